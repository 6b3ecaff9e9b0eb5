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


def test_orthogonal_calibration_dump_has_what_the_path_test_reads(tmp_path, capsys):
    """``bench_path_calibration.py --orthogonal --dump`` writes the rows that
    ``tests/data/orthogonal_path_timings.json`` holds: its quick run must give rows of the same
    fields, all three paths timed."""
    import json

    spec = importlib.util.spec_from_file_location("bench_path_calibration",
                                                  os.path.join(BENCH_DIR, "bench_path_calibration.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dump = tmp_path / "rows.json"
    module.main(["--quick", "--orthogonal", "--dump", str(dump)])
    assert "auto's path against the fastest of the three" in capsys.readouterr().out
    rows = json.loads(dump.read_text())
    stored = json.loads(open(os.path.join(os.path.dirname(__file__), "data", "orthogonal_path_timings.json")).read())
    assert rows and set(rows[0]) == set(stored[0])
    assert all(row["core_kind"] == "orthogonal" and min(row[p] for p in ("dense", "factored", "separable")) > 0
               for row in rows)
