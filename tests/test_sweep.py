"""Sweeps: the TOML file is checked before anything runs; cells are ordinary run directories; the
local executor and a local Ray cluster give identical cells; a second run skips finished cells; a
worker killed mid-cell costs only that cell's replay; a failing cell is a row, not the end; ROC.

Tiny models only (test:planted, induction-2l); where a kill has to land mid-cell, a set-up hook holds
the worker after a few decisions until the test has killed it (an event, not a timer).
"""
import contextlib
import functools
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from circuitsearch.cli import main
from circuitsearch.sweeps import InlineExecutor, LocalExecutor, SpecError, load_spec, parse_spec, run_sweep
from circuitsearch.sweeps.roc import auc
from circuitsearch.toys import PLANTED_EDGES, PLANTED_NODES

SPEC = """
[fixed]
level = "both"
n_prompts = 12
curves = false

[[cases]]
model = "test:planted"
task = "planted"

[[cases]]
model = "induction-2l"
task = "induction"

[[cases]]            # fails at run time: the planted model has no tokenizer for a text task
model = "test:planted"
task = "digits"

[axes]
order = ["reverse", "target"]
absolute = [0.5, 0.8]
"""
QUIET = dict(log=lambda *a: None)
TESTS = str(Path(__file__).parent)


HOLD = "CIRCUITSEARCH_TEST_HOLD"  # environment: the hold file and the cells it holds, for Ray's set-up hook


def hold_mid_cell(hold: str | None = None, cells: str = "*", after: int = 5):
    """Worker set-up hook: a cell whose directory name matches `cells` (a glob) waits after its `after`-th
    logged decision for as long as the file `hold` exists, so a kill lands mid-cell; the test removes the
    file once it has killed (see killing_a_worker). Without arguments, both come from $CIRCUITSEARCH_TEST_HOLD
    ("path|glob")."""
    import fnmatch

    from circuitsearch.runs import store

    if hold is None:
        hold, cells = os.environ[HOLD].split("|")
    record = store.DecisionLog.record

    def held(self, decision):
        record(self, decision)
        if self.n == after and fnmatch.fnmatch(self.out.name, cells):
            while os.path.exists(hold):
                time.sleep(0.01)

    store.DecisionLog.record = held


