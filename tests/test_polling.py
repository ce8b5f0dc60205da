"""Deployed rounds wait less: the ServerApp and each department's SuperNode pull promptly, same contract."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from client.approved_code import UnapprovedCode
from client.department_supernode import install_prompt_pulls, prompt_pulls
from server.prompt_grid import PromptGrid


class ScriptedGrid:
    """A grid whose replies to pushed messages appear at the given pull (1-based), or never (None)."""

    def __init__(self, *, ready_at: dict[str, int | None]) -> None:
        self.ready_at = ready_at
        self.pulls = 0
        self.pushed: list[str] = []

    def push_messages(self, messages):
        self.pushed = [message.id for message in messages]
        return list(self.pushed)

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid))
                for mid, at in self.ready_at.items() if mid in wanted and at is not None and at <= self.pulls]

    def get_node_ids(self):
        return [11, 12]


def messages(*ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=mid) for mid in ids]


def test_the_server_collects_every_reply_as_soon_as_it_is_in_not_3_s_later():
    flower = ScriptedGrid(ready_at={"a": 1, "b": 4})
    grid = PromptGrid(flower, poll_interval_s=0.01)  # type: ignore[arg-type]
    started = time.monotonic()
    replies = grid.send_and_receive(messages("a", "b"), timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert flower.pulls == 4  # pulled until the last reply, not once more
    assert time.monotonic() - started < 1.0  # Flower's own grid would have slept 3 s three times
    assert list(grid.get_node_ids()) == [11, 12]  # everything else is the wrapped grid's


def test_the_server_stops_waiting_at_the_timeout_with_the_replies_it_has():
    flower = ScriptedGrid(ready_at={"a": 2, "b": None})
    grid = PromptGrid(flower, poll_interval_s=0.01)  # type: ignore[arg-type]
    started = time.monotonic()
    replies = grid.send_and_receive(messages("a", "b"), timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.2 <= time.monotonic() - started < 1.0


def test_a_department_pulls_again_until_a_message_arrives_and_passes_refusals_on():
    answers = iter([None, None, 7])
    calls = []

    def pull(*args, **kwargs):
        calls.append((args, kwargs))
        return next(answers)

    assert prompt_pulls(pull, active_s=0.001, idle_s=0.001)("state", get_fab="f") == 7
    assert calls == [(("state",), {"get_fab": "f"})] * 3

    def refusing(*args, **kwargs):
        raise UnapprovedCode("not approved")

    with pytest.raises(UnapprovedCode):  # the approval check still stops the SuperNode
        prompt_pulls(refusing, active_s=0.001, idle_s=0.001)()


def test_a_department_pulls_often_while_a_run_is_active_and_seldom_when_idle(monkeypatch):
    import client.department_supernode as supernode

    slept = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    answers = iter([None, 1, None, None, 2])
    pulling = prompt_pulls(lambda: next(answers), active_s=0.2, idle_s=2.0, window_s=60.0)
    assert pulling() == 1 and slept == [2.0]  # no message yet: idle
    assert pulling() == 2 and slept == [2.0, 0.2, 0.2]  # a message a moment ago: the next stage is due


def test_the_prompt_pull_is_what_flowers_supernode_loop_calls():
    from flwr.supernode import start_client_internal

    original = start_client_internal._pull_and_store_message
    try:
        install_prompt_pulls()
        assert start_client_internal._pull_and_store_message is not original
        assert start_client_internal._pull_and_store_message.__name__ == "pull_until_a_message"
    finally:
        start_client_internal._pull_and_store_message = original


def test_flower_processes_find_this_environments_commands_without_an_activated_environment(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from simulation.deploy.processes import environment

    monkeypatch.setenv("PATH", "/usr/bin")
    env = environment(tmp_path)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert (Path(env["PATH"].split(":")[0]) / "flower-superexec").exists()


class RunningForever:
    """A `flwr run --stream` that never exits on its own (it notices the end seconds after the ServerApp)."""

    def poll(self):
        return None


def test_fedpriv_run_returns_once_the_report_is_written_not_when_flwr_run_exits(tmp_path, monkeypatch):
    import os

    from server import run_folder
    from simulation.deploy import launcher

    seen = []
    (tmp_path / run_folder.REPORT_FILE).write_text("<html>an older attempt's report</html>")  # a resumed run's folder
    os.utime(tmp_path / run_folder.REPORT_FILE, ns=(1, 1))
    (tmp_path / run_folder.ROUNDS_FILE).write_text('{"round": 1}\n{"round": 2}\n')
    run_folder.write_status(tmp_path, state=run_folder.COMPLETED)  # final status: the export and report follow
    monkeypatch.setattr(launcher, "FINISH_GRACE_S", 0.5)
    started = time.monotonic()
    launcher._follow(tmp_path, RunningForever(), seen.append)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.5  # the old report does not count: it waited for a new one
    assert [r["round"] for r in seen] == [1, 2]

    (tmp_path / run_folder.REPORT_FILE).write_text("<html>this run's report</html>")  # written after the status
    monkeypatch.setattr(launcher, "FINISH_GRACE_S", 60.0)
    started = time.monotonic()
    launcher._follow(tmp_path, RunningForever(), lambda _: None)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
