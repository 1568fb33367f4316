"""`msa/` is stage packages over two shared layers, and every import points down (issue 26).

Layers, lowest first: the shared top modules (errors, config, progress), ``data``, ``nn`` and
``figures``, the stage packages, ``cli``. A stage may use another stage only through the names its
package exports (``from msa.pretrain import load_pretrained``), never its modules, and no two
modules import each other, directly or through others."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "msa"
STAGES = {"pretrain", "finetune", "calibration", "catalogue", "spectra", "evaluation"}
LEVEL = {"errors": 0, "config": 0, "progress": 0, "data": 1, "nn": 2, "figures": 2, "cli": 4,
         **{stage: 3 for stage in STAGES}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import msa...`` / ``from msa... import`` in the file, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "msa":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "msa"]
    return found


def top(module: str) -> str:
    return module.split(".")[1] if "." in module else "msa"


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for module, names in imports_of(path):
            # `from msa.pkg import mod` imports a module; `from msa.pkg import name` the package
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            targets.update(subs or [module])
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def violations(edges: dict[str, set[str]], exports: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        if source == "msa":
            continue
        for target in targets:
            s, t = top(source), top(target)
            if target == "msa" or s == t:
                continue  # __version__, and a package's own modules
            if LEVEL[t] > LEVEL[s]:
                bad.append(f"{source} imports {target}, a layer above it")
            elif s in STAGES and t in STAGES and target != f"msa.{t}":
                bad.append(f"{source} imports {target}: another stage's module; import from msa.{t}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def package_exports() -> dict[str, set[str]]:
    out = {}
    for stage in STAGES:
        tree = ast.parse((PACKAGE / stage / "__init__.py").read_text())
        names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", "") == "__all__" for t in n.targets)]
        out[stage] = {e.value for e in names[0].elts} if names else set()
    return out


def test_top_level_holds_at_most_six_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules


def test_every_import_points_down_and_crosses_stages_only_through_their_exports():
    edges = graph()
    assert len(edges) > 50  # the walk found the package
    assert violations(edges, package_exports()) == []
    # the names one stage takes from another are ones that stage exports
    for path in PACKAGE.rglob("*.py"):
        for module, names in imports_of(path):
            stage = module.split(".")[1] if module.count(".") == 1 else None
            if stage in STAGES and top(module_name(path)) != stage:
                assert set(names) <= package_exports()[stage], (path, module, names)


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_are_for():
    """A stage reaching into another's module, an upward import, and a circle are each reported."""
    edges = {"msa.catalogue.predict": {"msa.calibration.calibrate"}, "msa.data.store": {"msa.nn.model"},
             "msa.nn.model": set(), "msa.calibration.calibrate": set()}
    bad = violations(edges, {})
    assert any("another stage's module" in b for b in bad) and any("layer above" in b for b in bad)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
