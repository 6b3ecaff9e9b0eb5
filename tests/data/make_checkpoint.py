"""Writes svdconv_v1.pt: a checkpoint of the current SVDConv state format (version 1).

Kept so later format changes can test that they still load it. Run from the repo root:
``python tests/data/make_checkpoint.py``.
"""

import os

import torch
from torch import nn

from ttconv import SVDConv


def reference_model() -> nn.Sequential:
    return nn.Sequential(
        SVDConv(3, 8, 3, padding=1, rank=(4, 2)),
        nn.ReLU(),
        SVDConv(8, 8, (3, 2), stride=2, groups=2, padding_mode="reflect", padding=1),
        SVDConv(8, 8, 3, padding=1, core_kind="orthogonal", max_singular_value=1.0),
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    model = reference_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    path = os.path.join(os.path.dirname(__file__), "svdconv_v1.pt")
    torch.save({"state_dict": model.state_dict(), "input": x, "output": y}, path)
    print(f"wrote {path}")
