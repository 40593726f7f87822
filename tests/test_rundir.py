"""Run directories that never lie: locks, resume from any decision, damaged files, bad input before loading.

Small models throughout (the planted model: a prune is a second); faults are real where they can
be (kill -9 of a child process, a second process on the same directory) and injected where they
cannot (a full disk).
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from circuitsearch.cli import main
from circuitsearch.runs import PruneConfig, RunDirError, run_prune
from circuitsearch.runs.store import RunLock
from circuitsearch.toys import PLANTED_NODES

QUIET = dict(progress=False, log=lambda *a: None)
PLANTED = ["--model", "test:planted", "--task", "planted", "--n-prompts", "12", "--quiet"]

# Runs the command line in a child process whose decision log kills the process (SIGKILL, as
# `kill -9` would) after K decisions, or sleeps after each one (SLEEP seconds) to keep it running.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from circuitsearch.runs import store
    kill_at, sleep = int(sys.argv[1]), float(sys.argv[2])
    record, n = store.DecisionLog.record, [0]
    def faulty(self, decision):
        record(self, decision)
        n[0] += 1
        if kill_at and n[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(sleep)
    store.DecisionLog.record = faulty
    from circuitsearch.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def child(out, kill_at=0, sleep=0.0, extra=(), **kw):
    args = [sys.executable, "-c", CHILD, str(kill_at), str(sleep), "prune", *PLANTED, *extra, "--out", str(out)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def same_run(a, b):
    """Two run directories hold the same circuit and the same decision log."""
    ca, cb = (json.loads((d / "circuit.json").read_text()) for d in (a, b))
    assert (ca["nodes"], ca["edges"], ca["scores"]) == (cb["nodes"], cb["edges"], cb["scores"])
    assert (a / "decisions.jsonl").read_text() == (b / "decisions.jsonl").read_text()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------- killed runs resume

def test_kill_9_at_random_decision_counts_resumes_to_the_identical_circuit(whole, tmp_path, capsys):
    n = len((whole / "decisions.jsonl").read_text().splitlines())
    for k in [1, 2] + random.Random(0).sample(range(3, n), 2):  # 1 and 2: before any checkpoint
        out = tmp_path / f"k{k}"
        p = child(out, kill_at=k)
        p.communicate(timeout=120)
        assert p.returncode == -signal.SIGKILL
        assert len((out / "decisions.jsonl").read_text().splitlines()) == k
        assert not (out / "circuit.json").exists()
        assert main(["prune", *PLANTED, "--out", str(out)]) == 0
        same_run(whole, out)
        assert json.loads((out / "circuit.json").read_text())["stats"]["replayed"] == k


def test_a_failed_start_leaves_nothing_that_blocks_the_next(tmp_path, capsys):
    out = tmp_path / "latest"
    # fails after its settings are written: the planted model has no tokenizer for the text task 'digits'
    assert main(["prune", "--model", "test:planted", "--task", "digits", "--quiet", "--out", str(out)]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert json.loads((out / "checkpoint.json").read_text())["status"] == "starting"
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0  # other settings: nothing of value was there
    assert sorted(json.loads((out / "circuit.json").read_text())["nodes"]) == sorted(PLANTED_NODES)


# ---------------------------------------------------------------- damaged files

def _killed(tmp_path, name, k=20):
    out = tmp_path / name
    p = child(out, kill_at=k)
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    return out


def test_truncated_checkpoint_is_rebuilt_from_the_log(whole, tmp_path, capsys):
    out = _killed(tmp_path, "ck")
    text = (out / "checkpoint.json").read_text()
    (out / "checkpoint.json").write_text(text[: len(text) // 2])
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0
    err = capsys.readouterr().out
    assert "checkpoint.json is damaged" in err and "replayed under the settings given now" in err
    same_run(whole, out)
    assert "checkpoint.json is damaged" in (out / "report.md").read_text()
    assert json.loads((out / "checkpoint.json").read_text())["status"] == "done"


def test_lost_checkpoint_and_other_settings_is_refused_by_the_log(tmp_path, capsys):
    out = _killed(tmp_path, "ck2")
    (out / "checkpoint.json").unlink()
    assert main(["prune", *PLANTED, "--order", "forward", "--out", str(out)]) == 2
    assert "does not belong to these settings" in capsys.readouterr().err


def test_garbage_in_the_middle_of_the_log_is_reported_and_recomputed(whole, tmp_path, capsys):
    out = _killed(tmp_path, "garbage", k=30)
    lines = (out / "decisions.jsonl").read_text().splitlines(keepends=True)
    lines[10] = "#@!garbage\n"
    (out / "decisions.jsonl").write_text("".join(lines))
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "decisions.jsonl is damaged at line 11" in said and "the 19 after it were dropped" in said
    same_run(whole, out)
    assert "damaged at line 11" in (out / "report.md").read_text()
    assert json.loads((out / "circuit.json").read_text())["stats"]["replayed"] == 10


def test_a_foreign_line_under_matching_settings_is_a_damaged_log(whole, tmp_path, capsys):
    out = _killed(tmp_path, "foreign", k=30)
    lines = (out / "decisions.jsonl").read_text().splitlines(keepends=True)
    d = json.loads(lines[12])
    d["candidate"] = "a1.0" if d["candidate"] != "a1.0" else "a0.0"  # valid JSON, a decision, but not this run's
    lines[12] = json.dumps(d) + "\n"
    (out / "decisions.jsonl").write_text("".join(lines))
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "damaged at line 13" in said and "with the same settings" in said and "other settings" not in said
    same_run(whole, out)


# ---------------------------------------------------------------- two runs, one directory

def test_second_run_on_a_live_directory_is_refused_with_the_pid(tmp_path, capsys):
    out = tmp_path / "busy"
    p = child(out, sleep=0.05)
    try:
        deadline = time.time() + 60
        while not ((out / "decisions.jsonl").exists() and (out / "decisions.jsonl").read_text()):
            assert time.time() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.05)
        assert main(["prune", *PLANTED, "--out", str(out)]) == 2
        assert f"is in use by pid {p.pid}" in capsys.readouterr().err
    finally:
        _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    data = json.loads((out / "circuit.json").read_text())
    assert len((out / "decisions.jsonl").read_text().splitlines()) == data["stats"]["decisions"]
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0  # released on exit


def test_a_dead_holders_lock_is_stale(tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=12), out, curves=False, **QUIET)
    assert (out / "circuit.json").exists()


def test_the_lock_is_held_while_running_and_released_after(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        run_prune(PruneConfig(model="test:planted", task="planted"), tmp_path, **QUIET)
    lock.release()
    with RunLock(tmp_path):
        pass


def test_a_directory_of_the_old_default_order_resumes_on_the_command_line_without_order(tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["prune", *PLANTED, "--order", "alternate", "--out", str(out)]) == 0
    first = json.loads((out / "circuit.json").read_text())
    capsys.readouterr()
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0  # the command of the old default, unchanged
    printed = capsys.readouterr().out
    assert "note: order alternate: the order this run directory was started with" in printed
    assert "(order alternate)" in printed
    again = json.loads((out / "circuit.json").read_text())
    assert again["method"]["order"] == "alternate" and again["stats"]["replayed"] == first["stats"]["decisions"]
    assert (again["nodes"].keys(), again["edges"].keys()) == (first["nodes"].keys(), first["edges"].keys())


# ---------------------------------------------------------------- bad input, before any model loads

NO_LOAD = ("import sys; from circuitsearch.cli import main; code = main(sys.argv[1:]); "
           "assert 'transformer_lens' not in sys.modules, 'a model was loaded'; sys.exit(code)")


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", NO_LOAD, *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--n-prompts", "0"], "--n-prompts 0 must be a whole number of at least 1"),
    (["--n-prompts", "-3"], "--n-prompts -3 must be"),
    (["--max-passes", "0"], "--max-passes 0 must be"),
    (["--steps", "0"], "--steps 0 must be"),
    (["--task", "missing.jsonl"], "task file 'missing.jsonl' does not exist"),
    (["--task", "no-such-task"], "unknown task 'no-such-task'"),
    (["--target", ""], "target '' is not a number"),
    (["--order", "file:missing.txt"], "order file 'missing.txt' does not exist"),
    (["--model", "bogus"], "unknown model 'bogus'"),
    (["--order", "attribution", "--metric", "accuracy"],
     "the accuracy metric has none: leave --order out (the default for accuracy is alternate)"),
    (["--target", "0.8", "--metric", "accuracy"], "the target search ranks candidates by attribution gradients"),
    (["--level", "nodes,edges,positions"], "nodes,positions,edges in that order"),
])
def test_bad_flags_fail_before_the_default_model_loads(args, message, tmp_path):
    r = run_cli("prune", *args, "--out", str(tmp_path / "o"))  # the default model is the 135M one
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_compare_orders_with_attribution_and_accuracy_fails_before_loading(tmp_path):
    r = run_cli("compare-orders", "--orders", "alternate,attribution", "--metric", "accuracy",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "the accuracy metric has none" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, message", [
    (b"5\n", "1: a line must be a JSON object"),
    (b'{"clean": "a b", "corrupted": "c d", "answer": 7, "wrong_answer": "x"}\n', "1: field 'answer' must be a"),
    (b'{"clean": "a", "corrupted": "b", "answer": "c", "wrong_answer": "d"}\n\xff\xfe\n', "2: not UTF-8 text"),
    (b'{"clean": "a"}\n', "missing corrupted, answer, wrong_answer"),
    (b"\n\n", "holds no prompts"),
])
def test_bad_task_files_are_named_by_file_and_line(content, message, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(content)
    r = run_cli("prune", "--task", str(path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_order_file_with_unknown_names_is_refused(tmp_path, capsys):
    order = tmp_path / "order.txt"
    order.write_text("a1.2\na9.9\nm0\nbanana\n")
    assert main(["prune", *PLANTED, "--order", f"file:{order}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "names 2 node(s) or edge(s) this model's graph does not have: a9.9, banana" in err


def test_order_file_tries_what_it_leaves_out_after_the_listed_ones(whole, tmp_path):
    order = tmp_path / "order.txt"
    order.write_text("# the planted heads first\na1.2\na0.1\n")
    out = tmp_path / "o"
    assert main(["prune", *PLANTED, "--level", "nodes", "--order", f"file:{order}", "--out", str(out)]) == 0
    first = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    first = [d["candidate"] for d in first if d["pass"] == 0]
    data = json.loads((out / "circuit.json").read_text())
    every = [json.loads(x) for x in (whole / "decisions.jsonl").read_text().splitlines()]
    n_senders = sum(1 for d in every if d["phase"] == "nodes" and d["pass"] == 0)
    assert first[:2] == ["a1.2", "a0.1"] and len(first) == len(set(first)) == n_senders
    assert sorted(data["nodes"]) == sorted(PLANTED_NODES)


@pytest.mark.parametrize("where, message", [("file", "is a file, not a directory"),
                                            ("under-file", "Not a directory"),
                                            ("sys", "cannot create or write the run directory")])
def test_unusable_out_is_a_one_line_error(where, message, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    out = {"file": f, "under-file": f / "run", "sys": "/sys/circuitsearch-test-run"}[where]
    if where == "sys":
        try:
            os.mkdir(out)
        except OSError:
            pass
        else:
            os.rmdir(out)
            pytest.skip("/sys is writable here: no read-only location to try")
    assert main(["prune", *PLANTED, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_while_drawing_extras_keeps_the_result(tmp_path, monkeypatch, capsys):
    from circuitsearch.algorithms import curves

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(curves, "plot_curves", full)
    out = tmp_path / "full"
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0
    assert "faithfulness curves not written (No space left on device)" in capsys.readouterr().out
    assert sorted(json.loads((out / "circuit.json").read_text())["nodes"]) == sorted(PLANTED_NODES)
    assert "a1.2" in (out / "report.md").read_text()
    assert json.loads((out / "checkpoint.json").read_text())["status"] == "done"


def test_faithfulness_above_one_is_explained(whole):
    from circuitsearch.graphs.export import load_circuit
    from circuitsearch.runs.reports import prune_report

    c = load_circuit(whole / "circuit.json")
    assert "Faithfulness above 1" not in prune_report(c, None)
    c.scores["faithfulness"] = 1.231  # as seen on the induction model
    assert "Faithfulness above 1: the circuit scores higher than the full model" in prune_report(c, None)


def test_a_task_too_large_for_memory_is_refused_before_it_runs(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from circuitsearch import config

    smollm2 = SimpleNamespace(name="smollm2-135m", n_layers=30, n_heads=9, d_model=576)
    big = type("T", (), {"__len__": lambda self: 5000, "seq_len": 20})()
    monkeypatch.setattr(config, "available_memory", lambda: 24 * 2 ** 30)
    with pytest.raises(ValueError, match="5000 prompts x 20 tokens on smollm2-135m .* needs about .* GiB of memory "
                                         "and 24.0 GiB is available.*--no-memory-check"):
        config.check_fits(smollm2, big)
    config.check_fits(smollm2, big, force=True)  # forced: no error
    said = []
    small = type("T", (), {"__len__": lambda self: 24, "seq_len": 8})()
    config.check_fits(smollm2, small, said.append)
    assert said == []
    monkeypatch.setattr(config, "available_memory", lambda: int(1.5 * config.memory_needed(smollm2, small)))
    config.check_fits(smollm2, small, said.append)
    assert said and said[0].startswith("warning: 24 prompts x 8 tokens")
    # the command line refuses before the evaluator runs, and --no-memory-check overrides
    monkeypatch.setattr(config, "available_memory", lambda: 1000)
    assert main(["prune", *PLANTED, "--out", str(tmp_path / "o")]) == 2
    assert "--no-memory-check" in capsys.readouterr().err
    assert main(["prune", *PLANTED, "--no-memory-check", "--out", str(tmp_path / "o")]) == 0
