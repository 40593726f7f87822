"""Learned-mask search (algorithms/masks.py, `prune --search masks`): known circuits recovered, every circuit
verified and held to A and R, repair when the masks overshoot, a run directory that resumes after kill -9."""
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys

import pytest
import torch

from circuitsearch.algorithms.iterative import edge_candidates, find_circuit
from circuitsearch.algorithms.levels import level_of, phases
from circuitsearch.algorithms.mask_settings import MaskSettings
from circuitsearch.algorithms.masks import find_circuit_masks, relaxed_inputs
from circuitsearch.algorithms.search import Thresholds
from circuitsearch.cli import main
from circuitsearch.config import PruneConfig
from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.evaluator.relaxed import keep_tensors, relaxed_score
from circuitsearch.toys import PLANTED_NODES, induction_task, load_induction_model, planted_model, planted_task

PLANTED = ["--model", "test:planted", "--task", "planted", "--n-prompts", "12", "--quiet"]
FAST = MaskSettings(steps=40, checkpoint_every=5)


@pytest.fixture(scope="module")
def planted():
    return Evaluator(planted_model(), planted_task(), "mean")


@pytest.fixture(scope="module")
def induction():
    return Evaluator(load_induction_model(), induction_task(n=24, k=10, seed=0), "mean")


def kept(ev, result):
    return sorted(n for n in ev.senders if n not in result.ablated)


def verified(ev, result, A):
    """The circuit scored from scratch holds A, and result.final is that score."""
    score = ev.score(nodes=result.ablated, edges=result.removed_edges,
                     at=result.run.units, edges_at=result.run.edge_units)
    assert result.final == pytest.approx(score, abs=1e-6)
    assert ev.faithfulness(score) >= A


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_planted_circuit_recovered_exactly(ablation):
    ev = Evaluator(planted_model(), planted_task(), ablation)
    result = find_circuit_masks(ev, "both", Thresholds(0.8), FAST, progress=False)
    verified(ev, result, 0.8)
    assert set(kept(ev, result)) == set(PLANTED_NODES) - {"logits"}
    exact = find_circuit(ev, "both", Thresholds(0.8), "reverse", progress=False)
    assert set(edge_candidates(ev, result.run)) == set(edge_candidates(ev, exact.run))
    m = result.masks
    assert set(m) == {"nodes", "edges"} and m["nodes"]["discretised_removed"] > 0
    assert ev.backward_passes >= 2 * FAST.steps  # one backward per step and phase


