"""convert keeps what a conv carries besides its kernel; converted checkpoints reload.

Frozen flags and hooks (issue 10, item 6) and reloading energy/param_budget conversions
into the plain model (item 7): every test fails on a convert that unfreezes, drops hooks,
or a checkpoint format without the layer configuration.
"""

import io
import os
import sys

import pytest
import torch
from torch import nn

from models import SmallResNet
from oracle import default_device
from ttconv import SVDConv, convert, decompose, densify
from ttconv.convert import load_converted

DATA = os.path.join(os.path.dirname(__file__), "data")


def _factor_flags(layer):
    return [p.requires_grad for p in (layer.U, layer.S, layer.core, layer.V)]


# ------------------------------------------------------------------ frozen convs
def test_requires_grad_of_kernel_and_bias_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, bias=False))
    model[0].requires_grad_(False)
    model[1].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    converted = convert(model)
    assert _factor_flags(converted[0]) == [False] * 4 and not converted[0].bias.requires_grad
    assert _factor_flags(converted[1]) == [False] * 4 and converted[1].bias.requires_grad
    assert _factor_flags(converted[2]) == [True] * 4 and not converted[2].bias.requires_grad
    assert _factor_flags(converted[3]) == [True] * 4 and converted[3].bias is None
    # An optimizer over the trainable parameters leaves frozen layers frozen.
    assert sum(p.requires_grad for p in converted[0].parameters()) == 0
    back = densify(converted)
    assert [(c.weight.requires_grad, c.bias is not None and c.bias.requires_grad) for c in back] == [
        (False, False), (False, True), (True, False), (True, False)]


# ------------------------------------------------------------------------ hooks
class _Counter:
    """Hooks recording their calls; plain functions, so a deepcopy of the model shares ``calls``."""

    def __init__(self):
        calls = self.calls = []

        def pre(module, args):
            calls.append(("pre", type(module).__name__))

        def pre_kwargs(module, args, kwargs):
            calls.append(("pre_kwargs", type(module).__name__))

        def post_doubling(module, args, output):
            calls.append(("post", type(module).__name__))
            return 2 * output

        def post_always(module, args, kwargs, output):
            calls.append(("always", type(module).__name__))

        def backward(module, grad_input, grad_output):
            calls.append(("backward", type(module).__name__))

        self.pre, self.pre_kwargs, self.post_doubling, self.post_always, self.backward = (
            pre, pre_kwargs, post_doubling, post_always, backward)


def _hooked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    counter = _Counter()
    conv = model[2]
    handles = [
        conv.register_forward_pre_hook(counter.pre),
        conv.register_forward_pre_hook(counter.pre_kwargs, with_kwargs=True),
        conv.register_forward_hook(counter.post_doubling),
        conv.register_forward_hook(counter.post_always, with_kwargs=True, always_call=True),
        conv.register_full_backward_hook(counter.backward),
    ]
    return model, counter, handles


def test_forward_and_backward_hooks_move_to_the_new_layer_in_order():
    model, counter, _ = _hooked_model()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    expected = model(x)  # includes the doubling forward hook
    counter.calls.clear()
    converted, report = convert(model, return_report=True)
    y = converted(x)
    assert torch.allclose(y, expected, atol=1e-5)
    y.sum().backward()
    assert counter.calls == [("pre", "SVDConv"), ("pre_kwargs", "SVDConv"), ("post", "SVDConv"),
                             ("always", "SVDConv"), ("backward", "SVDConv")]
    assert report.layers[1].notes == (
        "moved 2 forward pre-hooks, 2 forward hooks, 1 backward hook to the SVDConv (hooks now receive it "
        "as the module)",)
    assert "moved 2 forward pre-hooks" in str(report)
    assert report.layers[0].notes == ()


def test_always_call_hook_still_runs_when_forward_raises():
    model, counter, _ = _hooked_model()
    converted = convert(model, return_report=True)[0]
    counter.calls.clear()
    with pytest.raises(ValueError, match="expects in_channels=4"):
        converted[2](torch.randn(1, 3, 6, 6))
    assert ("always", "SVDConv") in counter.calls


def test_inplace_conversion_keeps_hook_handles_working():
    model, counter, handles = _hooked_model()
    convert(model, inplace=True, return_report=True)
    for handle in handles:
        handle.remove()
    counter.calls.clear()
    model(torch.randn(1, 3, 6, 6, requires_grad=True)).sum().backward()
    assert counter.calls == []


def test_moved_hooks_are_warned_about_without_a_report():
    model, _, _ = _hooked_model()
    with pytest.warns(UserWarning, match=r"'2': moved 2 forward pre-hooks"):
        convert(model)


def test_state_dict_hooks_are_dropped_with_a_warning_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    model[1]._register_state_dict_hook(lambda module, state, prefix, metadata: None)
    with pytest.warns(UserWarning, match=r"(?s)dropped hooks.*'1': dropped 1 state_dict hook"):
        _, report = convert(model, return_report=True)
    assert "dropped 1 state_dict hook" in report.layers[1].notes[0]


