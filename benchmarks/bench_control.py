"""Singular-value control: cost of a pass, one clip vs the paper's code, strided clipping, overshoot.

1. Pass cost: a ResNet-18-like stack of 3x3 convs (widths 64-512, input sizes 56-7), as
   SVDConv at rank c/4 and as dense nn.Conv2d; times ``SpectralControl.apply()`` in each
   mode (``scale``, ``clip``, ``clip_scale``; interleaved, on fresh copies; medians, runs
   per mode printed) with every layer above the target, and one training step of the
   model. The last column is the largest norm the plain clip pass leaves, over the
   target (``clip_scale`` ends at the target by construction).
2. The limit: per layer, the FLOP ratio of the per-frequency work (dense vs core
   matrices) and, timed in the same run, the bare kernels each pass is made of, in the
   batches the pass uses (on the CPU at most 8 MiB of matrices): the batched SVD at one
   frequency of each conjugate pair (the floor of a clip) and the Gram product plus Cholesky
   factorisation of every frequency (the floor of the certified norm).
3. One clip step on one SVDConv layer (float32, target half its norm) against the
   paper's code, Senderovich et al. (2022), ``Clip_AssignOperatorNorm`` of
   github.com/WhiteTeaDragon/practical_svd_conv run on the same orthonormal core. It is
   loaded from a local clone (``--paper-repo``, a work tree or a git directory) and
   never copied here; without one, only the re-implementation below runs (labelled).
   ttconv's step includes everything (orthonormal bases, clip, canonical form, the exact
   norm returned); the paper's is the clip of the core alone.
4. Strided layers: clipping the strided (polyphase) spectrum itself vs the stride-1
   operator at the same target (what ttconv did before): relative kernel change and the
   strided norm reached.
5. Overshoot: random float64 layers (half nn.Conv2d, half SVDConv; channels 1-16 incl.
   groups, kernels 1x1-5x5, stride and dilation 1-2), each clipped once at a target that is
   a fraction of its own exact norm; the norm reached over the target, for plain clip
   (``n_iter`` 1 and 10) and for ``clip_scale``.

Run: ``python benchmarks/bench_control.py`` (``--quick`` for a smoke run; ``--device cuda`` on a
GPU: timers synchronised, TF32 off, see ``_device``). The paper's code runs on the CPU whatever
the device (its clip calls ``np.transpose`` on the tensor, and its own training loop moves the
kernel to the CPU for the clip); its cells then say "cpu".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import subprocess
import sys
import types
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _device import add_device_argument, describe, on_device  # noqa: E402
from _timing import markdown_table, median_seconds, timed_call  # noqa: E402

import ttconv  # noqa: E402
from ttconv import control, spectra  # noqa: E402
from ttconv.spectra import transfer_batches  # noqa: E402

MODES = ("scale", "clip", "clip_scale")
PAPER_REPO = "/work/.mirror/WhiteTeaDragon+practical_svd_conv/repo"



@torch.no_grad()
def _exact_norm(kernel, n, stride, dilation, groups) -> float:
    """ttconv's exact norm as a control pass computes it (certified route, no gradients)."""
    return float(ttconv.conv_spectral_norm(kernel, n, stride=stride, dilation=dilation, groups=groups))

