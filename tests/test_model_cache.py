"""The embedded model's converted copy in the cache is the GGUF file's model, and a cache that
cannot be written only costs time (with a warning that says so)."""
import os

import pytest
import torch

from circuitsearch import models


@pytest.mark.slow
def test_cached_conversion_is_the_gguf_model(smollm2):
    path = models.smollm2_gguf_path()
    converted = models.cache_dir() / f"{path.stem}-{models._sha256(path)[:16]}"
    assert (converted / models.COMPLETE).exists()  # the fixture's load wrote (or used) it
    from transformers import AutoModelForCausalLM

    tok, hf = models._read_gguf(path)  # read afresh from the GGUF file
    cached = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32, local_files_only=True)
    fresh, kept = hf.state_dict(), cached.state_dict()
    assert fresh.keys() == kept.keys()
    assert all(torch.equal(fresh[k], kept[k]) for k in fresh)
    prompts = ["1 2 3 4 ", "one, two, three, four,", "January, February,"]
    assert tok(prompts).input_ids == smollm2.tokenizer(prompts).input_ids
    ids = torch.tensor([tok("3 4 5 6 7 ").input_ids])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, cached(ids).logits)
        assert torch.allclose(smollm2.bridge(ids), hf(ids).logits, atol=1e-4)  # what the runs use


def test_unwritable_cache_warns_and_leaves_nothing(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("CIRCUITSEARCH_CACHE", str(blocker))
    target = models.cache_dir() / "m-0123"
    with pytest.warns(UserWarning, match="could not keep the converted model"):
        models._keep_converted(target, hf=None, tok=None, source=tmp_path / "m.gguf")
    assert blocker.read_text() == ""


def test_stale_partial_conversion_is_removed(tmp_path, monkeypatch):
    """A directory left by a killed conversion (its pid gone) is removed by the next one; a live
    process's is left alone."""
    monkeypatch.setenv("CIRCUITSEARCH_CACHE", str(tmp_path))
    target = models.cache_dir() / "m-0123"
    dead = tmp_path / "m-0123.tmp999999999"
    live = tmp_path / f"m-0123.tmp{os.getppid()}"
    for d in (dead, live):
        d.mkdir()
    with pytest.warns(UserWarning):  # hf=None cannot be saved: the write fails after the clean-up
        models._keep_converted(target, hf=None, tok=None, source=tmp_path / "m.gguf")
    assert not dead.exists() and live.exists() and not target.exists()