def test_densify_moves_hooks_back():
    model, counter, _ = _hooked_model()
    converted = convert(model, return_report=True)[0]
    dense = densify(converted)
    counter.calls.clear()
    dense(torch.randn(1, 3, 6, 6))
    assert counter.calls == [("pre", "Conv2d"), ("pre_kwargs", "Conv2d"), ("post", "Conv2d"), ("always", "Conv2d")]


# ---------------------------------------------------------------------- reload
def _saved(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kwargs", [dict(energy=0.8), dict(param_budget=6000), dict(rank=0.3)])
def test_weight_dependent_ranks_reload_into_the_plain_model(kwargs):
    torch.manual_seed(0)
    # Random kernels do not compress: force keeps layers whose TT form is larger converted.
    converted = convert(SmallResNet(), **kwargs, force=("*",)).eval()
    ranks = {n: m.ranks for n, m in converted.named_modules() if isinstance(m, SVDConv)}
    assert len(set(ranks.values())) > 1  # the ranks really differ per layer
    state = _saved(converted)
    torch.manual_seed(1)  # another process: fresh weights, nothing shared with the first model
    skeleton = SmallResNet().eval()
    restored = load_converted(skeleton, state)
    assert {n: m.ranks for n, m in restored.named_modules() if isinstance(m, SVDConv)} == ranks
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(restored(x), converted(x))
    assert isinstance(skeleton.stem, nn.Conv2d)  # not inplace: the skeleton is untouched
    # A fresh full-rank conversion cannot take these weights: the error says what to do.
    with pytest.raises(RuntimeError, match=r"stem: the checkpoint's SVDConv has rank=.*load with load_converted"):
        convert(SmallResNet()).load_state_dict(state)


def test_state_dict_values_stay_tensors_and_load_with_weights_only():
    state = _saved(convert(SmallResNet(), energy=0.9, force=("*",)))
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert state["stem._extra_state"].dtype == torch.int64


def test_orthogonal_bound_never_loads_into_an_unbounded_layer():
    torch.manual_seed(0)
    bounded = nn.Sequential(SVDConv(4, 4, 3, padding=1, core_kind="orthogonal", max_singular_value=0.5))
    state = _saved(bounded)
    unbounded = nn.Sequential(SVDConv(4, 4, 3, padding=1, core_kind="orthogonal"))
    with pytest.raises(RuntimeError, match=r"0: the checkpoint's SVDConv has max_singular_value=0\.5, "
                                           r"this layer max_singular_value=None"):
        unbounded.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"0: the checkpoint's SVDConv has max_singular_value=0\.5, "
                                           r"this layer max_singular_value=2\.0"):
        nn.Sequential(SVDConv(4, 4, 3, padding=1, core_kind="orthogonal", max_singular_value=2.0)).load_state_dict(state)
    restored = load_converted(unbounded, state)
    assert restored[0].max_singular_value == 0.5
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(restored(x), bounded(x))
    general = nn.Sequential(SVDConv(4, 4, 3, padding=1))
    with pytest.raises(RuntimeError, match="core_kind='orthogonal', this layer core_kind='general'"):
        general.load_state_dict(state)


def test_load_converted_carries_flags_hooks_and_path():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    converted = convert(plain, rank=2)
    converted[2].path = "factored"
    state = _saved(converted)
    plain[0].requires_grad_(False)
    calls = []
    plain[2].register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    restored = load_converted(plain.eval(), state)
    assert _factor_flags(restored[0]) == [False] * 4 and _factor_flags(restored[2]) == [True] * 4
    assert restored[2].path == "factored" and not restored.training
    restored(torch.randn(1, 3, 6, 6))
    assert calls == ["SVDConv"]


def test_load_converted_rebuilds_svdconv_layers_of_another_rank_and_loads_inplace():
    torch.manual_seed(0)
    saved = convert(SmallResNet(), energy=0.7, force=("*",))  # random kernels: keep every layer converted
    skeleton = convert(SmallResNet(), rank=2)
    same = load_converted(skeleton, _saved(saved), inplace=True)
    assert same is skeleton
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(skeleton(x), saved(x))


def test_version_1_state_dicts_load_by_their_shapes():
    torch.manual_seed(0)
    converted = convert(SmallResNet(), rank=3)
    state = converted.state_dict()
    for key in [k for k in state if k.endswith("_extra_state")]:
        del state[key]
    for key, meta in state._metadata.items():
        if "version" in meta and key and isinstance(converted.get_submodule(key), SVDConv):
            meta["version"] = 1
    restored = load_converted(SmallResNet(), state)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(restored(x), converted(x))


