"""``ttconv._linalg``: the tall orientation for single real matrices' singular values."""

import pytest
import torch

from oracle import svdvals_cpu
from ttconv._linalg import matrix_two_norm, tall


def test_tall_transposes_only_wide_matrices_as_a_view():
    wide, square, tall_one = torch.randn(2, 3, 5), torch.randn(4, 4), torch.randn(6, 2)
    assert tall(wide).shape == (2, 5, 3) and tall(wide).data_ptr() == wide.data_ptr()
    assert tall(square) is square and tall(tall_one) is tall_one


@pytest.mark.parametrize("shape", [(5, 40), (40, 5), (3, 7, 30), (6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_two_norm_is_the_largest_singular_value_with_its_gradient(shape, dtype):
    matrix = torch.randn(*shape, dtype=torch.float64).to(dtype).requires_grad_()
    value = matrix_two_norm(matrix)
    expected = svdvals_cpu(matrix)[..., 0]
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(value.double(), expected, rtol=tolerance, atol=0)
    # d sigma_max / dM = u v^T (a simple top singular value): the same as torch's own norm's.
    (grad,) = torch.autograd.grad(value.sum(), matrix)
    reference = matrix.detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(torch.linalg.matrix_norm(reference, ord=2).sum(), reference)
    torch.testing.assert_close(grad, expected_grad, rtol=10 * tolerance, atol=10 * tolerance)
