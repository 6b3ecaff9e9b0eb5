"""Which modules a spectral report analyses, which it skips (and why), and whether the
model is a plain chain, learnt from one traced forward pass.

A product of per-layer norms bounds a model's Lipschitz constant only when the model is
the composition of those layers with 1-Lipschitz maps in between. ``trace`` checks that on
the example forward pass itself rather than trusting the module tree: every *leaf* call
(an analysed layer, or a module without children) is recorded with the tensor it received
and the tensor it returned, and the model is a plain chain when

* every leaf takes exactly one tensor and returns one tensor;
* the first leaf receives the model's input tensor, each later leaf receives the very
  tensor object the previous leaf returned, unmodified (same ``_version``: no in-place
  residual addition in between), and the last leaf's output is the model's output;
* every analysed layer is called exactly once;
* every other leaf is a known 1-Lipschitz map (``ONE_LIPSCHITZ``, with its arguments
  checked, e.g. a non-overlapping max pool).

Anything computed outside a leaf (a functional ``torch.relu``, a residual addition, a
concatenation, a reshape) produces a new tensor and breaks the chain: the check errs on
the side of "not verified", never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._effective_kernel import _REPARAMETRIZATION_HOOKS
from ._hooks import run_example, unwrap
from .activations import ChannelPad, MaxMin
from .geometry import conv_spec
from .layer import _SVDConvNd

#: Module types with a spectral norm that the report analyses.
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)  # eval mode: a fixed per-channel scale
#: Every convolution: torch's ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` and the SVD layers
#: (each analysed through its ``ConvSpec``, which says its dimension and whether it is transposed).
CONVS = (nn.modules.conv._ConvNd, _SVDConvNd)
ANALYSED = CONVS + (nn.Linear,) + BATCH_NORMS
#: Analysed layers whose norm does not depend on the input size.
SIZE_FREE = (nn.Linear,) + BATCH_NORMS


def _dims(m: nn.Module) -> int:
    """Spatial axes of a pooling/dropout module, from its class name (``MaxPool3d`` -> 3)."""
    return int(type(m).__name__[-2])


def _ntuple(value: Any, d: int) -> Tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


def _non_overlapping_max_pool(m: nn.Module) -> bool:
    d = _dims(m)
    kernel, stride, dilation = _ntuple(m.kernel_size, d), _ntuple(m.stride or m.kernel_size, d), \
        _ntuple(m.dilation, d)
    # Each input pixel in at most one window: |max a - max b| <= max |a - b| per window.
    return all(k <= s for k, s in zip(kernel, stride)) and all(x == 1 for x in dilation)


def _average_pool(m: nn.Module) -> bool:
    # Rows sum to 1, columns to at most prod(ceil(k/s)/k) <= 1 (Schur test) with no padding,
    # or with zero padding counted in the divisor; partial (ceil_mode) windows divide by less.
    # (AvgPool1d has no divisor_override.)
    no_padding = all(p == 0 for p in _ntuple(m.padding, _dims(m)))
    return bool(not m.ceil_mode and (no_padding or m.count_include_pad)
                and getattr(m, "divisor_override", None) is None)


def _global(m: nn.Module) -> bool:
    # A mean (norm <= 1) or max over each map; None keeps an axis (the identity along it).
    return all(size in (1, None) for size in _ntuple(m.output_size, _dims(m)))


#: 1-Lipschitz maps (L2) that may sit between analysed layers of a plain chain, with the
#: condition on their arguments under which they are.
ONE_LIPSCHITZ: Dict[type, Callable[[Any], bool]] = {
    nn.ReLU: lambda m: True, nn.ReLU6: lambda m: True, nn.Tanh: lambda m: True, nn.Sigmoid: lambda m: True,
    nn.Hardtanh: lambda m: True, nn.Hardsigmoid: lambda m: True, nn.Softsign: lambda m: True,
    nn.LeakyReLU: lambda m: abs(m.negative_slope) <= 1, nn.ELU: lambda m: 0 <= m.alpha <= 1,
    nn.CELU: lambda m: True,  # slope exp(x / alpha) <= 1 for x < 0, any alpha > 0
    nn.Identity: lambda m: True, nn.Flatten: lambda m: True, nn.Unflatten: lambda m: True,
    # The identity in eval mode (the report's pass).
    nn.Dropout: lambda m: True, nn.Dropout1d: lambda m: True, nn.Dropout2d: lambda m: True,
    nn.Dropout3d: lambda m: True,
    nn.PixelShuffle: lambda m: True, nn.PixelUnshuffle: lambda m: True,  # permutations
    **{pool: _non_overlapping_max_pool for pool in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)},
    **{pool: _average_pool for pool in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)},
    **{pool: _global for pool in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)},
    MaxMin: lambda m: True, ChannelPad: lambda m: True,
    nn.PReLU: lambda m: bool((m.weight.detach().abs() <= 1).all()),  # slopes in [-1, 1]
}

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def batch_norm_problem(module: nn.Module) -> Optional[str]:
    """Why an (analysed) batch norm is not a fixed linear map in eval mode, or None."""
    if not module.track_running_stats or module.running_var is None:
        return ("batch norm without running statistics: it normalises by each batch's own statistics, "
                "not a fixed linear map")
    return None


def skip_reason(module: nn.Module) -> Optional[str]:
    """Why a module with a linear part (or parameters) is not analysed, or None for a module
    without parameters of its own (activations, pooling, containers)."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialised lazy module (run a forward pass first)"
    if type(module) in ONE_LIPSCHITZ:
        return None
    if isinstance(module, _NORMS):
        return ("normalisation by the input's own statistics (group/layer/instance norm): not a linear map, "
                "not analysed")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding lookup: not a linear map of its (integer) input"
    if isinstance(module, nn.MultiheadAttention):
        return "attention: not a linear map, no spectral norm"
    if isinstance(module, nn.Bilinear):
        return "bilinear layer: not linear in its input, no spectral norm"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return "recurrent layer: not analysed"
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        return (f"{type(module).__name__} with parameters ({', '.join(own)}) of no supported layer type "
                "(Conv1d/2d/3d, ConvTranspose1d/2d/3d, their SVD layers, Linear, BatchNorm): not analysed")
    return None


