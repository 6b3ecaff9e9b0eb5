"""Device readiness: every layer kind runs forward and backward on the ``meta`` device.

A meta tensor has a shape and a device but no values, so on meta

* a host sync raises (``.item()``, ``bool(t)``, ``float(t)``, ``t.tolist()``, masked
  indexing, ...: "cannot be called on meta tensors");
* a hidden CPU tensor of more than one element raises (device mismatch);
* a hidden 0-d CPU tensor (``torch.tensor(2.0)`` mixed into the maths) does not raise, so
  every aten call is also audited (``_DeviceAudit``): any tensor argument or result that is
  not on meta fails the test, in forward and in backward.

Together these show that ``forward`` and its backward read nothing from the host and create
nothing off the input's device, on CPU, without a GPU. What meta cannot show is a sync
inside a torch kernel on CUDA (a kernel that copies a value to the host itself): the
CUDA-only test at the end runs the same cases under ``torch.cuda.set_sync_debug_mode("error")``.

The spectra and bounds are checked on meta too where they are sync-free (the full spectrum,
the differentiable norms used as training regularisers, the size-independent bounds), and the
ones that sync by design are listed (``SYNCING``; docs/testing.md, "Devices").
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import ttconv
from ttconv import _conv_args, _functional, bounds, spectra, tt

META = torch.device("meta")


class _DeviceAudit(TorchDispatchMode):
    """Records every aten call that takes or returns a tensor off ``device`` (0-d CPU tensors too)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.offending: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in tree_flatten((args, kwargs, result))[0]:
            if isinstance(value, torch.Tensor) and value.device != self.device:
                self.offending.append(f"{func}: a {tuple(value.shape)} tensor on {value.device}")
        return result


@contextmanager
def audited(device: torch.device = META) -> Iterator[_DeviceAudit]:
    """Run the block under a ``_DeviceAudit`` and fail if any tensor left ``device``."""
    with _DeviceAudit(device) as audit:
        yield audit
    assert not audit.offending, "tensors off the input's device:\n" + "\n".join(sorted(set(audit.offending)))


# ------------------------------------------------------------------ the cases
_PLAIN = {1: ttconv.SVDConv1d, 2: ttconv.SVDConv2d, 3: ttconv.SVDConv3d}
_TRANSPOSED = {1: ttconv.SVDConvTranspose1d, 2: ttconv.SVDConvTranspose2d, 3: ttconv.SVDConvTranspose3d}
_TORCH_PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TORCH_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

# (name, constructor arguments): 8 input and 12 output channels.
_PLAIN_GEOMETRIES: List[Tuple[str, Dict[str, Any]]] = [
    ("k3", dict(kernel_size=3, padding=1)),
    ("k3-stride2-dilation2-groups2", dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=2)),
    ("k3-same", dict(kernel_size=3, padding="same")),
    ("k2-valid-stride2", dict(kernel_size=2, stride=2, padding="valid")),
    ("k1-pointwise", dict(kernel_size=1)),
    ("k1-stride2-padded-groups4", dict(kernel_size=1, stride=2, padding=1, groups=4)),
]
_TRANSPOSED_GEOMETRIES: List[Tuple[str, Dict[str, Any]]] = [
    ("k3", dict(kernel_size=3, padding=1)),
    ("k3-stride2-output-padding-dilation2-groups2",
     dict(kernel_size=3, stride=2, padding=1, output_padding=1, dilation=2, groups=2)),
    ("k2-stride2", dict(kernel_size=2, stride=2)),
    ("k1", dict(kernel_size=1)),
]
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_PATHS = ("dense", "factored", "auto")  # 'auto' (one of the two, picked in Python) on the first geometry
# Spatial sizes per dimension: a small input, and one with >= 2^14 positions at batch 2 (the
# factored path then mixes channels by batched matmul, _functional.MATMUL_MIN_POSITIONS).
_LARGE = {1: (8192,), 2: (96, 96), 3: (24, 24, 16)}


