"""Calls go one way: attr -> engine -> ops -> backends. Shared helpers live in the neutral
``taylor_kernels.numerics``; the oracle backend ``reference/`` is imported only by ``ops/`` (which
dispatches to it) and by tests and benchmarks. Checked on the source with ``ast`` (module-level
and function-level imports alike)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "taylor_kernels"

# rank of each layer: a module may import layers of its own or a lower rank only
LAYERS = {"attr": 3, "engine": 2, "ops": 1, "backends": 0}
REFERENCE_USERS = {"ops", "reference", "benchmarks"}
# Known exception (GPU owner): the Triton kernels register their meta functions through
# helpers defined next to the op they implement (torch.library registration):
# register_path_meta / register_ih_meta / register_jet_meta.
ALLOWED = {("taylor_kernels.triton.path", "taylor_kernels.ops.path"),
           ("taylor_kernels.triton.hessian", "taylor_kernels.ops.hessian"),
           ("taylor_kernels.triton.jet", "taylor_kernels.ops.jet")}


def _area(module: str) -> str | None:
    """``"attr"``, ``"engine"``, ``"ops"``, ``"backends"``, ``"reference"``, ``"benchmarks"``
    or None for a dotted module name under ``taylor_kernels``."""
    parts = module.split(".")
    if parts[0] != "taylor_kernels" or len(parts) < 2:
        return None
    head = parts[1]
    if head in ("attr", "engine", "ops", "reference", "benchmarks"):
        return head
    if head in ("backends", "triton", "_native", "backend_table"):
        return "backends"
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every ``import``/``from ... import`` in ``path`` (relative
    imports resolved against the package)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        dotted = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        yield path, dotted, _area(dotted)


def _violations() -> list[str]:
    bad = []
    for path, dotted, area in _modules():
        if area is None:
            continue
        for line, target in _imports(path):
            if any(dotted == a and (target == b or target.startswith(b + "."))
                   for a, b in ALLOWED):
                continue
            to = _area(target)
            where = f"{path.relative_to(PKG.parent)}:{line} imports {target}"
            if to == "reference" and area not in REFERENCE_USERS:
                bad.append(f"{where} (reference/ is for ops/, tests and benchmarks)")
            elif area in LAYERS and to in LAYERS and LAYERS[to] > LAYERS[area]:
                bad.append(f"{where} ({area} must not call up into {to})")
    return bad


def test_calls_go_attr_engine_ops_backends():
    assert _violations() == []


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a fake engine module importing attr and reference is flagged."""
    fake = tmp_path / "taylor_kernels"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "bad.py").write_text(
        "from taylor_kernels.attr import layer\n"
        "def f():\n    from ..reference.path import path_points\n")
    monkeypatch.setitem(globals(), "PKG", fake)
    found = _violations()
    assert len(found) >= 2
    assert any("must not call up into attr" in v for v in found)
    assert any("reference/ is for ops/" in v for v in found)


@pytest.mark.parametrize("module,area", [("taylor_kernels.engine.path_engine", "engine"),
                                         ("taylor_kernels.triton.path", "backends"),
                                         ("taylor_kernels.numerics", None)])
def test_areas(module, area):
    assert _area(module) == area