def _analysed_or_inside(name: str, analysed_names: List[str]) -> bool:
    return any(a == "" or name == a or name.startswith(a + ".") for a in analysed_names)


def find_layers(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, Tuple[int, ...], str]]]:
    """``(analysed, skipped)``: analysed ``(name, module)`` in module order, and
    ``(name, weight shape or (), reason)`` of every module that has parameters (or a
    linear part) but is not analysed. Modules inside an analysed one (a parametrization's
    ``original``) belong to it. Shared modules count once."""
    root = unwrap(model)
    analysed: List[Tuple[str, nn.Module]] = []
    skipped: List[Tuple[str, Tuple[int, ...], str]] = []
    for name, module in root.named_modules():
        if _analysed_or_inside(name, [n for n, _ in analysed]):
            continue
        if isinstance(module, ANALYSED):
            analysed.append((name, module))
            continue
        reason = skip_reason(module)
        if reason is not None:
            weight = getattr(module, "weight", None)
            shape = tuple(weight.shape) if isinstance(weight, Tensor) and not isinstance(
                weight, nn.parameter.UninitializedParameter) else ()
            skipped.append((name or "<top level>", shape, reason))
    return analysed, skipped


@dataclass
class Trace:
    """What one forward pass learnt: per analysed layer the spatial sizes of its operator grid
    (one entry per spatial axis of the conv, 1, 2 or 3): a conv's input size ``n``; for a
    transposed conv ``s n``, the grid of the strided circular conv its circular operator on
    ``n`` inputs is the adjoint of (``bounds``, ``control`` and ``singular_values`` mean the
    same); for a transposed conv also the spatial sizes of the input and output of its first
    call; and whether the model is a verified plain chain (``chain_reason`` says why not)."""

    sizes: Dict[str, List[Tuple[int, ...]]] = field(default_factory=dict)
    transposed_inputs: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    transposed_outputs: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    chain: bool = False
    chain_reason: str = ""


