"""Dictionaries: the hook grammar and feature names, encode/decode by hand, sae_lens's format both ways, refusals
naming the problem, the digest; hook activations and the spliced forward against Engine.forward and the bridge."""
import json

import pytest
import torch
from safetensors.torch import save_file

from circuitsearch.engine import Engine
from circuitsearch.features.dictionary import Dictionary, DictionaryError, check_fits
from circuitsearch.features.hooks import (Hook, HookError, feature_name, from_saelens, parse_feature, parse_hook,
                                          to_saelens)
from circuitsearch.features.saelens import load_dictionary, save_dictionary
from circuitsearch.features.splice import forward_with, hook_activations, spliced_forward
from circuitsearch.models import build_test_model


def small(kind="relu", d=3, F=4, **kw) -> Dictionary:
    g = torch.Generator().manual_seed(1)
    extra = {"threshold": torch.full((F,), 0.5)} if kind == "jumprelu" else {}
    extra |= {"k": 2} if kind == "topk" else {}
    return Dictionary(torch.randn(d, F, generator=g), torch.randn(F, generator=g), torch.randn(F, d, generator=g),
                      torch.randn(d, generator=g), kind=kind, **({"hook": "resid_pre.1"} | extra | kw))


@pytest.fixture(scope="module")
def llama():
    m = build_test_model("tiny-llama")
    return m, Engine(m)


# ---- hooks and names ---------------------------------------------------------------------------------------------

def test_hook_grammar_and_its_refusals():
    assert parse_hook("resid_pre.6") == Hook("resid_pre", 6) and str(parse_hook(" mlp_in.0 ")) == "mlp_in.0"
    for bad in ("resid_post.3", "resid_pre", "mlp_out.-1", "attn.2", "blocks.3.hook_resid_pre"):
        with pytest.raises(HookError, match="circuitsearch's hook points are resid_pre.L"):
            parse_hook(bad)
    with pytest.raises(HookError, match="from_saelens"):
        parse_hook("blocks.3.hook_resid_pre")


@pytest.mark.parametrize("name, ours", [
    ("blocks.6.hook_resid_pre", "resid_pre.6"), ("blocks.5.hook_resid_post", "resid_pre.6"),
    ("blocks.2.hook_attn_out", "attn_out.2"), ("blocks.2.hook_mlp_out", "mlp_out.2"),
    ("blocks.4.ln2.hook_normalized", "mlp_in.4"), ("blocks.4.mlp.hook_in", "mlp_in.4"),
    ("blocks.4.hook_mlp_in", "resid_mid.4"), ("blocks.4.hook_resid_mid", "resid_mid.4")])
def test_saelens_hook_names_map_to_ours(name, ours):
    assert str(from_saelens(name)) == ours


def test_unknown_saelens_hooks_are_refused_by_name():
    for bad in ("blocks.3.attn.hook_z", "hook_embed", "blocks.1.mlp.hook_post", "blocks.x.hook_resid_pre"):
        with pytest.raises(HookError, match=f"sae_lens hook '{bad}' is not a hook point"):
            from_saelens(bad)
    for hook in ("resid_pre.3", "attn_out.0", "mlp_out.2", "mlp_in.1", "resid_mid.4"):
        assert str(from_saelens(to_saelens(hook))) == hook  # our names written as sae_lens's come back


def test_feature_names_round_trip():
    assert feature_name("resid_pre.6", 1234) == "r6.f1234"
    assert feature_name("mlp_out.5", None) == "m5.err"
    assert feature_name("mlp_in.5", 42, out_hook="mlp_out.5") == "t5.f42"
    assert feature_name("attn_out.0", 7) == "a0.f7" and feature_name("resid_mid.2", 1) == "rm2.f1"
    for name in ("r6.f1234", "m5.err", "t5.f42", "a0.f7", "rm2.f1", "mi3.f0"):
        assert str(parse_feature(name)) == name
    f = parse_feature("m5.f42")
    assert (f.site, f.layer, f.index, f.is_error) == ("mlp_out", 5, 42, False)
    assert parse_feature("t5.err").site == "transcoder" and parse_feature("t5.err").is_error
    for bad in ("x5.f1", "m5", "m5.f", "r6.feature3", "m.f1"):
        with pytest.raises(HookError, match="not a feature node name"):
            parse_feature(bad)