def test_committed_version_1_checkpoint():
    saved = torch.load(os.path.join(DATA, "svdconv_v1.pt"), weights_only=True)
    sys.path.insert(0, DATA)
    from make_checkpoint import reference_model

    # Its orthogonal layer's bound is not in a version-1 state dict: refuse to guess.
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, (3, 2), stride=2, groups=2, padding_mode="reflect", padding=1),
                          nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(ValueError, match=r"layer '3': a version-1 checkpoint of an orthogonal-core SVDConv"):
        load_converted(dense, saved["state_dict"])
    model = reference_model()  # built with the right configuration: loads as it always did
    model.load_state_dict(saved["state_dict"])
    device = default_device()  # the test's device; the checkpoint's tensors load on the CPU
    with torch.no_grad():
        assert torch.allclose(model(saved["input"].to(device)), saved["output"].to(device), atol=1e-6)


def test_load_converted_errors():
    state = convert(nn.Sequential(nn.Conv2d(3, 4, 3)), rank=2).state_dict()
    with pytest.raises(ValueError, match=r"layer '0': the state dict holds an SVD layer there, but the model has a Linear"):
        load_converted(nn.Sequential(nn.Linear(3, 4)), state)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_converted(nn.Sequential(nn.Conv2d(3, 4, 3)), [1, 2])
    state["0._extra_state"] = torch.tensor([7, 1])
    with pytest.raises(ValueError, match=r"layer '0': malformed SVDConv extra state"):
        load_converted(nn.Sequential(nn.Conv2d(3, 4, 3)), state)
    with pytest.raises(RuntimeError, match=r"0: malformed SVDConv extra state"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3)), rank=2).load_state_dict(state)


class _HalvedConv(nn.Conv2d):
    def forward(self, x):
        return 0.5 * super().forward(x)


def test_load_converted_names_convs_that_convert_would_have_left():
    """A state dict with an SVD layer where the model has a conv subclass or a conv whose forward
    was replaced on the instance: the layer is built (the saved model had one) and a warning
    says what was dropped, never silently."""
    saved = convert(nn.Sequential(nn.Conv2d(4, 8, 3)))
    with pytest.warns(UserWarning, match=r"'0' \(_HalvedConv\) became a SVDConv.*subclass"):
        restored = load_converted(nn.Sequential(_HalvedConv(4, 8, 3)), saved.state_dict())
    assert isinstance(restored[0], SVDConv)
    conv = nn.Conv2d(4, 8, 3)
    plain_forward = conv.forward
    conv.forward = lambda x: plain_forward(x) + 1.0
    with pytest.warns(UserWarning, match=r"'0' \(Conv2d\) became a SVDConv.*replaced on the instance"):
        load_converted(nn.Sequential(conv), saved.state_dict())


def test_convs_with_nothing_to_decompose_are_left_with_the_reason():
    """A kernel on the meta device, an empty one, one whose shape disagrees with the conv's own
    arguments (pruned by hand) and one kept as a buffer: each is left and listed, by name,
    with what is wrong, not a traceback from deep inside the decomposition."""
    with torch.device("meta"):
        on_meta = nn.Conv2d(8, 16, 3)
    pruned = nn.Conv2d(8, 16, 3)
    pruned.weight = nn.Parameter(pruned.weight[:12].detach())
    pruned.bias = nn.Parameter(pruned.bias[:12].detach())
    as_buffer = nn.Conv2d(4, 4, 3)
    kernel = as_buffer.weight.detach()
    del as_buffer.weight
    as_buffer.register_buffer("weight", kernel)
    model = nn.Sequential(on_meta, nn.Conv2d(0, 4, 3), pruned, as_buffer)
    converted, report = convert(model, force=("*",), return_report=True)
    reasons = dict(report.skipped)
    assert sorted(reasons) == ["0", "1", "2", "3"] and not report.layers
    assert "meta device" in reasons["0"] and "empty" in reasons["1"]
    assert "(12, 8, 3, 3)" in reasons["2"] and "out_channels=16" in reasons["2"]
    assert "buffer" in reasons["3"]
    assert all(converted[i] is not model[i] and type(converted[i]) is nn.Conv2d for i in range(4))
    with pytest.raises(ValueError, match="weight is empty"):
        decompose(torch.randn(0, 4, 3, 3))


def test_load_converted_names_what_does_not_fit_the_model():
    saved = convert(nn.Sequential(nn.Conv2d(16, 16, 3)))
    with pytest.raises(ValueError, match=r"layer '0'.*rank \(16, 16\), more than this Conv2d \(8 -> 8 channels"):
        load_converted(nn.Sequential(nn.Conv2d(8, 8, 3)), saved.state_dict())
    state = dict(saved.state_dict())
    extra = state["0._extra_state"].clone()
    extra[4] = 1  # bounded, with the bits of NaN
    extra[5] = torch.tensor([float("nan")], dtype=torch.float64).view(torch.int64)[0]
    state["0._extra_state"] = extra
    with pytest.raises(ValueError, match=r"layer '0'.*max_singular_value nan is not a positive finite number"):
        load_converted(nn.Sequential(nn.Conv2d(16, 16, 3)), state)
