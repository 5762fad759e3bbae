"""The dependency rule: core <- costmodels <- simulator <- planner, no torch, no I/O."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDER = ["core", "costmodels", "simulator", "planner"]
PURE = set(ORDER)


def test_pure_packages_do_not_import_torch():
    code = ("import sys; import meshplan.core, meshplan.costmodels, meshplan.simulator, "
            "meshplan.planner; import meshplan.simulator.analytical; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_package_imports_a_higher_one():
    for i, pkg in enumerate(ORDER):
        higher = ORDER[i + 1:] + ["runtime", "kernels", "validate"]
        for path in (ROOT / pkg).rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                assert parts[0] != "torch", f"{path} imports torch"
                if parts[0] == "meshplan" and len(parts) > 1:
                    assert parts[1] not in higher, f"{path} imports {name}"
                    assert parts[1] in ORDER[: i + 1], f"{path} imports {name} (not below)"


def test_pure_packages_touch_no_disk_or_environment():
    banned = {"open", "environ", "getenv", "read_text", "write_text"}
    for pkg in PURE:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Name | ast.Attribute):
                    name = node.id if isinstance(node, ast.Name) else node.attr
                    assert name not in banned, f"{path}:{node.lineno} uses {name}"


def test_runtime_never_imports_simulator_or_planner():
    for path in (ROOT / "runtime").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("meshplan.simulator", "meshplan.planner")), path
