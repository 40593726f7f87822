"""Shared fixtures: seeded native models, random token tasks, and the embedded model (slow)."""
import random

import pytest
import torch

from circuitsearch.catalogue import load_model
from circuitsearch.tasks.base import Task, build_task


_RUNNING: list = [None]  # the test item being set up or run


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _RUNNING[0] = item


@pytest.fixture(autouse=True, scope="session")
def _smollm2_only_in_slow_tests():
    """A test that loads the embedded SmolLM2 in this process without the `slow` marker fails, naming the fix, so
    `-m "not slow"` really leaves the model out (tests that load it only in a child process are not seen)."""
    import circuitsearch.models as models

    real = models._load_smollm2

    def guarded():
        item = _RUNNING[0]
        if item is not None and item.get_closest_marker("slow") is None:
            pytest.fail(f"{item.nodeid} loads SmolLM2 but is not marked slow: add @pytest.mark.slow (or a module "
                        "pytestmark) so that -m 'not slow' skips it")
        return real()

    models._load_smollm2 = guarded
    yield
    models._load_smollm2 = real


@pytest.fixture(autouse=True)
def _torch_threads_as_they_were():
    """Commands set torch's thread count for the model they load (engine.choose_threads); a test that
    ran one must not leave the next test's models on its count."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def random_task(vocab: int, n: int = 6, seq: int = 7, seed: int = 0, low: int = 0, name: str = "random") -> Task:
    """Random prompts (token ids low..vocab-1) and answers; the wrong answer is always another token."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(low, vocab, (n, seq), generator=g)
    corrupted = torch.randint(low, vocab, (n, seq), generator=g)
    answers = torch.randint(0, vocab, (n,), generator=g)
    wrong = (answers + 1 + torch.randint(0, vocab - 1, (n,), generator=g)) % vocab
    blank = [""] * n
    return Task(name, clean, corrupted, answers, wrong, blank, blank, blank, blank)


def self_task(model, n: int = 8, seq: int = 7, seed: int = 0) -> Task:
    """Random prompts whose answer is the model's own top choice and wrong answer its last choice,
    so the full model scores high and ablations lower the score: a graded task on a random model."""
    t = random_task(model.bridge.cfg.d_vocab, n, seq, seed)
    with torch.no_grad():
        logits = model.bridge(t.clean)[:, -1]
    return Task("self", t.clean, t.corrupted, logits.argmax(-1), logits.argmin(-1), t.clean_text,
                t.corrupted_text, t.answer_text, t.wrong_text)


@pytest.fixture(scope="session", params=["test:tiny-llama", "test:tiny-gpt", "test:tiny-attn"])
def test_model(request):
    return load_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


def digits_prompts(n: int = 24, seed: int = 0):
    """Increasing-digit prompts ('3 4 5 6 ' -> '7') with random-digit corruptions."""
    rng = random.Random(seed)
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        s = rng.randint(0, 5)
        seq = [str(s + j) for j in range(4)]
        clean.append(" ".join(seq) + " ")
        corrupted.append(" ".join(str(rng.randint(0, 9)) for _ in range(4)) + " ")
        answers.append(str(s + 4))
        wrong.append(seq[-1])
    return clean, corrupted, answers, wrong


@pytest.fixture(scope="session")
def smollm2_digits(smollm2):
    return build_task("digits", smollm2.tokenizer, *digits_prompts())


# ---- stability pages (tests/test_stability_page.py, tests/test_page_browser.py) ----------------------
# The toy models' circuits are the same in every resample (every frequency 1), so the shading tests also
# use a copy of a real stability run whose stability.json is given varied frequencies, including units
# the full-data circuit does not hold (a0.0, m1 and their edges); the page is rebuilt from it.
VARIED_NODES = {"a1.2": 1.0, "m0": 0.75, "a0.1": 0.5, "a0.0": 0.25, "m1": 0.5}
VARIED_EDGES = {"a1.2->logits": 1.0, "m0->logits": 0.75, "a0.1->a1.2.v": 0.5, "embed->a0.1.v": 0.25,
                "embed->m0": 0.0, "a0.0->m1": 0.25, "m1->logits": 0.5}


def planted_stability(out, bootstrap: int = 4) -> dict:
    """A real stability run of the planted model (about 2 s): B bootstrap prunes, held-out scores, stability.html."""
    from circuitsearch.config import PruneConfig
    from circuitsearch.sweeps import InlineExecutor
    from circuitsearch.sweeps.stability import run_stability

    cfg = PruneConfig(model="test:planted", task="planted", n_prompts=12)
    return run_stability(cfg, out, bootstrap, InlineExecutor(), holdout=6, log=lambda *a: None)


def vary_stability(src, dst):
    """A copy of the stability directory `src` at `dst` with VARIED_* frequencies in stability.json (in_full kept
    true to the full-data circuit), and its stability.html rebuilt; returns dst."""
    import json
    import shutil

    from circuitsearch.runs.view import write_view

    shutil.copytree(src, dst)
    s = json.loads((dst / "stability.json").read_text())
    full_nodes = {n for n, r in s["nodes"].items() if r["in_full"]}
    full_edges = {e for e, r in s["edges"].items() if r["in_full"]}
    s["nodes"] = {n: {"frequency": f, "in_full": n in full_nodes} for n, f in VARIED_NODES.items()}
    s["edges"] = {e: {"frequency": f, "in_full": e in full_edges} for e, f in VARIED_EDGES.items()}
    (dst / "stability.json").write_text(json.dumps(s))
    write_view(dst, dst / "stability.html")
    return dst
