"""Never silently wrong: a flag the user gave is honoured or refused, a task the model fails is refused
before the search, and what a run has to say reaches the user (issue: settings ignored, failed tasks
scored, messages swallowed)."""
import json

import pytest
import torch

from circuitsearch.catalogue import load_model
from circuitsearch.cli import _config, build_parser, main
from circuitsearch.config import PruneConfig
from circuitsearch.metrics import get_metric, score_problem
from circuitsearch.runs import run_compare, run_prune

PLANTED = ["--model", "test:planted", "--task", "planted"]


def refused(capsys, *args) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------- prune --target: every flag honoured or refused

@pytest.mark.parametrize("flag, value", [("--relative", "0.05"), ("--max-passes", "3"), ("--order", "forward"),
                                         ("--absolute", "0.7")])
def test_target_refuses_flags_it_cannot_honour(capsys, tmp_path, flag, value):
    err = refused(capsys, "prune", *PLANTED, "--target", "0.9", flag, value, "--out", str(tmp_path / "t"))
    assert f"{flag} does not apply to --target" in err
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_target_refuses_an_explicit_default_too(capsys, tmp_path):
    err = refused(capsys, "prune", *PLANTED, "--target", "0.9", "--max-passes", "10", "--out", str(tmp_path / "t"))
    assert "--max-passes does not apply" in err


def test_patience_without_target_is_refused(capsys, tmp_path):
    assert "--patience applies to the target search only" in refused(
        capsys, "prune", *PLANTED, "--patience", "5", "--out", str(tmp_path / "p"))


def test_target_circuits_record_the_threshold_they_were_searched_to(tmp_path, capsys):
    out = tmp_path / "targets"
    assert main(["prune", *PLANTED, "--target", "0.95,0.8", "--out", str(out), "--quiet"]) == 0
    for t in (0.95, 0.8):
        c = json.loads((out / f"target-{t}" / "circuit.json").read_text())
        assert c["method"]["thresholds"] == {"absolute": t, "relative": None, "on": "faithfulness"}
        assert "max_passes" not in c["method"] and c["method"]["order"] == "gain"
        assert c["scores"]["faithfulness"] >= t - 1e-6
        assert f"absolute {t:g}, relative off" in (out / f"target-{t}" / "report.md").read_text()


def test_library_target_search_refuses_unused_settings(tmp_path):
    from circuitsearch.runs import run_targets

    with pytest.raises(ValueError, match="relative 0.05 does not apply to the target search"):
        run_targets(PruneConfig(model="test:planted", task="planted", relative=0.05), [0.9], tmp_path)


def test_sweep_target_cell_with_a_relative_threshold_is_refused():
    from circuitsearch.sweeps.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="relative 0.02 does not apply to the target search"):
        parse_spec({"fixed": {"model": "test:planted", "task": "planted", "relative": 0.02, "absolute": 0.8},
                    "axes": {"order": ["reverse", "target"]}})


# ----------------------------------------------------------------- --preset acdc keeps the flags given

def config_of(*argv):
    return _config(build_parser().parse_args(["prune", *argv]))


def test_preset_sets_what_was_not_given(capsys):
    c = config_of("--preset", "acdc")
    assert (c.ablation, c.metric, c.level, c.order, c.on, c.absolute, c.relative) == \
        ("resample", "kl", "edges", "reverse", "metric", None, 0.01)
    assert "--preset acdc: resample ablation" in capsys.readouterr().err


def test_preset_keeps_explicit_flags(capsys):
    c = config_of("--preset", "acdc", "--ablation", "mean", "--level", "both", "--order", "forward",
                  "--metric", "logit_diff", "--relative", "0.2")
    assert (c.ablation, c.level, c.order, c.metric, c.relative, c.on) == \
        ("mean", "both", "forward", "logit_diff", 0.2, "metric")
    assert "(--ablation, --level, --metric, --order as given)" in capsys.readouterr().err


def test_preset_with_an_absolute_threshold_is_refused(capsys, tmp_path):
    err = refused(capsys, "prune", *PLANTED, "--preset", "acdc", "--absolute", "0.8", "--out", str(tmp_path / "a"))
    assert "--absolute does not combine with --preset acdc" in err


# ----------------------------------------------------------------- faithfulness curves use the run's attribution

