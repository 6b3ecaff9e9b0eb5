"""The package's modules import one way: each only from modules on a lower floor.

The floors (docs/design.md, "Module floors"): small helpers; the math on kernels (conv
geometry, TT factors, orthogonal cores, spectra, the forward-path model, the effective
kernel); the layers and the bounds; the model hooks; tracing, conversion, control and the
demo; the report; the evaluation toolkit; the CLI. Every relative import counts, including imports inside functions (a lazy import
hides a cycle; it does not remove it). A new module must be given a floor here.
"""

import ast
from pathlib import Path

import pytest

import ttconv

PACKAGE = Path(ttconv.__file__).parent

FLOORS = [
    {"_typing", "_precision", "_compile", "_conv_args", "_functional", "_linalg", "_progress", "_table",
     "activations"},
    {"geometry", "tt", "orthogonal", "spectra", "_forward_paths", "_effective_kernel"},
    {"layer", "bounds"},
    {"_hooks"},
    {"_trace", "control", "convert", "demo"},
    {"report"},
    {"evaluate"},
    {"cli"},
    {"__init__", "__main__"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _relative_imports(path):
    """Names of the package's modules that ``path`` imports (``from . import x``, ``from .x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module == "ttconv":  # from . import x / from .x import y / from ttconv import x
                found |= {module.split(".")[0]} if node.level == 1 and module else {a.name for a in node.names}
            elif module.startswith("ttconv."):  # from ttconv.x import y
                found.add(module.split(".")[1])
        elif isinstance(node, ast.Import):  # import ttconv.x (as y)
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ttconv.")}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_every_module_has_a_floor():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - set(FLOOR) == set(), "give the new module a floor in FLOORS"
    assert set(FLOOR) - modules == set(), "FLOORS names a module that no longer exists"


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_imports_go_down_only(module):
    upward = {name for name in _relative_imports(PACKAGE / f"{module}.py") if FLOOR[name] >= FLOOR[module]}
    assert not upward, f"ttconv.{module} (floor {FLOOR[module]}) imports {sorted(upward)} from its floor or above"


def test_the_checker_sees_lazy_and_absolute_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from . import tt\nimport torch\n\ndef f():\n    from .convert import convert\n"
                      "    from ttconv.report import spectral_report\n    from ttconv import cli\n"
                      "    import ttconv.evaluate\n    import ttconv.bounds as b\n")
    assert _relative_imports(source) == {"tt", "convert", "report", "cli", "evaluate", "bounds"}


def test_svd_names_match_the_conversion_table():
    from ttconv._effective_kernel import SVD_NAMES, TORCH_CONVS
    from ttconv.convert import SVD_CLASSES

    assert tuple(SVD_CLASSES) == TORCH_CONVS
    assert {torch_class: cls.__name__ for torch_class, cls in SVD_CLASSES.items()} == dict(SVD_NAMES)
