"""DDP on CPU (gloo, 2 processes): SpectralControl keeps ranks bit-identical and within target."""

import os
import subprocess
import sys

import pytest
import torch

# Subprocesses, files and numpy: these run on the CPU whatever --device says.
pytestmark = pytest.mark.cpu_only

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def test_ddp_training_with_spectral_control(tmp_path):
    result = subprocess.run([sys.executable, WORKER, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # bit-identical
    assert ranks[0]["norms"] == ranks[1]["norms"]
    assert len(ranks[0]["norms"]) == 3
    assert all(value <= 0.9 * (1 + 1e-5) for value in ranks[0]["norms"].values())