def _cases() -> List[Any]:
    cases = []
    for d in (1, 2, 3):
        for (name, geometry), mode, path in [(g, m, p) for g in _PLAIN_GEOMETRIES for m in _PADDING_MODES
                                             for p in _PATHS if (m == "zeros" or g[1].get("padding", 0))
                                             and (p != "auto" or g is _PLAIN_GEOMETRIES[0])]:
            cores = [("general", {})]
            if d == 2 and mode in ("zeros", "circular"):  # (its core and forward do not depend on the mode)
                cores.append(("orthogonal", {}))
                if path == "factored":
                    cores.append(("orthogonal-bounded", dict(max_singular_value=1.0)))
            for core, extra in cores:
                kwargs = dict(geometry, padding_mode=mode, path=path, core_kind=core.split("-")[0], **extra)
                if core == "general":
                    kwargs["rank"] = 3
                cases.append(pytest.param(d, False, kwargs, id=f"Conv{d}d-{name}-{mode}-{path}-{core}"))
        for (name, geometry), path in [(g, p) for g in _TRANSPOSED_GEOMETRIES for p in _PATHS
                                       if p != "auto" or g is _TRANSPOSED_GEOMETRIES[0]]:
            kwargs = dict(geometry, path=path, rank=3)
            cases.append(pytest.param(d, True, kwargs, id=f"ConvTranspose{d}d-{name}-{path}"))
        # An orthogonal core's separable path (two convs) on every geometry of both kinds.
        for name, geometry in _PLAIN_GEOMETRIES:
            kwargs = dict(geometry, padding_mode="reflect" if geometry.get("padding") else "zeros",
                          path="separable", core_kind="orthogonal")
            cases.append(pytest.param(d, False, kwargs, id=f"Conv{d}d-{name}-separable-orthogonal"))
        for name, geometry in _TRANSPOSED_GEOMETRIES:
            kwargs = dict(geometry, path="separable", core_kind="orthogonal")
            cases.append(pytest.param(d, True, kwargs, id=f"ConvTranspose{d}d-{name}-separable-orthogonal"))
    return cases


def _layer(d: int, transposed: bool, kwargs: Dict[str, Any], device: torch.device) -> nn.Module:
    cls = (_TRANSPOSED if transposed else _PLAIN)[d]
    return cls(8, 12, **kwargs, device=device)


def _reference(d: int, transposed: bool, kwargs: Dict[str, Any], device: torch.device) -> nn.Module:
    """torch's own layer of the same geometry (for output shapes)."""
    geometry = {k: v for k, v in kwargs.items() if k not in ("path", "core_kind", "rank", "max_singular_value")}
    return (_TORCH_TRANSPOSED if transposed else _TORCH_PLAIN)[d](8, 12, **geometry, device=device)


def _inputs(d: int, device: torch.device) -> List[torch.Tensor]:
    """Batched small, unbatched small, batched large."""
    return [torch.randn(2, 8, *(8,) * d, device=device), torch.randn(8, *(8,) * d, device=device),
            torch.randn(2, 8, *_LARGE[d], device=device)]


def _largest_output_size(reference: nn.Module, x: torch.Tensor) -> List[int]:
    """The largest ``output_size`` a transposed layer accepts for ``x``: the smallest size (no
    output padding) plus ``stride - 1``, so the output padding of the call differs from the layer's."""
    default = reference(x).shape[2:]
    return [n - pad + stride - 1 for n, pad, stride in zip(default, reference.output_padding, reference.stride)]


def _forward_backward(layer: nn.Module, reference: nn.Module, x: torch.Tensor, transposed: bool) -> None:
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    if transposed and x.dim() == layer._dims + 2:  # also exercise forward(input, output_size)
        output_size = _largest_output_size(reference, x)
        y, expected = layer(x, output_size), reference(x, output_size)
    else:
        y, expected = layer(x), reference(x)
    assert y.device == x.device and y.dtype == x.dtype
    assert y.shape == expected.shape, f"output shape {tuple(y.shape)}, torch's layer gives {tuple(expected.shape)}"
    y.square().sum().backward()
    assert x.grad is not None and x.grad.device == x.device and x.grad.shape == x.shape
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.device == x.device and parameter.grad.shape == parameter.shape, name