def test_phase_masks_at_zero_and_one_are_the_evaluators_removals(induction):
    """relaxed_inputs puts each phase's units where the evaluator's names put them: masks at 0 for some units
    score exactly what removing those units scores, for every phase of the positions levels."""
    ev = induction
    rng = random.Random(0)
    run = ev.run(nodes=[ev.senders[-1]])
    for p in phases("nodes,positions,edges"):
        table = level_of(ev, p)
        ids = table.present(run)
        drop = rng.sample(ids, max(1, len(ids) // 3))
        m = torch.tensor([0.0 if i in drop else 1.0 for i in ids])
        with torch.no_grad():
            got = float(relaxed_score(ev, *relaxed_inputs(ev, p, keep_tensors(ev, run), torch.tensor(ids), m)))
        want = table.extend(ev, run, drop).score
        assert got == pytest.approx(want, abs=1e-5), p
        assert abs(want - run.score) > 1e-4 or p == "edge-positions", p


def test_induction_circuit_at_positions(induction):
    ev = induction
    result = find_circuit_masks(ev, "nodes,positions", Thresholds(0.8), FAST, progress=False)
    verified(ev, result, 0.8)
    present = result.run.present_units()
    slots = {n: [ev.slots.names[q] for q in range(ev.Q) if present[ev.index.node(n), q]] for n in kept(ev, result)}
    assert slots["a0.2"] == ["S9"]  # the previous-token head, only where the induction head's key reads it
    assert slots["a1.1"] == ["end"]
    assert set(result.masks) == {"nodes", "positions"}


def test_masks_that_remove_too_much_are_repaired_in_mask_order(planted):
    """Logits started far below 0 and few steps: the masks drop every unit, the exact score misses A, and the
    bisection in mask order puts back what A needs; the circuit written still verifies."""
    ev = planted
    settings = MaskSettings(steps=3, init=-8.0)
    result = find_circuit_masks(ev, "nodes", Thresholds(0.8), settings, progress=False)
    verified(ev, result, 0.8)
    first = result.decisions[0]
    assert first.pass_ == "masks" and not first.removed and first.chunk == len(ev.senders)
    repairs = [d for d in result.decisions if d.pass_ == "repair"]
    assert repairs and any(d.removed for d in repairs)
    assert result.masks["nodes"]["repaired"] > 0
    assert set(kept(ev, result)) == set(PLANTED_NODES) - {"logits"}


def test_relative_threshold_binds_the_polish(planted):
    """R applies to every single removal of the polish: with R = 0 nothing that costs faithfulness goes."""
    ev = planted
    loose = find_circuit_masks(ev, "nodes", Thresholds(0.5), MaskSettings(steps=3, init=-8.0), progress=False)
    strict = find_circuit_masks(ev, "nodes", Thresholds(0.5, 0.0), MaskSettings(steps=3, init=-8.0), progress=False)
    polish = [d for d in strict.decisions if d.pass_ not in ("masks", "repair")]
    assert polish and all(d.faithfulness >= ev.faithfulness(d.before) - 1e-12 for d in polish if d.removed)
    assert len(kept(ev, strict)) >= len(kept(ev, loose))


def test_same_settings_same_circuit_and_logits(planted):
    a = find_circuit_masks(planted, "both", Thresholds(0.8), FAST, progress=False)
    b = find_circuit_masks(planted, "both", Thresholds(0.8), FAST, progress=False)
    assert a.mask_logits == b.mask_logits
    assert [d.to_json() for d in a.decisions] == [d.to_json() for d in b.decisions]


# ---------------------------------------------------------------- the run directory

def run_masks(out, *extra):
    return main(["prune", *PLANTED, "--search", "masks", "--mask-steps", "30", *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def masks_run(tmp_path_factory):
    """One finished `prune --search masks` run directory, read (or copied) by the tests below."""
    out = tmp_path_factory.mktemp("masks") / "whole"
    assert run_masks(out) == 0
    return out


def test_prune_search_masks_writes_a_verified_run_directory(masks_run):
    out = masks_run
    c = json.loads((out / "circuit.json").read_text())
    m = c["method"]
    assert m["search"] == "masks" and m["order"] == "masks"
    assert m["masks"]["settings"]["steps"] == 30 and m["masks"]["settings"]["lr"] == MaskSettings().lr
    assert set(m["masks"]["phases"]) == {"nodes", "edges"}
    assert set(c["nodes"]) == set(PLANTED_NODES)
    st = c["stats"]
    assert st["backward_passes"] == 60  # 30 steps x 2 phases
    assert st["forward_equivalents"] >= 3 * 60  # a step: a forward and a backward, 3 forward-equivalents
    cfg = json.loads((out / "checkpoint.json").read_text())["config"]
    assert (cfg["order"], cfg["mask_steps"], cfg["mask_lr"], cfg["mask_margin"]) == \
        ("masks", 30, MaskSettings().lr, MaskSettings().margin)
    report = (out / "report.md").read_text()
    assert "## Learned masks" in report and "| nodes | " in report
    assert (out / "masks.pt").exists()
    curves = json.loads((out / "curves.json").read_text())
    assert any(cv["name"] == "learned masks" for cv in curves["curves"])
    assert c["scores"]["faithfulness"] >= 0.8


def _killed_after_checkpoint(kill_at, argv):
    """In a forked child (a real process of its own, started without a fresh interpreter's imports): the
    command line, its masks file killing the process (SIGKILL) right after its `kill_at`-th save."""
    from circuitsearch.runs import store

    save, n = store.MaskFile.save, [0]

    def faulty(self, phase, state):
        save(self, phase, state)
        n[0] += 1
        if n[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    store.MaskFile.save = faulty
    sys.exit(main(argv))


def test_kill_9_mid_optimisation_resumes_to_the_same_circuit(masks_run, tmp_path, capsys):
    whole = masks_run
    children = {}
    for k in (2, 5):  # killed after the 2nd checkpoint (nodes phase, step 20 of 30) or the 5th (edges, step 20)
        args = ["prune", *PLANTED, "--search", "masks", "--mask-steps", "30", "--out", str(tmp_path / f"k{k}")]
        children[k] = multiprocessing.get_context("fork").Process(target=_killed_after_checkpoint, args=(k, args))
        children[k].start()
    for k, p in children.items():  # the two ran side by side, each its own process
        out = tmp_path / f"k{k}"
        p.join(300)
        assert p.exitcode == -signal.SIGKILL
        assert not (out / "circuit.json").exists() and (out / "masks.pt").exists()
        assert run_masks(out) == 0
        a, b = (json.loads((d / "circuit.json").read_text()) for d in (whole, out))
        assert (a["nodes"], a["edges"], a["scores"], a["method"]["masks"]) == \
            (b["nodes"], b["edges"], b["scores"], b["method"]["masks"])
        assert (whole / "decisions.jsonl").read_text() == (out / "decisions.jsonl").read_text()
        assert b["stats"]["backward_passes"] == 60 - 10 * k  # the resumed session ran only the steps left


def test_damaged_masks_file_is_said_and_recomputed(masks_run, tmp_path, capsys):
    whole = masks_run
    out = tmp_path / "dmg"
    shutil.copytree(whole, out)  # a finished run of the same settings, to damage
    (out / "circuit.json").unlink()
    (out / "masks.pt").write_bytes(b"not a torch file")
    capsys.readouterr()
    assert run_masks(out) == 0
    err = capsys.readouterr()
    assert "masks.pt is damaged" in err.out + err.err
    a, b = (json.loads((d / "circuit.json").read_text()) for d in (whole, out))
    assert (a["nodes"], a["edges"], a["method"]["masks"]) == (b["nodes"], b["edges"], b["method"]["masks"])


def test_compare_orders_and_sweeps_take_masks(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare-orders", *PLANTED, "--orders", "reverse,masks", "--out", str(out)]) == 0
    cmp = json.loads((out / "comparison.json").read_text())
    assert "masks" in json.dumps(cmp)
    spec = tmp_path / "s.toml"
    fixed = '[fixed]\nmodel = "test:planted"\ntask = "planted"\nn_prompts = 12\n'
    spec.write_text(fixed + 'mask_steps = 20\n[axes]\norder = ["masks", "reverse"]\n')
    capsys.readouterr()
    assert main(["sweep", str(spec), "--out", str(tmp_path / "bad"), "--workers", "1"]) == 2
    assert "cell order=reverse: --mask-steps does not apply" in capsys.readouterr().err  # not silently dropped
    spec.write_text(fixed + '[[cases]]\norder = "masks"\nmask_steps = 20\n[[cases]]\norder = "reverse"\n')
    # in this process (--workers 0): the cells' settings are what is checked; test_sweep covers the executors
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sw"), "--workers", "0"]) == 0
    cells = list((tmp_path / "sw" / "cells").iterdir())
    configs = [json.loads((c / "checkpoint.json").read_text())["config"] for c in cells]
    assert sorted(c["order"] for c in configs) == ["masks", "reverse"]
    assert [c["mask_steps"] for c in configs if c["order"] == "masks"] == [20]


@pytest.mark.parametrize("extra, message", [
    (["--search", "masks", "--order", "forward"], "--order does not combine with --search masks"),
    (["--search", "masks", "--preset", "acdc"], "--preset does not combine with --search masks"),
    (["--mask-steps", "10"], "--mask-steps does not apply"),
    (["--search", "masks", "--metric", "accuracy"], "accuracy metric has none"),
    (["--search", "masks", "--absolute", "off", "--relative", "0.1"], "aim at the absolute threshold"),
    (["--search", "masks", "--target", "0.9"], "does not combine with --search masks"),
    (["--search", "masks", "--mask-steps", "0"], "--mask-steps 0 must be a whole number"),
    (["--search", "masks", "--mask-margin", "1.5"], "--mask-margin 1.5 must be in"),
    (["--search", "masks", "--engine", "hooked"], "hook-based path"),
    (["--target", "0.9", "--mask-lr", "0.1"], "--mask-lr sets learned masks"),
])
def test_bad_mask_flags_are_refused_before_loading(tmp_path, capsys, extra, message):
    assert main(["prune", *PLANTED, *extra, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_search_target_takes_absolute_as_its_target(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["prune", *PLANTED, "--search", "target", "--absolute", "0.9", "--out", str(out)]) == 0
    summary = json.loads((out / "targets.json").read_text())
    assert summary["config"]["targets"] == [0.9]
    assert (out / "target-0.9" / "circuit.json").exists()


def test_config_records_mask_settings_only_for_masks():
    assert "mask_steps" not in PruneConfig().to_json()
    d = PruneConfig(order="masks", mask_lr=0.2).to_json()
    assert (d["mask_steps"], d["mask_lr"], d["mask_margin"]) == (MaskSettings().steps, 0.2, MaskSettings().margin)
