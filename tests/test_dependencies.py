"""Every third-party module that lora_lightning/ imports is a declared dependency of the default install.

Reads every module under lora_lightning/ with ``ast``: imports at the top and inside functions alike (a function's
import runs when the function does: `lora-lightning compare` crashed on matplotlib after its runs had finished),
except those guarded by ``try: ... except ImportError`` (optional extras) or ``if TYPE_CHECKING:``. Each import's
top-level name is mapped to its distribution (``importlib.metadata.packages_distributions()``, e.g. sklearn →
scikit-learn) and must be named in pyproject's [project].dependencies itself: a dependency of a dependency does
not count, since its owner may drop it. An import inside a function that serves an optional feature (QLoRA's
bitsandbytes path, Liger's fused loss on CUDA) may instead be covered by an extra in
[project.optional-dependencies]; a module-level import never.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_lightning"
# import names whose distribution is named otherwise, for when the distribution is not installed here
KNOWN = {"sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow", "google": "protobuf"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _names(requirements) -> set[str]:
    return {normalize(re.match(r"[A-Za-z0-9._-]+", req).group()) for req in requirements}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _names(project["dependencies"])


def declared_extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _names(r for reqs in project.get("optional-dependencies", {}).values() for r in reqs)


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``try: ... except ImportError/ModuleNotFoundError`` or ``if TYPE_CHECKING:``."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            caught = [h.type for h in parent.handlers]
            names = {n.id for t in caught for n in ast.walk(t) if isinstance(n, ast.Name)} if all(caught) else set()
            if not all(caught) or names & {"ImportError", "ModuleNotFoundError", "Exception"}:
                return True
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        node = parent
    return False


def third_party_imports(lazy: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """{top-level import name: {files importing it}} over lora_lightning/, unguarded imports only; ``lazy``
    collects the names imported only inside functions."""
    found: dict[str, set[str]] = {}
    module_level: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "lora_lightning" or _guarded(node, parents):
                    continue
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
                if not _in_function(node, parents):
                    module_level.add(top)
    if lazy is not None:
        lazy.update({name: files for name, files in found.items() if name not in module_level})
    return found


def test_every_import_of_the_package_is_a_declared_dependency():
    deps, extras = declared(), declared_extras()
    dists = packages_distributions()
    lazy: dict[str, set[str]] = {}
    imports = third_party_imports(lazy)
    assert {"torch", "lightning", "transformers", "matplotlib"} <= set(imports)  # the scan sees real imports
    undeclared = {}
    for name, files in sorted(imports.items()):
        candidates = {normalize(d) for d in dists.get(name, [])} or {normalize(KNOWN.get(name, name))}
        if not candidates & deps and not (name in lazy and candidates & extras):
            undeclared[name] = (sorted(candidates), sorted(files))
    assert not undeclared, (
        "imported by lora_lightning/ but not in pyproject.toml [project].dependencies "
        f"(import: (distribution, files)): {undeclared}; add the distribution to the dependencies"
    )


def test_the_scan_catches_a_function_level_import_and_skips_guarded_ones(tmp_path, monkeypatch):
    pkg = tmp_path / "lora_lightning"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "import os\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import pandas\n"
        "try:\n    import bitsandbytes\nexcept ImportError:\n    bitsandbytes = None\n"
        "def plot():\n    import matplotlib.pyplot as plt\n    from sklearn.datasets import load_digits\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert third_party_imports() == {"matplotlib": {"lora_lightning/mod.py"}, "sklearn": {"lora_lightning/mod.py"}}