# ------------------------------------------------------------------ meta: forward and backward
@pytest.mark.cpu_only
@pytest.mark.parametrize("d, transposed, kwargs", _cases())
def test_forward_and_backward_on_meta_touch_no_host_tensor_and_no_host_value(d, transposed, kwargs):
    layer = _layer(d, transposed, kwargs, META)
    reference = _reference(d, transposed, kwargs, META)
    assert all(p.device == META for p in layer.parameters())
    for x in _inputs(d, META):
        with audited():
            _forward_backward(layer, reference, x, transposed)


@pytest.mark.cpu_only
@pytest.mark.parametrize("d, transposed, kwargs", [
    pytest.param(2, False, dict(kernel_size=3, padding=1, path="auto", rank=3), id="Conv2d"),
    pytest.param(2, False, dict(kernel_size=3, padding=1, path="auto", core_kind="orthogonal"), id="Conv2d-orthogonal"),
    pytest.param(3, True, dict(kernel_size=3, stride=2, path="auto", rank=3), id="ConvTranspose3d"),
])
def test_layers_built_on_the_default_device_or_moved_stay_there(d, transposed, kwargs):
    """``with torch.device('meta')`` / ``set_default_device`` (no ``device=``) and ``.to(device)``:
    the parameters, the buffers and everything forward creates follow."""
    with torch.device(META):
        built = (_TRANSPOSED if transposed else _PLAIN)[d](8, 12, **kwargs)
    moved = _layer(d, transposed, kwargs, torch.device("cpu")).to(META)
    reference = _reference(d, transposed, kwargs, META)
    for layer in (built, moved):
        assert all(t.device == META for t in [*layer.parameters(), *layer.buffers()])
        with audited():
            _forward_backward(layer, reference, _inputs(d, META)[0], transposed)


@pytest.mark.cpu_only
def test_the_audit_catches_a_hidden_cpu_scalar_and_meta_catches_a_host_sync(monkeypatch):
    """The harness itself: a forward that mixes in a 0-d CPU tensor passes on meta without the
    audit (torch allows CPU scalars on any device) and fails with it; one that reads a value
    on the host raises on meta."""
    layer = ttconv.SVDConv2d(8, 8, 3, padding=1, rank=3, path="factored", device=META)
    x = torch.randn(2, 8, 8, 8, device=META)
    mix_channels = _functional.mix_channels
    monkeypatch.setattr(_functional, "mix_channels", lambda *a: mix_channels(*a) * torch.tensor(1.0))
    layer(x)  # meta alone lets a CPU scalar through
    with pytest.raises(AssertionError, match="on cpu"):
        with audited():
            layer(x)
    monkeypatch.setattr(_functional, "mix_channels", lambda *a: mix_channels(*a) * float(a[0].abs().max()))
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        layer(x)


@pytest.mark.cpu_only
def test_every_layer_kind_is_covered():
    """Every public layer class is built by the sweep above."""
    public = {getattr(ttconv, name) for name in ttconv.__all__ if name.startswith("SVDConv")}
    swept = set(_PLAIN.values()) | set(_TRANSPOSED.values())
    assert public == swept


# ------------------------------------------------------------------ meta: spectra and bounds
def _meta_safe_check_kernel(check_kernel):
    """``check_kernel`` with a meta weight's values taken as zeros: its finiteness check is a
    host read of every value (one sync per call), the shape checks are kept."""
    def check(weight, groups, name="weight"):
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            with _disable_current_modes():  # a check on a stand-in: nothing for the audit
                return check_kernel(torch.zeros((), dtype=weight.dtype).expand(weight.shape), groups, name)
        return check_kernel(weight, groups, name)
    return check


