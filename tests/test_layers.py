"""The layering of blocksnap, read from the import statements of its modules (see STYLE.md).

Every `import` and `from ... import` of every module under blocksnap/ counts, wherever it
stands: at module level, under `if TYPE_CHECKING:` (a typing dependency is a dependency)
or inside a function (an import deferred to dodge a cycle still closes the cycle).
Relative imports are resolved against the importing module's package, and `from X import
Y` names the module X.Y when that is a module of blocksnap, else X.  Imports through
importlib with a computed name (the lazy re-exports of blocksnap and blocksnap.fs) are
not statements and are not seen.  Each failure names the module, the line and the rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "blocksnap"


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing blocksnap module
    target: str  # the imported module, resolved (blocksnap.x.y, or lmdb, zstandard, ...)
    line: int

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = _sources()


def _hold(rule: str, breaking: list[str]) -> None:
    """Fail with one line per place that breaks the rule, in full."""
    if breaking:
        pytest.fail(f"{rule}:\n" + "\n".join(f"  {b}" for b in breaking), pytrace=False)


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name that `from <node.module>` refers to in `module`."""
    if node.level == 0:
        assert node.module is not None
        return node.module
    package = module.split(".")
    if path.name != "__init__.py":
        package.pop()  # a plain module's relative imports start from its package
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def _imports_of(module: str, path: Path) -> list[Import]:
    found: dict[tuple[str, int], Import] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [sub if sub in MODULES else base for sub in subs]
        else:
            continue
        for target in targets:
            if target != "__future__":
                found.setdefault((target, node.lineno), Import(module, target, node.lineno))
    return list(found.values())


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]


def _is(target: str, *modules: str) -> bool:
    """Whether target is one of modules or inside one of them (a package's submodule)."""
    return any(target == m or target.startswith(m + ".") for m in modules)


def _breaking(allowed: set[str], imported: tuple[str, ...]) -> list[str]:
    return [str(imp) for imp in IMPORTS if _is(imp.target, *imported) and imp.module not in allowed]


# (rule, the modules it concerns, the modules that alone may import them)
EXCLUSIVE = [
    pytest.param(
        ("lmdb",),
        # The index's parts (store/index.py names them) reach LMDB through lmdbenv's
        # transactions; lmdbfile checks the data file before LMDB maps it.
        {"blocksnap.store.lmdbenv", "blocksnap.store.lmdbfile"},
        id="only blocksnap.store.lmdbenv and blocksnap.store.lmdbfile import lmdb",
    ),
    pytest.param(
        ("zstandard",),
        # fs.btrfs decodes btrfs's own zstd-compressed file extents: a format of the image,
        # not of the repository, which the record codec has no business knowing.
        {"blocksnap.store.codec", "blocksnap.fs.btrfs"},
        id="only blocksnap.store.codec imports zstandard (and fs.btrfs, for btrfs extents)",
    ),
    pytest.param(
        # The record codec is the one place that compresses, frames and opens records.
        ("blocksnap.store.codec",),
        {"blocksnap.store.records"},
        id="only blocksnap.store.records imports blocksnap.store.codec",
    ),
    pytest.param(
        ("blocksnap._native",),
        {"blocksnap.native._cffi"},
        id="only blocksnap.native._cffi imports blocksnap._native",
    ),
]


@pytest.mark.parametrize(("imported", "allowed"), EXCLUSIVE)
def test_layers_exclusive_import(
    imported: tuple[str, ...], allowed: set[str], request: pytest.FixtureRequest
) -> None:
    assert set(allowed) <= set(MODULES), "a module named by the rule no longer exists"
    _hold(request.node.callspec.id, _breaking(allowed, imported))


# The engine hands raw blocks and map nodes to a StoreWriter, which seals them
# (store/records.py): it neither compresses nor lays out records or packs.  gc and verify
# work on packs themselves (compaction copies records, verify walks packs): they live
# beside the store, in blocksnap.store, not in the engine.
PACK_LEVEL = ("blocksnap.store",)


def test_layers_the_engine_imports_neither_the_codec_nor_the_packs() -> None:
    engine = [m for m in MODULES if not _is(m, *PACK_LEVEL)]
    assert "blocksnap.snapshot" in engine and "blocksnap.synthesize" in engine
    _hold(
        "the engine imports neither blocksnap.store.codec nor blocksnap.store.packs",
        [
            str(imp)
            for imp in IMPORTS
            if imp.module in engine
            and _is(imp.target, "blocksnap.store.codec", "blocksnap.store.packs")
        ],
    )


