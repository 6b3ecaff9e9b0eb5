"""Command line: ``python -m ttconv {demo,check}`` (also installed as ``ttconv``).

``ttconv check CHECKPOINT [--input-size C [D] H W | C L] [--json] [--plot PNG] [--max-memory SIZE]``
prints the spectral table of every conv kernel (1-D, 2-D and 3-D) in a state dict or
training checkpoint (or,
with ``--unsafe-load``, a whole saved model). Every user error is one line
``ttconv: error: ...`` on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, NoReturn, Optional, TextIO

import torch
from torch import nn

from ._progress import Progress
from .report import (
    DEFAULT_MAX_MEMORY,
    SpectralReport,
    UnsafeTensorError,
    check_tensor_storage,
    spectral_report,
    state_dict_report,
)

__all__ = ["main", "load_checkpoint", "parse_memory_size", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot (or may not) be read."""


class _UsageError(Exception):
    """A command-line argument error (argparse's, turned into one line and status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# A zip whose entries inflate to more than this many times the file (and over 64 MB) is
# refused before loading: torch.save never compresses, so only a crafted file does that.
_MAX_INFLATION = 100


def load_checkpoint(path: str, *, unsafe: bool = False) -> Any:
    """``torch.load`` on CPU, with ``weights_only=True`` unless ``unsafe``; clear errors.

    Before loading, the path must be a regular file (not a directory, device such as
    ``/dev/zero``, FIFO or socket) and a zip must not inflate to far more than its size.
    After loading, every tensor must store as much data as its shape claims
    (``ttconv.report.check_tensor_storage``), so an expanded (stride-0) tensor cannot
    make the analysis allocate gigabytes.

    Raises
    ------
    CheckpointError
        The file is missing, not a regular file, unreadable, not a torch file, a
        decompression bomb, holds a tensor that claims far more data than it stores, or
        needs arbitrary unpickling (which can execute code from the file) while ``unsafe``
        is False.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a file written by torch.save")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a regular file (a device, FIFO or socket?), "
                              "expected a file written by torch.save")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(2)
        is_zip = zipfile.is_zipfile(path)
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                inflated = sum(info.file_size for info in archive.infolist())
            size = os.path.getsize(path)
            if inflated > max(_MAX_INFLATION * size, 64 * 2**20):
                raise CheckpointError(
                    f"{path!r} declares {inflated:,} bytes of content in a {size:,}-byte file (a compressed "
                    "archive; torch.save never compresses): refused as a possible decompression bomb")
    except OSError as error:
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {error.strerror or error}") from None
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path!r} is not a readable torch checkpoint (broken zip: {error})") from None
    # torch.save writes a zip archive (legacy format: a pickle, protocol >= 2, starts 0x80).
    if not is_zip and magic[:1] != b"\x80":
        raise CheckpointError(f"{path!r} is not a readable torch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe)
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
    try:
        check_tensor_storage(obj.state_dict() if isinstance(obj, nn.Module) else obj)
    except UnsafeTensorError as error:
        raise CheckpointError(f"{path!r}: {error}") from None
    return obj


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text: str) -> Optional[int]:
    """Bytes from ``'512MB'``, ``'1.5GB'``, ``'2GiB'``, ``'1000000'``; ``None`` for ``'none'``.

    ``kB, MB, GB, TB`` (and ``k, M, G, T``) are powers of 1000, ``KiB, MiB, GiB, TiB``
    powers of 1024; case-insensitive. Raises ``ValueError`` naming the accepted forms.
    """
    cleaned = str(text).strip().lower()
    if cleaned in ("none", "unlimited", "inf"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", cleaned)
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"expected a memory size such as 512MB, 1.5GB, 2GiB or 'none' (no limit), got {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise ValueError(f"the memory size must be positive, got {text!r}")
    return value


def _memory_arg(text: str) -> Optional[int]:
    try:
        return parse_memory_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _check_plot_path(path: str, input_size: Optional[List[int]]) -> None:
    """Fail before any computation when ``--plot PATH`` cannot be written."""
    if input_size is None:
        raise ValueError("--plot needs --input-size C H W: the plotted spectra are the exact circular spectra at "
                         "an input size")
    if os.path.isdir(path):
        raise ValueError(f"--plot {path!r} is a directory; give a file name such as {os.path.join(path, 'spectra.png')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path!r}: directory {folder!r} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--plot {path!r}: directory {folder!r} is not writable")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'ttconv[plot]'") from None
    extension = os.path.splitext(path)[1][1:].lower()
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if extension and extension not in supported:
        raise ValueError(f"--plot {path!r}: unknown image format {extension!r}; use one of "
                         f"{', '.join('.' + e for e in sorted(supported))}")


_MODEL_KEYS = ("model", "module", "net", "network")


def _module_in(obj: Any) -> Optional[nn.Module]:
    """An ``nn.Module`` under a model key of a checkpoint dict (only with --unsafe-load)."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _MODEL_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _timed_lines(stream: TextIO) -> Callable[[int, int, str], None]:
    """Progress callback: ``[3/20] layer2.0.conv1  0.41 s`` per layer on ``stream`` (time since the
    previous line, the first one since the analysis was set up)."""
    printer = Progress(0, stream=stream)

    def report(done: int, total: int, name: str) -> None:
        printer.total = total
        printer.step(name)

    return report


def _input_size(values: Optional[List[int]]) -> Optional[List[int]]:
    """``--input-size``: the channel count and 1, 2 or 3 spatial sizes."""
    if values is not None and not 2 <= len(values) <= 4:
        raise _UsageError(f"--input-size takes C and 1, 2 or 3 spatial sizes (C L for Conv1d models, C H W for "
                          f"Conv2d, C D H W for Conv3d), got {len(values)} value(s): {' '.join(map(str, values))}")
    return values


def _check(options: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    size = _input_size(options.input_size)
    if options.plot:
        _check_plot_path(options.plot, size)
    obj = load_checkpoint(options.checkpoint, unsafe=options.unsafe_load)
    common = dict(gram_iters=options.gram_iters, power_iters=options.power_iters, keep_spectra=bool(options.plot),
                  max_memory=options.max_memory, progress=False if options.json else _timed_lines(err))
    module = _module_in(obj)
    if module is not None:
        example = None
        if size is not None:
            param = next(module.parameters(), None)
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
            example = torch.zeros(1, *size, dtype=dtype)
        report: SpectralReport = spectral_report(module, example, **common)
    elif isinstance(obj, Mapping):
        report = state_dict_report(obj, tuple(size[1:]) if size is not None else None,
                                   in_channels=size[0] if size is not None else None, **common)
    else:
        raise CheckpointError(
            f"{options.checkpoint!r} holds a {type(obj).__name__}, expected a state_dict (a mapping of "
            "tensors), a training checkpoint dict or an nn.Module"
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


def _demo(options: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .demo import run_demo

    print("\n".join(run_demo(options.channels, options.input_size)), file=out)
    return 0


# One function per subcommand (``_build_parser`` declares the same names and their options).
_COMMANDS: Dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {"demo": _demo, "check": _check}


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ttconv", description="ttconv: see, clip and bound conv singular values")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="convert a conv layer and print its errors and exact spectrum")
    demo.add_argument("--channels", type=_positive_int, default=128, help="channels of the demo conv (default 128)")
    demo.add_argument("--input-size", type=_positive_int, default=16, help="spatial size, at least 3 (default 16)")
    check = commands.add_parser("check", help="spectral norms and bounds of every conv in a checkpoint")
    check.add_argument("checkpoint", help="file written by torch.save: a state_dict, a training checkpoint, or a "
                                          "whole model (--unsafe-load)")
    check.add_argument("--input-size", type=_positive_int, nargs="+", metavar="C [D] H W",
                       help="input shape without the batch: C L (1-D), C H W (2-D) or C D H W (3-D); adds exact "
                            "values (a whole model: per-layer sizes from one forward pass; a state dict: every kernel "
                            "with that many spatial axes at that size, C checked against the first layer)")
    check.add_argument("--json", action="store_true", help="print strict JSON instead of a table")
    check.add_argument("--unsafe-load", action="store_true",
                       help="allow arbitrary unpickling (can execute code from the file): trusted files only")
    check.add_argument("--gram-iters", type=_positive_int, default=6, help="Gram iterations of the frequency bound")
    check.add_argument("--power-iters", type=_positive_int, default=20, help="power iterations of the lower estimate")
    check.add_argument("--max-memory", type=_memory_arg, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                       help="memory budget of one layer's analysis, e.g. 512MB, 4GB, 2GiB or none (default 1GiB); "
                            "a computation estimated to need more is skipped with a note")
    check.add_argument("--plot", metavar="PNG", help="save the spectra to this image (needs --input-size, matplotlib)")
    return parser


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the command line; returns the exit status (0, or 2 after a one-line error on ``err``)."""
    try:
        options = _build_parser().parse_args(argv)
        return _COMMANDS[options.command](options, out, err)
    except (_UsageError, CheckpointError, ValueError, ImportError) as error:
        message = str(error)
    except OSError as error:  # writing the plot, a closed pipe...
        message = f"{error.strerror or error}" + (f": {error.filename!r}" if error.filename else "")
    except MemoryError:
        message = "out of memory; lower --max-memory or the --input-size"
    except RuntimeError as error:
        if "allocate" not in str(error).lower():
            raise
        message = f"out of memory ({str(error).splitlines()[0]}); lower --max-memory or the --input-size"
    except KeyboardInterrupt:
        print("ttconv: interrupted", file=err)
        return 130
    print(f"ttconv: error: {' '.join(message.split())}", file=err)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