@pytest.fixture
def finiteness_check_skipped_on_meta(monkeypatch):
    check = _meta_safe_check_kernel(_conv_args.check_kernel)
    for module in (_conv_args, spectra, tt):  # geometry calls it as _conv_args.check_kernel
        monkeypatch.setattr(module, "check_kernel", check)


def _meta_weight(*shape: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, device=META, requires_grad=requires_grad)


# (name, call): sync-free apart from the finiteness check of the weight.
SYNC_FREE = [
    ("conv_singular_values", lambda: spectra.conv_singular_values(_meta_weight(8, 8, 3, 3), 8)),
    ("conv_singular_values strided, dilated, grouped",
     lambda: spectra.conv_singular_values(_meta_weight(8, 4, 3, 3), (8, 6), stride=2, dilation=2, groups=2)),
    ("conv_singular_values below the kernel", lambda: spectra.conv_singular_values(_meta_weight(8, 8, 3, 3), 2)),
    ("conv_singular_values 1x1", lambda: spectra.conv_singular_values(_meta_weight(8, 8, 1, 1), 8)),
    ("conv_singular_values 1-D", lambda: spectra.conv_singular_values(_meta_weight(8, 8, 3), 8)),
    ("conv_singular_values 3-D", lambda: spectra.conv_singular_values(_meta_weight(8, 8, 3, 3, 3), 4)),
    ("SVDConv.singular_values",
     lambda: ttconv.SVDConv2d(8, 8, 3, stride=2, rank=4, device=META).singular_values(8)),
    ("SVDConvTranspose2d.singular_values",
     lambda: ttconv.SVDConvTranspose2d(8, 8, 3, stride=2, rank=4, device=META).singular_values(8)),
    ("SVDConv1d.singular_values", lambda: ttconv.SVDConv1d(8, 8, 3, rank=4, device=META).singular_values(8)),
    ("conv_spectral_norm, differentiable",
     lambda: spectra.conv_spectral_norm(_meta_weight(8, 8, 3, 3, requires_grad=True), 8, stride=2)),
    ("SVDConv.spectral_norm, differentiable",
     lambda: ttconv.SVDConv2d(8, 8, 3, rank=4, device=META).spectral_norm(8)),
    ("ttconv.spectral_norm (the regulariser)",
     lambda: ttconv.spectral_norm(ttconv.SVDConv2d(8, 8, 3, padding=1, rank=4, device=META), 8)),
    ("fantastic_four_bound", lambda: bounds.fantastic_four_bound(_meta_weight(8, 8, 3, 3, requires_grad=True))),
    ("gram_iteration_bound",
     lambda: bounds.gram_iteration_bound(_meta_weight(8, 8, 3, 3, requires_grad=True), 8, stride=2)),
    ("gram_iteration_bound 3-D", lambda: bounds.gram_iteration_bound(_meta_weight(8, 8, 3, 3, 3), 4)),
    ("spatial_gram_bound", lambda: bounds.spatial_gram_bound(_meta_weight(8, 8, 3, 3, requires_grad=True))),
    ("SVDConv.orthonormal_core", lambda: ttconv.SVDConv2d(8, 8, 3, rank=4, device=META).orthonormal_core()),
    ("SVDConv.canonicalize_", lambda: ttconv.SVDConv2d(8, 8, 3, rank=4, device=META).canonicalize_().U),
    ("SVDConv.to_conv", lambda: ttconv.SVDConv2d(8, 8, 3, rank=4, device=META).to_conv().weight),
    ("tt.random_factors", lambda: tt.random_factors(8, 8, (3, 3), (4, 4), 2, dtype=torch.float32,
                                                    device=META).core),
]

