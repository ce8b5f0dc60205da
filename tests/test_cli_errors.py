"""A user's mistake stops `fedpriv simulate` before training, with one message and no traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from simulation.cli.main import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def csv(tmp_path, body, name="data.csv"):
    path = tmp_path / name
    path.write_text(body)
    return path


def small_federation(tmp_path, per_department=40):
    rows = "".join(f"request {i} about {dept},{label},{dept}\n"
                   for dept in ("it", "hr", "finance") for label in ("a", "b") for i in range(per_department // 2))
    return csv(tmp_path, "text,label,department\n" + rows)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--epsilon", "0"], "target-epsilon must be > 0 (got 0.0)"),
        (["--epsilon", "-1", "--rounds", "0"], "num-server-rounds must be >= 1"),
        (["--delta", "0.1"], "delta=0.1 must be below 1/records"),
        (["--model", "/no/such/model"], "--model /no/such/model: not 'minilm', 'tiny' or an existing model folder"),
        (["--partition", "shuffle"], "--partition must be one of column, domain, dirichlet, iid"),
        (["--partition", "domain"], "--partition domain needs the CLINC150 folder"),
        (["--accountant", "moments"], "accountant must be one of"),
        (["--budget", "it=0"], "site policy of department it: - epsilon: the budget must be > 0 (got 0.0)"),
        (["--budget", "it"], "--budget 'it': expected NAME=EPSILON"),
        (["--budget", "sales=3"], "name a department 'sales' that this partition does not have"),
        (["--policy", "it:min-departments=x"], "--policy 'it:min-departments=x': 'x' is not a number or true/false"),
        (["--policy", "it:colour=red"], "unknown key 'colour'"),
        (["--policy", "hr:delta=0.5"], "delta: must be in (0, 1e-05]"),
        (["--label-scope", "it=a,zzz"], "department it: label-scope: 'zzz' not among the federation's labels"),
        (["--label-scope", "it=a"], "unknown label 'b' (not in department it's label-scope)"),
        (["--label-scope", "it"], "--label-scope 'it': expected NAME=LABEL[,LABEL...]"),
        (["--secagg-num-shares", "4"], "secagg-num-shares must be 0 (every department) or an odd number >= 3 (got 4)"),
        (["--max-length", "4"], "max-length must be in [8, 512] (got 4)"),
        (["--val-fraction", "0.7"], "val-fraction must be in (0, 0.5) (got 0.7)"),
        (["--lora-r", "4", "--lora-targets", ","], "lora-targets must name at least one module"),
    ],
)
def test_bad_options_fail_cleanly(tmp_path, args, expected):
    result = run("simulate", "--data", str(small_federation(tmp_path)), "--model", "tiny", "--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 1, result.output
    assert expected in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()  # a refused run writes nothing: no folder, no copies of the data


def test_a_model_folder_that_holds_no_model_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    result = run("simulate", "--data", str(small_federation(tmp_path)), "--model", str(tmp_path / "not-a-model"),
                 "--out", str(tmp_path / "run"))
    assert result.exit_code == 1, result.output
    assert "not-a-model" in result.output and not (tmp_path / "run").exists()


def test_bad_data_files_fail_cleanly(tmp_path):
    malformed = csv(tmp_path, "text,label\nhello,a,extra\n", "bad.csv")
    result = run("simulate", "--data", str(malformed), "--out", str(tmp_path / "r1"))
    assert result.exit_code == 1 and f"{malformed}:2" in result.output.replace("\n", "")

    no_label = csv(tmp_path, "text,intent\nhello,a\n", "nolabel.csv")
    result = run("simulate", "--data", str(no_label), "--out", str(tmp_path / "r2"))
    assert result.exit_code == 1 and "missing column(s) label" in result.output

    test_file = csv(tmp_path, "text,label\nsomething,zzz\n", "test.csv")
    result = run("simulate", "--data", str(small_federation(tmp_path)), "--test-data", str(test_file),
                 "--out", str(tmp_path / "r3"))
    assert result.exit_code == 1 and "unknown label 'zzz'" in result.output

    no_departments = csv(tmp_path, "text,label\nhello,a\nbye,b\n", "nodept.csv")
    result = run("simulate", "--data", str(no_departments), "--out", str(tmp_path / "r4"))
    assert result.exit_code == 1 and "no 'department' column" in " ".join(result.output.split())


def test_empty_department_and_reused_run_folder(tmp_path):
    data = small_federation(tmp_path, per_department=4)
    result = run("simulate", "--data", str(data), "--batch-size", "8", "--out", str(tmp_path / "r"))
    assert result.exit_code == 1
    for department in ("it", "hr", "finance"):
        assert f"department {department}:" in result.output
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.json").write_text("{}")
    result = run("simulate", "--model", "tiny", "--out", str(used))
    assert result.exit_code == 1 and "already holds files" in " ".join(result.output.split())


def test_admin_commands_on_folders_that_are_not_runs(tmp_path):
    for command in ("ledger", "audit", "report"):
        result = run(command, str(tmp_path))
        assert result.exit_code == 1 and "not a fedpriv run folder" in result.output, (command, result.output)
    result = run("simulate", "--resume", str(tmp_path))
    assert result.exit_code == 1 and "not a fedpriv run folder" in result.output


def test_predict_on_a_missing_model(tmp_path):
    result = run("predict", "--model", str(tmp_path), "hello")
    assert result.exit_code == 1 and "not an exported fedpriv model" in result.output


def test_version_and_the_labels_file_a_deployed_run_needs(tmp_path):
    result = run("--version")
    assert result.exit_code == 0 and result.output.startswith("fedpriv ")
    first = csv(tmp_path, "utterance,intent\nhi,greet\nbye,leave\n", "a.csv")
    second = csv(tmp_path, "utterance,intent\nrefund please,refund\nhello,greet\n", "b.csv")
    out = tmp_path / "labels.txt"
    result = run("labels", str(first), str(second), "--out", str(out), "--text-column", "utterance", "--label-column", "intent")
    assert result.exit_code == 0, result.output
    assert out.read_text() == "greet\nleave\nrefund\n"
    result = run("labels", str(first), "--out", str(tmp_path / "x.txt"))
    assert result.exit_code == 1 and "missing column(s) text, label" in result.output
    assert not (tmp_path / "x.txt").exists()


def test_simulate_reads_the_users_column_names_and_refuses_a_missing_one(tmp_path):
    data = csv(tmp_path, "body,tag,unit\n" + "".join(f"message {i},{'ab'[i % 2]},{('it', 'hr')[i % 2]}\n" for i in range(4)))
    result = run("simulate", "--data", str(data), "--model", "tiny", "--out", str(tmp_path / "r"),
                 "--text-column", "body", "--label-column", "tag", "--department-column", "unit")
    assert result.exit_code == 1 and "needs at least 4 for training" in " ".join(result.output.split())  # read, then refused
    result = run("simulate", "--data", str(data), "--model", "tiny", "--out", str(tmp_path / "r"),
                 "--text-column", "body", "--label-column", "tag")
    assert result.exit_code == 1 and "no 'department' column" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


TRAINING_OPTIONS = {"rounds", "head_init", "local_epochs", "batch_size", "learning_rate", "momentum", "statistics_share",
                    "max_grad_norm", "epsilon", "delta", "accountant", "model", "lora_r", "lora_layers", "test_data",
                    "lora_alpha", "lora_targets", "max_length", "fraction_train", "val_fraction", "ncm_logit_scale",
                    "stage_two_logit_scale", "server_momentum", "centering_share", "distributed_noise", "secagg_reconstruction_threshold",
                    "no_dp", "no_secagg", "secagg_num_shares", "min_departments", "out", "resume"}


def test_simulate_and_run_take_the_same_training_options():
    import typer

    commands = typer.main.get_command(app).commands
    for name in ("simulate", "run"):
        declared = {p.name for p in commands[name].params}
        assert TRAINING_OPTIONS <= declared, (name, sorted(TRAINING_OPTIONS - declared))


def test_a_deployed_run_refuses_department_settings_and_says_where_they_live(tmp_path):
    result = run("run", "--kit", str(tmp_path), "--budget", "finance=3")
    assert result.exit_code == 1 and "belong to each department" in " ".join(result.output.split())
    assert "department.toml" in result.output
