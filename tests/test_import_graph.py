"""The import graph has one direction (README, Layout): each package imports only packages listed before it,

    kernels <- model <- data <- checkpoint <- engine <- server <- evaluation <- training <- train.py,
    generate.py, serve.py, export.py, eval.py

and inference (engine/, server/, evaluation/, generate.py, serve.py, export.py, eval.py) never imports training/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["kernels", "model", "data", "checkpoint", "engine", "server", "evaluation", "training"]
INFERENCE = ["engine", "server", "evaluation", "generate.py", "serve.py", "export.py", "eval.py"]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ORDER)


def files_of(name: str) -> list[Path]:
    p = ROOT / name
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def test_packages_import_only_earlier_packages():
    for i, package in enumerate(ORDER):
        for f in files_of(package):
            later = imported_packages(f) - set(ORDER[:i + 1])
            assert not later, f"{f.relative_to(ROOT)} imports {sorted(later)}, which come after {package}"


def test_inference_never_imports_training():
    for name in INFERENCE:
        for f in files_of(name):
            assert "training" not in imported_packages(f), f"{f.relative_to(ROOT)} imports training"
