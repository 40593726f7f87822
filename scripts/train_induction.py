"""Train the 2-layer attention-only induction model shipped as circuitsearch/data/induction_2l.pt.

Data: BOS (token 0), k distinct random tokens from 1..47, the same k tokens again, then random
filler up to 47 positions; k is drawn per sequence from 6..23 so no fixed positional offset can
stand in for induction. Loss only where induction predicts (second copy, after its first token).

Run:     .venv/bin/python scripts/train_induction.py        (from /work/main, CPU, 2 threads)
Result:  SEED = 0, 1000 steps of batch 64; RESULT_PLACEHOLDER
Then it reloads the file with load_induction_model(), checks the logits are identical, and
prints attention scores and a per-head mean-ablation table (see the report / tests).
"""
import time

import torch
import torch.nn.functional as F

from circuitsearch.models import INDUCTION_CONFIG, INDUCTION_WEIGHTS, build_test_model, load_induction_model

SEED, STEPS, BATCH, LR = 0, 1000, 64, 3e-3
V, BOS, KMIN, KMAX = INDUCTION_CONFIG["d_vocab"], 0, 6, 23
T = 1 + 2 * KMAX


def make_batch(g, n, k=None):
    """tokens [n, T], predictable-position mask [n, T] (logits at p predict p+1), and k per row."""
    ks = torch.randint(KMIN, KMAX + 1, (n,), generator=g) if k is None else torch.full((n,), k)
    toks = torch.randint(1, V, (n, T), generator=g)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i, ki in enumerate(ks.tolist()):
        a = torch.randperm(V - 1, generator=g)[:ki] + 1
        toks[i, 0], toks[i, 1:ki + 1], toks[i, ki + 1:2 * ki + 1] = BOS, a, a
        mask[i, ki + 1:2 * ki] = True
    return toks, mask, ks


def masked_loss_acc(logits, toks, mask):
    lg, tgt, m = logits[:, :-1], toks[:, 1:], mask[:, :-1]
    loss = F.cross_entropy(lg[m], tgt[m])
    return loss, (lg[m].argmax(-1) == tgt[m]).float().mean().item()


def train():
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    net = build_test_model(INDUCTION_CONFIG, seed=SEED, name="induction-2l").bridge.original_model
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    net.train()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    t0 = time.time()
    for step in range(1, STEPS + 1):
        toks, mask, _ = make_batch(g, BATCH)
        loss, acc = masked_loss_acc(net(toks), toks, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  acc {acc:.3f}  {time.time() - t0:.0f}s")
    print(f"training took {time.time() - t0:.1f}s")
    net.eval()
    INDUCTION_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, INDUCTION_WEIGHTS)
    return net


@torch.no_grad()
def analyse(net):
    model = load_induction_model()
    bridge, H = model.bridge, model.n_heads
    g = torch.Generator().manual_seed(SEED + 1)
    toks, mask, _ = make_batch(g, 256)
    assert torch.equal(bridge(toks), net(toks)), "reloaded logits differ"
    _, acc = masked_loss_acc(bridge(toks), toks, mask)
    print(f"reload OK; accuracy on the repeated half (k in {KMIN}..{KMAX}): {acc:.4f}")

    k = 20  # fixed k so positions line up for per-position means
    clean, cmask, _ = make_batch(g, 256, k)
    corrupt = clean.clone()
    corrupt[:, k + 1:] = torch.randint(1, V, (256, T - k - 1), generator=g)
    _, cache = bridge.run_with_cache(clean)
    pos = torch.arange(k + 1, 2 * k + 1)  # second copy
    for L in range(model.n_layers):
        pat = cache[f"blocks.{L}.attn.hook_pattern"]  # [batch, head, query, key]
        prev = pat[:, :, pos, pos - 1].mean((0, 2))
        ind = pat[:, :, pos, pos - k + 1].mean((0, 2))
        print(f"layer {L}: attn to i-1 {[round(x, 3) for x in prev.tolist()]}, "
              f"to induction target {[round(x, 3) for x in ind.tolist()]}")

    # logit difference: correct next token vs a random other token of the first copy
    qpos = torch.arange(k + 1, 2 * k)
    correct = clean[:, qpos + 1]
    shift = torch.randint(1, k, correct.shape, generator=g)
    wrong = clean[:, 1 + (qpos - k + shift) % k]

    def logit_diff(logits):
        lg = logits[:, qpos]
        return (lg.gather(-1, correct[..., None]) - lg.gather(-1, wrong[..., None])).mean().item()

    base = logit_diff(bridge(clean))
    _, ccache = bridge.run_with_cache(corrupt)
    print(f"clean logit diff {base:.3f}; corrupted {logit_diff(bridge(corrupt)):.3f}")
    print("mean-ablation (corrupted-batch mean of hook_z per position): logit diff, fraction lost")
    for L in range(model.n_layers):
        mean_z = ccache[f"blocks.{L}.attn.hook_z"].mean(0)  # [pos, head, d_head]
        for h in range(H):
            def hook(z, hook, h=h, mean_z=mean_z):
                z[:, :, h] = mean_z[:, h]
                return z
            ld = logit_diff(bridge.run_with_hooks(clean, fwd_hooks=[(f"blocks.{L}.attn.hook_z", hook)]))
            print(f"  L{L}H{h}: {ld:7.3f}   {1 - ld / base:6.1%}")


if __name__ == "__main__":
    analyse(train())
