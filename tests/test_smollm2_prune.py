"""The main job on the embedded model: a digits node circuit that keeps 80% and is much smaller."""
import json

import pytest
import torch

from circuitsearch.evaluation import cross_task
from circuitsearch.patching import Evaluator
from circuitsearch.reference import hooked_score
from circuitsearch.runs import PruneConfig, run_prune
from circuitsearch.tasks import get_task
from circuitsearch.tasks.base import Task


@pytest.mark.slow
def test_smollm2_digits_node_circuit(tmp_path, smollm2):
    cfg = PruneConfig(model="smollm2-135m", task="digits", level="nodes", n_prompts=24)
    c = run_prune(cfg, tmp_path, progress=False, log=lambda *a: None, curves=False)
    n_nodes = 1 + smollm2.n_layers * (smollm2.n_heads + 1)
    assert c.scores["faithfulness"] >= 0.8
    assert c.n_nodes - 1 <= 0.25 * n_nodes  # much smaller than the model (logits not counted)
    assert len(c.heads()) <= 0.25 * smollm2.n_layers * smollm2.n_heads
    # an independent re-score from the files alone
    task = Task.from_json(json.loads((tmp_path / "task.json").read_text()))
    ev = Evaluator(smollm2, task, "mean")
    ablated = [n for n in ev.senders if n not in c.nodes]
    assert ev.faithfulness(ev.score(nodes=ablated)) == pytest.approx(c.scores["faithfulness"], abs=1e-5)
    assert ev.faithfulness(ev.score(nodes=ablated)) >= 0.8
    # cross-task: on its own prompts the circuit scores its own score; months prompts are built fresh
    ct = cross_task([tmp_path], ["digits", "months"], model=smollm2, log=lambda *a: None)
    assert ct.scores[0][0]["faithfulness"] == pytest.approx(c.scores["faithfulness"], abs=1e-5)
    assert ct.prompts == {"digits": 24, "months": 24}
    # the months column against values computed here: the same prompts built by hand, the full score by the
    # plain forward, the circuit's by the hooked reference (every node outside the circuit ablated)
    months = get_task("months", smollm2.tokenizer, n=24, seed=0, model=smollm2)
    assert not months.mixed and len(months) == 24
    with torch.no_grad():
        logits = smollm2.bridge(months.clean)[:, -1]
    plain = float((logits.gather(1, months.answers[:, None]) - logits.gather(1, months.wrong_answers[:, None])).mean())
    on_months = ct.scores[0][1]
    assert on_months["full"] == pytest.approx(plain, abs=1e-4) and plain > 0
    assert on_months["circuit"] == pytest.approx(hooked_score(smollm2, months, "mean", nodes=ablated), abs=1e-3)
    empty = hooked_score(smollm2, months, "mean", nodes=ev.senders)
    assert on_months["faithfulness"] == pytest.approx(on_months["circuit"] / plain, abs=1e-4)
    assert on_months["normalized"] == pytest.approx((on_months["circuit"] - empty) / (plain - empty), abs=1e-3)
