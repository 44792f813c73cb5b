"""The floors are executable: an import may only point down (docs/architecture.md).

errors/metrics < data < models < inference < training inside deepfeat.finetune; connectors may use finetune below
training and never Lightning; recipes may use everything; nothing imports recipes but recipes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"finetune": "deepfeat.finetune", "connectors": "deepfeat.connectors", "recipes": "deepfeat.recipes"}
# floor of each part of deepfeat.finetune; a module may import its own floor and those below
FLOORS = {"errors": 0, "metrics": 0, "data": 1, "models": 2, "inference": 3, "training": 4}
# modules kept only so that old YAML class_paths resolve; they re-export training code on purpose
SHIMS = {"deepfeat.finetune.module", "deepfeat.finetune.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(path: Path) -> set[str]:
    """deepfeat modules imported anywhere in the file (deferred imports included; TYPE_CHECKING ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepfeat"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("deepfeat"))
    return found


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["deepfeat", "finetune"] or len(parts) < 3:
        return None
    return FLOORS.get(parts[2])


def _violations() -> list[str]:
    bad = []
    for module, path in sorted(_modules().items()):
        if module in SHIMS:
            continue
        for target in sorted(_imports(path)):
            if module.startswith("deepfeat.finetune"):
                if target.startswith(("deepfeat.connectors", "deepfeat.recipes")):
                    bad.append(f"{module} imports {target} (finetune never imports connectors or recipes)")
                mine, theirs = _floor(module), _floor(target)
                if mine is not None and theirs is not None and theirs > mine:
                    bad.append(f"{module} (floor {mine}) imports {target} (floor {theirs}): imports point down")
            elif module.startswith("deepfeat.connectors") and target.startswith(
                    ("deepfeat.recipes", "deepfeat.finetune.training")):
                bad.append(f"{module} imports {target} (connectors never import recipes or training)")
    return bad


def test_imports_only_point_down() -> None:
    assert _violations() == []


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: an upward import in a module is found by the same parser."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from deepfeat.finetune.training.module import MetricLearningModule\n")
    assert "deepfeat.finetune.training.module" in _imports(bad)
    assert _floor("deepfeat.finetune.data.records") == 1 and _floor("deepfeat.finetune.training.module") == 4


@pytest.mark.parametrize("module", ["deepfeat.connectors", "deepfeat.finetune.inference.embed",
                                    "deepfeat.finetune.models.bundle"])
def test_serving_floors_do_not_load_lightning(module: str) -> None:
    code = f"import sys, {module}; print('lightning' in sys.modules or 'lightning.pytorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False", f"import {module} loads Lightning"


def _underscore_imports(path: Path) -> list[str]:
    """``from deepfeat.X import _name`` in the file: another module's private name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepfeat"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_underscore_names(tmp_path: Path) -> None:
    bad = {module: names for module, path in sorted(_modules().items()) if (names := _underscore_imports(path))}
    assert bad == {}
    probe = tmp_path / "x.py"  # the check is not vacuous
    probe.write_text("def f():\n    from deepfeat.connectors.client import _lock_holder\n")
    assert _underscore_imports(probe) == ["deepfeat.connectors.client._lock_holder"]


HEAVY = ("torch", "lightning", "timm")


def _loaded_after(*steps: str) -> list[set[str]]:
    """The heavy packages (:data:`HEAVY`) in ``sys.modules`` after each of ``steps``, run in one fresh Python."""
    show = f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    probe = "\n".join(["import sys", *(f"{step}\n{show}" for step in steps)])
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return [set(ast.literal_eval(line)) for line in out.stdout.strip().splitlines()[-len(steps):]]


@pytest.mark.parametrize("module", ["deepfeat.finetune.models.card", "deepfeat.connectors.collection",
                                    "deepfeat.connectors.schema", "deepfeat.connectors.search"])
def test_card_and_collection_modules_do_not_load_torch(module: str) -> None:
    """Listing, describing and checking collections needs the card, never torch (issue 21 item 10)."""
    assert _loaded_after(f"import {module}") == [set()]


def test_collections_list_command_does_not_load_torch(tmp_path: Path) -> None:
    """The whole ``deepfeat collections list`` command, on a real Milvus Lite file, runs without torch."""
    command = (f"from deepfeat.recipes.cli import main\n"
               f"assert main(['collections', 'list', '--uri', {str(tmp_path / 'x.db')!r}]) == 0")
    after_command, after_plugin = _loaded_after(command, "import deepfeat.connectors.plugin")
    assert after_command == set()
    assert "torch" in after_plugin  # the probe does see torch once something imports it


def test_connectors_lazy_exports_resolve() -> None:
    """Every public name of deepfeat.connectors (imported on first use) is its defining submodule's object."""
    import importlib

    import deepfeat.connectors as connectors

    for name in connectors.__all__:
        value = getattr(connectors, name)
        module = importlib.import_module(value.__module__)
        assert module.__name__.startswith("deepfeat.connectors.") and getattr(module, name) is value, name
    assert set(connectors.__all__) <= set(dir(connectors))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = connectors.nope  # type: ignore[attr-defined]
