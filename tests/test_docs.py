"""The README and docs/ say only what is true of this checkout: every command line they show parses
with the real parser, every `make` target they name exists, every relative link, image and #anchor
resolves, and every docs page is in the index. No model is loaded; nothing is run."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from circuitsearch.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
# Command lines shown on purpose although they do not parse, keyed by (page, command), with the reason.
# Keep this short: a line that does not run should not be shown as one.
NOT_RUNNABLE: dict[tuple[str, str], str] = {}
README_MAX_LINES = 250  # the README is the front door; the reference goes into docs/


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of each ``` fenced block."""
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, start, body = line.strip()[3:].strip().lower(), n + 1, []
            else:
                out.append((lang, start, body))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"a ``` block opened at line {start - 1} is never closed"
    return out


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans, line numbers kept (blanked, not removed)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), "\n".join(lines))


def strip_comment(line: str) -> str:
    """The line without its shell comment: a # at the start or after a blank, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(lines: list[str], start: int) -> list[tuple[int, str]]:
    """(line number, logical line) with `\\` continuations joined and comments dropped."""
    out, buf, first = [], "", None
    for n, line in enumerate(lines, start):
        first = n if first is None else first
        line = strip_comment(line).rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((first, buf + line))
        buf, first = "", None
    if buf.strip():
        out.append((first, buf))
    return out


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command on a shell line (split at ; && || | & and a leading $ prompt),
    with `for ...; do` / `then` keywords dropped from the front."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    cmds, cur = [], []
    for tok in lexer:
        if tok in SEPARATORS:
            cmds.append(cur)
            cur = []
        elif not cur and tok in ("$", "do", "then", "else", "time"):
            continue
        else:
            cur.append(tok)
    cmds.append(cur)
    return [c for c in cmds if c]


def shown_commands() -> list[tuple[str, int, str, list[str]]]:
    """(page, line, program, args) of every circuitsearch and make command in the pages' shell blocks."""
    found = []
    for page in PAGES:
        for lang, start, body in fenced_blocks(page.read_text()):
            if lang not in SHELL_LANGS:
                continue
            for n, line in shell_lines(body, start):
                for words in simple_commands(line):
                    prog = words[0]
                    if Path(prog).name == "circuitsearch":
                        found.append((rel(page), n, "circuitsearch", words[1:]))
                    elif Path(prog).name.startswith("python") and words[1:2] == ["-m"] and len(words) > 2 \
                            and words[2].split(".")[0] == "circuitsearch":
                        found.append((rel(page), n, f"python -m {words[2]}", words[3:]))
                    elif prog == "make":
                        found.append((rel(page), n, "make", words[1:]))
    return found


def make_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_./$() -]+?)\s*::?(?!=)", line)
        if m and not line.startswith("\t"):
            targets.update(m.group(1).split())
    return targets


def shown_make_targets() -> list[tuple[str, int, str]]:
    """(page, line, target) of `make X` in shell blocks and in inline code spans (which may wrap a line)."""
    out = [(page, n, t) for page, n, prog, args in shown_commands() if prog == "make"
           for t in args if not t.startswith("-") and "=" not in t]
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"`make\s+([^`]*)`", text):
            n = text.count("\n", 0, m.start()) + 1
            out += [(rel(page), n, t) for t in m.group(1).split() if not t.startswith("-") and "=" not in t]
    return out


CIRCUITSEARCH = [c for c in shown_commands() if c[2] != "make"]


def test_the_pages_show_commands():
    """The extraction itself works: the README shows the commands used most, the docs many more."""
    pages = {page for page, *_ in CIRCUITSEARCH}
    assert "README.md" in pages and len(pages) >= 5, pages
    assert len(CIRCUITSEARCH) >= 25, len(CIRCUITSEARCH)
    shown = {args[0] for *_, args in CIRCUITSEARCH if args}
    assert {"prune", "view", "diff", "compare-orders", "sweep"} <= shown, shown


@pytest.mark.parametrize("page,line,prog,args", CIRCUITSEARCH, ids=[f"{c[0]}:{c[1]}" for c in CIRCUITSEARCH])
def test_shown_command_parses(page, line, prog, args):
    key = (page, shlex.join(args))
    if key in NOT_RUNNABLE:
        pytest.skip(NOT_RUNNABLE[key])
    if prog.startswith("python -m "):  # runnable only if that module runs the command line
        module = prog.split()[-1]
        path = ROOT.joinpath(*module.split("."))
        main = path / "__main__.py" if path.is_dir() else path.with_suffix(".py")
        assert main.exists() and "main(" in main.read_text(), f"{page}:{line}: `{prog}` has no {rel(main)} to run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{page}:{line}: `circuitsearch {shlex.join(args)}` does not parse:\n{err.getvalue()}")


def test_shown_make_targets_exist():
    targets = make_targets()
    assert {"demo", "test"} <= targets, targets
    shown = shown_make_targets()
    assert any(t == "demo" for _, _, t in shown) and any(t == "test" for _, _, t in shown), shown
    bad = [f"{page}:{n}: make {t}" for page, n, t in shown if t not in targets]
    assert not bad, f"targets not in the Makefile ({sorted(targets)}): {bad}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation other than - and _ dropped,
    spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link and image, reference definition and HTML src/href."""
    text = prose(page.read_text())
    out = []
    for pattern in (r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)",
                    r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", r"\b(?:src|href)=\"([^\"]+)\""):
        for m in re.finditer(pattern, text, re.M):
            out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def test_links_resolve():
    problems, checked = [], 0
    for page in PAGES:
        for n, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{rel(page)}:{n}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif ROOT not in dest.parents and dest != ROOT:
                problems.append(f"{where}: outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {rel(dest)}")
    assert checked >= 40, checked
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_index():
    index = ROOT / "docs" / "README.md"
    listed = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index)}
    missing = [rel(p) for p in PAGES if p.parent.name == "docs" and p != index and p.resolve() not in listed]
    assert not missing, f"docs pages missing from docs/README.md: {missing}"


def test_the_readme_stays_a_front_door():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move reference text into docs/"


def test_the_checks_can_fail():
    """The helpers see what they should: a broken link, a missing anchor, a bad flag, a wrapped command."""
    assert slug("Better than chance, and stable? Random baselines") == "better-than-chance-and-stable-random-baselines"
    assert slug("`--search` and presets") == "--search-and-presets"
    assert simple_commands("for t in a b; do .venv/bin/circuitsearch prune --task $t; done")[1] == \
        [".venv/bin/circuitsearch", "prune", "--task", "$t"]
    assert shell_lines(["circuitsearch prune \\", "  --task months   # a comment"], 1) == \
        [(1, "circuitsearch prune    --task months")]
    assert strip_comment("x --order file:a#b  # c") == "x --order file:a#b  "
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--no-such-flag"])