def resnet_like(widths):
    layers, c_in = [], 3
    for index, width in enumerate(widths):
        stride = 1 if index == 0 else 2
        layers += [nn.Conv2d(c_in, width, 3, stride=stride, padding=1), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def control_costs(dense, low, size, batch, repeats):
    """``repeats[mode]``: (dense, SVDConv) runs, interleaved by mode; medians reported."""
    example = torch.zeros(1, 3, size, size)
    x = torch.randn(batch, 3, size, size)
    target = 1e-3  # tiny, so that every layer is above it and gets scaled or clipped
    models = (("nn.Conv2d (dense FFT)", dense), ("SVDConv r=c/4 (core)", low))
    times = {(label, mode): [] for label, _ in models for mode in MODES}
    overshoot = {}
    for run in range(max(max(pair) for pair in repeats.values())):
        for mode in MODES:  # interleaved: modes, then models
            for index, (label, model) in enumerate(models):
                if run >= repeats[mode][index]:
                    continue
                controller = ttconv.SpectralControl(copy.deepcopy(model), target, every=1, mode=mode,
                                                    example_input=example)
                reached = {}
                times[label, mode].append(timed_call(lambda: reached.update(controller.apply())))
                if mode == "clip":
                    overshoot[label] = max(reached.values()) / target
    rows, medians = [], {key: statistics.median(value) for key, value in times.items()}
    for label, model in models:
        def train_step(model=model):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
        step = median_seconds(train_step, 3)
        cells = [label, f"{step * 1e3:.0f}"]
        for mode in MODES:
            cells += [f"{medians[label, mode] * 1e3:.0f}", f"{medians[label, mode] / step:.2f}"]
        ratio = medians[label, "clip_scale"] / medians[label, "clip"]
        rows.append(cells + [f"{ratio:.2f}", f"{overshoot[label]:.2f}"])
    speedup = ["speed-up (dense / SVDConv)", ""]
    for mode in MODES:
        speedup += [f"{medians[models[0][0], mode] / medians[models[1][0], mode]:.1f}x", ""]
    rows.append(speedup + ["", ""])
    header = ["model", "train step ms"]
    for mode in MODES:
        header += [f"{mode} pass ms", "/ step"]
    runs = ", ".join(f"{mode} {pair[0]} / {pair[1]}" for mode, pair in repeats.items())
    table = markdown_table(header + ["clip_scale / clip", "clip: max sigma / target"], rows)
    return f"Runs (dense / SVDConv): {runs}.\n\n{table}"


def _pass_matrices(layer, size, per_frequency_factor=4):
    """The matrices a control pass decomposes for ``layer``, in the batches the pass decomposes them
    in (``transfer_batches`` with the pass's memory limit: on the CPU at most
    ``spectra._CPU_BATCH_BYTES`` of matrices): a list of ``(B g, o, i)`` (orthonormal core for SVDConv)."""
    kernel = control._kernel(layer).detach()
    stride = control._effective_stride(layer, size)
    grouped = control._stride1(kernel, stride, layer.dilation, layer.groups)
    grid = (size[0] // stride[0], size[1] // stride[1])
    return [m.flatten(0, 1) for _, _, m in transfer_batches(grouped, grid, spectra.DEFAULT_MAX_MEMORY,
                                                             per_frequency_factor=per_frequency_factor)]


def _tall(matrices):
    return matrices.mT if matrices.shape[-2] < matrices.shape[-1] else matrices  # as the clip decomposes them


def _gram_cholesky(matrices):
    o, i = matrices.shape[-2:]
    gram = matrices @ matrices.mH if o <= i else matrices.mH @ matrices
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.cholesky_ex(2 * gram.diagonal(dim1=-2, dim2=-1).real.sum(-1)[:, None, None] * eye - gram)


def limit_table(dense, low, size):
    """Per layer: FLOP ratio and bare-kernel time ratios (dense / core), each timed once, interleaved."""
    example = torch.zeros(1, 3, size, size)
    pairs = zip(ttconv.SpectralControl(dense, 1.0, example_input=example).layers,
                ttconv.SpectralControl(low, 1.0, example_input=example).layers)
    rows, totals = [], [0.0] * 6
    with torch.no_grad():
        for (name, d_layer, n), (_, c_layer, _) in pairs:
            # The clip's batches (room for 8 copies of a frequency's matrices) and the norm's (4).
            d_clip, c_clip = _pass_matrices(d_layer, n, 8), _pass_matrices(c_layer, n, 8)
            d_norm, c_norm = _pass_matrices(d_layer, n), _pass_matrices(c_layer, n)
            d_mat, c_mat = torch.cat(d_norm), torch.cat(c_norm)
            flops = [m.shape[0] * m.shape[1] * m.shape[2] * min(m.shape[1:]) for m in (d_mat, c_mat)]
            svd = [timed_call(lambda b=b: [torch.linalg.svd(_tall(m), full_matrices=False) for m in b])
                   for b in (d_clip, c_clip)]
            chol = [timed_call(lambda b=b: [_gram_cholesky(m) for m in b]) for b in (d_norm, c_norm)]
            for index, value in enumerate(flops + svd + chol):
                totals[index] += value
            rows.append([name, f"{n[0]}x{n[1]}", str(d_mat.shape[0]), "x".join(map(str, d_mat.shape[1:])),
                         "x".join(map(str, c_mat.shape[1:])), f"{flops[0] / flops[1]:.0f}",
                         f"{svd[0] * 1e3:.0f} / {svd[1] * 1e3:.1f}", f"{svd[0] / svd[1]:.1f}",
                         f"{chol[0] * 1e3:.0f} / {chol[1] * 1e3:.1f}", f"{chol[0] / chol[1]:.1f}"])
    rows.append(["all", "", "", "", "", f"{totals[0] / totals[1]:.0f}",
                 f"{totals[2] * 1e3:.0f} / {totals[3] * 1e3:.0f}", f"{totals[2] / totals[3]:.1f}",
                 f"{totals[4] * 1e3:.0f} / {totals[5] * 1e3:.0f}", f"{totals[4] / totals[5]:.1f}"])
    header = ["layer", "grid", "frequencies", "dense matrix", "core matrix", "FLOP ratio", "SVD ms dense / core",
              "ratio", "Gram+Cholesky ms dense / core", "ratio"]
    return markdown_table(header, rows)


# ----------------------------------------------------------------- the paper's clip
def load_paper_clip(repo):
    """``Clip_AssignOperatorNorm`` from a local clone of WhiteTeaDragon/practical_svd_conv, or None.

    ``repo``: a work tree (``src/utils.py``) or a git directory (``HEAD:src/utils.py``). Its
    module imports wandb, torchvision, torchsummary, einops and its own layer module, none
    of which the clip uses on inputs at least the kernel's size: they are stubbed while the
    module loads, then removed again.
    """
    if not repo or not os.path.exists(repo):
        return None
    path = os.path.join(repo, "src", "utils.py")
    if os.path.isfile(path):
        with open(path) as handle:
            source = handle.read()
    else:
        shown = subprocess.run(["git", "--git-dir", repo, "show", "HEAD:src/utils.py"], capture_output=True, text=True)
        if shown.returncode:
            return None
        source = shown.stdout
    names = ("wandb", "torchvision", "torchsummary", "einops", "_paper", "_paper.tt_dec_layer")
    saved = {name: sys.modules.get(name) for name in names}
    try:
        for name in names[:4]:
            sys.modules[name] = types.ModuleType(name)
        sys.modules["einops"].rearrange = None
        package = types.ModuleType("_paper")
        package.__path__ = []
        layer_module = types.ModuleType("_paper.tt_dec_layer")
        layer_module.ConvDecomposed2D_t, layer_module.full_tt = type("ConvDecomposed2D_t", (), {}), None
        sys.modules["_paper"], sys.modules["_paper.tt_dec_layer"] = package, layer_module
        module = types.ModuleType("_paper.utils")
        module.__package__ = "_paper"
        exec(compile(source, "practical_svd_conv/src/utils.py", "exec"), module.__dict__)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    clip = module.Clip_AssignOperatorNorm

    def quiet_clip(*arguments):
        with warnings.catch_warnings():  # numpy's __array_wrap__ deprecation, from np.transpose on a tensor
            warnings.simplefilter("ignore", DeprecationWarning)
            return clip(*arguments)

    return quiet_clip


def reimplemented_clip(core, n, max_singular_value, stride):
    """RE-IMPLEMENTATION (not the paper's code) of the paper's FFT clip of a core, as described:

    the core zero-padded to ``n x n``, its ``s*s`` polyphase components on the ``n/s`` grid,
    ``fft2``, a full SVD at every frequency, singular values clipped, ``ifft2``, the
    components put back and the kernel's taps kept. ``core``: ``(c_out, c_in, kh, kw)``.
    """
    c_out, c_in, kh, kw = core.shape
    padded = torch.zeros(c_out, c_in, n, n, dtype=core.dtype, device=core.device)
    padded[..., :kh, :kw] = core
    phases = torch.stack([padded[..., a::stride, b::stride] for a in range(stride) for b in range(stride)], 2)
    transfer = torch.fft.fft2(phases.reshape(c_out, -1, n // stride, n // stride)).permute(2, 3, 0, 1)
    left, values, right = torch.linalg.svd(transfer, full_matrices=False)
    clipped = (left * values.clamp(max=max_singular_value).to(left.dtype).unsqueeze(-2)) @ right
    spatial = torch.fft.ifft2(clipped.permute(2, 3, 0, 1)).real.reshape(c_out, c_in, stride * stride, n // stride, -1)
    for index, (a, b) in enumerate((a, b) for a in range(stride) for b in range(stride)):
        padded[..., a::stride, b::stride] = spatial[:, :, index]
    return padded[..., :kh, :kw]


def paper_table(shapes, repo, runs):
    paper = load_paper_clip(repo)
    # The paper's clip needs host tensors (np.transpose on a tensor): on another device it gets a
    # CPU copy of the core, made outside the timed window, and runs with the CPU as the default
    # device (its torch.zeros must land there too).
    elsewhere = torch.empty(0).device.type != "cpu"
    on_cpu = (lambda: torch.device("cpu")) if elsewhere else contextlib.nullcontext

    def run_paper(layout, n, target, stride):
        with on_cpu():
            return paper(layout, (n, n), target, (stride, stride))

    rows = []
    for c, r, n, stride in shapes:
        torch.manual_seed(0)
        layer = ttconv.SVDConv(c, c, 3, stride=stride, padding=1, rank=r)
        with torch.no_grad():
            core = layer.orthonormal_core()
            target = 0.5 * float(ttconv.spectral_norm(layer, n))
        theirs_layout = core.permute(2, 3, 0, 1).contiguous().cpu()  # (k, k, c_out, c_in), as their nn.Conv2d path
        times = {"ours": [], "norm": [], "paper": [], "re": []}
        for _ in range(runs):  # interleaved
            fresh = copy.deepcopy(layer)
            times["ours"].append(timed_call(lambda: ttconv.clip_singular_values_(fresh, target, n)))
            with torch.no_grad():
                times["norm"].append(timed_call(lambda: control._norm(fresh, (n, n))))
                if paper is not None:
                    times["paper"].append(timed_call(lambda: run_paper(theirs_layout, n, target, stride)))
                times["re"].append(timed_call(lambda: reimplemented_clip(core, n, target, stride)))
        with torch.no_grad():
            ours_kernel = control._clip_kernel(core, (n, n), target, (stride, stride), (1, 1), 1)
            reference = (run_paper(theirs_layout, n, target, stride).permute(2, 3, 0, 1).to(core.device)
                         if paper is not None else reimplemented_clip(core, n, target, stride))
            difference = float((ours_kernel - reference).abs().max() / reference.abs().max())
        median = {key: statistics.median(value) if value else float("nan") for key, value in times.items()}
        rows.append([f"c={c} r={r} n={n} stride {stride}", f"{median['ours'] * 1e3:.0f}", f"{median['norm'] * 1e3:.0f}",
                     (f"{median['paper'] * 1e3:.0f}" + (" (cpu)" if elsewhere else "")) if paper is not None
                     else "not run",
                     f"{median['paper'] / median['ours']:.2f}x" if paper is not None else "",
                     f"{median['re'] * 1e3:.0f}", f"{median['re'] / median['ours']:.2f}x", f"{difference:.1e}"])
    header = ["core (float32)", "ttconv step ms", "of which exact norm ms", "paper's clip ms", "ttconv speed-up",
              "re-implementation ms", "speed-up", "max |ours - paper| / max |paper|"]
    source = (f"paper's code loaded from {repo}" + (", run on the cpu" if elsewhere else "") if paper is not None
              else "paper's code not found (--paper-repo): re-implementation only")
    return source, markdown_table(header, rows)


# ----------------------------------------------------------------- strided clipping
def strided_table(cases):
    """Kernel change and strided norm after clipping the strided operator vs the stride-1 one."""
    rows = []
    with torch.no_grad():
        for label, layer, n in cases:
            kernel = control._kernel(layer).detach()
            stride, dil, groups = layer.stride, layer.dilation, layer.groups
            strided = _exact_norm(kernel, n, stride, dil, groups)
            target = 0.5 * strided
            cells = [label, f"{n[0]}x{n[1]}", f"{strided / _exact_norm(kernel, n, (1, 1), dil, groups):.2f}"]
            for clip_stride in (stride, (1, 1)):  # the strided operator; the stride-1 over-constraint
                clipped = control._clip_kernel(kernel, n, target, clip_stride, dil, groups)
                controlled = _exact_norm(clipped, n, clip_stride, dil, groups)
                scaled = clipped * min(1.0, target / controlled)  # clip_scale
                change = lambda k: float((k - kernel).norm() / kernel.norm())  # noqa: E731
                reached = lambda k: _exact_norm(k, n, stride, dil, groups) / target  # noqa: E731
                cells += [f"{100 * change(clipped):.1f}%", f"{reached(clipped):.2f}",
                          f"{100 * change(scaled):.1f}%", f"{reached(scaled):.2f}"]
            rows.append(cells)
    header = ["layer", "input", "strided / stride-1 norm",
              "strided clip: change", "norm / target", "+scale: change", "norm / target",
              "stride-1 clip: change", "norm / target", "+scale: change", "norm / target"]
    return markdown_table(header, rows)


def strided_cases(quick):
    torch.manual_seed(0)
    shapes = [(8, 16, 8)] if quick else [(64, 128, 32), (128, 256, 16), (256, 512, 8)]
    cases = []
    for c_in, c_out, n in shapes:
        conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, dtype=torch.float64)
        cases.append((f"nn.Conv2d {c_in}->{c_out} s2", conv, (n, n)))
        low = ttconv.convert(nn.Sequential(conv), rank=0.25)[0]
        cases.append((f"SVDConv {c_in}->{c_out} s2 r=c/4 (core)", low, (n, n)))
    return cases


# ----------------------------------------------------------------- overshoot
def random_layers(count, seed):
    rng = random.Random(seed)
    layers = []
    while len(layers) < count:
        groups = rng.choice([1, 1, 1, 2, 3, 4])
        c_in, c_out = groups * rng.randint(1, 16 // groups), groups * rng.randint(1, 16 // groups)
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2)])
        dilation = rng.choice([(1, 1), (1, 1), (2, 2), (1, 2)])
        extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
        n = tuple(s * -(-(e + rng.randint(0, 4)) // s) for e, s in zip(extent, stride))
        if c_in * n[0] * n[1] > 2000:
            continue
        conv = dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride, dilation=dilation,
                    groups=groups, dtype=torch.float64)
        torch.manual_seed(len(layers))
        layer = nn.Conv2d(**conv) if len(layers) % 2 else ttconv.SVDConv(**conv)
        layers.append((layer, n))
    return layers


def overshoot_table(count, fractions):
    layers = random_layers(count, seed=0)
    rows = []
    for fraction in fractions:
        ratios = {"clip 1": [], "clip 10": [], "clip_scale": []}
        for layer, n in layers:
            with torch.no_grad():
                sigma = float(ttconv.spectral_norm(layer, n))
            target = fraction * sigma
            for key, n_iter in (("clip 1", 1), ("clip 10", 10)):
                reached = ttconv.clip_singular_values_(copy.deepcopy(layer), target, n, n_iter=n_iter)
                ratios[key].append(reached / target)
            guaranteed = copy.deepcopy(layer)
            example = torch.zeros(1, layer.in_channels, *n, dtype=torch.float64)
            controller = ttconv.SpectralControl(nn.Sequential(guaranteed), target, every=1, mode="clip_scale",
                                                example_input=example)
            ratios["clip_scale"].append(controller.apply()["0"] / target)
        rows.append([f"{fraction:g}", str(len(layers)),
                     f"{max(ratios['clip 1']):.3f}", f"{statistics.median(ratios['clip 1']):.3f}",
                     f"{max(ratios['clip 10']):.3f}", f"{statistics.median(ratios['clip 10']):.3f}",
                     f"{max(ratios['clip_scale']):.3f}"])
    header = ["target / sigma", "layers", "clip n_iter=1: max", "median", "clip n_iter=10: max", "median",
              "clip_scale: max"]
    return markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paper-repo", default=os.environ.get("TTCONV_PAPER_REPO", PAPER_REPO),
                        help="local clone (work tree or git directory) of WhiteTeaDragon/practical_svd_conv")
    add_device_argument(parser)
    options = parser.parse_args(argv)
    with on_device(options.device):
        _run(options)


def _run(options: argparse.Namespace) -> None:
    if options.quick:
        widths, size, batch, count, fractions = [8, 16], 8, 2, 6, (0.5,)
        repeats = {mode: (1, 1) for mode in MODES}
        shapes, runs = [(16, 4, 8, 1), (16, 4, 8, 2)], 1
    else:
        widths, size, batch, count = [64, 128, 256, 512], 56, 32, 200
        repeats = {"scale": (3, 5), "clip": (1, 3), "clip_scale": (1, 3)}
        fractions = (0.9, 0.5, 0.25, 0.1)
        shapes, runs = [(256, 64, 32, 1), (512, 128, 16, 1), (128, 32, 56, 1), (256, 64, 32, 2)], 3
    torch.manual_seed(0)
    dense = resnet_like(widths)
    low = ttconv.convert(dense, rank=0.25)
    print(f"torch {torch.__version__}, {describe(options.device)}; widths {widths}, input {size}x{size}, "
          f"batch {batch}, target 1e-3\n")
    print(control_costs(dense, low, size, batch, repeats))
    print("\nThe limit, per controlled layer: FLOP ratio of the per-frequency work (matrices o x i, "
          "o i min(o, i) each) and the bare kernels, dense / core, in the batches a pass uses (on the CPU "
          f"at most {spectra._CPU_BATCH_BYTES >> 20} MiB of matrices), timed once in this run:\n")
    print(limit_table(dense, low, size))
    source, table = paper_table(shapes, options.paper_repo, runs)
    print(f"\nOne clip step at half the layer's norm vs the paper's clip of the same core ({source}; "
          f"median of {runs}, interleaved):\n")
    print(table)
    print("\nStrided layers (float64), target half the strided norm: the strided (polyphase) spectrum clipped "
          "vs the stride-1 operator's; kernel change ||W' - W|| / ||W|| and strided norm reached / target:\n")
    print(strided_table(strided_cases(options.quick)))
    print(f"\nNorm reached / target after one control of {count} random float64 layers (exact circular norms):\n")
    print(overshoot_table(count, fractions))


if __name__ == "__main__":
    main()
