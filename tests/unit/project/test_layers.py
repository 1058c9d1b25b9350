"""The layers of docs/architecture.md, enforced: every `import` in src/ipshift goes down (or
stays inside its own package), components never import each other, and only tests, benchmarks
and demo modules use the lab."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[3] / "src" / "ipshift"

#: rank of each top-level package or module of ipshift; an import must go to a lower rank
#: (or stay within the same package)
RANKS: dict[str, int] = {
    "ui": 0, "keyfile": 0,
    "packet": 1,
    "net": 2,
    "ctl": 3,
    "daemon": 4,
    "tunnel": 5,
    # components
    "resend": 6, "routes": 6, "sacip": 6, "rsip": 6, "ilnp": 6,
    "lab": 7,
    # the commands on top
    "registry": 8, "cli": 9, "demo": 9, "benchcli": 9, "__main__": 10,
}
COMPONENTS = {name for name, rank in RANKS.items() if rank == 6}


def _unit(module: str) -> str:
    """'ipshift.net.nft' -> 'net'; 'ipshift' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ipshift" else ""


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every ipshift import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ipshift")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("ipshift"):
                if module == "ipshift":  # `from ipshift import registry`: the names are modules
                    found += [(node.lineno, f"ipshift.{a.name}") for a in node.names
                              if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()]
                else:
                    found.append((node.lineno, module))
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        source = _module_name(path)
        src_unit = _unit(source)
        if src_unit not in RANKS and src_unit:
            problems.append(f"{source}: package {src_unit!r} has no layer in RANKS "
                            "(add it, and to docs/architecture.md)")
            continue
        is_demo = path.name == "demo.py"
        for line, target in _imports(path):
            dst_unit = _unit(target)
            where = f"{path.relative_to(SRC.parent)}:{line} imports {target}"
            if not src_unit or not dst_unit or dst_unit == src_unit:
                continue  # ipshift/__init__ (version), or within one package
            if dst_unit == "lab":
                if not is_demo:
                    problems.append(f"{where}: only tests, bench and demo modules use the lab")
                continue
            if src_unit in COMPONENTS and dst_unit in COMPONENTS:
                problems.append(f"{where}: components never import each other")
            elif RANKS.get(dst_unit, 99) >= RANKS[src_unit]:
                problems.append(f"{where}: goes up or sideways (layer {src_unit} -> "
                                f"{dst_unit})")
    return problems


def test_imports_go_down_only() -> None:
    problems = _violations()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("source", "expected"), [
    ("from ipshift.cli import main\n", "goes up"),
    ("from ipshift.routes.model import RoutesConfig\n", "components never import each other"),
    ("from ipshift.lab import Lab\n", "only tests, bench and demo modules"),
])
def test_the_checker_catches_each_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       source: str, expected: str) -> None:
    """The rule is really applied: a planted import of each kind is reported."""
    fake = tmp_path / "ipshift"
    (fake / "resend").mkdir(parents=True)
    (fake / "resend" / "engine.py").write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", fake)
    problems = _violations()
    assert len(problems) == 1 and expected in problems[0], problems
