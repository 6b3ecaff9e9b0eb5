"""The command line: tables from checkpoints, JSON, refusal of unsafe pickles, errors."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ttconv import SVDConv
from ttconv.cli import main

# Subprocesses, files and numpy: these run on the CPU whatever --device says.
pytestmark = pytest.mark.cpu_only


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SVDConv(8, 16, 3, stride=2, padding=1, rank=4))


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture()
def checkpoints(tmp_path):
    torch.manual_seed(0)
    net = _net()
    paths = {"state": tmp_path / "state.pt", "model": tmp_path / "model.pt", "evil": tmp_path / "evil.pt",
             "garbage": tmp_path / "garbage.pt"}
    torch.save(net.state_dict(), paths["state"])
    torch.save(net, paths["model"])
    torch.save({"weights": _Exploit()}, paths["evil"])
    paths["garbage"].write_text("not a checkpoint")
    return {k: str(v) for k, v in paths.items()}


def test_state_dict_table_without_input_size(checkpoints):
    code, out, err = _run("check", checkpoints["state"])
    assert code == 0
    assert "size-independent bounds only" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    assert [line.split()[0] for line in lines[header + 2: header + 4]] == ["0", "2"]
    assert "[2/2] 2" in err  # per-layer progress on stderr


def test_state_dict_with_input_size_gives_exact_values(checkpoints):
    code, out, _ = _run("check", checkpoints["state"], "--input-size", "3", "8", "8", "--json")
    assert code == 0
    rows = json.loads(out)["layers"]
    assert [r["name"] for r in rows] == ["0", "2"]
    assert all(r["exact"] is not None and r["upper_bound"] >= r["exact"] * (1 - 1e-6) for r in rows)


def test_whole_model_needs_the_unsafe_flag(checkpoints):
    code, _, err = _run("check", checkpoints["model"])
    assert code == 2 and "--unsafe-load" in err
    code, out, _ = _run("check", checkpoints["model"], "--unsafe-load", "--input-size", "3", "8", "8", "--json")
    rows = json.loads(out)["layers"]
    assert code == 0 and rows[1]["stride"] == [2, 2] and rows[1]["input_size"] == [8, 8]


def test_malicious_pickle_is_refused_and_not_executed(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run("check", checkpoints["evil"])
    assert code == 2 and "Refused" in err and "--unsafe-load" in err
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name, match", [("missing", "does not exist"), ("garbage", "not a readable torch checkpoint")])
def test_bad_paths(checkpoints, tmp_path, name, match):
    path = checkpoints.get(name, str(tmp_path / "missing.pt"))
    code, _, err = _run("check", path)
    assert code == 2 and match in err


def test_console_entry_point_runs_as_module(checkpoints):
    result = subprocess.run([sys.executable, "-m", "ttconv", "check", checkpoints["state"], "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"]) == 2


def test_demo_prints_errors_and_spectrum():
    code, out, _ = _run("demo", "--channels", "16", "--input-size", "8")
    assert code == 0 and "speed-up" in out and "sigma_max" in out


def test_whole_model_inside_a_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = _net()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 2, "model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict()}, path)
    code, _, err = _run("check", str(path))
    assert code == 2 and "--unsafe-load" in err
    code, out, err = _run("check", str(path), "--unsafe-load", "--input-size", "3", "8", "8", "--json")
    assert code == 0, err
    rows = json.loads(out)["layers"]
    assert [r["name"] for r in rows] == ["0", "2"] and rows[1]["stride"] == [2, 2]


def test_table_lists_skipped_tensors_and_the_column_legend(tmp_path):
    torch.manual_seed(0)
    net = _net()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "images": torch.randn(2, 3, 8, 8)}, path)
    code, out, _ = _run("check", str(path), "--input-size", "3", "8", "8")
    assert code == 0
    assert "skipped 1 layer(s) or tensor(s), not analysed:" in out and "images" in out
    assert "'circ' = circular convolution on the input size" in out
