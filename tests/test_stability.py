"""Prompt stability: bootstrap prunes on the induction model keep its heads in every resample, scores on held-out
prompts are the evaluator's own, the directory resumes (and grows), other settings are refused, local worker
processes give the in-process cells, and bad input is an error naming the fix."""
import json
import shutil

import pytest

from circuitsearch.catalogue import load_model
from circuitsearch.cli import main
from circuitsearch.config import PruneConfig
from circuitsearch.graphs.export import load_circuit
from circuitsearch.patching import Evaluator
from circuitsearch.sweeps import InlineExecutor, LocalExecutor
from circuitsearch.sweeps.stability import bootstrap_indices, run_stability
from circuitsearch.tasks.base import Task
from circuitsearch.toys import PLANTED_NODES

QUIET = dict(log=lambda *a: None)
INDUCTION = PruneConfig(model="induction-2l", task="induction", n_prompts=16)
HEADS = ("a0.2", "a1.1")  # previous-token head and induction head (tests/test_induction_circuit.py, README)
B = 4


def task_of(path) -> Task:
    return Task.from_json(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def induction(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability") / "induction"
    return out, run_stability(INDUCTION, out, B, InlineExecutor(), **QUIET)


def test_the_induction_heads_are_kept_in_every_resample(induction):
    out, s = induction
    assert [r["name"] for r in s["circuits"]] == ["full"] + [f"boot-{i}" for i in range(1, B + 1)]
    for head in HEADS:
        assert s["nodes"][head] == {"frequency": 1.0, "in_full": True}
        for name in ["full"] + [f"boot-{i}" for i in range(1, B + 1)]:
            assert head in load_circuit(out / "sweep" / "cells" / name / "circuit.json").nodes
    assert set(HEADS) <= set(s["kept_in_every_resample"]["nodes"])
    assert all(r["heldout_faithfulness"] > 0.8 for r in s["circuits"])  # the circuits generalise
    assert s["split"] == {"pool": 32, "train": 16, "heldout": 16, "heldout_seen_in_train": 0}


def test_resamples_are_bootstrap_draws_of_the_training_prompts(induction):
    out, s = induction
    train = task_of(out / "tasks" / "train.json")
    assert task_of(out / "sweep" / "cells" / "full" / "task.json").clean.tolist() == train.clean.tolist()
    held = task_of(out / "tasks" / "heldout.json").clean.tolist()
    distinct = []
    for i in range(1, B + 1):
        t = task_of(out / "sweep" / "cells" / f"boot-{i}" / "task.json")  # what the cell pruned on
        idx = bootstrap_indices(len(train), i, INDUCTION.seed)
        assert t.meta["resample"] == {"kind": "bootstrap", "draw": i, "prompts": idx}
        assert t.clean.tolist() == train.clean[idx].tolist()
        assert not any(row in held for row in t.clean.tolist())  # held-out prompts are never pruned on
        distinct.append(len(set(idx)))
    assert [r["distinct"] for r in s["circuits"][1:]] == distinct and max(distinct) < len(train)  # draws repeat
    assert len({tuple(bootstrap_indices(len(train), i, 0)) for i in range(1, B + 1)}) == B


def test_jaccard_and_held_out_scores_are_recomputed_independently(induction):
    out, s = induction
    model = load_model("induction-2l")
    ev = Evaluator(model, task_of(out / "tasks" / "heldout.json"), "mean")
    full = load_circuit(out / "sweep" / "cells" / "full" / "circuit.json")
    fn, fe = set(full.heads() + full.mlps()), set(full.edges)
    for r in s["circuits"]:
        c = load_circuit(out / "sweep" / "cells" / r["name"] / "circuit.json")
        n, e = set(c.heads() + c.mlps()), set(c.edges)
        assert r["jaccard_nodes"] == pytest.approx(len(n & fn) / len(n | fn))
        assert r["jaccard_edges"] == pytest.approx(len(e & fe) / len(e | fe))
        assert r["heldout_faithfulness"] == pytest.approx(ev.score_circuit(c)["faithfulness"], abs=1e-5)
        assert r["faithfulness"] == c.scores["faithfulness"]


def test_reports_hold_the_table_and_the_full_run_gets_a_section(induction):
    out, s = induction
    report = (out / "report.md").read_text()
    assert "## Stability over resampled prompts" in report and "[boot-4](sweep/cells/boot-4/report.md)" in report
    full = (out / "sweep" / "cells" / "full" / "report.md").read_text()
    assert full.count("<!-- circuitsearch:stability -->") == 1 and "[boot-1](../boot-1/report.md)" in full
    assert (out / "plots" / "frequency.png").exists()
    assert json.loads((out / "stability.json").read_text())["circuits"] == s["circuits"]


def test_a_second_run_skips_every_prune_and_a_larger_bootstrap_adds_resamples(induction, tmp_path):
    out, s = induction
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = run_stability(INDUCTION, copy, B, InlineExecutor(), **QUIET)
    assert again["sweep"]["counts"] == {"skipped": B + 1}
    assert again["circuits"] == s["circuits"]
    more = run_stability(INDUCTION, copy, B + 1, InlineExecutor(), **QUIET)
    assert more["sweep"]["counts"] == {"skipped": B + 1, "done": 1}
    assert more["circuits"][:B + 1] == s["circuits"] and more["bootstrap"] == B + 1


def test_a_directory_of_other_settings_is_refused_naming_them(induction, tmp_path):
    out, _ = induction
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    other = PruneConfig(model="induction-2l", task="induction", n_prompts=16, absolute=0.9)
    with pytest.raises(ValueError, match=r"absolute: 0\.8 there, 0\.9 now.*choose another --out"):
        run_stability(other, copy, B, InlineExecutor(), **QUIET)
    with pytest.raises(ValueError, match="not empty and holds no stability run"):
        run_stability(INDUCTION, out / "sweep" / "cells" / "full", B, InlineExecutor(), **QUIET)


def test_local_worker_processes_give_the_in_process_circuits(induction, tmp_path):
    out, s = induction
    local = run_stability(INDUCTION, tmp_path / "local", 2, LocalExecutor(workers=2), **QUIET)
    assert local["sweep"]["executor"]["executor"] == "local"
    assert local["circuits"] == s["circuits"][:3]
    for name in ("full", "boot-1", "boot-2"):
        a = (out / "sweep" / "cells" / name / "decisions.jsonl").read_text()
        assert (tmp_path / "local" / "sweep" / "cells" / name / "decisions.jsonl").read_text() == a


def test_seed_resamples_make_the_planted_task_anew_and_find_the_planted_circuit(tmp_path):
    cfg = PruneConfig(model="test:planted", task="planted", n_prompts=12, level="nodes")
    s = run_stability(cfg, tmp_path / "seeds", 2, InlineExecutor(), resample="seeds", holdout=6, **QUIET)
    assert [r["name"] for r in s["circuits"]] == ["full", "seed-1", "seed-2"]
    train = task_of(tmp_path / "seeds" / "tasks" / "train.json")
    for i in (1, 2):
        cell = tmp_path / "seeds" / "sweep" / "cells" / f"seed-{i}"
        assert json.loads((cell / "checkpoint.json").read_text())["config"]["seed"] == i
        assert task_of(cell / "task.json").clean.tolist() != train.clean.tolist()
    assert set(s["kept_in_every_resample"]["nodes"]) == set(PLANTED_NODES) - {"embed", "logits"}
    assert s["split"]["heldout"] == 6 and all(r["jaccard_nodes"] == 1.0 for r in s["circuits"])


@pytest.mark.parametrize("args,words", [
    (["--bootstrap", "0"], ["--bootstrap 0", "at least 1"]),
    (["--holdout", "0"], ["--holdout 0", "at least 1"]),
    (["--resample", "seeds", "--task", "{task}"], ["task file", "--resample bootstrap"]),
    (["--n-prompts", "1", "--holdout", "1"], ["leaves 1 to prune on", "--holdout"]),
])
def test_bad_input_is_an_error_naming_the_fix(tmp_path, capsys, args, words):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"clean": [1, 2], "corrupted": [2, 1], "answer": 3, "wrong_answer": 4}) + "\n")
    args = [a.replace("{task}", str(task)) for a in args]
    base = ["stability", "--model", "induction-2l", "--workers", "0", "--out", str(tmp_path / "out")]
    if "--task" not in args:
        base += ["--task", "induction"]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
