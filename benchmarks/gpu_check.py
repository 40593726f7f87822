"""The engine on a CUDA device: logits against the bridge, batch-size invariance, and the demo's speed.

Checks, one table row each (check, device, dtype, result, time):

  logits      the fast engine's forward (every position of the task's clean and corrupted prompts)
              against the bridge's own float32 forward on CPU. float32: max |engine - bridge| at most
              1e-4 of the logit scale, scale = max(1, max |bridge logit|) (the scale Engine.check uses).
              bfloat16 is checked through the float32 row (its semantics are those of the engine that
              passed there): the bfloat16 engine may be no further from the float32 bridge than
              BF16_FACTOR x the bridge's own bfloat16 forward (a copy of it in bfloat16 on the same
              device) is; both figures are printed, and the bf16 engine vs the bf16 bridge beside them.
  batch       the search with speculation batch 1 and batch --batch (16) on the device: the same
              decisions (phase, pass, candidate, verdict, in order) and the same circuit, exactly;
              the largest difference between logged scores is printed (a row of a batched pass takes
              another GEMM path than a lone one, so scores agree to float rounding, not bit for bit).
  search      the demo's search (`circuitsearch prune` defaults: digits, both levels, default order,
              A = 0.8, 24 prompts; --quick: node level, 8 prompts) at batch --batch, timed on each
              device (model load and evaluator build excluded), and whether CUDA's circuit is CPU's.

Cost: on a 2-core CPU box the full run took 11 min (each demo search ~4 min, bf16 on CPU ~2 min) and --quick
(node level, 8 prompts) 2.5 min; on a GPU machine the CPU rows get its cores. Without a CUDA device it says so and runs the CPU rows only (the CUDA rows say "not run"). Exit status
1 if any check fails (an exception in a check is a failure, with its message in the row), 2 for bad
arguments. --out writes the table as Markdown (atomically) for benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py [--quick] [--device auto|cpu|cuda|cuda:N] [--out table.md]
                                   [--model smollm2-135m] [--task digits] [--batch 16]
                                   [--checks logits,search]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from circuitsearch.algorithms.iterative import Thresholds, find_circuit
from circuitsearch.algorithms.orders import parse_order
from circuitsearch.catalogue import load_model
from circuitsearch.config import PruneConfig, evaluator, resolve_task
from circuitsearch.engine import Engine, parse_device

FP32_TOLERANCE = 1e-4  # max |engine - bridge| / logit scale, float32
BF16_FACTOR = 3.0      # the bf16 engine's error against fp32, at most this many times the bf16 bridge's own
NO_CUDA = "no CUDA device: running the CPU columns only"


@dataclass
class Row:
    """One line of the table: ok None means not run (said in `result`), never a pass."""

    check: str
    device: str
    dtype: str
    ok: bool | None
    result: str
    seconds: float | None = None

    def cells(self) -> list[str]:
        verdict = {True: "PASS", False: "FAIL", None: "not run"}[self.ok]
        took = "" if self.seconds is None else f"{self.seconds:.1f} s"
        cells = [self.check, self.device, self.dtype, f"{verdict}: {self.result}", took]
        return [c.replace("|", "\\|").replace("\n", " ") for c in cells]  # one Markdown cell each


def logit_scale(ref: torch.Tensor) -> float:
    """The logit scale differences are measured against: max(1, max |reference logit|)."""
    return max(1.0, float(ref.abs().max()))


def compare_logits(mine: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    """max |mine - ref| / scale; inf for a shape mismatch or any NaN/inf (never a pass by accident)."""
    if mine.shape != ref.shape:
        return math.inf
    diff = (mine.float().cpu() - ref.float().cpu()).abs().max()
    worst = float(diff) / scale
    return worst if math.isfinite(worst) else math.inf


def fp32_verdict(rel: float, tolerance: float = FP32_TOLERANCE) -> tuple[bool, str]:
    """(passes, text) of a float32 logit comparison."""
    return rel <= tolerance, f"max abs(engine - bridge) = {rel:.2e} of the logit scale (tolerance {tolerance:g})"


def bf16_verdict(rel_engine: float, rel_bridge: float, rel_pair: float, fp32_ok: bool,
                 factor: float = BF16_FACTOR) -> tuple[bool, str]:
    """(passes, text) of the bf16 row: within `factor` x the bridge's own bf16 error, and the fp32 row passed."""
    limit = factor * rel_bridge
    text = (f"bf16 engine vs fp32 bridge {rel_engine:.2e}, bf16 bridge vs fp32 bridge {rel_bridge:.2e} "
            f"(limit {factor:g}x = {limit:.2e}), bf16 engine vs bf16 bridge {rel_pair:.2e}")
    if not fp32_ok:
        return False, "the float32 row failed, so bf16 is not checked through it; " + text
    return rel_engine <= limit and math.isfinite(rel_bridge), text


