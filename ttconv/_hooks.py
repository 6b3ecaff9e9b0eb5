"""Finding conv layers in a model and learning their input sizes with one forward pass."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from .layer import SVDConv


def unwrap(model: Any) -> nn.Module:
    """The model inside a ``DataParallel`` / ``DistributedDataParallel`` wrapper (or itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return inner
    return model


def find_conv_layers(model: nn.Module) -> List[Tuple[str, Union[nn.Conv2d, SVDConv]]]:
    """``(qualified name, module)`` of every ``nn.Conv2d`` and ``SVDConv`` in ``model``.

    Looks through ``DataParallel`` / ``DistributedDataParallel`` wrappers; names are
    relative to the wrapped model.
    """
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, (nn.Conv2d, SVDConv))]


def record_input_sizes(
    model: nn.Module, layers: Sequence[Tuple[str, nn.Module]], example_input: Any
) -> Dict[str, List[Tuple[int, int]]]:
    """Spatial input sizes seen by each layer in one forward pass (eval mode, no grad).

    The model's training flag is restored afterwards, so batch-norm statistics are not
    touched. Raises ``ValueError`` naming ``example_input`` when the forward pass fails.
    """
    sizes: Dict[str, List[Tuple[int, int]]] = {name: [] for name, _ in layers}
    handles = []
    for name, module in layers:
        def record(module, inputs, name=name):
            height, width = inputs[0].shape[-2:]
            size = (int(height), int(width))
            if size not in sizes[name]:
                sizes[name].append(size)

        handles.append(module.register_forward_pre_hook(record))
    try:
        run_example(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def run_example(model: nn.Module, example_input: Any) -> Any:
    """The model's output on ``example_input`` (a tensor, or a tuple of positional arguments)
    in eval mode without grad. Every module's training flag is restored as it was (so
    batch-norm statistics and dropout are not touched, and a submodule frozen in eval mode
    stays so). Raises ``ValueError`` naming ``example_input`` when the forward pass fails."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(*example_input) if isinstance(example_input, (tuple, list)) else model(example_input)
    except Exception as error:
        raise ValueError(
            f"example_input could not be run through the model ({type(error).__name__}: {error}); "
            "pass an input the model accepts, e.g. torch.zeros(1, C, H, W) (torch.zeros(1, C, L) for 1-D, "
            "torch.zeros(1, C, D, H, W) for 3-D layers), or a tuple of positional arguments"
        ) from error
    finally:
        for module, mode in modes:
            module.training = mode
