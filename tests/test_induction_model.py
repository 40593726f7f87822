"""The shipped induction model (scripts/train_induction.py): it copies repeated sequences, with a
previous-token head in layer 0 and an induction head in layer 1."""
import pytest
import torch

from circuitsearch.toys import load_induction_model

PREV_TOKEN_HEAD = (0, 2)  # layer 0, head 2: attends to position i-1
INDUCTION_HEAD = (1, 1)   # layer 1, head 1: attends to the token after the previous occurrence
K, BOS = 20, 0


@pytest.fixture(scope="module")
def induction():
    return load_induction_model()


def repeated_batch(n: int = 64, seed: int = 1234) -> torch.Tensor:
    """BOS, K distinct random tokens from 1..d_vocab-1, the same K tokens again: [n, 2K+1]."""
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(47, generator=g)[:K] + 1 for _ in range(n)])
    return torch.cat([torch.full((n, 1), BOS), first, first], dim=1)


SECOND = torch.arange(K + 1, 2 * K + 1)  # query positions of the second copy


@torch.no_grad()
def test_accuracy_on_repeated_half(induction):
    toks = repeated_batch()
    logits = induction.bridge(toks)
    pos = SECOND[:-1]  # the last position's next token is not in the sequence
    acc = (logits[:, pos].argmax(-1) == toks[:, pos + 1]).float().mean().item()
    assert acc >= 0.9


@torch.no_grad()
def test_previous_token_and_induction_heads(induction):
    toks = repeated_batch()
    _, cache = induction.bridge.run_with_cache(toks)
    n, T = toks.shape
    pattern0 = cache["blocks.0.attn.hook_pattern"]
    assert pattern0.shape == (n, induction.n_heads, T, T)  # [batch, head, query, key]
    layer, head = PREV_TOKEN_HEAD
    prev = cache[f"blocks.{layer}.attn.hook_pattern"][:, head, SECOND, SECOND - 1].mean().item()
    assert prev >= 0.5
    layer, head = INDUCTION_HEAD
    ind = cache[f"blocks.{layer}.attn.hook_pattern"][:, head, SECOND, SECOND - K + 1].mean().item()
    assert ind >= 0.8
