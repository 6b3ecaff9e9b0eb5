"""The kernel and bias a torch conv computes with, torch's reparametrizations folded.

``spectral_norm``, ``weight_norm`` and pruning (forward pre-hooks) and
``torch.nn.utils.parametrize`` recompute a conv's ``weight`` (or ``bias``) before every
forward; converting the stored tensor instead would change the model. Used by the layers'
``from_conv`` and by ``convert`` (which sits above the layers), so it lives below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook
from torch.nn.utils.weight_norm import WeightNorm

from . import _conv_args as args

TORCH_CONVS: Tuple[Type[_ConvNd], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""The torch conv classes ttconv converts (the keys of ``ttconv.convert.SVD_CLASSES``)."""

SVD_NAMES: Mapping[Type[_ConvNd], str] = {
    nn.Conv1d: "SVDConv1d", nn.Conv2d: "SVDConv", nn.Conv3d: "SVDConv3d",
    nn.ConvTranspose1d: "SVDConvTranspose1d", nn.ConvTranspose2d: "SVDConvTranspose2d",
    nn.ConvTranspose3d: "SVDConvTranspose3d",
}
"""The name of the ttconv class each becomes, for messages (``SVD_CLASSES`` holds the classes;
a test keeps the two in step)."""

# Forward pre-hooks of torch's hook-based reparametrizations: they recompute the conv's
# ``weight`` attribute from other parameters before every forward.
_REPARAMETRIZATION_HOOKS = (SpectralNorm, WeightNorm, BasePruningMethod)
# spectral_norm's own state-dict hooks; they go with the folded reparametrization.
_OWN_STATE_HOOKS = (SpectralNormStateDictHook, SpectralNormLoadStateDictPreHook)
_PARAMETRIZATIONS_MODULE = "torch.nn.utils.parametrizations"  # e.g. weight_norm's compatibility hook


def _is_reparametrization_state_hook(hook: Any) -> bool:
    """State-dict hooks that torch's reparametrizations register for themselves
    (spectral_norm's, the new weight_norm's compatibility hook): folded with them."""
    return isinstance(hook, _OWN_STATE_HOOKS) or getattr(hook, "__module__", "") == _PARAMETRIZATIONS_MODULE


class _Unconvertible(ValueError):
    """Why a conv cannot be converted exactly."""


@dataclass
class _Kernel:
    """The kernel and bias a conv computes with, and how they came about."""

    weight: Tensor
    bias: Optional[Tensor]
    weight_frozen: bool
    bias_frozen: bool
    folded: List[str]
    fold_hooks: List[int]  # ids of the forward pre-hooks that computed folded tensors


def _hook_tensor_name(hook: Any) -> str:
    return hook._tensor_name if isinstance(hook, BasePruningMethod) else hook.name


def _fold_hook(conv: _ConvNd, hook: Any, name: str) -> Tuple[Tensor, List[str], List[str], str]:
    """``(value, source parameters, other state, note)`` of a hook-based reparametrization."""
    if isinstance(hook, SpectralNorm):
        # Eval mode: no power-iteration step, sigma = u^T W v from the stored u, v. In
        # training mode each forward would first move u, v one step; the eval-mode kernel
        # is the function a trained model is used with. sigma is one scalar, whichever
        # dim the hook normalises (dim=1 for a ConvTranspose, whose weight is (in, out/g, ...)):
        # compute_weight reshapes with the hook's own dim.
        value = hook.compute_weight(conv, do_power_iteration=False)
        return (value, [name + "_orig"], [name + "_u", name + "_v"],
                f"spectral_norm on {name} folded: its eval-mode value W / sigma (sigma from the stored "
                "power-iteration vectors); the normalization is no longer enforced")
    if isinstance(hook, WeightNorm):
        return (hook.compute_weight(conv), [name + "_g", name + "_v"], [],
                f"weight_norm on {name} folded: g * v / ||v||; no longer reparametrized")
    return (hook.apply_mask(conv), [name + "_orig"], [name + "_mask"],
            f"pruning ({type(hook).__name__}) on {name} folded: the masked kernel; the mask is no longer "
            "enforced")


def _original_class(module: nn.Module) -> type:
    # parametrize swaps in a generated subclass ``Parametrized<Class>`` of the original.
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _torch_conv_class(module: nn.Module) -> Optional[Type[_ConvNd]]:
    """The class of ``TORCH_CONVS`` that ``module`` is an instance of (a subclass too), or None."""
    return next((cls for cls in type(module).__mro__ if cls in TORCH_CONVS), None)


def _reparametrization_hooks(module: nn.Module) -> List[Tuple[int, Any]]:
    """``(key, hook)`` of the forward pre-hooks of torch's hook-based reparametrizations on ``module``."""
    return [(key, hook) for key, hook in module._forward_pre_hooks.items()
            if isinstance(hook, _REPARAMETRIZATION_HOOKS)]


