"""Check that moving the README's reference into docs/ lost no text.

Every block of the old README (a run of non-blank lines: a paragraph, a table, a code block, a figure)
must appear, line for line and in order, in README.md or one docs/*.md file, and every non-blank line
as often as it did. Two changes are allowed and undone before comparing: a Markdown link
`[text](target)` counts as its text (links were added), and a heading counts without its `#`s (levels
changed). Headings renamed on purpose are listed in RENAMED,
lines reworded on purpose in CHANGED (the new wording must then be found). Usage, from the repository root:

    python scripts/check_docs_move.py [GIT_REF]     # GIT_REF: the old README's commit (default 1e2a312)

Exits 1 and names each block or line not found.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

OLD_REF = "1e2a312"  # main's last commit before the move
RENAMED = {  # old heading -> where its text went, on purpose
    "## Tasks": "docs/tasks.md: '## Task files' (the page's title is 'Tasks and task files')",
    "## Layout": "docs/layout.md: '# Code layout'",
}
CHANGED = {  # old line -> its new wording, on purpose (a reference to a section that moved)
    "they differ between neighbouring thresholds of one search (Sweeps: sizes against the threshold), so **the":
    "they differ between neighbouring thresholds of one search ([sizes against the threshold](#which-search-by-default)), so **the",
}
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def normalise(line: str) -> str:
    """A line as compared: links reduced to their text (images kept whole), heading marks dropped."""
    line = _LINK.sub(lambda m: m.group(0) if m.group(1) else m.group(2), line.rstrip())
    return re.sub(r"^#{1,6} ", "", line)


def blocks(lines: list[str]) -> list[list[str]]:
    """Runs of non-blank lines, headings as blocks of their own; a fenced code block is one block."""
    out, cur, fenced = [], [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and (not line.strip() or line.startswith("#")):
            if cur:
                out.append(cur)
            cur = [line] if line.startswith("#") else []
            if cur:
                out.append(cur)
                cur = []
            continue
        cur.append(line)
    if cur:
        out.append(cur)
    return out


def contains(haystack: list[str], block: list[str]) -> bool:
    n = len(block)
    return any(haystack[i:i + n] == block for i in range(len(haystack) - n + 1))


def main(ref: str = OLD_REF) -> int:
    old = subprocess.run(["git", "show", f"{ref}:README.md"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    files = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
    new = {f: [normalise(x) for x in f.read_text().splitlines()] for f in files}
    old = [CHANGED.get(x, x) for x in old]
    missing_blocks, missing_lines = [], []
    for block in blocks(old):
        if block[0] in RENAMED:
            continue
        want = [normalise(x) for x in block]
        if not any(contains(lines, want) for lines in new.values()):
            missing_blocks.append(block)
    have = Counter(x for lines in new.values() for x in lines if x.strip())
    need = Counter(normalise(x) for x in old if x.strip() and x not in RENAMED)
    for line, n in need.items():
        if have[line] < n:
            missing_lines.append(f"{line!r}: {n} in the old README, {have[line]} now")
    for b in missing_blocks:
        print("block not found:\n    " + "\n    ".join(b))
    for m in missing_lines:
        print("line short:", m)
    n_blocks = len(blocks(old))
    print(f"{len(old)} old lines, {n_blocks} blocks, {sum(need.values())} non-blank lines checked against "
          f"{len(files)} files; renamed on purpose: {len(RENAMED)}, lines reworded: {len(CHANGED)}; missing blocks: {len(missing_blocks)}, "
          f"missing lines: {len(missing_lines)}")
    for h, where in RENAMED.items():
        print(f"  renamed {h!r} -> {where}")
    for a, b in CHANGED.items():
        print(f"  reworded {a!r}\n        -> {b!r}")
    return 1 if missing_blocks or missing_lines else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