def test_curves_use_the_runs_attribution_method(tmp_path):
    run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=10, order="reverse", attribution="eap"),
              tmp_path / "eap", progress=False, log=lambda *a: None)
    names = [c["name"] for c in json.loads((tmp_path / "eap" / "curves.json").read_text())["curves"]]
    assert names == ["removal order (reverse)", "EAP ranking"]
    run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=10, order="reverse", steps=3),
              tmp_path / "ig3", progress=False, log=lambda *a: None)
    names = [c["name"] for c in json.loads((tmp_path / "ig3" / "curves.json").read_text())["curves"]]
    assert names == ["removal order (reverse)", "EAP-IG ranking (3 steps)"]


def test_attribution_flags_without_a_gradient_are_refused(capsys, tmp_path):
    err = refused(capsys, "prune", *PLANTED, "--metric", "accuracy", "--steps", "3", "--out", str(tmp_path / "x"))
    assert "--steps does not apply" in err and "no gradient" in err


# ----------------------------------------------------------------- task settings a task cannot use

@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    """A token-id JSONL task for test:tiny-llama whose answers are the model's own top choices on 6 prompts
    and its second choices on 2 (the logit difference stays positive: the wrong answer is its last choice)."""
    model = load_model("test:tiny-llama")
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 64, (8, 6), generator=g)
    corrupted = torch.randint(0, 64, (8, 6), generator=g)
    with torch.no_grad():
        logits = model.bridge(clean)[:, -1]
    ranked = logits.argsort(-1, descending=True)
    path = tmp_path_factory.mktemp("ids") / "ids.jsonl"
    with open(path, "w") as f:
        for i in range(8):
            answer = int(ranked[i, 0] if i < 6 else ranked[i, 1])
            f.write(json.dumps({"clean": clean[i].tolist(), "corrupted": corrupted[i].tolist(), "answer": answer,
                                "wrong_answer": int(ranked[i, -1])}) + "\n")
    return path


@pytest.mark.parametrize("task, flag, value, why", [
    ("planted", "--template", "1", "has one template"),
    ("planted", "--corruption", "shuffle", "has one template and makes its corrupted prompts"),
    ("planted", "--keep-all", None, "keeps every prompt it makes"),
    ("FILE", "--n-prompts", "10", "shorten the file"),
    ("FILE", "--n-prompts", "24", "holds its own prompts"),  # the default, given: still cannot apply
    ("FILE", "--seed", "3", "holds its own prompts"),
    ("FILE", "--template", "0", "holds its own prompts"),
])
def test_task_settings_that_cannot_apply_are_refused(capsys, ids_file, task, flag, value, why):
    model = "test:planted" if task == "planted" else "test:tiny-llama"
    task = str(ids_file) if task == "FILE" else task
    err = refused(capsys, "score", "--model", model, "--task", task, flag, *([value] if value else []))
    assert f"{flag} does not apply" in err and why in err


