"""Import and storage rules of issue 14, checked over the source tree with ``ast``.

* no import cycle in ``daemon/`` nor in ``guest_agent/`` (module-level imports; those under
  ``if TYPE_CHECKING:`` and inside functions are not run at import time);
* ``libvirt``, ``libvirt_qemu`` and the QMP client are imported only under ``symbiont/host/``;
* a part (a package with ``part.py``) imports another part only if it ``requires`` it;
* one knob table: no other ``CREATE TABLE ... *knobs``;
* another process's memory (``/proc/PID/mem``, ``pagemap``, ``smaps``) is opened only under
  ``symbiont/host/``.

Every daemon part is a :class:`symbiont.part.Part` now; the one exception left is ``cluster``, a
CLI-only package (no ``part.py``, never loaded by the daemon) that drives lab hosts' libvirt from
the operator's side. An exception list must only shrink: a listed package that no longer needs
its exception fails the test too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAEMON = ROOT / "daemon" / "symbiont"
AGENT = ROOT / "guest_agent" / "symbiont_agent"

# Non-part packages still doing what the rules forbid to parts, with what they do.
LEGACY_SYSTEM_IMPORTS: set[str] = set()  # libvirt outside host/ (none left: the cluster goes through host/migrate)
LEGACY_KNOB_TABLES: set[str] = set()  # parts' own knob tables (none left: dedup's moved into the ledger)
SYSTEM_MODULES = ("libvirt", "libvirt_qemu")  # QMP goes through libvirt_qemu (host/system.py)


def modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")
                    base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                if not _type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    visit(block)
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif not top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node.body)
            elif top_level_only and isinstance(node, ast.ClassDef):
                visit(node.body)

    if top_level_only:
        visit(tree.body)
    else:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def graph(root: Path, package: str) -> dict[str, set[str]]:
    mods = modules(root, package)
    # An edge to one's own package is not a cycle: Python initialises the package first anyway.
    return {m: {i for i in imports(p, m, top_level_only=True) if i in mods and i != m and not m.startswith(i + ".")}
            for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


@pytest.mark.parametrize("root, package", [(DAEMON, "symbiont"), (AGENT, "symbiont_agent")])
def test_no_import_cycle(root: Path, package: str) -> None:
    assert find_cycle(graph(root, package)) is None, " -> ".join(find_cycle(graph(root, package)) or [])


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (DAEMON / parts[1]).is_dir()) else None


def test_system_libraries_only_under_host() -> None:
    offenders: dict[str, set[str]] = {}
    for module, path in modules(DAEMON, "symbiont").items():
        if module.startswith("symbiont.host."):
            continue
        bad = {i for i in imports(path, module, top_level_only=False)
               if i in SYSTEM_MODULES or i.startswith("libvirt.")}
        if bad:
            offenders.setdefault(_package_of(module) or module, set()).update(bad)
    assert set(offenders) <= LEGACY_SYSTEM_IMPORTS, {k: v for k, v in offenders.items() if k not in LEGACY_SYSTEM_IMPORTS}
    assert LEGACY_SYSTEM_IMPORTS <= set(offenders), (
        f"{sorted(LEGACY_SYSTEM_IMPORTS - set(offenders))} no longer import libvirt/QMP: remove them from the list")


def test_migrated_parts_are_not_exceptions() -> None:
    migrated = {p.parent.name for p in DAEMON.glob("*/part.py")}
    assert {"memory", "cpu"} <= migrated
    assert not migrated & LEGACY_SYSTEM_IMPORTS


def test_a_migrated_part_imports_only_the_parts_it_requires() -> None:
    from symbiont.plugins import part_classes, parts

    all_parts = set(parts())
    for name, cls in part_classes().items():
        allowed = {name, *cls.requires}
        for path in (DAEMON / name).rglob("*.py"):
            if path.name in ("experiments.py", "cli.py"):  # research and client side: not the daemon's part
                continue
            module = "symbiont." + ".".join(path.relative_to(DAEMON).with_suffix("").parts)
            used = {i.split(".")[1] for i in imports(path, module, top_level_only=False)
                    if i.startswith("symbiont.") and i.count(".") >= 1}
            stray = (used & all_parts) - allowed
            assert not stray, f"{module} imports part(s) {sorted(stray)} that {name!r} does not require"


def test_one_knob_table() -> None:
    tables = set()
    for path in [*DAEMON.rglob("*.py"), *AGENT.rglob("*.py")]:
        for t in re.findall(r"CREATE TABLE IF NOT EXISTS (\w*knobs\w*)", path.read_text()):
            tables.add(t)
    assert tables - LEGACY_KNOB_TABLES == {"knobs"}
    assert LEGACY_KNOB_TABLES <= tables, "a legacy knob table is gone: remove it from LEGACY_KNOB_TABLES"


def test_daemon_package_carries_no_research_code() -> None:
    """Issue 14 item 5: the lab and the experiments live in ``symbiont_research`` (research/);
    no module of the daemon's package imports it (it is reached only through
    ``symbiont.plugins.research``, where installed) nor matplotlib, at any depth."""
    offenders = {}
    for module, path in modules(DAEMON, "symbiont").items():
        bad = {i for i in imports(path, module, top_level_only=False)
               if i.split(".")[0] in ("matplotlib", "symbiont_research")}
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, offenders
    assert not (DAEMON / "lab").exists() and not (DAEMON / "experiments").exists()
    assert not list(DAEMON.glob("*/experiments.py"))


PROC_FILES = ("mem", "pagemap", "smaps")  # another process's memory: host/procmem.py reads them
PROC_PATH = re.compile(r"/proc/[^\s/]+/(mem|pagemap|smaps)")


def proc_memory_paths(source: str) -> list[int]:
    """Lines that build a path to ``/proc/PID/{mem,pagemap,smaps}``: ``... / "mem"``, an f-string
    ``/proc/{pid}/mem``, or a string that is such a path (prose in docstrings does not count)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            hit = node.right.value in PROC_FILES
        elif isinstance(node, ast.JoinedStr):
            hit = bool(PROC_PATH.search("".join(v.value if isinstance(v, ast.Constant) else "{}"
                                                for v in node.values)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            hit = bool(PROC_PATH.fullmatch(node.value))
        else:
            hit = False
        if hit:
            lines.append(node.lineno)
    return lines


def test_other_processes_memory_only_under_host() -> None:
    """Reading a VM's memory is a platform access like libvirt: it goes through ``symbiont.host``
    (``host/procmem.py``), so a part can be tested against the host port's fakes."""
    offenders = {}
    for module, path in modules(DAEMON, "symbiont").items():
        if module.startswith("symbiont.host."):
            continue
        if hits := proc_memory_paths(path.read_text()):
            offenders[module] = hits
    assert not offenders, offenders


def test_proc_memory_paths_finds_the_ways_to_name_one() -> None:
    assert proc_memory_paths('os.open(Path(proc) / str(pid) / "mem", 0)')
    assert proc_memory_paths('open(f"/proc/{pid}/pagemap", "rb")')
    assert proc_memory_paths('p = "/proc/self/smaps"')
    assert not proc_memory_paths('d = {"mem": 1, "cpu": 2}; s = f"{x} mem"; e = "no permission (needs root)"')
