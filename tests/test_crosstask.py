"""Circuits scored on their own and other prompts, and the diff / evaluate commands over run directories."""
import json

import pytest
import torch

from circuitsearch.cli import main
from circuitsearch.evaluation import cross_task, format_matrix, load_run, score_on
from circuitsearch.catalogue import load_model
from circuitsearch.patching import Evaluator
from circuitsearch.reference import hooked_score
from circuitsearch.runs import PruneConfig, run_prune
from circuitsearch.toys import planted_task

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two planted runs of different prompts and levels, and one on the induction model."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, cfg in {
        "nodes": PruneConfig(model="test:planted", task="planted", level="nodes", n_prompts=12, seed=0),
        "edges": PruneConfig(model="test:planted", task="planted", level="edges", n_prompts=10, seed=1,
                             absolute=0.95),
        "induction": PruneConfig(model="induction-2l", task="induction", level="nodes", n_prompts=8),
    }.items():
        out[name] = (base / name, run_prune(cfg, base / name, **QUIET))
    return out


def test_a_circuit_on_its_own_task_scores_its_own_score(runs):
    ct = cross_task([runs["nodes"][0], runs["edges"][0]], log=lambda *a: None)
    assert ct.tasks == ["planted"] and ct.circuits == ["nodes", "edges"]  # same task twice: named by directory
    for (path, circuit), row in zip((runs["nodes"], runs["edges"]), ct.scores):
        assert row[0]["faithfulness"] == pytest.approx(circuit.scores["faithfulness"], abs=1e-6)
        assert row[0]["circuit"] == pytest.approx(circuit.scores["circuit"], abs=1e-6)
    assert "nodes" in format_matrix(ct) and ct.to_json()["schema"] == "circuitsearch.crosstask/1"


def test_other_prompts_give_another_score_from_the_same_machinery(runs):
    """The nodes circuit scored on new planted prompts equals a hand-built ablation of everything else, and
    its scores are the plain model's and the hooked reference's on those prompts."""
    run = load_run(runs["nodes"][0])
    other = planted_task(n=9, seed=5)
    model = load_model("test:planted")
    ev = Evaluator(model, other, "mean")
    s = score_on(ev, run.circuit)
    ablated = [n for n in ev.senders if n not in run.circuit.nodes]
    assert s["faithfulness"] == pytest.approx(ev.faithfulness(ev.score(nodes=ablated)), abs=1e-9)
    with torch.no_grad():
        logits = model.bridge(other.clean)[:, -1]
    plain = (logits.gather(1, other.answers[:, None]) - logits.gather(1, other.wrong_answers[:, None])).mean()
    assert s["full"] == pytest.approx(float(plain), abs=1e-4)
    assert s["circuit"] == pytest.approx(hooked_score(model, other, "mean", nodes=ablated), abs=1e-4)
    assert s["empty"] == pytest.approx(hooked_score(model, other, "mean", nodes=ev.senders), abs=1e-4)
    assert ablated and abs(s["full"] - s["empty"]) > 1  # a faithfulness with a real denominator


def test_circuits_of_different_models_are_refused(runs):
    with pytest.raises(ValueError, match="different models"):
        cross_task([runs["nodes"][0], runs["induction"][0]], log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="no circuit.json"):
        load_run(runs["nodes"][0].parent)


def test_diff_command_writes_table_json_and_overlay(runs, tmp_path, capsys):
    out = tmp_path / "diff"
    assert main(["diff", str(runs["nodes"][0]), str(runs["edges"][0] / "circuit.json"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shared by all 2" in text and "Jaccard" in text
    d = json.loads((out / "diff.json").read_text())
    assert d["schema"] == "circuitsearch.diff/1" and d["names"] == ["nodes", "edges"]
    shared = set(d["shared"]["nodes"])
    assert shared <= set(runs["nodes"][1].nodes) and shared <= set(runs["edges"][1].nodes)
    svg = (out / "overlay.svg").read_text()
    assert "shared by all 2" in svg and all(n in svg for n in shared)


@pytest.mark.parametrize("which, message", [
    (["nodes"], "at least two circuits"),
    (["nodes", "induction"], "different models"),
])
def test_diff_command_rejects(runs, which, message, tmp_path, capsys):
    assert main(["diff", *[str(runs[w][0]) for w in which], "--out", str(tmp_path / "d")]) == 2
    assert message in capsys.readouterr().err


def test_diff_command_names_a_missing_file(tmp_path, capsys):
    assert main(["diff", str(tmp_path / "nope"), str(tmp_path / "nope2"), "--out", str(tmp_path / "d")]) == 2
    assert "no such circuit file or run directory" in capsys.readouterr().err


def test_evaluate_command_writes_the_matrix(runs, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(runs["nodes"][0]), str(runs["edges"][0]), "--task", "planted",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tasks"] == ["planted"] and len(data["faithfulness"]) == 2
    assert data["faithfulness"][1][0] == pytest.approx(runs["edges"][1].scores["faithfulness"], abs=1e-6)
    assert "circuit \\ task" in capsys.readouterr().out


def test_evaluate_on_local_workers_equals_the_one_process_matrix(runs, tmp_path, capsys):
    """Columns (tasks) scored on worker processes give the in-process matrix exactly; a second run
    reuses the finished columns instead of scoring again."""
    other = str(runs["edges"][0] / "task.json")  # a second column: the edges run's own prompts as a task
    args = ["evaluate", str(runs["nodes"][0]), str(runs["edges"][0]), "--tasks", f"planted,{other}"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "pool.json"), "--workers", "2"]) == 0
    one, pool = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "pool.json"))
    assert one == pool and len(one["tasks"]) == 2 and len(one["scores"][0]) == 2
    columns = sorted((tmp_path / "pool.columns" / "columns").glob("*.json"))
    assert len(columns) == 2 and len(list((tmp_path / "pool.columns" / "logs").glob("*.log"))) == 2
    stamps = [c.stat().st_mtime_ns for c in columns]
    assert main([*args, "--out", str(tmp_path / "pool.json"), "--workers", "1"]) == 0
    assert [c.stat().st_mtime_ns for c in columns] == stamps  # kept, not scored again
    assert json.loads((tmp_path / "pool.json").read_text()) == one
    assert main([*args, "--out", str(tmp_path / "x.json"), "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