# (name, call, why): these read values on the host by design.
SYNCING = [
    ("conv_spectral_norm without grad", lambda: spectra.conv_spectral_norm(_meta_weight(8, 8, 3, 3), 8),
     "certified_batch_max: rounds of SVDs and Cholesky certificates until no frequency is left"),
    ("bounds.exact_spectral_norm", lambda: bounds.exact_spectral_norm(_meta_weight(8, 8, 3, 3), 8),
     "conv_spectral_norm without grad"),
    ("bounds.operator_norm_bound", lambda: bounds.operator_norm_bound(_meta_weight(8, 8, 3, 3), 8, padding=1),
     "the exact norm of the padded grid"),
    ("bounds.power_iteration_estimate",
     lambda: bounds.power_iteration_estimate(_meta_weight(8, 8, 3, 3), 8, padding=1),
     "a seeded torch.Generator on the kernel's device; stops early on a zero iterate"),
    ("tt.decompose", lambda: tt.decompose(_meta_weight(8, 8, 3, 3), rank=4),
     "ranks, energies and the reported approximation error are host numbers"),
    ("SVDConv.from_conv", lambda: ttconv.SVDConv2d.from_conv(nn.Conv2d(8, 8, 3, device=META), rank=4),
     "tt.decompose"),
    ("clip_singular_values_",
     lambda: ttconv.clip_singular_values_(ttconv.SVDConv2d(8, 8, 3, rank=4, device=META), 1.0, 8),
     "which layers are above the target, and the exact norm it returns"),
    ("scale_to_spectral_norm_",
     lambda: ttconv.scale_to_spectral_norm_(ttconv.SVDConv2d(8, 8, 3, rank=4, device=META), 1.0, 8),
     "the exact norm it divides by"),
]


@pytest.mark.cpu_only
@pytest.mark.usefixtures("finiteness_check_skipped_on_meta")
@pytest.mark.parametrize("call", [call for _, call in SYNC_FREE], ids=[name for name, _ in SYNC_FREE])
def test_spectra_bounds_and_regularisers_run_on_meta(call):
    with audited():
        result = call()
        assert result.device == META
        if result.requires_grad:
            result.sum().backward()


# (A conversion refuses a meta kernel up front, by name: it has no values to decompose.)
_HOST_READ = r"cannot be called on meta|not an accelerator|meta tensors|Cannot copy out of meta|no values to decompose"


@pytest.mark.cpu_only
@pytest.mark.usefixtures("finiteness_check_skipped_on_meta")
@pytest.mark.parametrize("call", [call for _, call, _ in SYNCING], ids=[name for name, _, _ in SYNCING])
def test_the_functions_listed_as_syncing_do_read_host_values(call):
    """docs/testing.md lists these as syncing; if one stops, move it to SYNC_FREE and the docs."""
    with pytest.raises((RuntimeError, NotImplementedError, ValueError), match=_HOST_READ):
        call()


@pytest.mark.cpu_only
def test_the_finiteness_check_is_the_one_host_read_of_the_sync_free_spectra():
    """Without the patch above the same call fails at the weight's finiteness check (a host
    read of every value, refusing NaN/Inf kernels) and nowhere else."""
    with pytest.raises(RuntimeError, match="meta") as raised:
        spectra.conv_singular_values(_meta_weight(8, 8, 3, 3), 8)
    assert any(frame.name == "check_kernel" for frame in raised.traceback)


# ------------------------------------------------------------------ CUDA: no sync in forward
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("d, transposed, kwargs", [
    param if "orthogonal" not in param.id else pytest.param(
        *param.values, id=param.id, marks=pytest.mark.xfail(
            strict=True, raises=RuntimeError,
            reason="the BCOP core's exponential reads the generator's norm on the host to size its "
                   "Taylor polynomial, and its QRs run on cuSOLVER (see docs/testing.md, Devices)"))
    for param in _cases()
])
def test_forward_and_backward_on_cuda_do_not_synchronize(d, transposed, kwargs, session_device):
    device = session_device if session_device.type == "cuda" else torch.device("cuda")
    layer = _layer(d, transposed, kwargs, device)
    reference = _reference(d, transposed, kwargs, device)
    inputs = _inputs(d, device)
    for x in inputs:  # warm-up (cuDNN/cuBLAS handles, autotuning), and a check of shapes and gradients
        _forward_backward(layer, reference, x, transposed)
    # torch's reference layer is not run under the debug mode: only ttconv's forward and backward are checked.
    sizes = [_largest_output_size(reference, x) if transposed and x.dim() == d + 2 else None for x in inputs]
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, size in zip(inputs, sizes):
            x = x.detach().requires_grad_(True)
            y = layer(x) if size is None else layer(x, size)
            y.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ------------------------------------------------------------------ the test option itself