def spec_file(tmp_path, text=SPEC, name="sweep.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def cell_results(out: Path) -> dict:
    """Per cell: status, its circuit (nodes, edges, scores) and its decision log, for comparing sweeps."""
    data = json.loads((out / "sweep.json").read_text())
    res = {}
    for r in data["cells"]:
        d = out / "cells" / r["name"]
        circuit = json.loads((out / r["circuit"]).read_text()) if r.get("circuit") else None
        res[r["name"]] = (r["status"] if r["status"] != "skipped" else "done",
                          circuit and (circuit["nodes"], circuit["edges"], circuit["scores"]),
                          (d / "decisions.jsonl").read_text() if (d / "decisions.jsonl").exists() else None)
    return res


def finished(run_dir: Path) -> bool:
    """The run has written its circuit (a kill now would not land mid-cell)."""
    return (run_dir / "circuit.json").exists()


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    t0 = time.time()
    summary = run_sweep(load_spec(spec_file(tmp)), tmp / "out", LocalExecutor(workers=2), **QUIET)
    return tmp, tmp / "out", summary, time.time() - t0


# ---------------------------------------------------------------- the file, checked up front

def test_cells_are_the_cases_crossed_with_the_axes_with_stable_safe_names(tmp_path):
    spec = load_spec(spec_file(tmp_path))
    names = [c.name for c in spec.cells]
    assert len(names) == 3 * 2 * 2
    assert names[0] == "model=test-planted,task=planted,order=reverse,absolute=0.5"
    assert all("/" not in n and ":" not in n for n in names)
    assert names == [c.name for c in load_spec(spec_file(tmp_path)).cells]  # stable
    target = next(c for c in spec.cells if c.settings["order"] == "target" and c.settings["absolute"] == 0.8)
    assert target.kind == "target" and target.targets == [0.8]


@pytest.mark.parametrize("text, words", [
    ("[fixed]\nlevle = 'nodes'\n", ["[fixed]", "unknown key 'levle'", "did you mean 'level'"]),
    ("[axis]\norder = ['forward']\n", ["unknown key 'axis'", "did you mean 'axes'"]),
    ("[axes]\norder = 'forward'\n", ["order", "non-empty list"]),
    ("[fixed]\norder = 'forward'\n[axes]\norder = ['reverse']\n", ["order is both in [fixed] and in [axes]"]),
    ("[axes]\nabsolute = [0.8, 'high']\n", ["absolute = 'high'", "number in [0, 1] or \"off\""]),
    ("[fixed]\nmodel = 'test:planted'\ntask = 'planted'\n[axes]\norder = ['reverse', 'sideways']\n",
     ["cell order=sideways:", "unknown order 'sideways'", "choose forward"]),
    ("[fixed]\nmodel = 'test:planted'\ntask = 'planted'\n[axes]\nabsolute = [0.8, 1.5]\n", ["absolute=1.5"]),
    ("[fixed]\nmodel = 'test:planted'\ntask = 'planted'\ntarget = 0.9\n", ["order = \"target\""]),
    ("[fixed]\nmodel = 'nosuch'\n", ["unknown model 'nosuch'"]),
    ("[fixed\n", ["not valid TOML"]),
])
def test_bad_files_are_refused_before_anything_runs_naming_key_and_fix(tmp_path, text, words):
    with pytest.raises(SpecError) as e:
        load_spec(spec_file(tmp_path, text))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_the_command_line_checks_without_running(tmp_path, capsys):
    assert main(["sweep", str(spec_file(tmp_path)), "--check", "--out", str(tmp_path / "o")]) == 0
    assert "12 cells; settings checked" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
    assert main(["sweep", str(spec_file(tmp_path, "[axes]\nseed = [1, 1]\n")), "--check"]) == 2
    assert "seed lists a value twice" in capsys.readouterr().err


# ---------------------------------------------------------------- running, resuming, failing

def test_local_sweep_finds_the_known_circuits_and_reports_a_failing_cell(local_sweep):
    tmp, out, summary, seconds = local_sweep
    rows = {r["name"]: r for r in summary["cells"]}
    assert summary["counts"] == {"done": 8, "failed": 4}
    for name, r in rows.items():
        if "task=digits" in name:
            assert r["status"] == "failed" and "has no tokenizer" in r["error"]
            continue
        circuit = json.loads((out / r["circuit"]).read_text())
        if "task=planted" in name and r["settings"]["absolute"] == 0.8:  # both paths needed at 0.8
            assert sorted(circuit["nodes"]) == sorted(PLANTED_NODES) and sorted(circuit["edges"]) == sorted(PLANTED_EDGES)
        if "task=induction" in name:  # previous-token head and induction head, K-composition
            assert {"a0.2", "a1.1"} <= set(circuit["nodes"]) and "a0.2->a1.1.k" in circuit["edges"]
        assert r["faithfulness"] >= r["settings"]["absolute"] - 1e-6
        assert (out / "cells" / name / "checkpoint.json").exists()
    # each worker loaded each model once, however many cells it ran
    assert max(r["model_loads"] for r in rows.values() if r["status"] == "done") <= 2
    workers = {r["worker"] for r in rows.values()}
    assert len(workers) <= 2 and sum(r["status"] == "done" for r in rows.values()) > 2 * len(workers)
    report = (out / "report.md").read_text()
    assert "has no tokenizer" in report and "plots/sizes.png" in report
    for png in ("sizes.png", "frequency-test-planted-0.png", "jaccard-induction-2l.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png
    assert list((out / "plots").glob("upset-test-planted-0-0.8.png"))


def test_a_second_run_skips_finished_cells_and_retries_failed_ones(local_sweep, tmp_path, capsys):
    tmp, out, first, _ = local_sweep
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/decisions.jsonl")}
    cells = cell_results(out)
    assert sum(c[0] == "done" for c in cells.values()) == 8 and all(c[2] for c in cells.values() if c[0] == "done")
    assert main(["sweep", str(spec_file(tmp)), "--out", str(out), "--workers", "0"]) == 1  # cells failed
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["counts"] == {"skipped": 8, "failed": 4}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing re-run
    assert "8 finished before" in capsys.readouterr().out
    assert cell_results(out) == cells  # every cell's status, circuit, scores and decision log as they were
    assert len(summary["cells"]) == 12  # one row per cell, nothing double-counted


@contextlib.contextmanager
def killing_a_worker(out, cells: str, hold: Path):
    """While the block runs, SIGKILL the process running the first cell matching `cells` (a glob)
    once it has logged 5 decisions (its pid is in the cell's lock), then remove `hold` to let the
    workers held by hold_mid_cell go on. Watches until the block ends, however long the workers take
    to start on a loaded machine. Yields the killed cells' names."""
    killed, done = [], threading.Event()
    hold.write_text("")

    def killer():
        while not done.is_set() and not killed:
            for log in (out / "cells").glob(f"{cells}/decisions.jsonl"):
                lock = log.parent / ".lock"
                if len(log.read_text().splitlines()) >= 5 and lock.exists() and not finished(log.parent):
                    holder = json.loads(lock.read_text() or "{}")
                    if holder.get("pid") and "released" not in holder:
                        os.kill(holder["pid"], signal.SIGKILL)
                        killed.append(log.parent.name)
                        break
            time.sleep(0.01)
        hold.unlink()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join()


def test_a_killed_worker_costs_only_its_cells_replay(local_sweep, tmp_path):
    _, whole, _, _ = local_sweep
    text = SPEC.split("[[cases]]            #")[0] + "[axes]\norder = ['reverse']\nabsolute = [0.8]\n"
    out, hold = tmp_path / "out", tmp_path / "hold"
    with killing_a_worker(out, "*", hold) as killed:
        summary = run_sweep(load_spec(spec_file(tmp_path, text)), out,
                            LocalExecutor(workers=1, setup=functools.partial(hold_mid_cell, str(hold))), **QUIET)
    assert killed, "the kill never landed"
    rows = {r["name"]: r for r in summary["cells"]}
    assert summary["counts"] == {"done": 2} and len(rows) == 2 and summary["executor"]["pool_restarts"] == 1
    assert rows[killed[0]]["replayed"] >= 5  # the killed cell resumed from its log
    mine, ref = cell_results(out), cell_results(whole)
    for name in rows:  # identical circuits and decision logs to the undisturbed sweep
        assert mine[name] == ref[name], name


def test_workers_end_when_the_sweep_process_is_killed(tmp_path):
    """SIGKILL of the sweep process (nothing it can catch) leaves no worker running on, writing into
    its cell and holding the cell's run lock; the sweep run again finishes that cell from its log."""
    import multiprocessing

    text = SPEC.split("[[cases]]            #")[0] + "[axes]\norder = ['reverse']\nabsolute = [0.8]\n"
    spec, out, hold = spec_file(tmp_path, text), tmp_path / "out", tmp_path / "hold"
    hold.write_text("")  # the worker waits after its 3rd decision while this exists: it is mid-cell when killed
    # the sweep process: a fork of this one (its own process, killed for real, without a fresh interpreter's
    # imports); its worker is started by the executor as always
    parent = multiprocessing.get_context("fork").Process(target=run_sweep, args=(load_spec(spec), out, LocalExecutor(
        workers=1, setup=functools.partial(hold_mid_cell, str(hold), after=3))), kwargs=QUIET)
    parent.start()
    try:
        worker, deadline = None, time.time() + 300
        while worker is None and time.time() < deadline and parent.is_alive():
            for log in (out / "cells").glob("*/decisions.jsonl"):
                holder = json.loads((log.parent / ".lock").read_text() or "{}") if (log.parent / ".lock").exists() else {}
                if len(log.read_text().splitlines()) >= 3 and holder.get("pid") and "released" not in holder:
                    worker = holder["pid"]
            time.sleep(0.01)
        assert worker is not None and worker != parent.pid, "no worker was seen mid-cell"
        parent.kill()
        parent.join()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker kept running after its sweep process was killed")
    finally:
        hold.unlink()
        if parent.is_alive():
            parent.kill()
    # run again (in this process: resuming from the log is the executor's no part) it finishes from the log
    summary = run_sweep(load_spec(spec), out, InlineExecutor(), **QUIET)
    assert summary["counts"].get("failed", 0) == 0 and sum(r["replayed"] for r in summary["cells"]) >= 3


# ---------------------------------------------------------------- ROC against a known circuit

def test_auc_is_the_trapezoid_with_the_corners_added():
    assert auc([(0.0, 1.0)])[0] == 1.0
    assert auc([(0.5, 0.5)])[0] == pytest.approx(0.5)
    assert auc([(0.2, 0.6)])[0] == pytest.approx(0.2 * 0.3 + 0.8 * 0.8)


def test_roc_on_the_planted_and_induction_models(tmp_path):
    text = """
[fixed]
level = "both"
n_prompts = 12
curves = false
order = "reverse"
[axes]
absolute = [0.3, 0.6, 0.9]
"""
    for model, task, truth, node_auc, edge_auc in (
            ("test:planted", "planted", {"nodes": list(PLANTED_NODES), "edges": list(PLANTED_EDGES)}, 1.0, 1.0),
            ("induction-2l", "induction", {"nodes": ["a0.2", "a1.1"], "edges": ["a0.2->a1.1.k"]}, 1.0, 0.97)):
        spec = spec_file(tmp_path, text.replace("[fixed]", f"[fixed]\nmodel = '{model}'\ntask = '{task}'"), f"{task}.toml")
        (tmp_path / f"{task}.json").write_text(json.dumps(truth))
        summary = run_sweep(load_spec(spec), tmp_path / task, InlineExecutor(), truth=tmp_path / f"{task}.json",
                            **QUIET)
        curves = {c["kind"]: c for c in summary["roc"]["curves"] if c["cells"]}  # the threshold sweep
        assert curves["nodes"]["auc"] == pytest.approx(node_auc)
        assert curves["edges"]["auc"] >= edge_auc
        assert len(curves["nodes"]["cells"]) == 3
        ranked = {c["kind"]: c for c in summary["roc"]["curves"] if c["series"].startswith("eap-ig ranking")}
        assert ranked["nodes"]["auc"] == pytest.approx(1.0)  # the known nodes rank above all others
        assert ranked["edges"]["auc"] >= edge_auc
        assert all("truth" in r for r in summary["cells"])
        assert (tmp_path / task / "plots" / "roc.png").stat().st_size > 1000
    low = next(r for r in summary["cells"] if r["settings"]["absolute"] == 0.3)
    assert low["truth"]["nodes"]["tpr"] == 1.0 and low["truth"]["nodes"]["fpr"] == 0.0


def test_a_truth_naming_what_the_graph_lacks_is_refused(tmp_path, local_sweep):
    tmp, out, _, _ = local_sweep
    (tmp_path / "t.json").write_text(json.dumps({"nodes": ["a7.7"]}))
    spec = load_spec(spec_file(tmp_path, SPEC.split("[[cases]]            #")[0] + "[axes]\norder = ['reverse']\n"
                               "absolute = [0.8]\n", "one.toml"))
    name = spec.cells[0].name  # finished in the local sweep: copied, so this sweep only reads it
    shutil.copytree(out / "cells" / name, tmp_path / "o" / "cells" / name)
    with pytest.raises(ValueError, match="a7.7"):
        run_sweep(spec, tmp_path / "o", LocalExecutor(workers=1), truth=tmp_path / "t.json", **QUIET)
    with pytest.raises(ValueError, match="must hold \"nodes\""):
        (tmp_path / "t.json").write_text("[]")
        run_sweep(spec, tmp_path / "o", LocalExecutor(workers=1), truth=tmp_path / "t.json", **QUIET)


# ---------------------------------------------------------------- Ray: same cells, killed worker

def test_ray_gives_the_local_cells_and_survives_a_killed_worker(local_sweep, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'circuitsearch[ray]')")
    from circuitsearch.sweeps import RayExecutor

    tmp, local_out, _, _ = local_sweep
    out, hold = tmp_path / "ray", tmp_path / "hold"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
                                       HOLD: f"{hold}|*task=induction*"},
                          "worker_process_setup_hook": "test_sweep.hold_mid_cell"})
    try:
        with killing_a_worker(out, "*task=induction*", hold) as killed:
            summary = run_sweep(load_spec(spec_file(tmp)), out, RayExecutor(address=None), **QUIET)
        assert killed, "the kill never landed"
        assert summary["counts"] == {"done": 8, "failed": 4}
        assert next(r for r in summary["cells"] if r["name"] == killed[0])["replayed"] >= 5
        assert cell_results(out) == cell_results(local_out)
        # evaluate's cross-task matrix on the same cluster: the in-process scores
        from circuitsearch.evaluation import cross_task
        planted = sorted(p for p in (out / "cells").glob("*task=planted*order=reverse*") if finished(p))
        one = cross_task(planted, log=lambda *a: None)
        from circuitsearch.sweeps.crosstask import columns_on
        on_ray = cross_task(planted, columns=columns_on(RayExecutor(address=None), tmp_path / "cols"), **QUIET)
        assert len(planted) == 2 and on_ray.to_json() == one.to_json()
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- sizing and the study the issue asks for

