"""benchmarks/gpu_check.py: its quick mode on a small trained model here (CPU rows, CUDA rows said not run),
and its comparisons failing on planted disagreements."""
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_PATH = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpu_check)


def test_quick_mode_has_every_row(tmp_path, capsys):
    """The quick mode on induction-2l here: every row, CPU ones passing, CUDA ones said not run."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-CUDA wording is checked where there is none")
    out = tmp_path / "table.md"
    code = gpu_check.main(["--quick", "--model", "induction-2l", "--task", "induction", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.splitlines()[0] == "no CUDA device: running the CPU columns only"
    lines = out.read_text().splitlines()
    assert lines[:2] == ["| check | device | dtype | result | time |", "|---|---|---|---|---|"]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert all(len(c) == 5 for c in cells)  # pipes inside a result are escaped
    want = [(c, d, t) for c, ts in (("logits vs bridge", ("float32", "bfloat16")), ("batch 1 vs 16", ("float32",)),
                                    ("search (batch 16)", ("float32",))) for d in ("cpu", "cuda") for t in ts]
    assert [tuple(c[:3]) for c in cells] == want
    assert all(c[3].startswith("PASS: ") and c[4].endswith(" s") for c in cells if c[1] == "cpu")
    assert all(c[3] == "not run: no CUDA device" for c in cells if c[1] == "cuda")
    assert "PASS: 12 vs 12 decisions, identical; circuit identical" in cells[4][3]  # this model's search, exact


def test_cpu_only_when_asked():
    said = []
    assert gpu_check.devices("cpu", said.append) == [torch.device("cpu")]
    assert said == ["--device cpu: running the CPU columns only"]
    row = gpu_check.not_run("batch 1 vs 16", "float32", "--device cpu")
    assert row.ok is None and row.cells()[3] == "not run: --device cpu"


def test_logit_disagreement_fails():
    ref = torch.randn(2, 3, 5) * 4
    scale = gpu_check.logit_scale(ref)
    same = gpu_check.compare_logits(ref.clone(), ref, scale)
    assert gpu_check.fp32_verdict(same)[0]
    planted = ref.clone()
    planted[1, 2, 3] += 1e-3 * scale  # 10x the tolerance, at one logit
    rel = gpu_check.compare_logits(planted, ref, scale)
    assert rel == pytest.approx(1e-3, rel=1e-3)
    ok, text = gpu_check.fp32_verdict(rel)
    assert not ok and "1.00e-03 of the logit scale" in text
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    assert gpu_check.compare_logits(nan, ref, scale) == math.inf
    assert gpu_check.compare_logits(ref[:, :2], ref, scale) == math.inf


def test_bf16_is_checked_through_fp32():
    assert gpu_check.bf16_verdict(0.05, 0.08, 0.1, fp32_ok=True)[0]
    assert not gpu_check.bf16_verdict(0.25, 0.08, 0.1, fp32_ok=True)[0]  # past 3x the bridge's own bf16 error
    ok, text = gpu_check.bf16_verdict(0.05, 0.08, 0.1, fp32_ok=False)
    assert not ok and "float32 row failed" in text


def _result(decisions, ablated=frozenset(), edges=frozenset()):
    ds = [SimpleNamespace(phase=p, pass_=0, candidate=c, removed=k, score=s) for p, c, k, s in decisions]
    return SimpleNamespace(decisions=ds, ablated=frozenset(ablated), removed_edges=frozenset(edges))


def test_search_disagreement_fails():
    a = _result([("nodes", "a0.1", True, 1.0), ("nodes", "m0", False, 0.5)], {"a0.1"})
    ok, text = gpu_check.compare_searches(a, _result([("nodes", "a0.1", True, 1.0 + 1e-6),
                                                      ("nodes", "m0", False, 0.5)], {"a0.1"}))
    assert ok and "scores agree to 1.0e-06" in text
    flipped = _result([("nodes", "a0.1", True, 1.0), ("nodes", "m0", True, 0.5)], {"a0.1"})
    ok, text = gpu_check.compare_searches(a, flipped)
    assert not ok and "DIFFERENT (first at #1" in text
    other_circuit = _result([("nodes", "a0.1", True, 1.0), ("nodes", "m0", False, 0.5)], {"a0.1"}, {"e"})
    ok, text = gpu_check.compare_searches(a, other_circuit)
    assert not ok and "circuit DIFFERENT" in text


def test_a_failing_check_sets_the_exit_status(monkeypatch, tmp_path):
    failing = [gpu_check.Row("logits vs bridge", "cpu", "float32", False, "planted")]
    monkeypatch.setattr(gpu_check, "run", lambda args, log: failing)
    assert gpu_check.main(["--out", str(tmp_path / "t.md")]) == 1
    assert "FAIL: planted" in (tmp_path / "t.md").read_text()


def test_a_device_this_machine_lacks_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
