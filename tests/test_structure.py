"""The shape of the code itself: short functions, no reaching into other modules' private names,
text scorers free of the model machinery."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "steerlab"


def _modules():
    for f in sorted(SRC.rglob("*.py")):
        yield f, ast.parse(f.read_text(encoding="utf-8"))


def test_no_function_over_80_lines():
    long = []
    for f, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{f.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_no_module_imports_another_modules_private_name():
    bad = []
    for f, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module is not None or \
                    isinstance(node, ast.ImportFrom) and node.level:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{f.relative_to(SRC)}:{node.lineno} imports {a.name} from {node.module}")
    assert not bad, bad


def test_text_scorers_do_not_import_the_model_machinery():
    code = "import steerlab.scoring, sys; assert 'steerlab.hooks' not in sys.modules, 'hooks imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_selfcorrect_experiment_stays_small():
    n = len((SRC / "experiments" / "selfcorrect.py").read_text().splitlines())
    assert n < 350, f"experiments/selfcorrect.py has {n} lines"