# ---- encode / decode by hand -------------------------------------------------------------------------------------

def hand_dictionary(kind, **kw):
    W_enc = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])  # d_in 2, F 3
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    return Dictionary(W_enc, torch.tensor([0.0, -1.0, 0.5]), W_dec, torch.tensor([0.1, 0.2]), kind=kind,
                      hook="resid_pre.0", **kw)


def test_encode_decode_by_hand():
    x = torch.tensor([[1.0, 1.0], [-2.0, 0.5]])
    # pre = x @ W_enc + b_enc: [1, 1, 0.5] and [-2, 0, 3]
    assert torch.equal(hand_dictionary("relu").encode(x), torch.tensor([[1.0, 1.0, 0.5], [0.0, 0.0, 3.0]]))
    jr = hand_dictionary("jumprelu", threshold=torch.tensor([0.9, 1.5, 0.4]))
    assert torch.equal(jr.encode(x), torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 3.0]]))
    tk = hand_dictionary("topk", k=1)
    assert torch.equal(tk.encode(x), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]) ) or \
        torch.equal(tk.encode(x), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]))  # a tie in the first row
    tk2 = hand_dictionary("topk", k=2)  # top 2 of [-2, 0, 3] are 3 and 0 -> relu keeps 3, and 0 stays 0
    assert torch.equal(tk2.encode(x)[1], torch.tensor([0.0, 0.0, 3.0]))
    f = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(hand_dictionary("relu").decode(f), torch.tensor([[4.1, 5.2]]))
    # apply_b_dec_to_input subtracts b_dec first: x - [0.1, 0.2] = [0.9, 0.8] -> pre [0.9, 0.6, 0.4]
    pre = hand_dictionary("relu", apply_b_dec_to_input=True).pre(torch.tensor([1.0, 1.0]))
    assert torch.allclose(pre, torch.tensor([0.9, 0.6, 0.4]))
    d = hand_dictionary("relu")
    assert torch.allclose(d.reconstruct(x), d.decode(d.encode(x)))


@pytest.mark.parametrize("change, message", [
    (dict(kind="gelu"), "unknown activation 'gelu'"),
    (dict(b_enc=torch.zeros(5)), r"b_enc must be \(4,\), but it is \(5,\)"),
    (dict(W_dec=torch.zeros(3, 3)), r"W_dec must be \(4, 3\)"),
    (dict(b_dec=torch.zeros(2)), r"b_dec must be \(3,\)"),
    (dict(kind="topk", k=9), "topk needs k between 1 and the number of features"),
    (dict(kind="jumprelu"), "needs its per-feature threshold"),
    (dict(k=3), "only topk uses k"),
    (dict(W_enc=torch.tensor([[float("nan")] * 4] * 3)), "W_enc holds 12 NaN or infinite"),
    (dict(b_dec=torch.tensor([0.0, float("inf"), 0.0])), "b_dec holds 1 NaN or infinite"),
    (dict(hook="resid_post.1"), "unknown hook point 'resid_post.1'"),
    (dict(hook="mlp_in.1", out_hook="mlp_out.2"), "reads mlp_in.L .* writes mlp_out.L of the same layer"),
])
def test_bad_dictionaries_are_refused_with_the_reason(change, message):
    base = dict(W_enc=torch.zeros(3, 4), b_enc=torch.zeros(4), W_dec=torch.zeros(4, 3), b_dec=torch.zeros(3),
                kind="relu", hook="resid_pre.1")
    with pytest.raises((DictionaryError, HookError), match=message):
        Dictionary(**(base | change))


def test_digest_changes_with_any_weight_or_setting():
    d = small("topk")
    same = small("topk")
    assert d.digest() == same.digest() and len(d.digest()) == 64
    same.W_dec[2, 1] += 1e-6
    assert same.digest() != d.digest()
    assert small("topk", hook="resid_pre.2").digest() != d.digest()
    other = small("topk")
    other.k = 3
    assert other.digest() != d.digest()
    assert small("relu", apply_b_dec_to_input=True).digest() != small("relu").digest()


