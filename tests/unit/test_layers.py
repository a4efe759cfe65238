"""The import graph keeps its tiers: services never import each other, the core tier imports
neither web nor torch, the gateway never loads torch, and nothing in the product imports
test, bench or demo support."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SERVICES = ("gateway", "worker", "query", "cli")
WEB = ("fastapi", "starlette", "uvicorn", "shared.web")
ML = ("torch", "transformers", "shared.ml")


def imports(path: Path) -> set[str]:
    """Every module name `path` imports (absolute imports only, as this project writes)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def under(names: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service: str) -> None:
    others = tuple(f"services.{s}" for s in SERVICES if s != service)
    for path in (ROOT / "services" / service).rglob("*.py"):
        assert not under(imports(path), others), path


def test_the_core_tier_imports_neither_web_nor_ml() -> None:
    for path in (ROOT / "shared").glob("*.py"):
        assert not under(imports(path), WEB + ML), path


def test_the_web_tier_imports_no_ml() -> None:
    for path in (ROOT / "shared" / "web").rglob("*.py"):
        assert not under(imports(path), ML), path


def test_the_product_imports_no_support_code() -> None:
    for folder in ("shared", "services/gateway", "services/worker", "services/query"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not under(imports(path), ("tests", "bench", "services.demo")), path


def test_the_gateway_process_never_loads_torch() -> None:
    code = "import sys, services.gateway.main; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"
