"""Rounding-error bounds for fp32 arithmetic, so tolerances follow from the computation checked.

``U`` is fp32's unit roundoff (round to nearest): every basic operation returns the exact result
times ``(1 + d)`` with ``|d| <= U``. A dot product of length ``n`` summed in *any* order (any BLAS
blocking, any thread count, SIMD width) is within ``gamma(n) * sum(|x_i y_i|)`` of the exact
value (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5): these bounds hold on
every CPU, unlike a tolerance read off one machine's output.
"""

from __future__ import annotations

import torch

U = 2.0**-24  # fp32 unit roundoff


def gamma(n: int) -> float:
    """``n U / (1 - n U)``: the relative bound of ``n`` accumulated roundings."""
    return n * U / (1 - n * U)


def matmul_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on ``|fl(a @ b) - a @ b|`` for fp32 ``a @ b`` in any summation order."""
    return gamma(a.shape[-1]) * (a.double().abs() @ b.double().abs())