def test_seed_and_prompt_count_still_apply_to_toy_tasks(capsys):
    assert main(["score", *PLANTED, "--n-prompts", "6", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 6


def test_a_task_file_reports_how_many_prompts_the_model_answers(ids_file, tmp_path):
    lines = []
    c = run_prune(PruneConfig(model="test:tiny-llama", task=str(ids_file), level="nodes"), tmp_path / "run",
                  progress=False, log=lines.append)
    assert any("the model answers 6 of 8 correctly, top-1; every prompt is used" in x for x in lines)
    assert c.meta["task_meta"]["n_correct"] == 6 and c.meta["task_meta"]["wrong_prompts"] == [6, 7]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "the model answers 6 of the 8 correctly (top-1); prompts 6, 7 (0-based) it answers otherwise" in report


# ----------------------------------------------------------------- a task the model fails is refused

@pytest.mark.parametrize("metric, full, empty, problem", [
    ("logit_diff", -0.5, -1.0, "at or below 0"),
    ("logit_diff", 0.0, -1.0, "is undefined"),
    ("logit_diff", 1.0, 1.5, "no better than nothing"),
    ("prob", 0.2, 0.2, "no better than nothing"),
    ("kl", 0.0, 0.0, "no better than nothing"),
    ("logprob", -3.0, -2.0, "no better than nothing"),
    ("logit_diff", float("nan"), 0.0, "not numbers"),
])
def test_score_problems_are_named(metric, full, empty, problem):
    assert problem in score_problem(get_metric(metric), full, empty)


@pytest.mark.parametrize("metric, full, empty", [("logit_diff", 2.0, 0.1), ("logit_diff", 2.0, 3.0 - 3.5),
                                                 ("kl", 0.0, 1.2), ("logprob", -1.0, -5.0), ("accuracy", 1.0, 0.0)])
def test_meaningful_scores_pass(metric, full, empty):
    assert score_problem(get_metric(metric), full, empty) is None


def test_a_task_the_model_fails_is_refused_before_the_search(tmp_path, capsys):
    model = load_model("test:tiny-llama")
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 64, (6, 6), generator=g)
    with torch.no_grad():
        logits = model.bridge(clean)[:, -1]
    path = tmp_path / "backwards.jsonl"  # answer and wrong answer swapped: the model prefers the wrong one
    with open(path, "w") as f:
        for i in range(6):
            f.write(json.dumps({"clean": clean[i].tolist(), "corrupted": torch.randint(0, 64, (6,), generator=g).tolist(),
                                "answer": int(logits[i].argmin()), "wrong_answer": int(logits[i].argmax())}) + "\n")
    err = refused(capsys, "prune", "--model", "test:tiny-llama", "--task", str(path), "--out", str(tmp_path / "r"))
    assert "at or below 0, so faithfulness (circuit / full) has the wrong sign" in err
    assert "answers 0 of its 6 prompts correctly" in err and "Check the answers" in err
    assert not (tmp_path / "r" / "circuit.json").exists()


def test_the_filter_message_names_a_real_option(ids_file):
    from circuitsearch.tasks import TaskError, filter_correct
    from circuitsearch.tasks.base import load_task

    model = load_model("test:tiny-llama")
    task = load_task(str(ids_file), None)
    wrong = task.subset([6, 7])  # the two prompts answered with the model's second choice
    with pytest.raises(TaskError, match="pass --keep-all to keep the prompts it answers wrongly"):
        filter_correct(wrong, model)
    assert config_of("--keep-all").keep_all and not config_of().keep_all  # and the option exists


# ----------------------------------------------------------------- messages reach the user

def test_compare_orders_passes_on_each_orders_messages(tmp_path):
    lines = []
    run_compare(PruneConfig(model="test:planted", task="planted", metric="accuracy", n_prompts=8),
                ["forward", "reverse"], tmp_path, progress=False, log=lines.append)
    for order in ("forward", "reverse"):
        assert any(x.strip().startswith(f"[{order}] note: no EAP-IG curve: the accuracy metric") for x in lines), lines


def test_compare_orders_on_an_executor_passes_on_messages(tmp_path):
    from circuitsearch.sweeps import InlineExecutor
    from circuitsearch.sweeps.compare import compare_orders

    lines = []
    compare_orders(PruneConfig(model="test:planted", task="planted", metric="accuracy", n_prompts=8),
                   ["forward", "reverse"], tmp_path, InlineExecutor(), log=lines.append)
    assert sum("note: no EAP-IG curve" in x and x.strip().startswith("[order=") for x in lines) == 2, lines


def test_a_gguf_tokenizer_that_fails_says_why_at_load(tmp_path, capsys):
    from test_local_models import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    err = refused(capsys, "score", "--model", str(path), "--task", "digits")
    assert "its tokenizer did not load (" in err  # said at load ...
    assert "has no tokenizer (its tokenizer did not load:" in err  # ... and where it matters


def test_memory_check_says_once_when_it_cannot_check(monkeypatch):
    from circuitsearch import config

    monkeypatch.setattr(config, "available_memory", lambda: None)
    monkeypatch.setattr(config, "_SAID", set())
    model = load_model("test:tiny-gpt")
    from conftest import random_task
    said = []
    config.check_fits(model, random_task(64), said.append)
    config.check_fits(model, random_task(64), said.append)
    assert len(said) == 1 and "memory not checked" in said[0]


def test_models_lists_what_this_machine_has_for_hub_models(capsys, monkeypatch):
    from circuitsearch import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=1.0: True)
    assert main(["models"]) == 0
    assert "here: the hub is reachable" in capsys.readouterr().out
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=1.0: False)
    assert main(["models"]) == 0
    assert "here: the hub is unreachable, and the local HF cache" in capsys.readouterr().out


def test_cuda_device_index_is_checked(monkeypatch):
    """A machine with one GPU (this one has none; torch's answers are stood in for): cuda:3 is refused."""
    from circuitsearch.engine import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parse_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="this machine has 1 CUDA device"):
        parse_device("cuda:3")


def test_a_test_that_loads_smollm2_without_the_slow_marker_fails():
    """conftest's guard: `-m "not slow"` must leave the embedded model out, so an unmarked test loading it fails
    (this test is unmarked: the guard stops the load before it starts)."""
    import circuitsearch.models as models

    with pytest.raises(pytest.fail.Exception, match="not marked slow"):
        models._load_smollm2()