def trace(result) -> list[tuple]:
    """A search's decisions as (phase, pass, candidate, kept), in order."""
    return [(d.phase, d.pass_, d.candidate, d.removed) for d in result.decisions]


def compare_searches(a, b) -> tuple[bool, str]:
    """(identical, text): the same decisions in the same order and the same circuit (nodes and edges)."""
    ta, tb = trace(a), trace(b)
    same_decisions = ta == tb
    same_circuit = a.ablated == b.ablated and a.removed_edges == b.removed_edges
    text = f"{len(ta)} vs {len(tb)} decisions, " + ("identical" if same_decisions else "DIFFERENT")
    if not same_decisions:
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        text += f" (first at #{first}: {ta[first] if first < len(ta) else '-'} vs {tb[first] if first < len(tb) else '-'})"
    text += "; circuit " + ("identical" if same_circuit else "DIFFERENT")
    if same_decisions:
        gap = max((abs(x.score - y.score) for x, y in zip(a.decisions, b.decisions)), default=0.0)
        text += f"; scores agree to {gap:.1e}"
    return same_decisions and same_circuit, text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(out) -> torch.Tensor:
    return getattr(out, "logits", out)


def _bridge_copy(model, device: torch.device, dtype: torch.dtype):
    """The bridge in another dtype on `device` (a deep copy: the loaded bridge stays as it is)."""
    return copy.deepcopy(model.bridge).to(device=device, dtype=dtype)


def logit_rows(model, tokens: torch.Tensor, device: torch.device) -> list[Row]:
    """The float32 and bfloat16 logit rows on `device`."""
    dev = str(device)
    with torch.inference_mode():
        ref = _logits(model.bridge(tokens)).float().cpu()
        scale = logit_scale(ref)
        rows = []
        t = time.perf_counter()
        try:
            mine = Engine(model, device=device, dtype=torch.float32).forward(tokens)
            _sync(device)
            ok32, text = fp32_verdict(compare_logits(mine, ref, scale))
            rows.append(Row("logits vs bridge", dev, "float32", ok32, f"{text}; scale {scale:.3g}",
                            time.perf_counter() - t))
        except Exception as e:  # a check that cannot run is a failure, with its reason
            ok32 = False
            rows.append(Row("logits vs bridge", dev, "float32", False, f"{type(e).__name__}: {e}"))
        t = time.perf_counter()
        try:
            e16 = Engine(model, device=device, dtype=torch.bfloat16).forward(tokens).float().cpu()
            _sync(device)
            seconds = time.perf_counter() - t
            r16 = _logits(_bridge_copy(model, device, torch.bfloat16)(tokens.to(device))).float().cpu()
            ok, text = bf16_verdict(compare_logits(e16, ref, scale), compare_logits(r16, ref, scale),
                                    compare_logits(e16, r16, scale), ok32)
            rows.append(Row("logits vs bridge", dev, "bfloat16", ok, text, seconds))
        except Exception as e:
            rows.append(Row("logits vs bridge", dev, "bfloat16", False,
                            f"bfloat16 not supported here: {type(e).__name__}: {e}"))
    return rows


def search(model, task, config: PruneConfig, device: torch.device, batch: int):
    """(result, seconds, evaluator) of the config's search on `device` at speculation batch `batch` (fresh evaluator)."""
    cfg = replace(config, device=str(device))
    ev = evaluator(cfg, model, task)
    order = parse_order(cfg.order, cfg.attribution, cfg.steps)
    torch.manual_seed(0)
    _sync(device)
    t = time.perf_counter()
    res = find_circuit(ev, cfg.level, Thresholds(cfg.absolute, cfg.relative, cfg.on), order, cfg.max_passes,
                       progress=False, attribution=cfg.attribution, steps=cfg.steps, batch=batch)
    _sync(device)
    return res, time.perf_counter() - t, ev


def describe(res, ev) -> str:
    text = f"{len(res.decisions)} decisions, {len(res.ablated)} nodes and {len(res.removed_edges)} edges removed"
    return text if res.final is None else text + f", faithfulness {ev.faithfulness(res.final):.3f}"


