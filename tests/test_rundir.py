"""Run directories that never lie: locks, resume from any decision, damaged files, bad input before loading.

Small models throughout (the planted model: a prune is a second); faults are real where they can
be (kill -9 of a child process, a second process on the same directory) and injected where they
cannot (a full disk).
"""
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from circuitsearch.cli import main
from circuitsearch.runs import PruneConfig, RunDirError, run_prune, store
from circuitsearch.runs.store import RunLock
from circuitsearch.toys import PLANTED_NODES

QUIET = dict(progress=False, log=lambda *a: None)
PLANTED = ["--model", "test:planted", "--task", "planted", "--n-prompts", "12", "--quiet"]

FORK = multiprocessing.get_context("fork")


def _faulty_main(argv, kill_at, hold):
    """The command line, in the child: its decision log kills the process (SIGKILL, as `kill -9`
    would) after `kill_at` decisions, or, given a `hold` file, waits after each decision while that file
    exists (the test deletes it to let the run finish at full speed: an event, not a timer)."""
    record, n = store.DecisionLog.record, [0]

    def faulty(self, decision):
        record(self, decision)
        n[0] += 1
        if kill_at and n[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        while hold and os.path.exists(hold):
            time.sleep(0.01)

    store.DecisionLog.record = faulty
    sys.exit(main(argv))


def forked_main(argv, kill_at=0, hold=""):
    """A process of its own running _faulty_main, forked from this one: a real process, killed for real, that
    starts in milliseconds instead of the ~10 s a fresh interpreter spends importing torch and TransformerLens."""
    p = FORK.Process(target=_faulty_main, args=(list(argv), kill_at, str(hold)), daemon=True)
    p.start()
    return p


def child(out, kill_at=0, hold="", extra=()):
    """The planted prune into `out` in a forked child (forked_main)."""
    return forked_main(["prune", *PLANTED, *extra, "--out", str(out)], kill_at, hold)


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
    ks = [1, 2] + random.Random(0).sample(range(3, n), 2)  # 1 and 2: before any checkpoint
    children = {k: child(tmp_path / f"k{k}", kill_at=k) for k in ks}  # side by side: each one its own process
    for k, p in children.items():
        out = tmp_path / f"k{k}"
        p.join(120)
        assert p.exitcode == -signal.SIGKILL
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

@pytest.fixture(scope="module")
def killed_at_30(tmp_path_factory):
    """A run directory whose process was killed (SIGKILL) after its 30th decision; read-only, see _killed."""
    out = tmp_path_factory.mktemp("killed") / "k30"
    p = child(out, kill_at=30)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    assert len((out / "decisions.jsonl").read_text().splitlines()) == 30 and (out / "checkpoint.json").exists()
    assert not (out / "circuit.json").exists()
    return out


def _killed(killed_at_30, tmp_path, name):
    """A copy of the killed run directory for this test to damage (one kill serves every such test)."""
    out = tmp_path / name
    shutil.copytree(killed_at_30, out)
    return out


def test_truncated_checkpoint_is_rebuilt_from_the_log(whole, killed_at_30, tmp_path, capsys):
    out = _killed(killed_at_30, tmp_path, "ck")
    text = (out / "checkpoint.json").read_text()
    (out / "checkpoint.json").write_text(text[: len(text) // 2])
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0
    err = capsys.readouterr().out
    assert "checkpoint.json is damaged" in err and "replayed under the settings given now" in err
    same_run(whole, out)
    assert "checkpoint.json is damaged" in (out / "report.md").read_text()
    assert json.loads((out / "checkpoint.json").read_text())["status"] == "done"


def test_lost_checkpoint_and_other_settings_is_refused_by_the_log(killed_at_30, tmp_path, capsys):
    out = _killed(killed_at_30, tmp_path, "ck2")
    (out / "checkpoint.json").unlink()
    assert main(["prune", *PLANTED, "--order", "forward", "--out", str(out)]) == 2
    assert "does not belong to these settings" in capsys.readouterr().err


def test_garbage_in_the_middle_of_the_log_is_reported_and_recomputed(whole, killed_at_30, tmp_path, capsys):
    out = _killed(killed_at_30, tmp_path, "garbage")
    lines = (out / "decisions.jsonl").read_text().splitlines(keepends=True)
    lines[10] = "#@!garbage\n"
    (out / "decisions.jsonl").write_text("".join(lines))
    assert main(["prune", *PLANTED, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "decisions.jsonl is damaged at line 11" in said and "the 19 after it were dropped" in said
    same_run(whole, out)
    assert "damaged at line 11" in (out / "report.md").read_text()
    assert json.loads((out / "circuit.json").read_text())["stats"]["replayed"] == 10


def test_a_foreign_line_under_matching_settings_is_a_damaged_log(whole, killed_at_30, tmp_path, capsys):
    out = _killed(killed_at_30, tmp_path, "foreign")
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
    out, hold = tmp_path / "busy", tmp_path / "hold"
    hold.write_text("")  # the child waits after its first decision until this file goes
    p = child(out, hold=hold)
    try:
        deadline = time.time() + 60
        while not ((out / "decisions.jsonl").exists() and (out / "decisions.jsonl").read_text()):
            assert time.time() < deadline and p.is_alive(), p.exitcode
            time.sleep(0.02)
        assert main(["prune", *PLANTED, "--out", str(out)]) == 2
        assert f"is in use by pid {p.pid}" in capsys.readouterr().err
    finally:
        hold.unlink()
        p.join(300)
    assert p.exitcode == 0
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

# One fresh interpreter runs every command line below in turn (its own output captured per command) and
# says, after each, whether a model library was imported: one start of Python for all of them, not one each.
# A command that loads a model fails its own case and every later one (the library stays imported).
NO_LOAD = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    from circuitsearch.cli import main
    said = {}
    for key, argv in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException:
                code = None
                traceback.print_exc()
        said[key] = {"code": code, "stderr": err.getvalue(), "loaded": "transformer_lens" in sys.modules}
    print(json.dumps(said))
""")

BAD_FLAGS = [
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
]
BAD_TASKS = [
    (b"5\n", "1: a line must be a JSON object"),
    (b'{"clean": "a b", "corrupted": "c d", "answer": 7, "wrong_answer": "x"}\n', "1: field 'answer' must be a"),
    (b'{"clean": "a", "corrupted": "b", "answer": "c", "wrong_answer": "d"}\n\xff\xfe\n', "2: not UTF-8 text"),
    (b'{"clean": "a"}\n', "missing corrupted, answer, wrong_answer"),
    (b"\n\n", "holds no prompts"),
]


@pytest.fixture(scope="module")
def no_load(tmp_path_factory):
    """Every bad command line of this section, run in one child process: key -> (its out dir, what it said)."""
    base = tmp_path_factory.mktemp("noload")
    runs = {"compare": ["compare-orders", "--orders", "alternate,attribution", "--metric", "accuracy",
                        "--out", str(base / "compare" / "o")]}
    for i, (args, _) in enumerate(BAD_FLAGS):  # the default model is the 135M one
        runs[f"flags{i}"] = ["prune", *args, "--out", str(base / f"flags{i}" / "o")]
    for i, (content, _) in enumerate(BAD_TASKS):
        (base / f"task{i}").mkdir()
        (base / f"task{i}" / "task.jsonl").write_bytes(content)
        runs[f"task{i}"] = ["prune", "--task", str(base / f"task{i}" / "task.jsonl"),
                            "--out", str(base / f"task{i}" / "o")]
    r = subprocess.run([sys.executable, "-c", NO_LOAD, json.dumps(runs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    said = json.loads(r.stdout.strip().splitlines()[-1])
    return {key: (base / key / "o", said[key]) for key in runs}


def refused_before_loading(case):
    out, said = case
    assert said["code"] == 2, said["stderr"]
    assert not said["loaded"], "a model was loaded"
    assert "Traceback" not in said["stderr"]
    return said["stderr"]


@pytest.mark.parametrize("i", range(len(BAD_FLAGS)), ids=[m for _, m in BAD_FLAGS])
def test_bad_flags_fail_before_the_default_model_loads(i, no_load):
    assert BAD_FLAGS[i][1] in refused_before_loading(no_load[f"flags{i}"])
    assert not no_load[f"flags{i}"][0].exists()


def test_compare_orders_with_attribution_and_accuracy_fails_before_loading(no_load):
    assert "the accuracy metric has none" in refused_before_loading(no_load["compare"])
    assert not no_load["compare"][0].exists()


@pytest.mark.parametrize("i", range(len(BAD_TASKS)), ids=[m for _, m in BAD_TASKS])
def test_bad_task_files_are_named_by_file_and_line(i, no_load):
    assert BAD_TASKS[i][1] in refused_before_loading(no_load[f"task{i}"])


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
