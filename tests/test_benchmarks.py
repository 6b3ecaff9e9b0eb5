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


@pytest.mark.cpu_only
def test_collect_builds_the_gpu_page_and_keeps_sections_the_new_run_did_not_reach(tmp_path):
    """``run_all.py --collect``: a section this run finished is replaced, one it stopped in shows its tables
    under a 'stopped' note, and one it never reached keeps the earlier page's tables, marked with the
    earlier machine (once, however many runs keep it)."""
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(BENCH_DIR, "run_all.py"))
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    headings = {script: heading for heading, script, _ in run_all.SECTIONS}
    layer, bounds, control = (headings[f"benchmarks/{name}.py"] for name in ("bench_layer", "bench_bounds",
                                                                              "bench_control"))
    page = tmp_path / "performance-cuda.md"
    page.write_text(f"# Performance on cuda\n\nCollected ... Machine: Old GPU; 8 CPU cores. Every ratio is ...\n\n"
                    f"## {layer}\n\nold blurb\n\n| old layer | 1 |\n\n## {bounds}\n\nold blurb\n\n| old bounds | 2 |\n\n"
                    f"## {control}\n\nNot run to the end on cuda: whatever.\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "env.txt").write_text("New GPU, driver 1\n16 CPU cores\n")
    (run / "device.txt").write_text("cuda\n")
    (run / "bench_layer.md").write_text("| new layer | 3 |\n")
    (run / "bench_layer.log").write_text("bench_layer: exit 0 after 5 s (limit 9 s)\n")
    (run / "bench_control.md").write_text("| new control, first table | 4 |\n")
    (run / "bench_control.log").write_text("bench_control: exit 124 after 9 s (limit 9 s)\n")
    for _ in range(2):  # a second collect from the same folder changes nothing
        run_all.main(["--collect", str(run), "--output", str(page)])
        text = page.read_text()
        sections = run_all._sections(str(page))
        assert "Machine: New GPU, driver 1; 16 CPU cores." in text
        assert "| new layer | 3 |" in sections[layer] and "old layer" not in text
        assert "| old bounds | 2 |" in sections[bounds]
        assert sections[bounds].count("*Kept from an earlier run on ") == 1
        assert "Old GPU; 8 CPU cores" in sections[bounds] and "the latest run: not run (no output saved)" in text
        assert "**Stopped before the end** (`bench_control: exit 124" in sections[control]
        assert "| new control, first table | 4 |" in sections[control]
        assert "Not run to the end on cuda" in sections[headings["benchmarks/bench_convert.py"]]
    # A later run that stops in the bounds script before its first table keeps the tables again: the machine
    # they were measured on stays, the reason becomes the later run's.
    later = tmp_path / "later"
    later.mkdir()
    (later / "env.txt").write_text("Newer GPU\n")
    (later / "bench_bounds.log").write_text("bench_bounds: exit 124 after 9 s (limit 9 s)\n")
    run_all.main(["--collect", str(later), "--output", str(page)])
    kept = run_all._sections(str(page))[bounds]
    assert kept.count("*Kept from an earlier run on ") == 1 and "Old GPU; 8 CPU cores" in kept
    assert "the latest run: `bench_bounds: exit 124 after 9 s (limit 9 s)`." in kept and "no output saved" not in kept
    assert "| old bounds | 2 |" in kept
