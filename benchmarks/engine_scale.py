"""Fast engine, hook-based path and plain bridge forward on seeded native models of growing size.

Llama-style models (RMS, rotary, grouped-query attention with 2 query heads per key/value head, gated
SiLU MLP of 8/3 d_model, vocabulary 1024), d_model 256 -> 2048 and 6 -> 24 layers, each in a fresh
subprocess so its memory is its own. For each size, on one task of random prompts:

- bridge: the bridge's own forward of the clean prompts (seconds; the reference cost of one pass);
- fast: the Evaluator (load check included) scoring circuits, seconds per forward-equivalent (its own
  count), and the engine-vs-bridge difference of the load check;
- hooked: the HookedEvaluator (structure check included) scoring the same circuits, seconds per
  forward-equivalent (one full forward per circuit); "edges" circuits remove k/v edges that differ
  between the query heads of a group, so the path runs two copies of the prompts (see hooked.py);
- peak memory: the resident set's high-water mark above the loaded model (and, fast, the engine's
  weights), divided by the prompts, for each path (fast: the evaluator's build, its scores and one
  attribution gradient; hooked: the same; bridge: its forward);
- bytes per parameter: resident memory of the loaded model (bridge) and of the engine's weights.

    python benchmarks/engine_scale.py [--prompts 8] [--seq 16] [--reps 3] [--sizes 0,1,2,3,4]

Results and the 24 GiB estimate: benchmarks/RESULTS.md ("Issue 13: engine, hook-based path, bridge").
"""
import argparse
import gc
import json
import random
import subprocess
import sys
import time

SIZES = [  # (layers, d_model, heads, kv heads)
    (6, 256, 8, 4), (12, 512, 8, 4), (12, 1024, 16, 8), (24, 1024, 16, 8), (24, 2048, 16, 8),
]


