"""Bringing your own model: a local Hugging Face directory, a GGUF file, a bridge or an HF model in
Python, and token-id tasks on a model without a tokenizer, through the command line."""
import json

import numpy as np
import pytest
import torch

from circuitsearch.catalogue import find_model, load_model
from circuitsearch.cli import main
from circuitsearch.models import LOCAL, HUB, Model, ModelError, build_test_model
from circuitsearch.patching import Evaluator
from conftest import random_task

V = 64


@pytest.fixture(scope="module")
def ids_task(tmp_path_factory):
    """A JSONL task of token ids (no tokenizer needed)."""
    path = tmp_path_factory.mktemp("task") / "ids.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(8):
            clean, corrupted = torch.randint(0, V, (2, 6), generator=g).tolist()
            f.write(json.dumps({"clean": clean, "corrupted": corrupted, "answer": i, "wrong_answer": i + 10}) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Seeded tiny GPT-2 and Llama models written with save_pretrained (no tokenizer files)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(root / "gpt2")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64,
                                       max_position_embeddings=64)).save_pretrained(root / "llama")
    return root


def write_tiny_gguf(path, seed=0):
    """A 2-layer Llama-architecture GGUF file (float32, no tokenizer), written with the gguf package."""
    import gguf

    d, L, H, KV, F = 32, 2, 4, 2, 64
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (0.2 * torch.randn(*s, generator=g)).numpy().astype(np.float32)
    ones = lambda n: np.ones(n, np.float32)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64), w.add_embedding_length(d), w.add_block_count(L), w.add_feed_forward_length(F)
    w.add_head_count(H), w.add_head_count_kv(KV), w.add_rope_dimension_count(d // H)
    w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(V), w.add_file_type(0)
    w.add_tensor("token_embd.weight", r(V, d)), w.add_tensor("output_norm.weight", ones(d))
    w.add_tensor("output.weight", r(V, d))
    for l in range(L):
        p = f"blk.{l}."
        for name, shape in (("attn_q", (d, d)), ("attn_k", (KV * d // H, d)), ("attn_v", (KV * d // H, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (F, d)), ("ffn_up", (F, d)), ("ffn_down", (d, F))):
            w.add_tensor(p + name + ".weight", r(*shape))
        w.add_tensor(p + "attn_norm.weight", ones(d)), w.add_tensor(p + "ffn_norm.weight", ones(d))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def score_json(capsys, *args):
    assert main(["score", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def bridge_logit_diff(model, task_path):
    rows = [json.loads(x) for x in open(task_path)]
    with torch.no_grad():
        logits = model.bridge(torch.tensor([r["clean"] for r in rows]))[:, -1]
    return float(np.mean([float(logits[i, r["answer"]] - logits[i, r["wrong_answer"]]) for i, r in enumerate(rows)]))


def test_local_hf_directory_scores_through_the_cli(hf_dirs, ids_task, capsys):
    for arch in ("gpt2", "llama"):
        out = score_json(capsys, "--model", str(hf_dirs / arch), "--task", str(ids_task))
        model = load_model(str(hf_dirs / arch))
        assert model.tokenizer is None and model.source.startswith("local:")
        assert abs(out["full"] - bridge_logit_diff(model, ids_task)) < 1e-4
        assert out["full"] != out["empty"]


def test_prune_a_local_model_then_rescore_its_task_json(hf_dirs, tmp_path, capsys):
    """A node circuit of a local Llama directory on a task it does (its own top choices), re-scored from the
    run's files alone by the plain forward and the hooked reference."""
    from circuitsearch.reference import hooked_score
    from circuitsearch.tasks.base import Task

    model = load_model(str(hf_dirs / "llama"))
    task_path = own_answers_task(model, tmp_path / "own.jsonl")
    out = tmp_path / "run"
    assert main(["prune", "--model", str(hf_dirs / "llama"), "--task", str(task_path), "--level", "nodes",
                 "--out", str(out), "--quiet"]) == 0
    circuit = json.loads((out / "circuit.json").read_text())
    scores = circuit["scores"]
    task = Task.from_json(json.loads((out / "task.json").read_text()))
    rows = [json.loads(x) for x in open(task_path)]
    assert task.clean.tolist() == [r["clean"] for r in rows] and task.answers.tolist() == [r["answer"] for r in rows]
    assert abs(scores["full"] - bridge_logit_diff(model, task_path)) < 1e-4
    senders = ["embed", *(f"a{l}.{h}" for l in range(2) for h in range(4)), "m0", "m1"]
    ablated = [n for n in senders if n not in circuit["nodes"]]
    assert ablated and "logits" in circuit["nodes"]  # something was pruned
    assert abs(scores["circuit"] - hooked_score(model, task, "mean", nodes=ablated)) < 1e-4
    assert scores["faithfulness"] == pytest.approx(scores["circuit"] / scores["full"], abs=1e-6)
    assert scores["faithfulness"] >= 0.8 - 1e-6
    capsys.readouterr()
    again = score_json(capsys, "--model", str(hf_dirs / "llama"), "--task", str(out / "task.json"))
    assert abs(again["full"] - scores["full"]) < 1e-6


def test_gguf_file_scores_through_the_cli(tmp_path, ids_task, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert find_model(str(path)) is LOCAL
    out = score_json(capsys, "--model", str(path), "--task", str(ids_task))
    assert abs(out["full"] - bridge_logit_diff(load_model(str(path)), ids_task)) < 1e-4


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "without config.json"),
    (lambda p: p / "missing.gguf", "no GGUF file at"),
])
def test_bad_local_paths_are_named(tmp_path, make, message, capsys):
    assert main(["score", "--model", str(make(tmp_path)), "--task", "planted"]) == 2
    assert message in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["prune", "--model", str(make(tmp_path)), "--task", "planted", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoint.json").exists()  # refused before anything was written


def test_text_task_on_a_model_without_tokenizer_is_refused(hf_dirs, capsys):
    assert main(["score", "--model", str(hf_dirs / "gpt2"), "--task", "digits"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_hub_names_are_not_taken_for_paths():
    assert find_model("EleutherAI/pythia-70m") is HUB and find_model("gpt2") is HUB
    assert find_model("./my-model") is LOCAL and find_model("weights.gguf") is LOCAL


def test_python_api_from_bridge_and_from_hf():
    import transformers as tf

    bridge = build_test_model("tiny-gpt").bridge
    m = Model.from_bridge(bridge, name="mine")
    task = random_task(V)
    assert Evaluator(m, task).full == pytest.approx(Evaluator(build_test_model("tiny-gpt"), task).full, abs=1e-6)
    torch.manual_seed(0)
    hf = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, rotary_pct=0.25)).eval()
    m = Model.from_hf(hf)
    assert m.name == "GPTNeoXForCausalLM" and m.tokenizer is None
    assert Evaluator(m, task).graph.parallel
    with pytest.raises(ModelError, match="no model at"):
        load_model("./not-a-model.bin")


def own_answers_task(model, path, n=8):
    """A token-id JSONL task whose answers are the model's own top choices and wrong answers its last: a task
    the model does (random answers would make its full score negative, which a search refuses)."""
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, V, (2, n, 6), generator=g)
    with torch.no_grad():
        logits = model.bridge(clean)[:, -1]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"clean": clean[i].tolist(), "corrupted": corrupted[i].tolist(),
                                "answer": int(logits[i].argmax()), "wrong_answer": int(logits[i].argmin())}) + "\n")
    return path


def test_readme_python_lines(tmp_path):
    """The README's three lines, on a tiny seeded GPT-NeoX without a tokenizer."""
    import transformers as tf
    from circuitsearch import Evaluator, Model, find_circuit, load_task

    torch.manual_seed(0)
    hf_model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64)).eval()
    model = Model.from_hf(hf_model, None)
    ev = Evaluator(model, load_task(own_answers_task(model, tmp_path / "own.jsonl"), model.tokenizer))
    result = find_circuit(ev, level="nodes", progress=False)
    assert ev.graph.parallel and ev.faithfulness(result.final) >= 0.8 - 1e-6
    assert len(result.ablated) > 0


@pytest.mark.parametrize("lines, message", [
    ([{"clean": [1, 2], "corrupted": [3, 4], "answer": 5, "wrong_answer": 6},
      {"clean": "a b", "corrupted": "c d", "answer": "e", "wrong_answer": "f"}], ":2: text, but the lines before"),
    ([{"clean": [1, 2], "corrupted": [3, 4], "answer": 5, "wrong_answer": 6},
      {"clean": [1, 2, 3], "corrupted": [3, 4], "answer": 5, "wrong_answer": 6}], "must align token by token"),
    ([{"clean": [1, -2], "corrupted": [3, 4], "answer": 5, "wrong_answer": 6}], "must be a non-empty string (text) or token ids"),
])
def test_bad_token_id_task_files_are_named(tmp_path, lines, message, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["score", "--model", "test:tiny-gpt", "--task", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_token_ids_outside_the_vocabulary_are_named(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"clean": [1, 2000], "corrupted": [3, 4], "answer": 5, "wrong_answer": 6}) + "\n")
    assert main(["score", "--model", "test:tiny-gpt", "--task", str(path)]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err