# ---- sae_lens's format -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
def test_saelens_format_round_trip(kind, tmp_path):
    d = small(kind, apply_b_dec_to_input=True)
    save_dictionary(d, tmp_path / "sae", model_name="test:tiny-llama")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[kind]
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and cfg["d_sae"] == 4
    back = load_dictionary(tmp_path / "sae")
    assert back.digest() == d.digest() and back.kind == kind and back.hook == "resid_pre.1"
    x = torch.randn(5, 3)
    assert torch.equal(back.encode(x), d.encode(x))
    (tmp_path / "sae" / "training.json").write_text("{}")
    save_dictionary(small(kind), tmp_path / "sae")  # saving again replaces the dictionary, keeps other files
    assert (tmp_path / "sae" / "training.json").exists()
    assert load_dictionary(tmp_path / "sae").digest() == small(kind).digest()


def write_saelens(directory, cfg, tensors):
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "sae_weights.safetensors"))


def test_a_cfg_in_saelens_6_layout_loads(tmp_path):
    """cfg.json as sae_lens 6 writes it (SAEConfig.to_dict: hooks under metadata), JumpReLU with its threshold."""
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(48, 8, generator=g), "b_enc": torch.randn(8, generator=g),
         "W_dec": torch.randn(8, 48, generator=g), "b_dec": torch.randn(48, generator=g),
         "threshold": torch.rand(8, generator=g)}
    cfg = {"d_in": 48, "d_sae": 8, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "jumprelu",
           "metadata": {"sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1",
                        "model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "hook_head_index": None,
                        "prepend_bos": True, "context_size": 128}}
    write_saelens(tmp_path / "j", cfg, t)
    d = load_dictionary(tmp_path / "j")
    assert (d.kind, d.hook, d.n_features, d.apply_b_dec_to_input) == ("jumprelu", "resid_pre.2", 8, False)
    x = torch.randn(4, 48, generator=g)
    pre = x @ t["W_enc"] + t["b_enc"]
    assert torch.allclose(d.encode(x), pre.relu() * (pre > t["threshold"]))


def test_pre_6_topk_and_transcoder_cfgs_load(tmp_path):
    """sae_lens < 6: hook_point, activation_fn_str, a TopK as activation_fn topk + activation_fn_kwargs; a
    transcoder (6.x) reads mlp_in and writes mlp_out."""
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(48, 8, generator=g), "b_enc": torch.zeros(8), "W_dec": torch.randn(8, 48, generator=g),
         "b_dec": torch.zeros(48)}
    old = {"d_in": 48, "d_sae": 8, "hook_point": "blocks.0.hook_mlp_out", "hook_point_layer": 0,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True,
           "sae_lens_training_version": "3.13.0"}
    write_saelens(tmp_path / "old", old, t)
    d = load_dictionary(tmp_path / "old")
    assert (d.kind, d.k, d.hook) == ("topk", 3, "mlp_out.0")
    assert int((d.encode(torch.randn(5, 48)) > 0).sum(-1).max()) <= 3
    tc = {"d_in": 48, "d_sae": 8, "d_out": 48, "architecture": "transcoder", "apply_b_dec_to_input": False,
          "metadata": {"sae_lens_version": "6.3.0", "hook_name": "blocks.2.mlp.hook_in",
                       "hook_name_out": "blocks.2.hook_mlp_out"}}
    write_saelens(tmp_path / "tc", tc, t)
    d = load_dictionary(tmp_path / "tc")
    assert (d.hook, d.out_hook, d.is_transcoder, d.feature_name(5)) == ("mlp_in.2", "mlp_out.2", True, "t2.f5")
    save_dictionary(d, tmp_path / "tc2")
    assert load_dictionary(tmp_path / "tc2").digest() == d.digest()


