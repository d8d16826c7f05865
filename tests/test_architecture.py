"""The arrows that must not exist (shared/design/architecture.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package prefix -> module prefixes it must never import
FORBIDDEN = {
    "ttm_ray": ("data_prep", "jobs"),
    "ttm_ray.models": ("ray", "deepspeed", "mlflow", "data_prep", "jobs"),
    "ttm_ray.conditioning": ("ray", "deepspeed", "mlflow", "data_prep", "jobs"),
    "ttm_ray.diffusion": ("ray", "deepspeed", "mlflow", "data_prep", "jobs"),
    "data_prep": ("ttm_ray.training", "ttm_ray.models", "jobs"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package: str) -> None:
    folder = REPO.joinpath(*package.split("."))
    if not folder.is_dir():
        pytest.skip(f"{package} does not exist yet")
    bad = []
    for path in folder.rglob("*.py"):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{module_name(path)} imports {name}")
    assert not bad, "\n".join(bad)