def _leaves(root: nn.Module, analysed: List[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    names = [n for n, _ in analysed]
    leaves = list(analysed)
    for name, module in root.named_modules():
        if not _analysed_or_inside(name, names) and not list(module.children()) and not isinstance(module, ANALYSED):
            leaves.append((name, module))
    return leaves


def trace(model: nn.Module, analysed: List[Tuple[str, nn.Module]], example_input: Any) -> Trace:
    """Run ``example_input`` through ``model`` once (eval mode, no grad; the training flag
    is restored) recording every leaf call; raises ``ValueError`` naming ``example_input``
    when the forward pass fails."""
    root = unwrap(model)
    result = Trace(sizes={name: [] for name, _ in analysed})
    analysed_ids = {id(m): name for name, m in analysed}
    # Spatial axes of each conv, and which convs are transposed, from their spec.
    with torch.no_grad():
        specs = {name: conv_spec(m) for name, m in analysed if isinstance(m, CONVS)}
    transposed = {name for name, spec in specs.items() if spec.transposed}
    calls: List[Tuple[str, nn.Module, Any, Any]] = []  # name, module, (input, version) or None, (output, version)
    handles = []
    for name, module in _leaves(root, analysed):
        def before(module, args, kwargs, name=name):
            single = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
            calls.append((name, module, (args[0], args[0]._version) if single else None, None))
            if name in result.sizes and args and isinstance(args[0], Tensor):
                if name in specs:
                    size = tuple(int(s) for s in args[0].shape[-specs[name].dims:])
                    if name in transposed:
                        result.transposed_inputs.setdefault(name, size)
                        size = tuple(n * s for n, s in zip(size, specs[name].stride))
                else:
                    size = tuple(int(s) for s in args[0].shape[1:-1])
                if size not in result.sizes[name]:
                    result.sizes[name].append(size)

        def after(module, args, output, name=name):
            index = max(i for i, call in enumerate(calls) if call[1] is module and call[3] is None)
            single = isinstance(output, Tensor)
            calls[index] = calls[index][:3] + ((output, output._version) if single else False,)
            if name in transposed and single:
                result.transposed_outputs.setdefault(name, tuple(int(s) for s in output.shape[-specs[name].dims:]))

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        # First of the module's forward hooks: it records what the module computed, so a later
        # hook that replaces or edits the output breaks the chain check instead of hiding in it.
        handles.append(module.register_forward_hook(after, prepend=True))
    try:
        output = run_example(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    result.chain_reason = _chain_problem(calls, analysed_ids, example_input, output) or ""
    result.chain = not result.chain_reason
    return result


def _chain_problem(calls, analysed_ids, example_input, output) -> Optional[str]:
    problem = global_hook_problem()
    if problem:
        return problem
    if isinstance(example_input, (tuple, list)):
        if len(example_input) != 1:
            return "the model takes several inputs"
        example_input = example_input[0]
    if not calls:
        return "no layer was called"
    counts: Dict[str, int] = {}
    previous: Any = (example_input, example_input._version) if isinstance(example_input, Tensor) else None
    for name, module, received, returned in calls:
        if id(module) in analysed_ids:
            counts[name] = counts.get(name, 0) + 1
        else:
            allowed = ONE_LIPSCHITZ.get(type(module))
            if allowed is None or not allowed(module):
                what = "not known to be 1-Lipschitz" if allowed is None else "not 1-Lipschitz with these arguments"
                return f"{type(module).__name__} {name!r} is {what}"
        if received is None or not isinstance(returned, tuple):
            return f"{name!r} does not map one tensor to one tensor"
        if previous is None or received[0] is not previous[0] or received[1] != previous[1]:
            first = previous is not None and previous[0] is example_input
            return (f"{name!r} does not receive the {'model input' if first else 'previous layer output'} "
                    "unchanged (a residual branch, concatenation or functional operation in between)")
        previous = returned
    if output is not previous[0] or output._version != previous[1]:
        return "the model's output is not the last layer's output unchanged"
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        return f"layer {repeated[0]!r} is called {counts[repeated[0]]} times"
    uncalled = [name for name in analysed_ids.values() if name not in counts]
    if uncalled:
        return f"layer {uncalled[0]!r} is not called"
    return None


def global_hook_problem() -> Optional[str]:
    """Why torch's global module hooks may change what the layers compute, or None."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "global forward hooks are registered (torch.nn.modules.module.register_module_forward_hook): " \
               "they can change what every layer computes"
    return None


def hook_problem(name: str, module: nn.Module) -> Optional[str]:
    """Why a forward hook (or a forward replaced on the instance) may change what ``module``
    computes, or None. The pre-hooks of
    torch's reparametrizations (spectral_norm, weight_norm, pruning) only recompute a conv's
    kernel, which is what the analysis reads."""
    label = repr(name) if name else "the model"
    if "forward" in vars(module):
        return f"{label} has its forward replaced on the instance, which can change what it computes"
    if module._forward_hooks:
        return f"{label} has a forward hook, which can change its output"
    if any(not isinstance(hook, _REPARAMETRIZATION_HOOKS) for hook in module._forward_pre_hooks.values()):
        return f"{label} has a forward pre-hook, which can change its input"
    return None


def sequential_problem(model: nn.Module, analysed: List[Tuple[str, nn.Module]]) -> Optional[str]:
    """Without an example input: None when ``model`` is an ``nn.Sequential`` (nested
    Sequentials flattened) of analysed layers and 1-Lipschitz maps, else why not."""
    root = unwrap(model)
    if type(root) is not nn.Sequential:
        return (f"{type(root).__name__} is not an nn.Sequential, and without an example input the report cannot "
                "trace how its layers connect")
    ids = {id(m) for _, m in analysed}
    seen: set = set()
    problem = global_hook_problem() or hook_problem("", model) or (hook_problem("", root) if root is not model else None)
    if problem:
        return problem

    def walk(sequential: nn.Sequential, prefix: str) -> Optional[str]:
        for name, module in sequential._modules.items():  # named_children() would hide a repeated module
            full = prefix + name
            problem = hook_problem(full, module) if module is not None else None
            if problem:
                return problem
            if type(module) is nn.Sequential:
                problem = walk(module, full + ".")
                if problem:
                    return problem
            elif id(module) in seen:
                return f"{full!r} is a module used twice in the chain"
            elif id(module) not in ids:
                allowed = ONE_LIPSCHITZ.get(type(module))
                if allowed is None or not allowed(module):
                    return f"{type(module).__name__} {full!r} is not known to be 1-Lipschitz"
            seen.add(id(module))
        return None

    return walk(root, "")
