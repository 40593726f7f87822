"""Every built-in task and template on SmolLM2: prompts answered, full, corrupted and empty scores.

For each template: get_task(..., n=N, model=model) generates 3N prompts and keeps the first N the
model answers correctly (top-1); the Evaluator (mean ablation, logit difference, the defaults of
`prune`) gives the full model's score, the corrupted run's and the empty circuit's (every node
mean-ablated). A template is sound when full is well above both baselines. Prints a Markdown table
(and writes the rows as JSON with --json):

    python benchmarks/task_table.py [--tasks digits,ioi | --only months:4,ioi:12] [--prompts 24] [--json rows.json]
"""
import argparse
import json
import sys
import time

import torch

from circuitsearch import load_model
from circuitsearch.engine import Engine
from circuitsearch.patching import Evaluator
from circuitsearch.tasks import TaskError, get_task
from circuitsearch.tasks.builtin import templates

TASKS = ["digits", "decreasing", "number-words", "months", "days", "letters", "greater-than", "ioi"]


def measure(model, engine, name: str, info, n: int) -> dict:
    row = {"task": name, "template": info.index, "name": info.name, "kind": info.kind, "pattern": info.pattern}
    t0 = time.perf_counter()
    try:
        task = get_task(name, model.tokenizer, n=n, template=info.index, model=model)
    except TaskError as e:  # the model answers none of the prompts
        return row | {"generated": 3 * n, "correct": 0, "kept": 0, "error": str(e)}
    ev = Evaluator(model, task, "mean", "logit_diff", engine=engine)  # prune's defaults
    return row | {"generated": task.meta["n_generated"], "correct": task.meta["n_correct"],
                  "kept": task.meta["n_kept"], "tokens": task.seq_len, "full": ev.full,
                  "corrupted": ev.corrupted, "empty": ev.empty, "seconds": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    out = ["| task | # | template | tokens | correct / generated | full | corrupted | empty | example |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        example = r["pattern"].replace("|", " ⟶ ").replace("\n", " ")
        if "full" not in r:
            out.append(f"| {r['task']} | {r['template']} | {r['name']} | – | 0 / {r['generated']} | – | – | – | "
                       f"`{example}` |")
            continue
        out.append(f"| {r['task']} | {r['template']} | {r['name']} | {r['tokens']} | {r['correct']} / "
                   f"{r['generated']} | {r['full']:.2f} | {r['corrupted']:.2f} | {r['empty']:.2f} | `{example}` |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--only", default=None, help="just these templates, e.g. months:4,ioi:12")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model("smollm2-135m")
    engine = Engine(model)  # one engine (weights extracted once) for every template
    rows = []
    picks = [(p.split(":")[0], int(p.split(":")[1])) for p in args.only.split(",")] if args.only else None
    for name in sorted({n for n, _ in picks}, key=TASKS.index) if picks else args.tasks.split(","):
        for info in templates(name):
            if picks and (name, info.index) not in picks:
                continue
            rows.append(measure(model, engine, name, info, args.prompts))
            print(table(rows[-1:]).splitlines()[-1], f"{rows[-1].get('seconds', 0):.1f} s", file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n{len(rows)} templates in {time.perf_counter() - t0:.0f} s (model load included)")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        import os
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
