"""The fast engine against the bridge's own forward, one architecture feature at a time.

Native TransformerLens models cover what TL4's native model builds (bidirectional attention,
partial rotary, soft caps, norm variants, biases); tiny seeded Hugging Face models cover the
families the engine claims (GPT-2, GPT-NeoX/Pythia, GPT-J, Llama, Mistral, Qwen2, Gemma).
Every parameter is perturbed so biases and norm scales are not their zero/one initial values.
"""
import pytest
import torch

from circuitsearch.engine import Engine, unsupported
from circuitsearch.models import TEST_CONFIGS, Model, ModelError, build_test_model

REL = 1e-4  # engine = bridge within 1e-4 of the logit scale (the bar)


def perturb(module, seed=0, scale=0.1):
    """Every parameter (biases and norm scales too) moved off its initial value, seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def assert_engine_matches_bridge(model, vocab, seq=9):
    tokens = torch.randint(0, vocab, (3, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.bridge(tokens).float()
        mine = Engine(model).forward(tokens)
    scale = max(1.0, float(ref.abs().max()))
    assert float((mine - ref).abs().max()) <= REL * scale


def native(seed=0, **changes):
    cfg = dict(TEST_CONFIGS["tiny-llama"], **changes)
    m = build_test_model(cfg, seed=seed)
    perturb(m.bridge.original_model, seed)
    return m


NATIVE = {
    "bidirectional": dict(attention_dir="bidirectional"),
    "partial-rotary": dict(rotary_dim=4),
    "soft-caps": dict(attn_scores_soft_cap=2.0, output_logits_soft_cap=3.0),
    "LNPre": dict(normalization_type="LNPre"),
    "RMSPre": dict(normalization_type="RMSPre"),
    "LN-final-RMS": dict(normalization_type="LN", final_rms=True),
    "ungated-relu-MHA": dict(gated_mlp=False, act_fn="relu", n_key_value_heads=None),
    "solu": dict(gated_mlp=False, act_fn="solu"),
    "learned-positions-gelu": dict(positional_embedding_type="standard", gated_mlp=False, act_fn="gelu",
                                   normalization_type="LN"),
}


@pytest.mark.parametrize("feature", NATIVE)
def test_native_feature_matches_bridge(feature):
    m = native(**NATIVE[feature])
    assert_engine_matches_bridge(m, m.bridge.cfg.d_vocab)


def test_native_biases_are_live():
    """The perturbation really gives q/k/v/o biases (the engine reads them, or this would fail)."""
    m = native()
    attn = m.bridge.original_model.layers[0].attn
    assert float(attn.q.bias.abs().max()) > 0.01 and float(attn.o.bias.abs().max()) > 0.01
    e = Engine(m)
    assert float(e.layer(0).b_Q.abs().max()) > 0.01


def test_bidirectional_differs_from_causal():
    """The engine's bidirectional forward is not the causal one (so the match above means something)."""
    m = native(attention_dir="bidirectional")
    e = Engine(m)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    bidir = e.forward(tokens)
    e.w.causal = True
    assert float((e.forward(tokens) - bidir).abs().max()) > 1e-2


# ----------------------------------------------------------------- Hugging Face families

def hf_model(kind: str, seed: int = 0):
    """A tiny seeded Hugging Face model of one family, every parameter perturbed."""
    import transformers as tf

    V = 64
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    configs = {
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "neox-parallel": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**common, rotary_pct=0.25)),
        "neox-sequential": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**common, rotary_pct=0.5,
                                                                    use_parallel_residual=False)),
        "gptj": (tf.GPTJForCausalLM, tf.GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                   n_positions=64)),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**common, num_key_value_heads=2)),
        "llama-biases": (tf.LlamaForCausalLM, tf.LlamaConfig(**common, num_key_value_heads=2, attention_bias=True,
                                                             mlp_bias=True)),
        "mistral-window": (tf.MistralForCausalLM, tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=3)),
        "qwen2-window": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=True,
                                                             sliding_window=3, max_window_layers=1)),
        "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=8)),
        "qwen3-qk-norm": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=8)),
        "phi": (tf.PhiForCausalLM, tf.PhiConfig(**common, partial_rotary_factor=0.5)),
        "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                                max_position_embeddings=64)),
        "stablelm": (tf.StableLmForCausalLM, tf.StableLmConfig(**common, num_key_value_heads=2,
                                                               partial_rotary_factor=0.25,
                                                               use_parallel_residual=True)),
        "stablelm-qk-layernorm": (tf.StableLmForCausalLM, tf.StableLmConfig(**common, qk_layernorm=True)),
        "gpt-neo": (tf.GPTNeoForCausalLM, tf.GPTNeoConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                                          attention_types=[[["global", "local"], 1]],
                                                          window_size=3, max_position_embeddings=64)),
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=8,
                                                         sliding_window=4)),
    }
    cls, cfg = configs[kind]
    torch.manual_seed(seed)
    return perturb(cls(cfg).eval(), seed)


