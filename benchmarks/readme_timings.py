"""Wall-clock time of every command the README shows, run one after another on this machine.

Each command runs as a user would type it (the `circuitsearch` of this environment), with its
run directories under --dir, and a time limit (a command over it is stopped and reported as
such, not as a time). Prints a Markdown table; take it with nothing else running.

    python benchmarks/readme_timings.py [--dir /tmp/readme-runs] [--limit 900]
"""
import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def commands(d: Path) -> list[str]:
    r = str(d)
    return [
        "circuitsearch models",
        "circuitsearch tasks",
        "circuitsearch score --task months",
        f"circuitsearch prune --out {r}/demo  # make demo",
        f"circuitsearch prune --task number-words --level nodes --absolute 0.9 --out {r}/words",
        f"circuitsearch render {r}/words --out {r}/words.png",
        f"circuitsearch attribute --task digits --check --out {r}/attribution",
        f"circuitsearch prune --target 0.97,0.9,0.8 --out {r}/targets",
        f"circuitsearch prune --order attribution --out {r}/attr",
        f"circuitsearch prune --task number-words --out {r}/number-words",
        f"circuitsearch prune --task months --out {r}/months",
        f"circuitsearch diff {r}/demo {r}/number-words {r}/months --out {r}/diff",
        f"circuitsearch evaluate {r}/demo {r}/number-words {r}/months --out {r}/crosstask.json",
        f"circuitsearch evaluate {r}/demo --task months --out {r}/crosstask-months.json",
        f"circuitsearch compare-orders --task digits --out {r}/orders",
        f"circuitsearch prune --preset acdc --relative 0.02 --out {r}/acdc",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/readme-runs")
    ap.add_argument("--limit", type=float, default=900, help="seconds a command may take before it is stopped")
    args = ap.parse_args()
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    exe = Path(sys.executable).parent / "circuitsearch"
    rows = []
    for cmd in commands(d):
        argv = cmd.split("#")[0].split()
        argv[0] = str(exe)
        if "prune" in argv or "compare-orders" in argv:
            argv.append("--quiet")
        t = time.perf_counter()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=args.limit)
            took, ok = time.perf_counter() - t, r.returncode == 0
            cell = f"{took:.0f} s" if ok else f"failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            cell = f"> {args.limit:.0f} s (stopped)"
        shown = cmd.replace(str(d), "runs")
        rows.append((shown, cell))
        print(f"{cell:>12}  {shown}", file=sys.stderr, flush=True)
    print("\n| command | wall time |\n|---|---|")
    for cmd, cell in rows:
        print(f"| `{cmd}` | {cell} |")


if __name__ == "__main__":
    main()
