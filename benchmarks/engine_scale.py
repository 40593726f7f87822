"""Engine vs bridge forward on seeded native models of growing size (Llama-style: RMS, rotary, GQA, gated MLP).

For each size: the engine's full forward (all positions, whole vocabulary, as Engine.check runs it)
and the bridge's own forward on the same tokens, median of repeated timings, with the threads
engine.choose_threads picks for that width; and the worst engine-vs-bridge difference relative to
the logit scale (the load check's figure; its tolerance is 1e-3).

    python benchmarks/engine_scale.py [--prompts 8] [--seq 16] [--seconds 2]

Measured on the 2-core machine (8 prompts x 16 tokens, --seconds 1.5):

    layers d_model   params threads engine ms bridge ms  ratio worst rel diff
         2      64     0.3M       1      1.38      2.72    2.0       2.09e-07
         4     128     1.2M       1      4.78      7.56    1.6       4.17e-07
         6     256     6.4M       2     13.86     19.45    1.4       8.41e-07
         8     512    32.5M       2     52.64     53.72    1.0       1.26e-06
        12     768   105.4M       2    207.34    150.53    0.7       1.48e-06

The engine's full forward (every position, whole vocabulary) is what the load check runs; the
evaluator's hot path never runs it (it recomputes from a cached layer and reads two unembedding
columns). Above ~30M parameters this full forward is slower than the bridge's: its attention is
plain einsum + softmax (the bridge's HF/native attention is fused), which the search does not feel
but the one-off check does.
"""
import argparse
import statistics
import time

import torch

from circuitsearch.engine import Engine, choose_threads
from circuitsearch.models import build_test_model

SIZES = [  # (layers, d_model, heads, kv heads)
    (2, 64, 4, 2), (4, 128, 4, 2), (6, 256, 8, 4), (8, 512, 8, 4), (12, 768, 12, 4),
]


def timed(fn, seconds: float) -> float:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print(f"{'layers':>6} {'d_model':>7} {'params':>8} {'threads':>7} {'engine ms':>9} {'bridge ms':>9} "
          f"{'ratio':>6} {'worst rel diff':>14}")
    for L, d, H, kv in SIZES:
        cfg = dict(n_layers=L, d_model=d, n_heads=H, n_key_value_heads=kv, d_head=d // H, d_mlp=4 * d,
                   d_vocab=1024, n_ctx=64, act_fn="silu", normalization_type="RMS", final_rms=True,
                   gated_mlp=True, positional_embedding_type="rotary", rotary_dim=d // H, init_mode="gpt2",
                   initializer_range=0.02)
        model = build_test_model(cfg, seed=0)
        threads = choose_threads(model)
        engine = Engine(model)
        tokens = torch.randint(0, 1024, (args.prompts, args.seq), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            t_engine = timed(lambda: engine.forward(tokens), args.seconds)
            t_bridge = timed(lambda: model.bridge(tokens), args.seconds)
        worst = engine.check(tokens)
        n = sum(p.numel() for p in model.bridge.original_model.parameters())
        print(f"{L:>6} {d:>7} {n / 1e6:>7.1f}M {threads:>7} {1e3 * t_engine:>9.2f} {1e3 * t_bridge:>9.2f} "
              f"{t_bridge / t_engine:>6.1f} {worst:>14.2e}")


if __name__ == "__main__":
    main()