def _check_kernel_values(conv: _ConvNd, weight: Tensor) -> None:
    """``_Unconvertible`` for a kernel there is nothing to decompose in: on the meta device, empty, or
    of another shape than the conv's own arguments say (e.g. pruned by hand, channels not updated)."""
    transposed = bool(getattr(conv, "transposed", False))
    first, second = (conv.in_channels, conv.out_channels) if transposed else (conv.out_channels, conv.in_channels)
    expected = (first, second // conv.groups, *conv.kernel_size)
    if tuple(weight.shape) != expected:
        raise _Unconvertible(f"its kernel has shape {tuple(weight.shape)}, but its arguments (in_channels="
                             f"{conv.in_channels}, out_channels={conv.out_channels}, groups={conv.groups}, kernel_size="
                             f"{tuple(conv.kernel_size)}) say {expected}: update them to match the kernel")
    if weight.numel() == 0:
        raise _Unconvertible(f"its kernel is empty (shape {tuple(weight.shape)}): nothing to decompose")
    if weight.is_meta:
        raise _Unconvertible("its kernel is on the meta device (no values to decompose): materialise the model "
                             "first, e.g. model.to_empty(device='cpu') and load its weights")


def _effective_kernel(conv: _ConvNd, strict: bool = True) -> _Kernel:
    """The kernel and bias ``conv`` computes with in eval mode, ready to convert.

    ``conv`` is any conv of ``TORCH_CONVS``; the kernel has torch's layout for its kind.
    ``strict``: raise ``_Unconvertible`` for what would not be exact as a whole
    layer (subclasses, state besides the kernel); ``from_conv`` converts those anyway.
    """
    base = _torch_conv_class(conv)
    base_name = "a torch conv" if base is None else f"an nn.{base.__name__}"
    svd = "the matching SVD layer" if base is None else SVD_NAMES[base]
    if isinstance(conv, LazyModuleMixin) and conv.has_uninitialized_params():
        raise _Unconvertible(f"uninitialized lazy conv: run one forward pass first (it then becomes {base_name})")
    problem = args.padding_in_effect_problem(conv)
    if problem:
        raise _Unconvertible(problem)
    if strict and "forward" in vars(conv):
        raise _Unconvertible("its forward is replaced on the instance (conv.forward = ...) and may compute more than "
                             f"a convolution; convert it by hand with {svd}.from_conv if it computes a plain one")
    cls = _original_class(conv)
    if strict and cls not in TORCH_CONVS:
        raise _Unconvertible(
            f"{cls.__qualname__} is a subclass of nn.{'Module' if base is None else base.__name__} and may "
            f"override forward or hold more state; convert it by hand with {svd}.from_conv if it computes a "
            "plain convolution"
        )
    hooks = _reparametrization_hooks(conv)
    parametrized = parametrize.is_parametrized(conv)
    if hooks and parametrized:
        raise _Unconvertible("reparametrized both by torch.nn.utils.parametrize and by a hook "
                             f"({type(hooks[0][1]).__name__})")
    values: Dict[str, Tuple[Tensor, bool]] = {}
    folded: List[str] = []
    accounted = {"weight", "bias"}
    for _, hook in hooks:
        name = _hook_tensor_name(hook)
        if name not in ("weight", "bias") or name in values:
            raise _Unconvertible(f"{type(hook).__name__} reparametrizes {name!r} in a way convert does not fold")
        with torch.no_grad():
            value, sources, state, note = _fold_hook(conv, hook, name)
        values[name] = (value.detach(), not any(conv.get_parameter(s).requires_grad for s in sources))
        accounted.update(sources, state)
        folded.append(note)
    if parametrized:
        # What torch.nn.utils.parametrize registers (nn.Module.__getattr__ is typed Tensor | Module).
        parametrizations = cast(nn.ModuleDict, conv.parametrizations)
        names = list(parametrizations.keys())
        if any(name not in ("weight", "bias") for name in names):
            raise _Unconvertible(f"parametrized tensors {names}; only weight and bias can be folded")
        # Eval mode, as for hook-based spectral_norm: no power-iteration step, no update
        # of the parametrization's buffers.
        modes = [(module, module.training) for module in parametrizations.modules()]
        parametrizations.eval()
        try:
            with torch.no_grad():
                for name in names:
                    trainable = any(p.requires_grad for p in parametrizations[name].parameters())
                    values[name] = (getattr(conv, name).detach(), not trainable)
        finally:
            for module, mode in modes:
                module.training = mode
        for name in names:
            chain = cast(parametrize.ParametrizationList, parametrizations[name])
            kinds = " + ".join(type(p).__name__.lstrip("_") for p in chain)
            folded.append(f"parametrization {kinds} on {name} folded: its eval-mode value; no longer enforced")
    if strict:
        extra = (set(conv._parameters) | set(conv._buffers)) - accounted
        extra |= set(conv._modules) - ({"parametrizations"} if parametrized else set())
        if extra:
            raise _Unconvertible(f"holds {', '.join(sorted(extra))} besides its kernel and bias; an SVD layer "
                                 "would drop them")
    if "weight" in values:
        weight, weight_frozen = values["weight"]
    else:
        if "weight" in conv._buffers:
            raise _Unconvertible("its kernel is a buffer, not a parameter (never trained); an SVD layer's factors are "
                                 f"parameters: convert it by hand with {svd}.from_conv and freeze them if that is meant")
        weight = conv.weight
        weight_frozen = not weight.requires_grad
    _check_kernel_values(conv, weight)
    bias: Optional[Tensor]
    if "bias" in values:
        bias, bias_frozen = values["bias"]
    else:
        bias = conv.bias
        bias_frozen = bias is None or not bias.requires_grad
    return _Kernel(weight, bias, weight_frozen, bias_frozen, folded, [key for key, _ in hooks])