def status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def one(L: int, d: int, H: int, kv: int, prompts: int, seq: int, reps: int, path: str) -> dict:
    """One size on one path (fast or hooked), in this process: the figures as a dict."""
    import torch

    from circuitsearch.engine import Engine, choose_threads
    from circuitsearch.hooked import HookedEvaluator
    from circuitsearch.models import build_test_model
    from circuitsearch.patching import Evaluator
    from circuitsearch.tasks.base import Task

    warm = build_test_model("tiny-llama")  # every lazy import done before the baseline
    Evaluator(warm, Task("w", *torch.zeros(2, 1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                         torch.ones(1, dtype=torch.long), [""], [""], [""], [""]))
    del warm
    gc.collect()
    rss0 = status("VmRSS")
    cfg = dict(n_layers=L, d_model=d, n_heads=H, n_key_value_heads=kv, d_head=d // H, d_mlp=(8 * d // 3) // 64 * 64,
               d_vocab=1024, n_ctx=64, act_fn="silu", normalization_type="RMS", final_rms=True, gated_mlp=True,
               positional_embedding_type="rotary", rotary_dim=d // H, init_mode="gpt2", initializer_range=0.02)
    model = build_test_model(cfg, seed=0)
    threads = choose_threads(model)
    gc.collect()
    rss_model = status("VmRSS")
    n_params = sum(p.numel() for p in model.bridge.original_model.parameters())
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, 1024, (2, prompts, seq), generator=g)
    answers = torch.randint(0, 1024, (prompts,), generator=g)
    wrong = (answers + 1) % 1024
    blank = [""] * prompts
    task = Task("random", clean, corrupted, answers, wrong, blank, blank, blank, blank)
    out = dict(layers=L, d_model=d, heads=H, kv=kv, params=n_params, threads=threads, prompts=prompts, seq=seq,
               model_bytes_per_param=(rss_model - rss0) / n_params)

    with torch.inference_mode():
        model.bridge(clean)  # warm-up
        reset_peak()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model.bridge(clean)
            t.append(time.perf_counter() - t0)
    out["bridge_s"] = min(t)
    out["bridge_peak_per_prompt"] = (status("VmHWM") - rss_model) / prompts

    def circuits(ev):
        rng = random.Random(0)
        nodes = rng.sample(ev.senders[1:], len(ev.senders) // 4)
        kv_edges = [e for e in ev.graph.edges if e.endswith(".k") or e.endswith(".v")]
        return [("nodes", nodes, [])] * reps + [("edges", nodes[: len(nodes) // 2], rng.sample(kv_edges, 40))] * reps

    def timed(ev, prefix):
        by = {}
        for kind, nodes, edges in circuits(ev):
            fe = ev.forward_equivalents
            t0 = time.perf_counter()
            ev.score(nodes=nodes, edges=edges)
            by.setdefault(kind, []).append((time.perf_counter() - t0) / max(ev.forward_equivalents - fe, 1e-9))
        for kind, v in by.items():
            out[f"{prefix}_{kind}_s_per_fe"] = min(v)
        return by

    if path == "fast":
        reset_peak()
        t0 = time.perf_counter()
        engine = Engine(model)  # its weights: the parts it fuses or converts are copies of the bridge's
        gc.collect()
        engine_bytes = status("VmRSS") - rss_model
        out["engine_bytes_per_param"] = engine_bytes / n_params
        ev = Evaluator(model, task, engine=engine)
        out["fast_build_s"] = time.perf_counter() - t0
        out["fast_check_rel_diff"] = ev.engine.check(task.clean)
        timed(ev, "fast")
        ev.receiver_gradients()  # one EAP-IG step: the default prune's curves run these
        out["fast_peak_per_prompt"] = (status("VmHWM") - rss_model - engine_bytes) / prompts
    else:
        reset_peak()
        t0 = time.perf_counter()
        ev = HookedEvaluator(model, task)
        out["hooked_build_s"] = time.perf_counter() - t0
        timed(ev, "hooked")
        ev.receiver_gradients()  # as on the fast path
        out["hooked_peak_per_prompt"] = (status("VmHWM") - rss_model) / prompts
    out[f"{path}_scores"] = [ev.score(nodes=n, edges=e) for _, n, e in circuits(ev)[::reps]]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default=",".join(str(i) for i in range(len(SIZES))))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(*SIZES[args.one], args.prompts, args.seq, args.reps, args.path)))
        return
    rows = []
    head = (f"{'layers':>6} {'d_model':>7} {'params':>7} {'bridge s':>9} {'fast s/fe':>9} {'hook s/fe':>9} "
            f"{'hook+kv s/fe':>12} {'MB/prompt fast':>14} {'hooked':>7} {'bridge':>7} {'B/param':>7} {'eng B/p':>7} {'check':>8} {'hook-fast':>9}")
    print(head, flush=True)
    for i in map(int, args.sizes.split(",")):
        t0 = time.perf_counter()
        row = {}
        for path in ("fast", "hooked"):  # each path in a process of its own: its memory is its own
            r = subprocess.run([sys.executable, __file__, "--one", str(i), "--path", path, "--prompts",
                                str(args.prompts), "--seq", str(args.seq), "--reps", str(args.reps)],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"size {SIZES[i]} {path} failed:\n{r.stderr[-3000:]}", flush=True)
                break
            row.update({k: v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()
                        if path == "fast" or k.startswith("hooked")})
        else:
            row["hooked_vs_fast_max_abs"] = max(abs(a - b) for a, b in zip(row["fast_scores"], row["hooked_scores"]))
        if "hooked_vs_fast_max_abs" not in row:
            continue
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        mb = lambda k: row[k] / 2 ** 20
        print(f"{row['layers']:>6} {row['d_model']:>7} {row['params'] / 1e6:>6.0f}M {row['bridge_s']:>9.3f} "
              f"{row['fast_nodes_s_per_fe']:>9.3f} {row['hooked_nodes_s_per_fe']:>9.3f} "
              f"{row['hooked_edges_s_per_fe']:>12.3f} {mb('fast_peak_per_prompt'):>14.1f} "
              f"{mb('hooked_peak_per_prompt'):>7.1f} {mb('bridge_peak_per_prompt'):>7.1f} "
              f"{row['model_bytes_per_param']:>7.2f} {row['engine_bytes_per_param']:>7.2f} "
              f"{row['fast_check_rel_diff']:>8.1e} {row['hooked_vs_fast_max_abs']:>9.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