_PROBE = """
    import pytest
    import torch


    def test_factories_follow_the_device(device):
        assert device == torch.device("meta")
        assert torch.randn(2).device == device


    @pytest.mark.cpu_only
    def test_cpu_only_keeps_the_cpu(device):
        assert device == torch.device("cpu")
        assert torch.randn(2).device.type == "cpu"


    def test_and_back_on_the_device_after_a_cpu_only_test(device):
        assert torch.randn(2).device == device
"""

# The session device overridden to meta: the machinery runs off the CPU without a GPU.
_META_SESSION = """


@pytest.fixture(scope="session")
def session_device():
    return torch.device("meta")


def pytest_sessionfinish(session):
    assert torch.randn(2).device.type == "cpu", "the default device leaked out of the last test"
"""


def _child_pytest(tmp_path, *options: str, environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--strict-markers",
                           *options, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, TTCONV_TEST_DEVICE=environment))


@pytest.mark.cpu_only
def test_the_device_fixtures_in_a_child_run(tmp_path):
    """The suite's device machinery end to end in a child pytest run of this conftest, with the
    session device overridden to meta: factories follow it, ``cpu_only`` tests keep the CPU,
    and nothing leaks once a test ends; the option wins over the environment variable and
    reaches the header."""
    conftest = open(os.path.join(os.path.dirname(__file__), "conftest.py")).read()
    (tmp_path / "conftest.py").write_text(conftest + _META_SESSION)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cpu_only: keeps the CPU\n")
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(_PROBE))
    run = _child_pytest(tmp_path, "--device", "cpu", environment="nonsense")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ttconv test device: cpu" in run.stdout and "3 passed" in run.stdout, run.stdout


class _Config:
    """The two things ``pytest_configure`` reads and writes."""

    def __init__(self, option):
        self.option, self.stash = option, {}

    def getoption(self, name):
        assert name == "--device"
        return self.option


@pytest.mark.cpu_only
def test_the_option_wins_over_the_environment_variable(monkeypatch):
    import conftest

    monkeypatch.setenv("TTCONV_TEST_DEVICE", "nonsense")
    with pytest.raises(pytest.UsageError, match="TTCONV_TEST_DEVICE='nonsense' is not a test device"):
        conftest.pytest_configure(_Config(None))
    config = _Config("cpu")
    conftest.pytest_configure(config)
    assert list(config.stash.values()) == [torch.device("cpu")]
    monkeypatch.setenv("TTCONV_TEST_DEVICE", "cpu")
    with pytest.raises(pytest.UsageError, match="--device='nonsense' is not a test device"):
        conftest.pytest_configure(_Config("nonsense"))
    monkeypatch.delenv("TTCONV_TEST_DEVICE")
    config = _Config(None)
    conftest.pytest_configure(config)
    assert list(config.stash.values()) == [torch.device("cpu")]  # the default


