"""The README's Python examples are runnable as written: every import resolves to something
the package has, and every name they use is defined in the example (imported, assigned or a
builtin). Nothing is executed (the examples talk to Orthanc servers)."""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_examples():
    assert len(EXAMPLES) >= 4


def _defined_and_used(tree: ast.AST) -> tuple[set[str], set[str]]:
    defined, used = set(dir(builtins)), set[str]()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
            if not isinstance(node, ast.ClassDef):
                args = node.args
                defined |= {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                                            *filter(None, [args.vararg, args.kwarg])]}
    return defined, used


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_a_readme_example_defines_every_name_it_uses(example):
    defined, used = _defined_and_used(ast.parse(example))
    assert not used - defined, f"undefined in the README example: {sorted(used - defined)}"


def test_the_readme_examples_imports_resolve_as_a_user_has_them(tmp_path):
    """In a fresh interpreter, outside the checkout (the suite puts the repository on
    sys.path, where its bare folder names would import): only installed names resolve."""
    imports = sorted({ast.unparse(node) for example in EXAMPLES
                      for node in ast.walk(ast.parse(example))
                      if isinstance(node, ast.Import | ast.ImportFrom)})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "\n".join(imports)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
