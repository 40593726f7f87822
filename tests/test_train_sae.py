"""train-sae: a seeded test model's dictionary reaches a stated explained variance, its report is consistent with
the dictionary it writes, bad input is refused before a model loads; one slow run on SmolLM2."""
import json

import pytest
import torch

from circuitsearch.cli import main
from circuitsearch.engine import Engine
from circuitsearch.features.saelens import load_dictionary
from circuitsearch.features.splice import hook_activations
from circuitsearch.features.train import TrainSettings, collect, train_sae, training_sequences
from circuitsearch.models import build_test_model


@pytest.fixture(scope="module")
def gpt():
    torch.set_num_threads(1)
    return Engine(build_test_model("tiny-gpt", seed=0))


def test_topk_reaches_the_stated_explained_variance_and_its_report_holds(gpt):
    s = TrainSettings(hook="resid_pre.2", kind="topk", features=192, k=8, steps=400, seed=0)
    r = train_sae(gpt, s, progress=False, log=lambda m: None)
    d, rep = r.dictionary, r.report
    assert rep["explained_variance"] >= 0.7  # measured 0.76 at these settings
    acts = collect(gpt, training_sequences(gpt, s), "resid_pre.2")
    f = d.encode(acts)
    assert rep["n_activations"] == acts.shape[0] and rep["mean_l0"] <= 8
    assert rep["dead_features"] == int((~(f > 0).any(0)).sum())
    assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(192), atol=1e-4)  # unit-norm decoder rows
    assert rep["ce_clean"] <= rep["ce_spliced"] + 1e-6 or rep["ce_recovered"] is not None
    assert 0.5 <= rep["ce_recovered"] <= 1.05
    assert rep["digest"] == d.digest()


def test_relu_l1_trades_sparsity_for_reconstruction(gpt):
    """A larger L1 coefficient gives fewer active features and a worse reconstruction."""
    reps = [train_sae(gpt, TrainSettings(hook="mlp_out.1", kind="relu", features=96, l1=l1, steps=300),
                      progress=False, log=lambda m: None).report for l1 in (1e-3, 3e-1)]
    assert reps[1]["mean_l0"] < reps[0]["mean_l0"]
    assert reps[1]["explained_variance"] < reps[0]["explained_variance"]
    assert reps[0]["explained_variance"] >= 0.8


def test_train_sae_command_writes_saelens_format_and_a_report(tmp_path, capsys):
    out = tmp_path / "sae"
    code = main(["train-sae", "--model", "test:tiny-llama", "--hook", "mlp_out.1", "--out", str(out),
                 "--features", "96", "--k", "4", "--steps", "150", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "explained variance" in printed and "dead features" in printed and "next-token CE" in printed
    rep = json.loads((out / "training.json").read_text())
    d = load_dictionary(out)
    assert (d.kind, d.k, d.hook, d.n_features) == ("topk", 4, "mlp_out.1", 96)
    assert rep["digest"] == d.digest() and rep["mean_l0"] <= 4
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_mlp_out" and cfg["architecture"] == "topk"
    engine = Engine(build_test_model("tiny-llama"))
    x = hook_activations(engine, torch.randint(0, 64, (2, 5)), "mlp_out.1")
    assert d.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("args, message", [
    (["--hook", "resid_post.3"], "unknown hook point 'resid_post.3'"),
    (["--hook", "resid_pre.1", "--k", "50", "--features", "10"], "--k 50 is more than --features 10"),
    (["--hook", "resid_pre.1", "--l1", "0.1"], "--l1 is the relu dictionary's"),
    (["--hook", "resid_pre.1", "--kind", "relu", "--k", "3"], "--k is the topk dictionary's"),
    (["--hook", "resid_pre.1", "--steps", "0"], "--steps 0: give at least 1"),
    (["--hook", "resid_pre.1", "--text", "/no/such/file.txt"], "--text /no/such/file.txt: no such file"),
    (["--hook", "mlp_out.7", "--model", "test:tiny-gpt"], "has layers 0 to 2"),
    (["--hook", "resid_pre.1", "--model", "test:tiny-gpt", "--text", __file__], "--text needs a tokenizer"),
])
def test_bad_train_sae_input_is_refused(args, message, tmp_path, capsys):
    steps = [] if "--steps" in args else ["--steps", "5"]
    code = main(["train-sae", "--out", str(tmp_path / "o"), *steps, *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_sae_on_smollm2_for_a_few_steps(tmp_path):
    from circuitsearch.catalogue import load_model

    engine = Engine(load_model("smollm2"))
    # a text file of its own (the --text path; the built-in prompts' 4,924 activations take a minute to score)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"On day {i} of the trip we walked {i + 3} miles along the river, counting the "
                             f"boats, and wrote down the names of {i % 7 + 2} towns." for i in range(40)) + "\n")
    s = TrainSettings(hook="resid_pre.6", features=1152, k=16, steps=60, task="digits", text=str(text))
    r = train_sae(engine, s, progress=False, log=lambda m: None)
    rep = r.report
    assert rep["n_activations"] > 600 and rep["mean_l0"] <= 16
    assert rep["explained_variance"] > 0.3 and rep["task"] == "digits"
    assert rep["logit_diff_full"] > 0 and rep["ce_spliced"] >= rep["ce_clean"] - 0.05
