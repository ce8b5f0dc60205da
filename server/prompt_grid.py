"""The ServerApp's grid, pulling the departments' replies every 0.1 s instead of every 3 s.

In deployment Flower's grid (``flwr.superlink.grid.http_grid``, flwr 1.42) pushes a round's
messages and then sleeps a hard-coded 3 s between pulls of the replies. A deployed SecAgg+ round
is four such exchanges, so the server alone added up to 12 s (about 6 s on average) of waiting
to every round. ``PromptGrid`` is the same grid with the same push and pull calls, only the wait
between pulls shorter: one small request to the SuperLink every ``poll_interval_s`` while a stage
is outstanding, from the one ServerApp. In simulation Flower's in-memory grid already polls every
0.1 s; wrapping it changes nothing there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.server import Grid
from flwr.supercore.run import Run

POLL_INTERVAL_S = 0.1


class PromptGrid(Grid):
    """``grid`` with ``send_and_receive`` pulling every ``poll_interval_s``; everything else is ``grid``'s own."""

    def __init__(self, grid: Grid, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self._grid = grid
        self.poll_interval_s = poll_interval_s

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract: push, then pull until every reply is in or ``timeout`` seconds have passed."""
        outstanding = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < end:
            pulled = list(self.pull_messages(outstanding))
            replies.extend(pulled)
            outstanding.difference_update(message.metadata.reply_to_message_id for message in pulled)
            if not outstanding:
                break
            time.sleep(self.poll_interval_s)
        return replies