def test_workers_are_sized_to_cores_memory_and_cells():
    from circuitsearch.sweeps.executors import GIB, plan_workers

    toy = load_spec_text("[fixed]\nmodel = 'test:planted'\ntask = 'planted'\n[axes]\nseed = [1, 2, 3]\n").cells
    big = load_spec_text("[fixed]\nmodel = 'smollm2-135m'\n[axes]\nseed = [1, 2, 3, 4]\n").cells
    assert (plan_workers(toy, cores=8, memory=64 * GIB).workers, plan_workers(toy, cores=8, memory=64 * GIB).threads) == (3, 2)
    assert plan_workers(toy, cores=2, memory=64 * GIB).workers == 2
    assert (plan_workers(big, cores=8, memory=7 * GIB).workers, plan_workers(big, cores=8, memory=7 * GIB).threads) == (2, 4)
    assert plan_workers(big, cores=8, memory=1 * GIB).workers == 1  # never below one


def load_spec_text(text):
    from circuitsearch.sweeps.spec import _toml
    return parse_spec(_toml().loads(text))


def test_the_default_search_study_is_expressible_with_target_cells():
    spec = load_spec(Path(__file__).parent.parent / "benchmarks" / "sweeps" / "default_search.toml")
    kinds = {c.name: c.kind for c in spec.cells}
    assert len(kinds) == 8 * 4 and sum(k == "target" for k in kinds.values()) == 8
    cell = spec.cells[3]
    assert cell.name == "task=digits,order=target" and cell.targets == [0.8]


