#!/usr/bin/env python3
"""Mutation check: deliberately broken one-line changes must make their targeted tests fail.

Each mutant in ``MUTANTS`` is a one-line change to a copy of the package. The script

1. copies ``ttconv/``, ``tests/`` and ``pyproject.toml`` into a temporary directory (from
   the working tree, or from a git revision with ``--rev``);
2. checks every mutant's ``original`` text occurs exactly once in its file and that the
   replacement changes exactly one line (otherwise the code moved on and the list below
   needs updating: a loud error, exit 2);
3. sanity run: the *unmutated* copy is the one imported (``PYTHONPATH`` points at it,
   checked) and passes every targeted test (exit 2 otherwise);
4. for each mutant: applies it, runs ``pytest -x -q -p no:cacheprovider <its tests>`` in
   the copy and expects a failure; restores the file.

It prints a table (mutant, killed/survived, killing test, seconds) and exits 1 if any
mutant survives. No dependency beyond pytest.

Usage::

    python .ci/mutation.py              # all mutants (about 5 minutes on 2 cores)
    python .ci/mutation.py --list       # the mutants and their tests
    python .ci/mutation.py --list --markdown   # the table in docs/testing.md
    python .ci/mutation.py --only ff_scale --only spatial_10x
    python .ci/mutation.py --rev HEAD   # test a commit instead of the working tree

To add a mutant, append a ``Mutant`` below: the smallest test selection that should kill
it (node ids), the exact text to replace (add surrounding lines when the line itself is
not unique; only one line may change) and what it models.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
COPIED = ("ttconv", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # exact text, must occur exactly once (may span lines for context)
    replacement: str  # differs from ``original`` on exactly one line
    tests: Tuple[str, ...]  # pytest node ids expected to fail
    description: str


MUTANTS: List[Mutant] = [
    # ------------------------------------------------------------------ _linalg.py
    Mutant(
        "wide_matrices_kept_wide", "ttconv/_linalg.py",
        "    return matrix.mT if matrix.shape[-2] < matrix.shape[-1] else matrix",
        "    return matrix",
        ("tests/test_linalg.py::test_tall_transposes_only_wide_matrices_as_a_view",),
        "single real matrices keep their wide orientation (LAPACK's slow SVD; same values)",
    ),
    # ------------------------------------------------------------------ bounds.py
    Mutant(
        "gram_frobenius_over_rows", "ttconv/bounds.py",
        "return torch.linalg.vector_norm(real, dim=(-3, -2, -1))",
        "return torch.linalg.vector_norm(real, dim=(-2, -1))",
        ("tests/test_bounds.py::test_gram_iterations_frobenius_norm_is_torchs_with_its_gradient",),
        "the Gram iteration's complex Frobenius norm reduces each row only (`dim=(-3, -2, -1)` -> `(-2, -1)`)",
    ),
    Mutant(
        "ff_scale", "ttconv/bounds.py",
        "math.sqrt(taps) * padding_factor(spec)",
        "taps * padding_factor(spec)",
        ("tests/test_bounds_values.py::test_fantastic_four_bounds_equal_independent_reshape_norms",),
        "looser Fantastic Four bound: factor `sqrt(kh*kw)` -> `kh*kw`",
    ),
    Mutant(
        "ff_min_to_max", "ttconv/bounds.py",
        ".amin(-1).amax()",
        ".amax(-1).amax()",
        ("tests/test_bounds_values.py::test_fantastic_four_bounds_equal_independent_reshape_norms",),
        "looser Fantastic Four bound: max instead of min over the four reshapes",
    ),
    Mutant(
        "spatial_10x", "ttconv/bounds.py",
        "return torch.stack(bounds).amax()",
        "return 10 * torch.stack(bounds).amax()",
        ("tests/test_bounds_values.py::test_zero_padding_bound_equals_independent_spatial_gram",),
        "spatial (zero-padding) Gram bound 10x looser",
    ),
    Mutant(
        "gram_exponent", "ttconv/bounds.py",
        "top = (frobenius.log() * exponent + log_scale * exponent).exp().amax()",
        "top = (frobenius.log() * exponent * 2 + log_scale * exponent * 2).exp().amax()",
        ("tests/test_bounds_values.py::test_gram_iteration_bound_is_the_schatten_norm_of_the_frequency_matrices",),
        "Gram iteration bound: root `2^-(t-1)` instead of `2^-t` (the bound squared)",
    ),
    Mutant(
        "gram_grid_ignores_stride", "ttconv/bounds.py",
        "grid = tuple(n_a // s_a for n_a, s_a in zip(n, spec.stride))",
        "grid = n",
        ("tests/test_bounds_values.py::test_gram_iteration_bound_is_the_schatten_norm_of_the_frequency_matrices",),
        "Gram bound: polyphase kernel on the n grid, not n/stride (still a bound, looser)",
    ),
    Mutant(
        "operator_bound_drops_padding_copies", "ttconv/bounds.py",
        "candidates.append(pad_norm * conv_spectral_norm(",
        "candidates.append(conv_spectral_norm(",
        ("tests/test_bounds_values.py::test_operator_norm_bound_counts_the_padding_copies",),
        "`operator_norm_bound` forgets the norm of the reflect/replicate padding map",
    ),
    Mutant(
        "power_estimate_inflated", "ttconv/bounds.py",
        "apply(x.detach()).norm() * scale,",
        "apply(x.detach()).norm() * scale * 1.01,",
        ("tests/test_bounds.py::test_power_iteration_converges_to_the_real_norm",),
        "power-iteration estimate returns a bound-looking value above the true norm",
    ),
    Mutant(
        "power_estimate_rounds_to_nearest", "ttconv/bounds.py",
        "cast = torch.nextafter(cast, torch.zeros_like(cast))",
        "cast = cast",
        ("tests/test_bounds_values.py::test_power_estimate_of_a_float32_layer_is_rounded_down",),
        "the float64 power estimate is cast to float32 to nearest, not down (can exceed the norm)",
    ),
    # ----------------------------------------------------------------- spectra.py
    Mutant(
        "exact_smallest_not_largest", "ttconv/spectra.py",
        "top = torch.linalg.matrix_norm(matrices, ord=2).amax()",
        "top = torch.linalg.matrix_norm(matrices, ord=-2).amax()",
        ("tests/test_bounds_values.py::test_exact_spectral_norm_equals_the_oracle",),
        "exact spectral norm takes the smallest singular value per frequency (`ord=2` -> `-2`)",
    ),
    Mutant(
        "cpu_batches_uncapped", "ttconv/spectra.py",
        'if kernel.device.type == "cpu":',
        'if kernel.device.type == "cuda":',
        ("tests/test_spectra_fast_paths.py::test_cpu_batches_stay_cache_sized_and_give_the_same_spectrum",),
        "CPU transfer batches fill max_memory instead of staying cache-sized (`cpu` -> `cuda`)",
    ),
    Mutant(
        "polyphase_contiguous_phases", "ttconv/spectra.py",
        "phases = padded.reshape(c_out, c_in, *(size for pair_ in zip(t, stride) for size in pair_)).permute(0, 1, *order)",
        "phases = padded.reshape(c_out, c_in, *(size for pair_ in zip(stride, t) for size in pair_)).permute(0, 1, *order)",
        ("tests/test_bounds_values.py::test_exact_spectral_norm_equals_the_oracle",),
        "polyphase split takes contiguous blocks of taps instead of every s-th tap",
    ),
    Mutant(
        "fold_keeps_the_first_cycle", "ttconv/spectra.py",
        "            kernel = padded.reshape(shape).sum(dim=axis - 1)",
        "            kernel = padded.reshape(shape).select(axis - 1, 0)",
        ("tests/test_spectra_fast_paths.py::test_spectrum_of_an_input_smaller_than_the_kernel_matches_the_tiled_oracle",),
        "an input smaller than the kernel: taps that wrap around the grid are dropped instead of added",
    ),
    Mutant(
        "one_by_one_copies_ignore_stride", "ttconv/bounds.py",
        "padded.flatten()[::stride].long()",
        "padded.flatten().long()",
        ("tests/test_spectra_fast_paths.py::test_one_by_one_operator_norm_is_exact_for_every_padding",),
        "the exact 1x1 operator norm counts pixel copies of outputs the stride skips",
    ),
    # ------------------------------------------------------------------- layer.py
    Mutant(
        "forward_costlier_path", "ttconv/_forward_paths.py",
        'path: ForwardPath = "dense" if dense_cost <= factored_cost else "factored"',
        'path: ForwardPath = "dense" if dense_cost > factored_cost else "factored"',
        ("tests/test_forward_path.py::test_auto_runs_the_cheaper_path",),
        "`forward` with `path='auto'` takes the costlier path",
    ),
    Mutant(
        "flop_costs_drop_compose", "ttconv/_forward_paths.py",
        "    return (dense_build + out_pixels * dense,",
        "    return (out_pixels * dense,",
        ("tests/test_forward_path.py::test_auto_runs_the_cheaper_path",),
        "the FLOP model forgets the cost of composing the dense kernel (tiny images go dense)",
    ),
    Mutant(
        "path_costs_no_elements", "ttconv/_forward_paths.py",
        "INFERENCE = PathConstants(element=5, mixing_call=1_400_000, compose=50_000, separable_conv=1.5)",
        "INFERENCE = PathConstants(element=0, mixing_call=1_400_000, compose=50_000, separable_conv=1.5)",
        ("tests/test_forward_path.py::test_auto_follows_the_cost_model_measured_on_the_forced_paths",),
        "the path cost model counts multiply-adds only (memory traffic ignored)",
    ),
    Mutant(
        "matmul_mixing_transposed", "ttconv/_functional.py",
        "    y = torch.matmul(weight, x.reshape(batch, groups, weight.shape[2], -1))",
        "    y = torch.matmul(weight.flip(1), x.reshape(batch, groups, weight.shape[2], -1))",
        ("tests/test_forward_path.py::test_large_inputs_mix_channels_by_matmul_exactly",),
        "the matmul 1x1 mixing of large inputs pairs channels wrongly",
    ),
    Mutant(
        "transposed_output_size_ignored", "ttconv/layer.py",
        "        return self._forward(input, tuple(output_padding))",
        "        return self._forward(input, self.output_padding)",
        ("tests/test_layer_nd.py::test_transposed_output_size_as_torch",),
        "a transposed layer ignores forward's output_size",
    ),
    Mutant(
        "transposed_fan_in_from_in_channels", "ttconv/layer.py",
        "            fan_in = (self._weight_channels()[1] // self.groups) * math.prod(self.kernel_size)",
        "            fan_in = (self.in_channels // self.groups) * math.prod(self.kernel_size)",
        ("tests/test_layer_nd.py::test_fresh_layers_initialise_like_torch",),
        "transposed layers initialise with a plain conv's fan-in (torch uses the weight's second axis)",
    ),
    Mutant(
        "fx_costlier_path", "ttconv/_forward_paths.py",
        "return dense <= math.prod(layer.stride) * factored_in + factored_out",
        "return dense > math.prod(layer.stride) * factored_in + factored_out",
        ("tests/test_forward_path.py::test_fx_trace_records_the_cheaper_path_per_pixel",),
        "a `torch.fx` trace of `path='auto'` records the costlier path",
    ),
    Mutant(
        "canonicalize_skipped", "ttconv/layer.py",
        "self._copy_factors(canonicalize(self.U, self.S, self._tt_core(self.core), self.V, self.groups))",
        "pass",
        ("tests/test_layer.py::test_canonicalize_keeps_function_and_parameter_identity",),
        "`SVDConv.canonicalize_()` does nothing for the general core",
    ),
    # ---------------------------------------------------------------------- tt.py
    Mutant(
        "relative_error_one_unfolding", "ttconv/tt.py",
        "discarded = float(sv_in[..., r_in:].pow(2).sum() + sv_out[..., r_out:].pow(2).sum())",
        "discarded = float(sv_out[..., r_out:].pow(2).sum())",
        ("tests/test_tt.py::test_truncation_error_is_reported_exactly_and_is_optimal_per_unfolding",),
        "`relative_error` leaves out the input-unfolding truncation",
    ),
    # ----------------------------------------------------------------- control.py
    Mutant(
        "regularizer_sums_norms", "ttconv/control.py",
        "t.square() for t in terms",
        "t for t in terms",
        ("tests/test_control_guarantee.py::test_exact_regularizer_is_the_sum_of_squared_oracle_norms",),
        "regularizer sums the norms instead of their squares",
    ),
    Mutant(
        "dilated_clip_wrong_taps", "ttconv/control.py",
        "support = spatial[(...,) + tuple(slice(None, dil * (k - 1) + 1, dil) for k, dil in zip(kernel_size, dilation))]",
        "support = spatial[(...,) + tuple(slice(None, k) for k in kernel_size)]",
        ("tests/test_control_guarantee.py::test_dilated_clip_matches_an_independent_reference",),
        "a dilated clip is projected onto the undilated (wrong) taps",
    ),
    Mutant(
        "clip_scale_skips_the_scale", "ttconv/control.py",
        "    return _scale_from(layer, _clip(layer, limit, size, n_iter), limit)",
        "    return _clip(layer, limit, size, n_iter)",
        ("tests/test_control_guarantee.py::test_guarantee_after_apply_against_the_oracle",),
        "SpectralControl's guaranteed mode clips but never rescales to the target",
    ),
    Mutant(
        "strided_clip_on_stride1", "ttconv/control.py",
        "    stride = _effective_stride(layer, n)\n    if isinstance(layer, _SVDConvNd):\n        q_u, kernel, q_v",
        "    stride = (1,) * len(n)\n    if isinstance(layer, _SVDConvNd):\n        q_u, kernel, q_v",
        ("tests/test_control_guarantee.py::test_strided_clip_clips_the_polyphase_spectrum_like_an_independent_reference",),
        "a strided layer is clipped on its stride-1 operator (over-constrained) instead of its own spectrum",
    ),
    Mutant(
        "half_plane_nyquist_counted_twice", "ttconv/control.py",
        "weight = torch.where(self_conjugate(frequencies, m), 1.0, 2.0)",
        "weight = torch.where(frequencies[-1] == 0, 1.0, 2.0)",
        ("tests/test_control_guarantee.py::test_half_plane_clip_equals_the_full_plane_clip",),
        "the half-plane inverse DFT counts the self-conjugate Nyquist column twice",
    ),
    Mutant(
        "certified_norm_trusts_the_power_iteration", "ttconv/spectra.py",
        "pending[where] = torch.linalg.cholesky_ex(shifted).info != 0",
        "pending[where] = False",
        ("tests/test_control_guarantee.py::test_certified_norm_finds_a_maximum_the_power_iteration_misses",),
        "the exact norm skips the Cholesky certificate and keeps the power iteration's best frequency",
    ),
    Mutant(
        "nd_ff_trivial_reshapes", "ttconv/bounds.py",
        "return tuple(subset for size in range(dims + 1) for subset in itertools.combinations(range(dims), size))",
        "return ((), tuple(range(dims)))",
        ("tests/test_bounds_nd.py::test_nd_fantastic_four_equals_the_reshape_norms_of_the_undilated_kernel",),
        "d-dimensional Fantastic Four uses only the two all-taps-on-one-side reshapes (looser)",
    ),
    Mutant(
        "transposed_circular_grid_not_scaled", "ttconv/bounds.py",
        "return tuple(n_a * s for n_a, s in zip(n, spec.stride))",
        "return n",
        ("tests/test_bounds_nd.py::test_every_bound_holds_for_transposed_convs",),
        "a transposed conv's circular spectrum taken on its input grid instead of stride x it",
    ),
    Mutant(
        "transposed_operator_on_n", "ttconv/bounds.py",
        "return spec.adjoint(), spec.conv_input_size(n)",
        "return spec.adjoint(), n",
        ("tests/test_bounds_nd.py::test_every_bound_holds_for_transposed_convs",),
        "a transposed conv's own-operator bound computed on the wrong grid",
    ),
    Mutant(
        "conv_input_size_drops_output_padding", "ttconv/geometry.py",
        "dil * (k - 1) + op + 1 for",
        "dil * (k - 1) + 1 for",
        ("tests/test_bounds_nd.py::test_a_transposed_conv_is_the_adjoint_of_the_cropped_zero_padded_conv",),
        "the transposed conv's output size forgets output_padding",
    ),
    Mutant(
        "conjugate_pairs_unravelled_as_half_space_indices", "ttconv/spectra.py",
        "        paired = paired // rest_half * rest[-1] + paired % rest_half",
        "        paired = paired + 0",
        ("tests/test_control_nd.py::test_every_kind_scale_clip_and_guarantee_against_the_explicit_operator",
         "tests/test_spectra_fast_paths.py::test_one_representative_per_conjugate_pair"),
        "3-D grids: the other axes' pair representatives are read as indices of their full grid, not of its half space",
    ),
    Mutant(
        "self_conjugate_misses_nyquist", "ttconv/spectra.py",
        "own &= (f == 0) | (2 * f == m_a)",
        "own &= f == 0",
        ("tests/test_spectra.py::test_odd_and_even_sizes_restore_conjugate_frequencies",
         "tests/test_spectra_fast_paths.py::test_one_representative_per_conjugate_pair"),
        "a Nyquist frequency (index m/2) is counted twice in the spectrum, as if it had a distinct conjugate",
    ),
    Mutant(
        "nyquist_column_never_decomposed", "ttconv/spectra.py",
        "    columns = [0] + ([last // 2] if last % 2 == 0 and last > 1 else [])",
        "    columns = [0]",
        ("tests/test_spectra.py::test_odd_and_even_sizes_restore_conjugate_frequencies",
         "tests/test_control_guarantee.py::test_half_plane_clip_equals_the_full_plane_clip"),
        "on an even grid the Nyquist column's frequencies (m2 / 2) are never decomposed",
    ),
    Mutant(
        "nyquist_column_counted_as_interior", "ttconv/spectra.py",
        "    interior = (rows[:, None] * half + torch.arange(1, (last + 1) // 2, device=device)).flatten()",
        "    interior = (rows[:, None] * half + torch.arange(1, last // 2 + 1, device=device)).flatten()",
        ("tests/test_spectra.py::test_odd_and_even_sizes_restore_conjugate_frequencies",
         "tests/test_spectra_fast_paths.py::test_one_representative_per_conjugate_pair"),
        "on an even grid the Nyquist column is taken whole, as if its conjugates lay outside the half space",
    ),
    # ------------------------------------------------------------------ tt.py / convert.py (compression)
    Mutant(
        "energy_ignores_the_input_side", "ttconv/tt.py",
        "        room = allowed - float(self.tail_in[r_in])",
        "        room = allowed",
        ("tests/test_tt.py::test_energy_is_met_on_the_whole_kernel_with_minimal_ranks",),
        "energy counts only the output-side truncation (the kernel is truncated twice)",
    ),
    Mutant(
        "energy_never_lowers_r_in", "ttconv/tt.py",
        "            if self._min_r_out(mid, allowed) <= r_out:",
        "            if False:",
        ("tests/test_tt.py::test_energy_ranks_shrink_r_in_below_the_tried_input_ranks",),
        "the energy search keeps the first feasible input rank instead of the smallest",
    ),
    Mutant(
        "depthwise_converted_anyway", "ttconv/convert.py",
        "    if smallest < dense:",
        "    if True:",
        ("tests/test_convert_compression.py::test_full_rank_keeps_depthwise_convs_dense_and_stays_exact",),
        "a conv whose TT form can never be smaller (depthwise) is converted and grows the model",
    ),
    Mutant(
        "truncation_grows_layers", "ttconv/convert.py",
        "            keep = truncating and not candidate.forced and tt_size >= _params(conv)",
        "            keep = False",
        ("tests/test_convert_compression.py::test_truncating_settings_never_grow_a_layer_unless_forced",),
        "a truncating setting converts a layer whose TT form is not smaller",
    ),
    Mutant(
        "transposed_sized_as_plain_conv", "ttconv/convert.py",
        "    rows, cols = (conv.in_channels, conv.out_channels) if conv.transposed else (conv.out_channels, conv.in_channels)",
        "    rows, cols = (conv.out_channels, conv.in_channels)",
        ("tests/test_convert_nd.py::test_transposed_ranks_count_in_channels_first",),
        "transposed convs sized with a plain conv's channel order (weight is (in, out/g, *k))",
    ),
    # ------------------------------------------------------------------ report.py, _trace.py
    Mutant(
        "chain_accepts_a_changed_input", "ttconv/_trace.py",
        "        if previous is None or received[0] is not previous[0] or received[1] != previous[1]:",
        "        if previous is None or received[0] is not previous[0]:",
        ("tests/test_report_coverage.py::test_a_residual_model_gets_no_unlabelled_product",),
        "an in-place residual (y += x, same tensor, new version) passes as a plain chain",
    ),
    Mutant(
        "operator_bound_copies_unrooted", "ttconv/bounds.py",
        "    pad_norm = math.sqrt(math.prod(_copies(",
        "    pad_norm = (math.prod(_copies(",
        ("tests/test_bounds_values.py::test_operator_norm_bound_never_exceeds_fantastic_four_times_the_padding_factor",),
        "operator_norm_bound multiplies by the padding map's largest copy count, not its square root: "
        "valid, but looser than Fantastic Four times the padding factor",
    ),
    Mutant(
        "product_printed_for_any_model", "ttconv/report.py",
        "        return self.upper_bound_product if self.chain else None",
        "        return self.upper_bound_product",
        ("tests/test_report_coverage.py::test_a_residual_model_gets_no_unlabelled_product",),
        "the product of layer bounds is returned as a Lipschitz bound for a non-sequential model",
    ),
    Mutant(
        "folded_clip_counts_each_residue_once", "ttconv/control.py",
        "(target - folded) / count.clamp_min(1)",
        "(target - folded)",
        ("tests/test_report_coverage.py::test_plain_clip_below_an_undilated_kernel_is_exact",),
        "a clip below the kernel size moves every tap of a residue by the whole change",
    ),
    Mutant(
        "report_transposed_ignores_the_calls_output_padding", "ttconv/report.py",
        "    return spec if used == spec.output_padding else dataclasses.replace(spec, output_padding=used)",
        "    return spec",
        ("tests/test_report_nd.py::test_transposed_call_with_output_size_uses_the_output_padding_of_the_call",),
        "a transposed layer called with output_size is analysed with its constructor's output_padding",
    ),
    Mutant(
        "report_transposed_own_operator_is_the_adjoint", "ttconv/report.py",
        "        own_spec, own_size = (spec, layer_input) if spec.transposed and layer_input is not None else (circ, input_size)",
        "        own_spec, own_size = (circ, input_size)",
        ("tests/test_report_coverage.py::test_transposed_conv_is_the_adjoint_of_the_conv_on_its_output_grid",),
        "'upper own' of a transposed layer computed on the adjoint conv's grid instead of the layer itself",
    ),
    Mutant(
        "trace_transposed_grid_not_scaled", "ttconv/_trace.py",
        "                        size = tuple(n * s for n, s in zip(size, specs[name].stride))",
        "                        size = size",
        ("tests/test_report_nd.py::test_every_conv_kind_is_certified_against_explicit_operators",),
        "a transposed layer's circular grid recorded as its input size, not s n",
    ),
    Mutant(
        "kept_spectrum_drops_the_low_rank_zeros", "ttconv/report.py",
        "    return torch.nn.functional.pad(values, (0, count - values.numel()))",
        "    return values",
        ("tests/test_report_nd.py::test_kept_spectra_are_the_full_dense_circular_spectra",),
        "a kept spectrum of a low-rank layer leaves out its zero singular values",
    ),
    Mutant(
        "trace_records_two_axes", "ttconv/_trace.py",
        "                    size = tuple(int(s) for s in args[0].shape[-specs[name].dims:])",
        "                    size = tuple(int(s) for s in args[0].shape[-2:])",
        ("tests/test_report_nd.py::test_every_conv_kind_is_certified_against_explicit_operators",),
        "input sizes recorded as the last two axes whatever the conv's dimension",
    ),
    Mutant(
        "state_dict_size_applied_to_every_kernel", "ttconv/report.py",
        "                size = input_size if input_size is not None and len(input_size) == spec.dims else None",
        "                size = input_size",
        ("tests/test_report_nd.py::test_state_dict_kernels_of_another_dimension_get_size_independent_bounds",),
        "a checkpoint's input size is applied to kernels of another dimension",
    ),
    Mutant(
        "adaptive_pool_always_1_lipschitz", "ttconv/_trace.py",
        "    return all(size in (1, None) for size in _ntuple(m.output_size, _dims(m)))",
        "    return True",
        ("tests/test_report_nd.py::test_1d_and_3d_pools_are_accepted_where_the_2d_ones_are",),
        "an adaptive pool with overlapping windows is accepted in a verified chain",
    ),
    Mutant(
        "transfer_bytes_two_axes", "ttconv/report.py",
        "    frequencies = 1 if all(t == 1 for t in taps) else math.prod(m[:-1]) * (m[-1] // 2 + 1)",
        "    frequencies = 1 if all(t == 1 for t in taps) else m[0] * (m[-1] // 2 + 1)",
        ("tests/test_report_nd.py::test_transfer_bytes_and_spectrum_length_are_dimension_generic",),
        "the memory estimate counts frequencies of two axes for a 3-D kernel",
    ),
    Mutant(
        "report_drops_spatial_bound", "ttconv/report.py",
        "upper = (ff_full if spatial is None else min(ff_full, spatial)) * factor_any_size",
        "upper = ff_full * factor_any_size",
        ("tests/test_report.py::test_size_independent_upper_bound_is_the_smaller_of_ff_and_the_spatial_bound",),
        "the size-independent report row ignores the spatial Gram bound",
    ),
    # ------------------------------------------------------------ forward-path regimes
    Mutant(
        "auto_ignores_the_training_regime", "ttconv/_forward_paths.py",
        "    backward = torch.is_grad_enabled() and (",
        "    backward = False and (",
        ("tests/test_forward_path.py::test_auto_models_the_backward_pass_when_the_call_will_be_differentiated",),
        "`auto` models every call as inference, also when it will be differentiated",
    ),
    Mutant(
        "backward_counts_the_first_input_gradient", "ttconv/_forward_paths.py",
        "        if not input_requires_grad:",
        "        if False:",
        ("tests/test_forward_path.py::test_auto_models_the_backward_pass_when_the_call_will_be_differentiated",),
        "the training cost counts an input gradient the first layer never computes",
    ),
    # ------------------------------------------------------------ orthogonal core, N-d
    Mutant(
        "skew_exp_degree_sized_for_the_value_only", "ttconv/orthogonal.py",
        "    return (math.factorial(degree) * unit / 4) ** (1.0 / degree)",
        "    return (math.factorial(degree + 1) * unit / 4) ** (1.0 / (degree + 1))",
        ("tests/test_orthogonal.py::test_skew_exp_equals_torchs_matrix_exp_and_its_gradient",),
        "the skew exponential's Taylor degree bounds the value's error but not the gradient's",
    ),
    Mutant(
        "skew_exp_one_squaring_short", "ttconv/orthogonal.py",
        "        result = torch.where((own > k)[..., None, None], result @ result, result)",
        "        result = torch.where((own > k + 1)[..., None, None], result @ result, result)",
        ("tests/test_orthogonal.py::test_skew_exp_equals_torchs_matrix_exp_and_its_gradient",),
        "the skew exponential squares one time too few (exp(A/2) instead of exp(A))",
    ),
    Mutant(
        "skew_exp_follows_autocast", "ttconv/orthogonal.py",
        "@full_precision  # under autocast too: the squarings amplify a low-precision product's error",
        "# (no full_precision)",
        ("tests/test_orthogonal.py::test_skew_exp_keeps_its_precision_under_autocast_and_for_half_inputs",),
        "the skew exponential's products follow autocast into bfloat16, and its squarings amplify the error",
    ),
    Mutant(
        "orthogonal_build_not_costed", "ttconv/_forward_paths.py",
        '    if getattr(layer, "core_kind", "general") != "orthogonal":',
        "    if True:",
        ("tests/test_layer_nd.py::test_orthogonal_flop_costs_are_torchs_flop_count",),
        "the path model charges an orthogonal core's BCOP build to neither path (auto then runs full-rank "
        "orthogonal layers factored, which builds the core and adds two 1x1 convs)",
    ),
    Mutant(
        "skew_exp_returns_unusable_matrices", "ttconv/orthogonal.py",
        "    return torch.where(usable[..., None, None], result, torch.nan)",
        "    return result",
        ("tests/test_orthogonal.py::test_skew_exp_sizes_each_matrix_alone_and_never_returns_a_wrong_finite_matrix",),
        "an exponential whose squarings ate every digit (or whose norm overflowed) comes back finite and "
        "not orthogonal instead of NaN",
    ),
    Mutant(
        "pointwise_fold_not_costed", "ttconv/_forward_paths.py",
        "    fold = rows * r_out * r_in if layer._is_pointwise() else 0",
        "    fold = 0",
        ("tests/test_layer_nd.py::test_pointwise_flop_costs_are_torchs_flop_count",),
        "the path model leaves out the 1x1 factored path's (U S) @ core product",
    ),
    Mutant(
        "bcop_outputs_blocks_in_wrong_order", "ttconv/orthogonal.py",
        "    for axis, projector in reversed(list(zip(blocks, projectors))):  # the last block runs last",
        "    for axis, projector in zip(blocks, projectors):",
        ("tests/test_orthogonal.py::test_bcop_outputs_are_the_kernel_composed_after_the_core",),
        "the last axis's blocks are composed onto outputs in the wrong order",
    ),
    Mutant(
        "bcop_block_not_complementary", "ttconv/orthogonal.py",
        "    return F.pad(first_taps, pad_after) + F.pad(kernel - first_taps, pad_before)",
        "    return F.pad(first_taps, pad_after) + F.pad(kernel, pad_before)",
        ("tests/test_orthogonal.py::test_bcop_circular_operator_is_orthogonal_in_every_dimension",),
        "a BCOP two-tap block is [P, I] instead of [P, I - P] (not orthogonal)",
    ),
    Mutant(
        "separable_strides_the_last_axis_twice", "ttconv/layer.py",
        "            input, first, None, (*self.stride[:-1], 1), first_padding, (*self.dilation[:-1], 1), g,",
        "            input, first, None, self.stride, first_padding, (*self.dilation[:-1], 1), g,",
        ("tests/test_orthogonal_nd.py::test_separable_path_is_the_torch_layer_with_the_dense_paths_gradients",),
        "the separable path's first conv also takes the last axis's stride, which the second conv applies again",
    ),
    Mutant(
        "separable_drops_the_last_axis_padding_mode", "ttconv/layer.py",
        "            self.padding_mode, [*pads[:2], *(0,) * (2 * d - 2)])",
        "            self.padding_mode, [0, 0, *(0,) * (2 * d - 2)])",
        ("tests/test_orthogonal_nd.py::test_separable_path_splits_every_padding_by_axis",),
        "the separable path's second conv leaves the last axis unpadded under reflect/replicate/circular padding",
    ),
    Mutant(
        "separable_transposed_loses_output_padding", "ttconv/layer.py",
        "                               (*zeros, output_padding[-1]), g, (*ones, self.dilation[-1]))",
        "                               (*zeros, 0), g, (*ones, self.dilation[-1]))",
        ("tests/test_orthogonal_nd.py::test_separable_path_is_the_torch_layer_with_the_dense_paths_gradients",),
        "a transposed layer's separable path drops the last axis's output padding (a wrong output size)",
    ),
    Mutant(
        "separable_path_never_chosen", "ttconv/_forward_paths.py",
        "    if separable is not None and separable < min(dense_cost, factored_cost):",
        "    if separable is not None and separable < 0:",
        ("tests/test_forward_path.py::test_auto_takes_the_separable_path_where_measured_timings_favour_it",),
        "auto never takes an orthogonal core's separable path, however much cheaper the model says it is",
    ),
    Mutant(
        "separable_strides_a_one_tap_last_axis_late", "ttconv/layer.py",
        '        if self.kernel_size[-1] == 1 and self.padding != "same":',
        '        if False:',
        ("tests/test_orthogonal_nd.py::test_a_one_tap_last_axis_is_strided_by_the_separable_paths_first_conv",),
        "a one-tap last axis is strided by the separable path's second conv: every position computed, "
        "and a 1 x 1 conv strided along one axis that oneDNN's channels-last backward corrupts memory on",
    ),
    Mutant(
        "bcop_halves_second_half_a_view", "ttconv/orthogonal.py",
        "    return right.contiguous(), second.contiguous()",
        "    return right.contiguous(), second",
        ("tests/test_layer_nd.py::test_output_memory_format_is_torchs",),
        "the separable path's second half stays a permuted view, whose strides can read as channels-last: "
        "its conv answers channels-last",
    ),
    Mutant(
        "factored_one_tap_core_strided_in_the_conv", "ttconv/layer.py",
        "            if all(k == 1 for k in self.kernel_size) and any(s > 1 for s in self.stride):",
        "            if False:",
        ("tests/test_layer_nd.py::test_a_strided_one_tap_core_is_padded_and_subsampled_then_unstrided",),
        "the factored path's strided 1 x 1 core runs as a strided conv, which oneDNN's channels-last backward "
        "corrupts memory on (2-4 channels, stride along the last axis alone)",
    ),
    Mutant(
        "separable_build_costed_with_the_join", "ttconv/_forward_paths.py",
        "    build = g * _bcop_macs(k, r, cols // g, outputs=rows // g, folded=r_in, join=False)",
        "    build = g * _bcop_macs(k, r, cols // g, outputs=rows // g, folded=r_in)",
        ("tests/test_layer_nd.py::test_orthogonal_flop_costs_are_torchs_flop_count",),
        "the separable path's model charges the product that joins the halves, which that path never computes",
    ),
    Mutant(
        "orthogonal_input_side_scaling_wrong", "ttconv/layer.py",
        "            core = core * S.reshape(g, 1, r_in, *(1,) * d)",
        "            core = core * S.reshape(g, 1, r_in, *(1,) * d).abs().max()",
        ("tests/test_orthogonal_nd.py::test_singular_values_are_exactly_s_on_the_explicit_operator",),
        "an orthogonal core with r_out > r_in scales its inputs by max |S| instead of S",
    ),
    Mutant(
        "orthogonal_spectrum_ignores_stride", "ttconv/layer.py",
        "        positions = math.prod(n_i // s_i for n_i, s_i in zip(n, self.stride))",
        "        positions = math.prod(n)",
        ("tests/test_orthogonal_nd.py::test_singular_values_are_exactly_s_on_the_explicit_operator",),
        "a strided orthogonal layer repeats |S| once per input position instead of per output position",
    ),
    Mutant(
        "folded_dense_weight_drops_input_scaling", "ttconv/layer.py",
        "        inputs = V.mT if r_out <= r_in else S[:, :, None] * V.mT  # (g, r_in, B/g)",
        "        inputs = V.mT  # (g, r_in, B/g)",
        ("tests/test_orthogonal_nd.py::test_dense_weight_with_v_folded_into_bcop_is_the_composed_factors",),
        "the orthogonal dense_weight (and the separable path) with V folded into BCOP drops the input-side S",
    ),
    Mutant(
        "hidden_cpu_scalar_in_forward", "ttconv/layer.py",
        "        scaled_core = S[(...,) + (None,) * (d + 1)] * core",
        "        scaled_core = S[(...,) + (None,) * (d + 1)] * core * torch.tensor(1.0)",
        ("tests/test_device.py::test_forward_and_backward_on_meta_touch_no_host_tensor_and_no_host_value",),
        "forward multiplies by a CPU scalar tensor (a host tensor inside forward: breaks on GPU)",
    ),
    # ------------------------------------------------------------ validation, attacks, tables
    Mutant(
        "bool_counts_as_int", "ttconv/_conv_args.py",
        "    return isinstance(value, numbers.Integral) and not isinstance(value, bool)",
        "    return isinstance(value, numbers.Integral)",
        ("tests/test_validation.py::test_each_scalar_check_accepts_exactly_its_domain_and_raises_by_kind",),
        "a bool passes as an int (rank=True would be rank 1)",
    ),
    Mutant(
        "linf_certificate_drops_sqrt_d", "ttconv/evaluate.py",
        '    "linf": _Ball(_linf_ascent, _linf_project, _linf_random_point, math.sqrt),',
        '    "linf": _Ball(_linf_ascent, _linf_project, _linf_random_point, lambda dim: 1.0),',
        ("tests/test_evaluate.py::test_certified_accuracy_on_a_hand_built_net",),
        "the Linf certificate forgets the sqrt(d) between the Linf ball and its L2 ball (a false certificate)",
    ),
    Mutant(
        "table_ignores_alignment", "ttconv/_table.py",
        "    return cell.ljust(width) if align == LEFT else cell.rjust(width)",
        "    return cell.ljust(width)",
        ("tests/test_table.py::test_text_columns_line_up_and_every_cell_is_where_its_alignment_says",),
        "the table renderer left-aligns every column",
    ),
    Mutant(
        "compose_returns_a_transposed_view", "ttconv/tt.py",
        "    return weight.reshape(g * out_g, taps, in_g).transpose(1, 2).contiguous().reshape(g * out_g, in_g, kh, kw)",
        "    return weight.reshape(g * out_g, taps, in_g).transpose(1, 2).reshape(g * out_g, in_g, kh, kw)",
        ("tests/test_layer_nd.py::test_output_memory_format_is_torchs",),
        "the composed kernel is a channels-last view: the dense path answers in channels-last (y.view(n, -1) breaks)",
    ),
    Mutant(
        "certify_in_float32", "ttconv/spectra.py",
        "values = [torch.linalg.svdvals(part.to(wide))[..., 0].to(real) for part in flat.split(chunk)]",
        "values = [torch.linalg.svdvals(part)[..., 0].to(real) for part in flat.split(chunk)]",
        ("tests/test_spectra.py::test_certifying_values_are_decomposed_in_float64",),
        "certified norms are decomposed in float32: their accuracy is the SVD backend's (cuSOLVER: 8e-6)",
    ),
    # ------------------------------------------------------------ red-team findings, stop 24
    Mutant(
        "trace_sees_hooked_outputs", "ttconv/_trace.py",
        "        handles.append(module.register_forward_hook(after, prepend=True))",
        "        handles.append(module.register_forward_hook(after))",
        ("tests/test_evaluate.py::test_hooks_that_can_change_a_layer_are_refused_and_never_certified",),
        "the trace records a layer's output after the user's forward hooks, which can replace it unseen",
    ),
    Mutant(
        "evaluate_chain_hides_repeats", "ttconv/evaluate.py",
        "    for name, child in module._modules.items():",
        "    for name, child in module.named_children():",
        ("tests/test_evaluate.py::test_a_module_registered_twice_counts_at_every_use",),
        "lipschitz_bound counts a module registered twice in the chain once",
    ),
    Mutant(
        "orthogonal_bound_ignores_padding", "ttconv/evaluate.py",
        "            return float(module.effective_S().detach().double().abs().max()) * factor",
        "            return float(module.effective_S().detach().double().abs().max())",
        ("tests/test_evaluate.py::test_orthogonal_layers_bound_includes_their_padding",),
        "an orthogonal core is bounded by max |S| whatever its padding (reflect/replicate copy pixels)",
    ),
    Mutant(
        "control_writes_reparametrized_layers", "ttconv/control.py",
        "    problem = _reparametrized(layer)\n    if problem:",
        "    problem = _reparametrized(layer)\n    if False:",
        ("tests/test_control.py::test_control_refuses_reparametrized_layers_and_leaves_them_unchanged",),
        "control scales a tensor a reparametrization recomputes before the next forward",
    ),
    Mutant(
        "weight_norm_read_with_dim_0", "ttconv/report.py",
        "        axes = [axis for axis in range(w.dim()) if axis not in kept]",
        "        axes = list(range(1, w.dim()))",
        ("tests/test_cli_checkpoints.py::test_square_reparametrized_kernels_are_rebuilt_with_their_own_dim",),
        "a state dict's weight_norm is rebuilt with dim=0 whatever g's shape says",
    ),
    Mutant(
        "spectral_norm_first_layout", "ttconv/report.py",
        "        layouts = [matrix for matrix in layouts if _iterated_pair(matrix, u64, v64)]",
        "        layouts = layouts[:1]",
        ("tests/test_cli_checkpoints.py::test_square_reparametrized_kernels_are_rebuilt_with_their_own_dim",),
        "a square kernel's spectral_norm is read with dim=0 (wrong for ConvTranspose and dim=1)",
    ),
    Mutant(
        "padding_cache_unchecked", "ttconv/_conv_args.py",
        "    if tuple(int(p) for p in cached) != expected:",
        "    if False:",
        ("tests/test_validation.py::test_padding_changed_after_construction_is_refused_where_the_forward_ignores_it",),
        "a padding attribute changed after construction is analysed, while the forward pads by the old one",
    ),
    Mutant(
        "patched_forward_converted", "ttconv/_effective_kernel.py",
        '    if strict and "forward" in vars(conv):',
        "    if False:",
        ("tests/test_convert_reparametrized.py::test_what_cannot_convert_exactly_is_left_and_listed",),
        "convert replaces a conv whose forward was replaced on the instance",
    ),
    Mutant(
        "one_tap_kernel_keeps_transposed_strides", "ttconv/tt.py",
        "    if taps == 1:",
        "    if False:",
        ("tests/test_layer_nd.py::test_output_memory_format_is_torchs",),
        "a composed 1 x 1 kernel keeps a transpose's strides, read as channels-last: strided 1 x 1 layers answer "
        "channels-last",
    ),
    Mutant(
        "exclude_sees_first_name_only", "ttconv/convert.py",
        "        if any(is_excluded(module, alias) for alias in names):",
        "        if is_excluded(module, name):",
        ("tests/test_convert.py::test_exclude_and_force_see_every_name_of_a_shared_conv",),
        "exclude naming a shared conv by its second name is ignored",
    ),
    Mutant(
        "singular_values_accept_nan", "ttconv/layer.py",
        "        if not bool(torch.isfinite(values).all()):",
        "        if False:",
        ("tests/test_orthogonal.py::test_stride_two_spectrum_and_bad_arguments",),
        "set_singular_values_ accepts NaN (it passes the range check) and Inf",
    ),
    Mutant(
        "rank_one_orthogonal_read_as_general", "ttconv/report.py",
        "    if core.dim() == 4 and core.shape[2] == core.shape[3] == r and core.shape[0] * r == S.numel():",
        "    if False:",
        ("tests/test_report_nd.py::test_factors_without_their_configuration_are_skipped_where_orthogonal_and_general_shapes_coincide",),
        "factors without their configuration whose shapes fit a rank-1 orthogonal core are read as a general core",
    ),
    Mutant(
        "complex_kernel_cast_to_real", "ttconv/spectra.py",
        "    if not weight.is_floating_point():  # a complex kernel's imaginary part would be dropped in the casts",
        "    if False:",
        ("tests/test_spectra.py::test_complex_and_empty_kernels_are_refused_not_cast",),
        "a complex kernel's spectrum is computed from its real part",
    ),
    Mutant(
        "attack_accepts_x_outside_clamp", "ttconv/evaluate.py",
        "    if clamp is not None and x.numel() and (float(x.min()) < clamp[0] or float(x.max()) > clamp[1]):",
        "    if False:",
        ("tests/test_evaluate.py::test_attacks_refuse_inputs_outside_clamp_and_labels_cross_entropy_cannot_take",),
        "an attack clamps an x that lies outside clamp, moving it further than eps",
    ),
    Mutant(
        "pair_quotient_in_float32", "ttconv/evaluate.py",
        "                change = (_in_float64(model, adversarial) - _in_float64(model, x)).flatten(1).norm(dim=1)",
        "                change = (model(adversarial) - model(x)).flatten(1).norm(dim=1).double()",
        ("tests/test_evaluate.py::test_empirical_lipschitz_pairs_stay_below_the_constant_for_tiny_pairs_in_float32",),
        "empirical_lipschitz's pair quotient in the model's float32: round-off lifts it above the true constant",
    ),
    Mutant(
        "probe_without_the_convs_hooks", "ttconv/convert.py",
        "        _carry_over(copied, layer, kernel.weight_frozen, kernel.bias_frozen, kernel.fold_hooks)",
        "        layer.train(copied.training)",
        ("tests/test_convert.py::test_output_search_runs_its_probes_with_the_convs_hooks",),
        "the output search's probes run the SVD layers without the convs' forward hooks the reference ran",
    ),
    Mutant(
        "convs_run_through_other_references_replaced", "ttconv/convert.py",
        "        built = [(candidate, layer) for candidate, layer in built if candidate.name not in still_ran]",
        "        built = list(built)",
        ("tests/test_convert.py::test_convs_the_forward_calls_through_other_references_are_left_and_listed",),
        "a conv the forward calls from a plain list is replaced anyway: the old conv keeps running, untrained",
    ),
    Mutant(
        "jit_convs_not_listed", "ttconv/convert.py",
        "        if isinstance(module, torch.jit.ScriptModule) and getattr(module, \"original_name\", None) in _CONV_NAMES:",
        "        if False:",
        ("tests/test_convert.py::test_convs_compiled_by_torch_jit_are_listed_not_silently_kept",),
        "convert finds no conv in a scripted model and says nothing",
    ),
    Mutant(
        "decompose_drops_the_scale", "ttconv/tt.py",
        "            S=(S * self.scale).reshape(groups * r_out).to(like),",
        "            S=S.reshape(groups * r_out).to(like),",
        ("tests/test_tt.py::test_float64_kernels_at_the_ends_of_the_range_decompose_as_at_scale_one",),
        "the kernel is decomposed at unit scale and S does not take the scale back",
    ),
    Mutant(
        "half_factors_report_the_float64_error", "ttconv/tt.py",
        "        if like.dtype in _HALF_DTYPES and norm_sq > 0:",
        "        if False:",
        ("tests/test_tt.py::test_half_precision_factors_report_the_error_of_their_rounding",),
        "float16/bfloat16 factors report the float64 truncation's error, not their own (0 at full rank)",
    ),
    Mutant(
        "fx_trace_drops_output_size", "ttconv/layer.py",
        "        if output_size is None:\n            return self._forward(input, self.output_padding)",
        "        if output_size is None or isinstance(input, torch.fx.Proxy):\n            return self._forward(input, self.output_padding)",
        ("tests/test_layer_nd.py::test_fx_trace_of_output_size_is_refused_or_kept_by_a_leaf_tracer",),
        "a symbolic trace of a transposed layer called with output_size records the default output size",
    ),
    Mutant(
        "lipschitz_report_for_2d_convs_only", "ttconv/evaluate.py",
        "    if any(isinstance(m, (_ConvNd, _SVDConvNd)) for _, m in modules):",
        "    if any(isinstance(m, (nn.Conv2d, SVDConv)) for _, m in modules):",
        ("tests/test_evaluate.py::test_lipschitz_bound_of_1d_3d_and_transposed_chains_against_explicit_operators",),
        "evaluate.lipschitz_bound asks no report for a chain without a 2-D conv and refuses it as not reached",
    ),
    Mutant(
        "phases_from_polar_at_quarter_turns", "ttconv/spectra.py",
        "    quarter = (4 * turns) % m == 0  # a quarter turn: cos and sin within 1e-16 of -1, 0 or 1, made exact",
        "    quarter = turns < 0",
        ("tests/test_spectra_fast_paths.py::test_self_conjugate_frequencies_are_exactly_real_so_float32_lapack_converges",),
        "phases at quarter turns keep polar's ~1e-16 imaginary noise (complex64 LAPACK then returns NaN)",
    ),
    Mutant(
        "padding_factor_on_refused_sizes", "ttconv/bounds.py",
        "    if n is not None:\n        _check_operator_size(spec, n)\n    extent",
        "    if False:\n        _check_operator_size(spec, n)\n    extent",
        ("tests/test_bounds.py::test_padding_factor_takes_any_conv_and_refuses_sizes_the_layer_refuses",),
        "padding_factor answers for a size the layer refuses (3.0 above its own worst case of 2.0)",
    ),
]


# ------------------------------------------------------------------------ machinery
def _copy_tree(destination: Path, rev: Optional[str]) -> None:
    if rev is None:
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, destination / name,
                                ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc"))
            else:
                shutil.copy2(source, destination / name)
        return
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, *COPIED],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)


def _mutate(text: str, mutant: Mutant) -> str:
    """The mutated text; raises ``LookupError`` when the mutant no longer fits the code."""
    count = text.count(mutant.original)
    if count != 1:
        where = "does not occur" if count == 0 else f"occurs {count} times"
        raise LookupError(f"{mutant.name}: the original text {where} in {mutant.file}; update MUTANTS "
                          f"in .ci/mutation.py to the current code:\n    {mutant.original!r}")
    mutated = text.replace(mutant.original, mutant.replacement)
    before, after = text.splitlines(), mutated.splitlines()
    changed = len(before) == len(after) and sum(a != b for a, b in zip(before, after)) == 1
    if not changed:
        raise LookupError(f"{mutant.name}: the replacement must change exactly one line")
    return mutated


def _environment(root: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a same-size mutant must never meet a stale .pyc
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _pytest(root: Path, tests: Sequence[str], timeout: float) -> Tuple[Optional[int], float, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=_environment(root), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        return None, time.perf_counter() - start, output
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def _first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if not match:
        return "?"
    return match.group(1).split("::", 1)[-1] if "::" in match.group(1) else match.group(1)


def _check_imports_the_copy(root: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import ttconv; print(ttconv.__file__)"], cwd=root,
                           env=_environment(root), capture_output=True, text=True, check=True)
    location = Path(probe.stdout.strip()).resolve()
    if root.resolve() not in location.parents:
        raise SystemExit(f"sanity check failed: the copy imports ttconv from {location}, not from {root}")


def _table(rows: List[Tuple[str, str, str, str]]) -> str:
    header = ("mutant", "result", "killed by", "seconds")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--markdown", action="store_true", help="with --list: a Markdown table (docs/testing.md)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("--rev", help="copy the package and tests from this git revision, not the working tree")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    options = parser.parse_args(argv)

    mutants = MUTANTS
    if options.only:
        unknown = sorted(set(options.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant(s) {unknown}; see --list")
        mutants = [m for m in MUTANTS if m.name in options.only]
    if options.list and options.markdown:
        print("| mutant | file | the one-line change models | killing test |\n|---|---|---|---|")
        for m in mutants:
            tests = "<br>".join(f"`{t.replace('tests/', '')}`" for t in m.tests)
            print(f"| `{m.name}` | `{m.file}` | {m.description} | {tests} |")
        return 0
    if options.list:
        for m in mutants:
            print(f"{m.name:36s} {m.file:20s} {m.description}\n{'':36s} tests: {' '.join(m.tests)}")
        return 0

    root = Path(tempfile.mkdtemp(prefix="ttconv-mutation-"))
    try:
        _copy_tree(root, options.rev)
        originals = {m.file: (root / m.file).read_text() for m in mutants}
        problems = []
        for m in mutants:
            try:
                _mutate(originals[m.file], m)
            except LookupError as error:
                problems.append(str(error))
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2

        _check_imports_the_copy(root)
        selection = list(dict.fromkeys(t for m in mutants for t in m.tests))
        code, seconds, output = _pytest(root, selection, options.timeout)
        if code != 0:
            print(output[-4000:], file=sys.stderr)
            print(f"sanity run failed (exit {code}): the unmutated copy must pass {selection}", file=sys.stderr)
            return 2
        print(f"sanity: unmutated copy imported from {root} passes {len(selection)} selections ({seconds:.1f} s)")

        rows, survived, errors = [], [], []
        start = time.perf_counter()
        for m in mutants:
            path = root / m.file
            path.write_text(_mutate(originals[m.file], m))
            try:
                code, seconds, output = _pytest(root, m.tests, options.timeout)
            finally:
                path.write_text(originals[m.file])
            if code == 1:
                result, by = "killed", _first_failure(output)
            elif code is None:
                result, by = "killed", f"timeout after {options.timeout:.0f} s"
            elif code == 0:
                result, by = "SURVIVED", "-"
                survived.append(m.name)
            else:  # 2: interrupted/collection error, 3: internal, 4: usage, 5: nothing collected
                result, by = "ERROR", f"pytest exit {code}"
                errors.append((m.name, output[-2000:]))
            rows.append((m.name, result, by, f"{seconds:.1f}"))
            print(f"  {m.name}: {result} ({seconds:.1f} s)", flush=True)
        print()
        print(_table(rows))
        print(f"\n{len(rows) - len(survived) - len(errors)}/{len(rows)} killed in {time.perf_counter() - start:.0f} s")
        for name, output in errors:
            print(f"\n{name}: pytest could not run the selection (a stale node id?):\n{output}", file=sys.stderr)
        if errors:
            return 2
        if survived:
            print(f"survived: {', '.join(survived)}: the targeted tests do not detect these changes")
            return 1
        return 0
    finally:
        if options.keep:
            print(f"copy kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
