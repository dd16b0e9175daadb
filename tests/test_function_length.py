"""No function outside tests/ is longer than 60 lines of code (docstrings, comments and blank lines not
counted; a nested function counts in its own length and in its parent's): one screen per idea."""

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def source_files() -> list[Path]:
    """The top-level scripts and every .py file of the top-level folders that hold Python (the packages,
    scripts/, training/), except tests/ and hidden folders such as .venv: not runs/ and other outputs."""
    folders = [d for d in sorted(ROOT.iterdir()) if d.is_dir() and not d.name.startswith(".") and d.name != "tests"
               and any(d.glob("*.py"))]
    return sorted(ROOT.glob("*.py")) + [f for d in folders for f in sorted(d.rglob("*.py"))]


def code_lines(source: str, tree: ast.AST) -> set[int]:
    """The line numbers that hold code: a token other than a comment, and not inside a docstring."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in NOT_CODE:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                   str):
                lines -= set(range(first.lineno, first.end_lineno + 1))
    return lines


def long_functions(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    code = code_lines(source, tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = len(code & set(range(node.lineno, node.end_lineno + 1)))
            if n > LIMIT:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines of code")
    return found


def test_counts_code_lines_only(tmp_path):
    """The counter against a hand count: 2 code lines (the def and the return) among a docstring, a
    comment, a blank line and a multi-line string that is code."""
    f = tmp_path / "m.py"
    f.write_text('def f():\n    """Doc\n    string."""\n    # a comment\n\n    return """a\nb"""\n')
    source = f.read_text()
    assert code_lines(source, ast.parse(source)) == {1, 6, 7}


def test_no_function_is_longer_than_60_lines_of_code():
    files = source_files()
    assert {"generate.py", "engine", "kernels", "training", "scripts"} <= {f.relative_to(ROOT).parts[0] for f in files}
    too_long = [line for f in files for line in long_functions(f)]
    assert not too_long, f"split these functions (at most {LIMIT} lines of code each):\n" + "\n".join(too_long)
