"""The house rules of the package (issue 27): no class over 400 lines, no function over 120 (the import
direction, the evaluator's rooms below its facade included, is tests/test_layout.py's)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "circuitsearch"
MAX_CLASS, MAX_FUNCTION = 400, 120


def oversized(tree: ast.AST, path: str) -> list[str]:
    out = []
    for node in ast.walk(tree):
        n = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
        if isinstance(node, ast.ClassDef) and n > MAX_CLASS:
            out.append(f"{path}: class {node.name} is {n} lines (at most {MAX_CLASS})")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_FUNCTION:
            out.append(f"{path}: function {node.name} is {n} lines (at most {MAX_FUNCTION})")
    return out


def test_no_class_or_function_is_too_long():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    problems = [p for f in files for p in oversized(ast.parse(f.read_text()), str(f.relative_to(PACKAGE)))]
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_long_function_and_class():
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION))
    tree = ast.parse(f"def f():\n{long_body}\n\nclass C:\n" + "\n".join(f"    y{i} = {i}" for i in range(MAX_CLASS)))
    assert [p.split(": ")[1].split(" is")[0] for p in oversized(tree, "x.py")] == ["function f", "class C"]
