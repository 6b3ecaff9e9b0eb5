"""Smoke runs of the examples (one epoch); they need scikit-learn's bundled digits."""

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
SCRIPTS = sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".py") and not n.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_quick_run(script, capsys):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(EXAMPLES, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--quick"])
    assert "acc" in capsys.readouterr().out
