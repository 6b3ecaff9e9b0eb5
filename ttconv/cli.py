"""Command line: ``python -m ttconv {demo,check}`` (also installed as ``ttconv``).

``ttconv check CHECKPOINT [--input-size C H W] [--json]`` prints the spectral table of every
conv kernel in a state dict (or, with ``--unsafe-load``, a whole saved model).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from typing import Any, List, Optional, TextIO

import torch
from torch import nn

from ._hooks import stream_progress
from .report import SpectralReport, spectral_report, state_dict_report

__all__ = ["main", "load_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot (or may not) be read."""


def load_checkpoint(path: str, *, unsafe: bool = False) -> Any:
    """``torch.load`` on CPU, with ``weights_only=True`` unless ``unsafe``; clear errors.

    Raises
    ------
    CheckpointError
        The file is missing, is not a torch file, or needs arbitrary unpickling (which
        can execute code from the file) while ``unsafe`` is False.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a file written by torch.save")
    with open(path, "rb") as handle:
        magic = handle.read(2)
    # torch.save writes a zip archive (legacy format: a pickle, protocol >= 2, starts 0x80).
    if not zipfile.is_zipfile(path) and magic[:1] != b"\x80":
        raise CheckpointError(f"{path!r} is not a readable torch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as error:
        if not unsafe and "weights_only" in str(error).lower().replace(" ", "_"):
            raise CheckpointError(
                f"{path!r} needs arbitrary unpickling to load (it holds more than tensors, e.g. a whole "
                "saved model), which can run code from the file. Refused. If you trust the file, rerun "
                "with --unsafe-load; or save model.state_dict() instead."
            ) from None
        raise CheckpointError(f"{path!r} is not a readable torch checkpoint ({error})") from None
    except Exception as error:  # garbage files fail in many ways inside the unpickler
        raise CheckpointError(f"{path!r} is not a readable torch checkpoint ({type(error).__name__}: {error})") from None


def _check(options: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    obj = load_checkpoint(options.checkpoint, unsafe=options.unsafe_load)
    size = options.input_size
    iters = dict(gram_iters=options.gram_iters, power_iters=options.power_iters,
                 progress=None if options.json else stream_progress(err))
    if isinstance(obj, nn.Module):
        example = None
        if size is not None:
            param = next(obj.parameters(), None)
            example = torch.zeros(1, *size, dtype=param.dtype if param is not None else torch.float32)
        report: SpectralReport = spectral_report(obj, example, **iters)
    elif isinstance(obj, Mapping):
        report = state_dict_report(obj, tuple(size[1:]) if size is not None else None, **iters)
    else:
        raise CheckpointError(
            f"{options.checkpoint!r} holds a {type(obj).__name__}, expected a state_dict (a mapping of "
            "tensors) or an nn.Module"
        )
    if options.json:
        print(report.to_json(indent=2), file=out)
    else:
        if size is None:
            print("no --input-size: size-independent bounds only (pass --input-size C H W for exact values)", file=out)
        print(report.table(), file=out)
    if options.plot:
        report.plot(options.plot)
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttconv", description="ttconv: see, clip and bound conv singular values")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="convert a conv layer and print its errors and exact spectrum")
    demo.add_argument("--channels", type=int, default=128)
    demo.add_argument("--input-size", type=int, default=16)
    check = commands.add_parser("check", help="spectral norms and bounds of every conv in a checkpoint")
    check.add_argument("checkpoint", help="file written by torch.save: a state_dict, or a whole model")
    check.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                       help="input shape; adds exact values (a whole model: per-layer sizes from one forward pass)")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.add_argument("--unsafe-load", action="store_true",
                       help="allow arbitrary unpickling (can execute code from the file): trusted files only")
    check.add_argument("--gram-iters", type=int, default=6, help="Gram iterations of the frequency bound")
    check.add_argument("--power-iters", type=int, default=20, help="power iterations of the lower estimate")
    check.add_argument("--plot", metavar="PNG", help="save the spectra to this image (needs matplotlib)")
    return parser


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = _build_parser()
    options = parser.parse_args(argv)
    try:
        if options.command == "demo":
            from .demo import run_demo

            print("\n".join(run_demo(options.channels, options.input_size)), file=out)
            return 0
        return _check(options, out, err)
    except (CheckpointError, ValueError, ImportError) as error:
        print(f"ttconv: error: {error}", file=err)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