def test_saelens_rewrites_are_exact(tmp_path):
    """log_threshold, a scaling_factor and a TopK's rescale_acts_by_decoder_norm are folded into the weights
    so that features and reconstructions equal sae_lens's definitions."""
    g = torch.Generator().manual_seed(0)
    W_enc, b_enc = torch.randn(48, 8, generator=g), torch.randn(8, generator=g)
    W_dec, b_dec = torch.randn(8, 48, generator=g) * 3, torch.randn(48, generator=g)
    x = torch.randn(6, 48, generator=g)
    cfg = {"d_in": 48, "d_sae": 8, "architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True,
           "apply_b_dec_to_input": False, "metadata": {"sae_lens_version": "6.20.0", "hook_name": "blocks.0.hook_resid_pre"}}
    write_saelens(tmp_path / "tk", cfg, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    d = load_dictionary(tmp_path / "tk")
    n = W_dec.norm(dim=-1)
    pre = (x @ W_enc + b_enc) * n  # sae_lens: topk over pre * |W_dec row|, then acts / |row| before W_dec
    v, i = pre.topk(3, -1)
    f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    assert torch.allclose(d.reconstruct(x), (f / n) @ W_dec + b_dec, atol=1e-5)
    assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(8), atol=1e-5) and d.meta["folded"]
    scale = torch.rand(8, generator=g) + 0.5
    cfg = {"d_in": 48, "d_sae": 8, "architecture": "jumprelu", "finetuning_scaling_factor": True,
           "apply_b_dec_to_input": True, "hook_name": "blocks.0.hook_resid_pre", "sae_lens_version": "5.2.0"}
    write_saelens(tmp_path / "jr", cfg, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                                          "log_threshold": torch.zeros(8), "scaling_factor": scale})
    d = load_dictionary(tmp_path / "jr")
    pre = (x - b_dec) @ W_enc + b_enc
    f = pre.relu() * (pre > 1.0)  # exp(0) = 1
    assert torch.allclose(d.reconstruct(x), (f * scale) @ W_dec + b_dec, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in'"),
    ({"d_sae": 9}, "cfg.json says d_sae=9 but the weights have 8"),
    ({"metadata": {"hook_name": "blocks.0.attn.hook_z"}}, "sae_lens hook 'blocks.0.attn.hook_z' is not a hook"),
    ({"metadata": {}}, "names no hook"),
    ({"architecture": "transcoder", "apply_b_dec_to_input": False}, "must say where it writes"),
])
def test_bad_saelens_files_are_refused_with_the_reason(change, message, tmp_path):
    t = {"W_enc": torch.zeros(48, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 48), "b_dec": torch.zeros(48)}
    cfg = {"d_in": 48, "d_sae": 8, "architecture": "standard",
           "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.0.hook_resid_pre"}} | change
    write_saelens(tmp_path / "bad", cfg, t)
    with pytest.raises((DictionaryError, HookError), match=message):
        load_dictionary(tmp_path / "bad")


def test_plain_safetensors_needs_a_hook(tmp_path):
    d = small("jumprelu")
    save_file(d.tensors(), str(tmp_path / "d.safetensors"))
    with pytest.raises(DictionaryError, match="say which hook point it reads"):
        load_dictionary(tmp_path / "d.safetensors")
    back = load_dictionary(tmp_path / "d.safetensors", hook="resid_pre.1")
    assert back.kind == "jumprelu" and back.digest() == d.digest()
    save_file({"W_enc": d.W_enc}, str(tmp_path / "half.safetensors"))
    with pytest.raises(DictionaryError, match="lacks tensor"):
        load_dictionary(tmp_path / "half.safetensors", hook="resid_pre.1")
    with pytest.raises(DictionaryError, match="not a sae_lens dictionary"):
        load_dictionary(tmp_path)


# ---- fitting a model, activations, the spliced forward -----------------------------------------------------------

def test_check_fits_names_the_problem(llama):
    model, engine = llama
    ok = Dictionary(torch.zeros(48, 4), torch.zeros(4), torch.zeros(4, 48), torch.zeros(48), hook="resid_pre.3")
    check_fits(ok, engine)  # resid_pre.3 of a 3-layer model: the final residual stream
    check_fits(ok, model)
    with pytest.raises(DictionaryError, match="d_in is 3 but resid_pre.1 of model .* is 48 wide"):
        check_fits(small(), engine)
    far = Dictionary(torch.zeros(48, 4), torch.zeros(4), torch.zeros(4, 48), torch.zeros(48), hook="mlp_out.3")
    with pytest.raises(DictionaryError, match="reads mlp_out.3, but model .* has 3 layers"):
        check_fits(far, engine)
    attn_only = build_test_model("tiny-attn")
    mlp = Dictionary(torch.zeros(32, 4), torch.zeros(4), torch.zeros(4, 32), torch.zeros(32), hook="mlp_out.0")
    with pytest.raises(DictionaryError, match="attention-only"):
        check_fits(mlp, attn_only)


