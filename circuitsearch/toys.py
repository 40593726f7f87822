"""Models with a known circuit, and their tasks: ground truth for the search algorithms.

Registered by name in MODELS and TASKS (catalogue.py and config.resolve_task read them). torch
is imported inside the functions, so listing the names stays instant.

The induction model (induction-2l) is a 2-layer attention-only model trained on repeated
random sequences by scripts/train_induction.py; its weights ship in data/.

The planted model (2 layers x 4 heads, no normalisation) computes its answer along two
paths only: a0.1 averages the token embeddings into dims 8-15, a1.2 reads those and
writes dims 24-31 (a composition a0.1 -> a1.2), and m0 copies the current token into dims
16-23; the unembedding reads dims 16-31. Every other head and MLP computes with random
weights but writes only into dims 32-39, which nothing planted reads, so ablating it
changes nothing, exactly. Each path gives half the logit difference, so at A = 0.8 every
planted node is needed.
"""
from __future__ import annotations

from pathlib import Path

from .models import Model, ModelError, NamedModel, build_test_model, load_state, seed_of, seeded

PLANTED_CONFIG = dict(n_layers=2, d_model=40, n_heads=4, d_head=8, d_mlp=16, d_vocab=8, n_ctx=16,
                      act_fn="relu", normalization_type=None, positional_embedding_type="standard")
PLANTED_NODES = ("embed", "a0.1", "m0", "a1.2", "logits")
PLANTED_EDGES = ("embed->a0.1.v", "embed->m0", "a0.1->a1.2.v", "m0->logits", "a1.2->logits")


def _param(model: Model, name: str):
    for k, v in model.bridge.original_model.named_parameters():
        if k.replace("._original_component", "") == name:
            return v
    raise KeyError(name)


def planted_model(seed: int = 0) -> Model:
    """The planted-circuit model; `seed` varies only the weights of the nodes outside the circuit."""
    import torch

    model = build_test_model(PLANTED_CONFIG, seed=seed, name=f"test:planted:{seed}")
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g) * 0.5
    eye8 = torch.eye(8)
    with torch.no_grad():
        for p in model.bridge.original_model.parameters():
            p.zero_()
        _param(model, "tok_embed.weight")[:, :8] = eye8
        _param(model, "tok_embed.weight")[:, 32:] = rand(8, 8)  # junk the planted nodes ignore
        for layer in range(2):
            q, k, v, o = (_param(model, f"layers.{layer}.attn.{x}.weight") for x in "qkvo")
            for h in range(4):
                rows = slice(8 * h, 8 * h + 8)  # head h's slice of the q/k/v outputs and o inputs
                if (layer, h) == (0, 1):        # uniform attention, copies the tokens into dims 8-15
                    v[rows, 0:8] = eye8
                    o[8:16, rows] = eye8
                elif (layer, h) == (1, 2):      # uniform attention, reads dims 8-15, writes 24-31
                    v[rows, 8:16] = eye8
                    o[24:32, rows] = eye8
                else:                           # reads anything, writes only junk dims 32-39
                    q[rows] = rand(8, 40)
                    k[rows] = rand(8, 40)
                    v[rows] = rand(8, 40)
                    o[32:40, rows] = rand(8, 8)
            fc_in = _param(model, f"layers.{layer}.mlp.fc_in.weight")
            fc_out = _param(model, f"layers.{layer}.mlp.fc_out.weight")
            if layer == 0:                      # copies the current token into dims 16-23
                fc_in[0:8, 0:8] = eye8
                fc_out[16:24, 0:8] = eye8
            else:
                fc_in[:] = rand(16, 40)
                fc_out[32:40, :] = rand(8, 16)
        unembed = _param(model, "head.weight")
        unembed[:, 16:24] = eye8
        unembed[:, 24:32] = eye8
    return model


def planted_task(n: int = 16, seq: int = 6, seed: int = 0):
    """Clean: one token repeated (answer: that token); corrupted: random tokens."""
    import torch

    from .tasks.base import Task

    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 8, (n,), generator=g)
    clean = t[:, None].repeat(1, seq)
    corrupted = torch.randint(0, 8, (n, seq), generator=g)
    corrupted[:, -1] = (t + 1 + torch.randint(0, 7, (n,), generator=g)) % 8  # never the answer itself
    wrong = (t + 1) % 8
    text = lambda row: " ".join(map(str, row.tolist()))
    return Task("planted", clean, corrupted, t, wrong, [text(r) for r in clean], [text(r) for r in corrupted],
                [str(int(a)) for a in t], [str(int(w)) for w in wrong], {"end": seq - 1},
                {"source": "circuitsearch.toys.planted_task", "seed": seed})


def induction_task(n: int = 24, k: int = 10, seed: int = 0, vocab: int = 48):
    """BOS, k distinct random tokens, then the same tokens again up to the last: answer the next one.

    Corrupted prompts replace the second copy with fresh tokens, so nothing repeats and
    induction has nothing to copy. The wrong answer is the first token of the sequence.
    """
    import torch

    from .tasks.base import Task

    g = torch.Generator().manual_seed(seed)
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        perm = torch.randperm(vocab - 1, generator=g) + 1
        a, fresh = perm[:k], perm[k:2 * k - 1]
        clean.append(torch.cat([torch.tensor([0]), a, a[: k - 1]]))
        corrupted.append(torch.cat([torch.tensor([0]), a, fresh]))
        answers.append(int(a[k - 1]))
        wrong.append(int(a[0]))
    clean, corrupted = torch.stack(clean), torch.stack(corrupted)
    text = lambda row: " ".join(map(str, row.tolist()))
    positions = {f"S{i}": i + 1 for i in range(k)} | {"end": 2 * k - 1}
    return Task("induction", clean, corrupted, torch.tensor(answers), torch.tensor(wrong),
                [text(r) for r in clean], [text(r) for r in corrupted], [str(a) for a in answers],
                [str(w) for w in wrong], positions, {"source": "circuitsearch.toys.induction_task", "k": k,
                                                     "seed": seed})


INDUCTION_CONFIG = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=48, n_ctx=48,
                        act_fn="gelu", normalization_type="LN", attn_only=True,
                        positional_embedding_type="standard", init_mode="gpt2")
INDUCTION_WEIGHTS = Path(__file__).parent / "data" / "induction_2l.pt"


def load_induction_model() -> Model:
    """The 2-layer attention-only model trained on repeated random sequences (see scripts/)."""
    if not INDUCTION_WEIGHTS.exists():
        raise ModelError(f"{INDUCTION_WEIGHTS} is missing: run `python scripts/train_induction.py`")
    model = build_test_model(INDUCTION_CONFIG, seed=0, name="induction-2l")
    model.source = "trained:" + INDUCTION_WEIGHTS.name
    return load_state(model, INDUCTION_WEIGHTS)


# The toys' entries in the model registry (catalogue.py) ...
MODELS = [
    NamedModel("induction-2l", lambda name: load_induction_model(),
               "2-layer attention-only model trained by scripts/train_induction.py (has an induction circuit)",
               "nothing: weights ship in the package"),
    NamedModel("test:planted", lambda name: planted_model(seed_of(name)),
               "2-layer model with a planted circuit (embed, a0.1, m0, a1.2); use --task planted",
               "nothing", seeded("test:planted")),
]
# ... and their tasks by name: name -> (builder(n=, seed=), description for `circuitsearch tasks`).
TASKS = {
    "planted": (planted_task, "token task for the test:planted model (known circuit)"),
    "induction": (induction_task, "token task for the induction-2l model (repeated random sequences)"),
}
