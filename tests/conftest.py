import os
import sys

import pytest
import torch

# Make the shared oracle importable as a plain module from every test file.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
