"""The shape of the code: the method files at the top, the folders below them, no import circles."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = ["model", "rollout", "rewards", "stepgrpo", "train", "evaluate"]
FOLDERS = ["training", "grading", "benchmarks", "qwen", "toy", "scripts"]


def project_imports():
    """{module: the project modules it imports}, read from the source (nothing is executed)."""
    files = [p for p in ROOT.glob("*.py")] + [p for d in FOLDERS for p in (ROOT / d).glob("*.py") if p.name != "__init__.py"]
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in files}
    graph = {}
    for p in files:
        found = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def test_the_top_level_holds_the_method_files():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert top == sorted(METHOD + ["bench"])
    assert all((ROOT / d / "__init__.py").is_file() for d in FOLDERS)


def test_the_imports_have_no_circle():
    graph, done, path = project_imports(), set(), []

    def visit(module):
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for dep in graph[module]:
            visit(dep)
        path.pop()
        done.add(module)
    for module in graph:
        visit(module)


def test_the_method_core_imports_nothing_above_it():
    graph = project_imports()
    assert graph["model"] == set() and graph["stepgrpo"] == set()
    assert graph["rollout"] == {"model"}
    assert all(m.startswith("grading.") for m in graph["rewards"])
    below = [m for m in graph if m.split(".")[0] in FOLDERS and not m.startswith("scripts.")]   # scripts run train.py
    assert not any({"train", "evaluate", "bench"} & graph[m] for m in below)


def test_importing_model_does_not_load_the_toy_task():
    code = "import sys, model; print(sorted(m for m in sys.modules if m.split('.')[0] in ('toy', 'qwen', 'training')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