def search_rows(model, task, config: PruneConfig, device: torch.device, batch: int,
                reference=None) -> tuple[list[Row], object]:
    """The batch row (batch 1 vs `batch`) and the timed search row on `device`; also the batched result."""
    dev, rows = str(device), []
    try:
        one, t1, _ = search(model, task, config, device, 1)
        many, tk, ev = search(model, task, config, device, batch)
    except Exception as e:
        return [Row(f"batch 1 vs {batch}", dev, "float32", False, f"{type(e).__name__}: {e}"),
                Row(f"search (batch {batch})", dev, "float32", False, "the search failed (the row above says why)")], None
    ok, text = compare_searches(one, many)
    rows.append(Row(f"batch 1 vs {batch}", dev, "float32", ok, f"{text} (batch 1 took {t1:.1f} s)", tk))
    text = describe(many, ev)
    if reference is not None:
        same, _ = compare_searches(reference, many)
        text += "; same decisions and circuit as on cpu" if same else "; decisions or circuit differ from cpu's"
    rows.append(Row(f"search (batch {batch})", dev, "float32", True, text, tk))
    return rows, many


def not_run(check: str, dtype: str, why: str) -> Row:
    return Row(check, "cuda", dtype, None, why)


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| check | device | dtype | result | time |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def devices(text: str, log) -> list[torch.device]:
    """cpu, then the CUDA device asked for (auto: cuda when there is one); ValueError for a device this machine
    lacks (parse_device's message)."""
    if text == "auto":
        if not torch.cuda.is_available():
            log(NO_CUDA)
            return [torch.device("cpu")]
        text = "cuda"
    dev = parse_device(text)
    if dev.type == "cpu":
        log("--device cpu: running the CPU columns only")
        return [dev]
    if dev.type != "cuda":
        raise ValueError(f"--device {text}: this check compares cuda with cpu; give cpu, cuda or cuda:N")
    return [torch.device("cpu"), dev]


def run(args, log=print) -> list[Row]:
    """Every check; the rows in table order."""
    devs = devices(args.device, log)
    config = PruneConfig(model=args.model, task=args.task, n_prompts=args.prompts or (8 if args.quick else 24),
                         level="nodes" if args.quick else "both")
    config.check()
    config, _ = config.resolve_order()
    model = load_model(args.model)
    task = resolve_task(config, model)
    tokens = torch.cat([task.clean, task.corrupted]) if task.clean.shape == task.corrupted.shape else task.clean
    log(f"{model.name}, task {task.name}: {len(task)} prompts x {task.seq_len} tokens; logits over "
        f"{tuple(tokens.shape)} tokens; search: level {config.level}, order {config.order}, A = {config.absolute}; "
        f"torch threads {torch.get_num_threads()}")
    rows, checks = [], args.checks.split(",")
    for d in devs:
        if "logits" in checks:
            log(f"[{time.strftime('%H:%M:%S')}] logits on {d}")
            rows += logit_rows(model, tokens, d)
            log(table(rows[-2:]))
        else:
            rows += [Row("logits vs bridge", str(d), t, None, "not asked (--checks)") for t in ("float32", "bfloat16")]
    reference = None
    for d in devs:
        if "search" not in checks:
            rows += [Row(c, str(d), "float32", None, "not asked (--checks)")
                     for c in (f"batch 1 vs {args.batch}", f"search (batch {args.batch})")]
            continue
        log(f"[{time.strftime('%H:%M:%S')}] searches on {d} (batch 1, then {args.batch})")
        got, res = search_rows(model, task, config, d, args.batch, reference if d.type == "cuda" else None)
        reference = res if d.type == "cpu" else reference
        rows += got
        log(table(got))
    if len(devs) == 1:
        why = "--device cpu" if args.device == "cpu" else "no CUDA device"
        rows += [not_run(c, t, why) for c, t in (("logits vs bridge", "float32"), ("logits vs bridge", "bfloat16"),
                                                 (f"batch 1 vs {args.batch}", "float32"),
                                                 (f"search (batch {args.batch})", "float32"))]
    order = ["logits vs bridge", f"batch 1 vs {args.batch}", f"search (batch {args.batch})"]
    return sorted(rows, key=lambda r: order.index(r.check))  # stable: cpu before cuda, float32 before bf16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda or cuda:N")
    ap.add_argument("--quick", action="store_true", help="node-level search on 8 prompts instead of the demo's")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 24, --quick 8)")
    ap.add_argument("--batch", type=int, default=16, help="the speculation batch compared with batch 1")
    ap.add_argument("--checks", default="logits,search",
                    help="which checks run: logits, search (batch 1 vs --batch and the timed search), or both")
    ap.add_argument("--out", default=None, help="also write the table here as Markdown")
    args = ap.parse_args(argv)
    if not args.checks or set(args.checks.split(",")) - {"logits", "search"}:
        ap.error(f"--checks {args.checks!r}: give logits, search or logits,search")
    if args.batch < 2:
        ap.error(f"--batch {args.batch}: compare batch 1 with a batch of at least 2")
    try:
        rows = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:  # a device, model or task this machine cannot run: said, not skipped
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = table(rows)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    failed = [r for r in rows if r.ok is False]
    if failed:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
