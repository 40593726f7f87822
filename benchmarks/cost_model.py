"""The full-forward-equivalent cost model against measured time.

Every run reports "full-forward equivalents": each forward pass counted as the fraction of the model it
recomputes (Layout.cost), a fixed model in which a change at layer l costs the layers from l on, a
layer's attention (q/k/v, softmax, W_O) being 0.35 of it and W_O alone 0.05. This script measures
what a pass from each kind of start really costs on this machine, relative to a full pass, and prints
the model's fraction beside it: it says how far the count can be read as time.

    python benchmarks/cost_model.py [--model smollm2-135m] [--task digits] [--reps 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from circuitsearch.config import PruneConfig, build


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    model, task, ev = build(PruneConfig(model=args.model, task=args.task))
    L, eng = ev.L, ev.engine
    print(f"{model.name}, task {task.name}: {len(ev.batch.tokens)} distinct prompt rows x {task.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")

    # 1. a layer's parts, timed through the engine's own layer functions on the task's rows
    l = L // 2
    lw, x = eng.layer(l), ev.clean_run.resid_pre[l]
    with torch.inference_mode():
        z = eng.attention(lw, x)
        t_attn = median_seconds(lambda: eng.add_heads(x, lw, eng.attention(lw, x)), args.reps)
        t_wo = median_seconds(lambda: eng.add_heads(x, lw, z), args.reps)
        t_mlp = median_seconds(lambda: eng.mlp(lw, x), args.reps) if not ev.attn_only else 0.0
    layer = t_attn + t_mlp
    print(f"\nlayer {l}: attention with W_O {t_attn * 1e3:.2f} ms, W_O sum alone {t_wo * 1e3:.2f} ms, MLP "
          f"{t_mlp * 1e3:.2f} ms")
    print("\n| part of a layer | cost model | measured |\n|---|---|---|")
    print(f"| attention (q/k/v, softmax, W_O) | 0.35 | {t_attn / layer:.2f} |")
    print(f"| W_O sum alone | 0.05 | {t_wo / layer:.2f} |")
    print(f"| MLP | 0.65 | {t_mlp / layer:.2f} |")

    # 2. whole passes: from a head ablated at layer l (its W_O sum on) and from an edge into its MLP,
    # against a full pass; and a pass with an edge removed into a head's query, whose layers then run each
    # head's own q/k/v input (the model counts it as a plain pass from that layer)
    rows = []
    with torch.inference_mode():
        full = median_seconds(lambda: ev._forward(None, -1, ev.clean_run.masks, ev._embed_clean, count=False), args.reps)
    rows.append(("full forward", -1, 1.0, full))
    for l in sorted({1, L // 2, L - 2}):
        q_edge = f"embed->a{l}.0.q" if ev.graph.qkv else f"embed->a{l}.0"
        kinds = [(f"head a{l}.0 ablated", {"nodes": [f"a{l}.0"]})]
        if not ev.attn_only:
            kinds.append((f"edge embed->m{l} removed", {"edges": [f"embed->m{l}"]}))
        kinds.append((f"edge {q_edge} removed (per-head q/k/v at layer {l})", {"edges": [q_edge]}))
        for what, change in kinds:
            masks, start = ev._change(ev.clean_run, change.get("nodes", ()), change.get("edges", ()))
            with torch.inference_mode():
                t = median_seconds(lambda: ev._forward(ev.clean_run, start, masks, ev._embed_clean, count=False),
                                   args.reps)
            rows.append((what, start, ev.layout.cost(start), t))
    print("\n| pass | start stage | cost model (fraction of a full pass) | measured fraction | measured ms |")
    print("|---|---|---|---|---|")
    for what, start, model_frac, t in rows:
        print(f"| {what} | {start} | {model_frac:.3f} | {t / full:.3f} | {t * 1e3:.1f} |")


if __name__ == "__main__":
    main()