# ---------------------------------------------------------------- compare-orders on the executors

def test_compare_orders_on_local_workers_equals_the_one_process_comparison(tmp_path, capsys):
    args = ["compare-orders", "--model", "induction-2l", "--task", "induction", "--n-prompts", "12", "--level",
            "both", "--orders", "forward,reverse,random:1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "pool"), "--workers", "2"]) == 0
    one, pool = (json.loads((tmp_path / d / "comparison.json").read_text()) for d in ("one", "pool"))
    for key in ("orders", "kept_by", "jaccard", "intersection", "union", "order_dependent"):
        strip = lambda x: {k: v for k, v in x.items() if k not in ("seconds", "forward_passes")} \
            if isinstance(x, dict) else x
        assert strip(one[key]) == strip(pool[key]), key
    for order in ("forward", "reverse", "random-1"):
        assert (tmp_path / "one" / order / "decisions.jsonl").read_text() == \
            (tmp_path / "pool" / order / "decisions.jsonl").read_text()
    assert (tmp_path / "pool" / "task.json").read_text() == (tmp_path / "pool" / "forward" / "task.json").read_text()


def test_a_cell_started_under_the_old_default_order_is_finished_and_keeps_it(tmp_path):
    """A cell that names no order, whose run directory was written when the default was alternate, counts as
    finished with its saved order (not re-run as attribution); a new cell gets the default, attribution."""
    base = ('[fixed]\nlevel = "nodes"\nn_prompts = 12\ncurves = false\n{}\n'
            '[[cases]]\nmodel = "test:planted"\ntask = "planted"\n')
    old, new = load_spec_text(base.format('order = "alternate"')), load_spec_text(base.format(""))
    assert new.cells[0].name == old.cells[0].name  # a fixed order is not in the name: the same directory
    assert run_sweep(old, tmp_path, InlineExecutor(), **QUIET)["counts"] == {"done": 1}
    assert run_sweep(new, tmp_path, InlineExecutor(), **QUIET)["counts"] == {"skipped": 1}
    ck = json.loads((tmp_path / "cells" / new.cells[0].name / "checkpoint.json").read_text())
    assert ck["config"]["order"] == "alternate"
    assert run_sweep(new, tmp_path / "fresh", InlineExecutor(), **QUIET)["counts"] == {"done": 1}
    ck = json.loads((tmp_path / "fresh" / "cells" / new.cells[0].name / "checkpoint.json").read_text())
    assert ck["config"]["order"] == "attribution"


def test_a_worker_loads_all_the_cells_code_at_start():
    """Everything a cell imports lazily is loaded when a worker starts, so an edit to the tree under a running
    sweep cannot mix two versions of the code in one cell."""
    import subprocess
    import sys

    from circuitsearch.sweeps.executors import CELL_CODE

    code = ("import sys; from circuitsearch.sweeps.executors import load_cell_code; load_cell_code(); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('circuitsearch'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                 .stdout.split())
    assert set(CELL_CODE) <= loaded
    lazy = {"circuitsearch.algorithms.levels", "circuitsearch.tasks.slots", "circuitsearch.graphs.circuit",
            "circuitsearch.readout", "circuitsearch.metrics"}
    assert lazy <= loaded