@pytest.mark.cpu_only
def test_device_option_values(monkeypatch):
    from conftest import resolve_device

    assert resolve_device("cpu", "--device") == torch.device("cpu")
    assert resolve_device(" CPU ", "--device") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "--device") == torch.device("cpu")
    for text, message in [("gpu", "not a test device"), ("meta", "not a test device"), ("", "not a test device"),
                          ("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available")]:
        with pytest.raises(pytest.UsageError, match=message) as raised:
            resolve_device(text, "TTCONV_TEST_DEVICE")
        assert "TTCONV_TEST_DEVICE" in str(raised.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto", "--device") == torch.device("cuda", 1)
    assert resolve_device("cuda", "--device") == torch.device("cuda", 1)
    assert resolve_device("cuda:0", "--device") == torch.device("cuda", 0)
    with pytest.raises(pytest.UsageError, match="only 2 CUDA device"):
        resolve_device("cuda:2", "--device")


# ------------------------------------------------------------------ the benchmarks' --device
_BENCH_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


@pytest.fixture
def bench_device(monkeypatch):
    monkeypatch.syspath_prepend(_BENCH_DIR)
    import _device

    return _device


@pytest.mark.cpu_only
def test_benchmark_device_option(bench_device, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    bench_device.add_device_argument(parser)
    assert parser.parse_args([]).device == torch.device("cpu")
    assert parser.parse_args(["--device", "CPU"]).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parser.parse_args(["--device", "auto"]).device == torch.device("cpu")
    for text, message in [("cuda", "CUDA is not available"), ("meta", "not a benchmark device"),
                          ("gpu", "not a benchmark device")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            bench_device.parse_device(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert bench_device.parse_device("auto") == torch.device("cuda", 0)
    with pytest.raises(argparse.ArgumentTypeError, match="only 1 CUDA device"):
        bench_device.parse_device("cuda:1")


@pytest.mark.cpu_only
def test_benchmark_on_device_sets_and_restores_the_default(bench_device):
    with bench_device.on_device("cpu") as device:
        assert device == torch.device("cpu") and torch.randn(1).device.type == "cpu"
        assert not any(type(mode).__name__ == "DeviceContext"
                       for mode in torch.overrides._get_current_function_mode_stack())  # CPU timings untouched
    with bench_device.on_device("meta"):
        assert torch.randn(1).device == META and ttconv.SVDConv2d(4, 4, 3).U.device == META
    assert torch.randn(1).device.type == "cpu"
    bench_device.synchronize()  # no CUDA initialised: a no-op
    bench_device.synchronize("cpu")
    assert bench_device.peak_memory_bytes("cpu") is None


@pytest.mark.cpu_only
def test_timers_synchronize_around_every_timed_call(bench_device, monkeypatch):
    """``_timing`` waits for queued device work before starting and before stopping the clock."""
    import _timing

    events: List[str] = []
    monkeypatch.setattr(_timing, "synchronize", lambda: events.append("sync"))
    _timing.median_seconds(lambda: events.append("call"), repeats=2, warmup=1)
    assert events == ["call"] + ["sync", "call", "sync"] * 2
    events.clear()
    _timing.interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=1, warmup=0)
    assert events == ["sync", "a", "sync", "sync", "b", "sync"]


@pytest.mark.cpu_only
def test_run_all_passes_the_device_to_the_scripts_that_take_it(bench_device, tmp_path, monkeypatch):
    import run_all

    aware = tmp_path / "bench_aware.py"
    aware.write_text("import argparse\nfrom _device import add_device_argument\n\n"
                     "def main(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument('--quick', "
                     "action='store_true')\n    add_device_argument(parser)\n    print('| ran on', "
                     "parser.parse_args(argv).device)\n")
    unaware = tmp_path / "bench_unaware.py"
    unaware.write_text("def main(argv):\n    print('| ran with', argv)\n")
    cpu = torch.device("cpu")
    assert run_all._run(str(aware), ["--quick"], cpu) == "| ran on cpu"
    assert run_all._run(str(unaware), ["--quick"], cpu) == "| ran with ['--quick']"
    # Off the CPU a script that cannot take the device is not run (its timers would not synchronise).
    assert run_all._run(str(unaware), ["--quick"], torch.device("cuda", 0)) is None
    monkeypatch.setattr(bench_device, "parse_device", torch.device)  # a CUDA device without CUDA
    assert run_all._run(str(aware), ["--quick"], torch.device("cuda", 0)) == "| ran on cuda:0"