# The reader, restore and filesystem side gets blocks through model.BlockSource, so a
# remote or cached store plugs in without touching it.
BLOCK_SOURCE_SIDE = (
    "blocksnap.reader",
    "blocksnap.restore",
    "blocksnap.synthesize",
    "blocksnap.history",
    "blocksnap.extract",
    "blocksnap.fs",
)
# The whole store package (repository, index, backend, and whatever it is split into),
# not only the Store class's module: none of it is the block source's business.
CONCRETE_STORE = ("blocksnap.store",)


def test_layers_reader_restore_and_fs_see_only_the_block_source() -> None:
    assert all(any(_is(m, side) for m in MODULES) for side in BLOCK_SOURCE_SIDE)
    _hold(
        "the reader/restore/fs side takes model.BlockSource, never blocksnap.store",
        [
            str(imp)
            for imp in IMPORTS
            if _is(imp.module, *BLOCK_SOURCE_SIDE) and _is(imp.target, *CONCRETE_STORE)
        ],
    )


@pytest.mark.parametrize(
    ("module", "file", "statement", "base"),
    [
        ("blocksnap.fs.btrfs", "fs/btrfs.py", "from . import node", "blocksnap.fs"),
        ("blocksnap.fs.btrfs", "fs/btrfs.py", "from .node import Node", "blocksnap.fs.node"),
        ("blocksnap.fs.btrfs", "fs/btrfs.py", "from ..store import codec", "blocksnap.store"),
        ("blocksnap.fs", "fs/__init__.py", "from . import node", "blocksnap.fs"),
        ("blocksnap.fs", "fs/__init__.py", "from .. import model", "blocksnap"),
        ("blocksnap.reader", "reader.py", "from blocksnap import model", "blocksnap"),
    ],
)
def test_layers_relative_imports_resolve(module: str, file: str, statement: str, base: str) -> None:
    node = ast.parse(statement).body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _base(module, PACKAGE_DIR / file, node) == base


def test_layers_from_import_names_the_submodule(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from blocksnap.store import codec\n"
        "from blocksnap.model import BlockSource, Progress\n"
        "def later() -> None:\n"
        "    import lmdb\n"
    )
    assert [(i.target, i.line) for i in _imports_of("blocksnap.probe", source)] == [
        ("blocksnap.store.codec", 1),
        ("blocksnap.model", 2),
        ("lmdb", 4),
    ]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one module that
    imports itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(sorted(component))
    return found


def test_layers_cycle_finder_finds_a_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_cycles(edges)) == [["a", "b", "c"], ["e"]]


def test_layers_no_import_cycles() -> None:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    where: dict[tuple[str, str], Import] = {}
    for imp in IMPORTS:
        if imp.target in MODULES:
            edges[imp.module].add(imp.target)
            where.setdefault((imp.module, imp.target), imp)
    _hold(
        "no import cycles among blocksnap's modules",
        [
            "cycle among "
            + ", ".join(component)
            + ": "
            + "; ".join(
                str(where[a, b]) for a in component for b in sorted(edges[a]) if b in component
            )
            for component in _cycles(edges)
        ],
    )


def _speaking(module: str, path: Path) -> Iterator[str]:
    """Where a module prints, writes to the standard streams or exits the process."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("print", "exit", "quit"):
                yield f"{module} (line {node.lineno}) calls {node.func.id}()"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = f"{node.value.id}.{node.attr}"
            if name in ("sys.exit", "sys.stdout", "sys.stderr", "os._exit"):
                yield f"{module} (line {node.lineno}) uses {name}"
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                yield f"{module} (line {node.lineno}) raises SystemExit"


def test_layers_only_the_cli_prints_or_exits() -> None:
    allowed = ("blocksnap.cli", "blocksnap.__main__")
    _hold(
        "only blocksnap.cli (and blocksnap.__main__) prints, writes to stdout/stderr or exits",
        [
            where
            for module, path in MODULES.items()
            if not _is(module, *allowed)
            for where in _speaking(module, path)
        ],
    )