HF_CLAIMED = {  # family -> a check that the feature under test is really there
    "gpt2": lambda e: e.w.W_pos is not None and float(e.layer(0).b_Q.abs().max()) > 0,
    "neox-parallel": lambda e: e.parallel and e.w.rotary[0].shape[-1] < e.layer(0).W_Q.shape[-1],
    "neox-sequential": lambda e: not e.parallel and e.w.rotary[0].shape[-1] < e.layer(0).W_Q.shape[-1],
    "gptj": lambda e: e.parallel and e.w.rotary[2] == "adjacent" and float(e.w.b_U.abs().max()) > 0,
    "llama": lambda e: e.layer(0).n_kv == 2,
    "llama-biases": lambda e: float(e.layer(0).b_gate_in.abs().min()) > 0 and float(e.layer(0).b_O.abs().max()) > 0,
    "mistral-window": lambda e: e.w.windows == [3, 3],
    "qwen2-window": lambda e: e.w.windows == [None, 3] and float(e.layer(0).b_K.abs().max()) > 0,
    "gemma": lambda e: e.w.embed_scale > 1 and e.layer(0).n_kv == 1,
    "qwen3-qk-norm": lambda e: e.layer(0).q_norm is not None and float((e.layer(0).q_norm[1] - 1).abs().max()) > 0,
    "phi": lambda e: e.parallel and e.w.rotary[0].shape[-1] == 4 and float(e.w.b_U.abs().max()) > 0,
    "phi3": lambda e: e.layer(0).n_kv == 2 and e.layer(0).W_gate is not None,
    "opt": lambda e: e.w.W_pos is not None and e.w.act == "relu",
    "stablelm": lambda e: e.parallel and e.w.rotary[0].shape[-1] == 2,
}


@pytest.mark.parametrize("kind", HF_CLAIMED)
def test_hf_family_matches_bridge(kind):
    m = Model.from_hf(hf_model(kind))
    assert HF_CLAIMED[kind](Engine(m))
    assert_engine_matches_bridge(m, 64)


# ----------------------------------------------------------------- refused by name

@pytest.mark.parametrize("changes, named", [
    (dict(parallel_attn_mlp=True), "parallel_attn_mlp=True"),
    (dict(act_fn="solu_ln", gated_mlp=False), "solu_ln"),
])
def test_native_features_it_cannot_reproduce_are_refused(changes, named):
    m = build_test_model(dict(TEST_CONFIGS["tiny-llama"], **changes))
    with pytest.raises(ModelError, match=named):
        Engine(m)


@pytest.mark.parametrize("kind, named", [("gemma2", "post-attention/post-MLP norms"),
                                         ("gpt-neo", "architecture GPTNeoForCausalLM"),
                                         ("stablelm-qk-layernorm", "hf:qk_layernorm=True")])
def test_hf_features_it_does_not_implement_are_refused(kind, named):
    m = Model.from_hf(hf_model(kind))
    assert any(named in f for f in unsupported(m))
    with pytest.raises(ModelError, match="does not reproduce"):
        Engine(m)


def test_a_model_without_attention_heads_is_refused_by_name():
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    with pytest.raises(ModelError, match=r"\(MambaForCausalLM\) has no attention heads"):
        Engine(Model.from_hf(hf))


def test_the_load_check_names_the_features_involved():
    """An engine that drops a feature the HF config holds (GPT-NeoX's partial rotary) is refused with the
    largest difference and the HF config's partial rotary factor named."""
    from circuitsearch.patching import Evaluator
    from conftest import random_task

    m = Model.from_hf(hf_model("neox-parallel"))
    engine = Engine(m)
    cos, sin, style = engine.w.rotary
    engine.w.rotary = (torch.ones_like(cos), torch.zeros_like(sin), style)  # no rotation at all
    with pytest.raises(ModelError, match=r"by up to [0-9.e-]+ \(prompt \d+, position \d+, token \d+.*partial_rotary_factor': 0.25"):
        Evaluator(m, random_task(64), engine=engine)