def test_pre_scale_hook_refused_where_ln2_has_a_scale(tmp_path):
    """sae_lens's ln2.hook_normalized is mlp_in only where ln2 is trivial (the test model's is; a changed one not)."""
    m = build_test_model("tiny-gpt")
    t = {"W_enc": torch.zeros(48, 4), "b_enc": torch.zeros(4), "W_dec": torch.zeros(4, 48), "b_dec": torch.zeros(48)}
    write_saelens(tmp_path / "n", {"d_in": 48, "d_sae": 4, "d_out": 48, "architecture": "transcoder",
                                    "apply_b_dec_to_input": False,
                                    "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.1.ln2.hook_normalized",
                                                 "hook_name_out": "blocks.1.hook_mlp_out"}}, t)
    d = load_dictionary(tmp_path / "n")
    check_fits(d, Engine(m))
    with torch.no_grad():
        next(m.bridge.blocks[1].ln2.parameters()).mul_(2.0)  # the norm's scale
    with pytest.raises(DictionaryError, match="non-trivial ln2 at layer 1"):
        check_fits(d, Engine(m))


HOOKS = ["resid_pre.0", "resid_pre.2", "resid_pre.3", "attn_out.1", "resid_mid.2", "mlp_in.0", "mlp_out.2"]
BRIDGE = {"resid_pre.1": "blocks.1.hook_resid_pre", "attn_out.1": "blocks.1.hook_attn_out",
          "resid_mid.2": "blocks.2.hook_resid_mid", "mlp_in.0": "blocks.0.mlp.hook_in",
          "mlp_out.2": "blocks.2.hook_mlp_out", "resid_pre.3": "blocks.2.hook_resid_post"}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt"])
def test_activations_and_identity_splice_match_the_engine_and_the_bridge(name):
    model = build_test_model(name, seed=2)
    engine = Engine(model)
    tokens = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    ref = engine.forward(tokens)
    for hook in HOOKS:
        assert (forward_with(engine, tokens, hook, lambda a: a) - ref).abs().max() <= 1e-5, hook
    _, cache = model.bridge.run_with_cache(tokens)
    for hook, bridge_name in BRIDGE.items():
        assert torch.allclose(hook_activations(engine, tokens, hook), cache[bridge_name], atol=1e-4), hook


def test_a_replaced_hook_changes_what_follows_and_the_error_restores_it(llama):
    model, engine = llama
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = engine.forward(tokens)
    zeroed = forward_with(engine, tokens, "mlp_out.1", torch.zeros_like)
    assert (zeroed - ref).abs().max() > 1e-3
    g = torch.Generator().manual_seed(3)
    d = Dictionary(torch.randn(48, 16, generator=g), torch.zeros(16), torch.randn(16, 48, generator=g) * 0.1,
                   torch.zeros(48), hook="resid_pre.2")
    assert (spliced_forward(engine, tokens, d, error=True) - ref).abs().max() <= 1e-4
    x = hook_activations(engine, tokens, "resid_pre.2")
    by_hand = forward_with(engine, tokens, "resid_pre.2", lambda a: d.reconstruct(x))
    assert torch.allclose(spliced_forward(engine, tokens, d), by_hand)
    tc = Dictionary(torch.randn(48, 16, generator=g), torch.zeros(16), torch.randn(16, 48, generator=g) * 0.1,
                    torch.zeros(48), hook="mlp_in.1", out_hook="mlp_out.1")
    h = hook_activations(engine, tokens, "mlp_in.1")
    assert torch.allclose(spliced_forward(engine, tokens, tc),
                          forward_with(engine, tokens, "mlp_out.1", lambda a: tc.reconstruct(h)))
    with pytest.raises(ValueError, match="is not reached before"):
        forward_with(engine, tokens, "mlp_in.1", lambda a: a, read="mlp_out.1")
    with pytest.raises(ValueError, match="has layers 0 to 2"):
        hook_activations(engine, tokens, "attn_out.3")
