"""What importing the package costs, what it ships, and how its modules depend on each other."""

import ast
import configparser
import subprocess
import sys
from importlib import resources
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sgsc"


def _imported_after(statement: str) -> list[str]:
    code = (
        f"import sys; {statement}\n"
        "heavy = ('lightning', 'hydra', 'torch_pruning', 'pytorch_grad_cam', 'sklearn', 'torchmetrics')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return eval(out.strip().splitlines()[-1])


def test_import_is_lean():
    code = "import sys, lightning_sgsc\nimport torch; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert _imported_after("import lightning_sgsc") == []


def test_the_artifact_reads_and_writes_without_lightning():
    # export/load need torch, safetensors and the package's pure modules only (a runtime without Lightning)
    assert _imported_after("import lightning_sgsc.export; from lightning_sgsc import load_compressed") == []


def test_public_api_names_resolve():
    import lightning_sgsc

    assert all(hasattr(lightning_sgsc, name) for name in lightning_sgsc.__all__)
    assert {"SafetyGuidedQuantization", "SafetyGuidedMixin", "quantize_", "model_size"} <= set(lightning_sgsc.__all__)
    assert sorted(dir(lightning_sgsc)) == sorted(lightning_sgsc.__all__)


def _internal_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (function bodies included), except under
    ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for body in stmt.body
        for node in ast.walk(body)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_sgsc"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_sgsc")}
    return found


def test_no_import_cycle_inside_the_package():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = _internal_imports(path)
    graph = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, start]
                if nxt not in trail:
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert cycles == []
    assert "lightning_sgsc.callback" not in graph["lightning_sgsc.mixin"]  # the callback attaches itself


def test_one_quantizer_path_in_plain_torch():
    # no C source, no compilation at run time, no foreign function calls: results do not depend on a toolchain
    assert not [p for p in PACKAGE.rglob("*") if p.suffix in (".c", ".cpp", ".so", ".h")]
    assert not [p for p in PACKAGE.rglob("*.py") if "ctypes" in p.read_text()]


def test_the_package_ships_its_type_annotations_and_configs():
    assert resources.files("lightning_sgsc").joinpath("py.typed").is_file()
    assert resources.files("lightning_sgsc").joinpath("conf/train.yaml").is_file()
    setup = configparser.ConfigParser()
    setup.read(PACKAGE.parent / "setup.cfg")
    shipped = setup.get("options.package_data", "lightning_sgsc").split()
    assert "py.typed" in shipped and "conf/*.yaml" in shipped and "conf/*/*.yaml" in shipped
    assert (PACKAGE.parent / "conf").resolve() == PACKAGE / "conf"  # the checkout's conf/ is the shipped one
