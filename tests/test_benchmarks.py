"""Smoke runs of the benchmark scripts (tiny shapes), so they cannot rot. No timing asserts."""

import importlib.util
import os

import pytest

BENCH_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
SCRIPTS = sorted(name for name in os.listdir(BENCH_DIR) if name.startswith("bench_") and name.endswith(".py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_run(script, capsys, device):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(BENCH_DIR, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Every script takes --device (benchmarks/_device.py): it runs on the test's device by its
    # own option, as ``--device cuda`` would run it, not by the default device the suite set.
    module.main(["--quick", "--device", str(device)])
    assert "|" in capsys.readouterr().out  # printed a table
