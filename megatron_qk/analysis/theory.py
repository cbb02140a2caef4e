"""The paper's closed-form theory quantities, evaluated exactly (CLI: ``megatron-qk theory``).

Two results of Section 6 / Appendix B of the paper are turned into numbers here:

**Theorem 2 (eqs. 9, 41-44): early gated-FFN output contraction.** A single-branch FFN
``F_single(x) = W_o phi(W_i x)`` of hidden width ``m`` and a gated FFN
``F_gate(x) = W~_o [psi(W_g x) * (W_u x)]`` of gated width ``r`` are compared at initialization,
with ``W_i, W_g, W_u ~ N(0, sigma^2)`` and output projections of variances ``tau_s^2``/``tau_g^2``.
For an input ``x`` put ``nu = sigma^2 ||x||_2^2`` and ``G_nu ~ N(0, nu)``. Every pre-activation
``a_i^T x`` is then distributed as ``G_nu``, so (eqs. 45-48)

* ``E ||P_out F_single(x)||^2 = rank(P_out) tau_s^2 m E[phi(G_nu)^2]``            (41)
* ``E ||P_out F_gate(x)||^2   = rank(P_out) tau_g^2 r nu E[psi(G_nu)^2]``          (42)

and their ratio is (eqs. 9, 43, 44)::

    rho_0 = (tau_g^2 / tau_s^2) * (r / m) * nu * E[psi(G_nu)^2] / E[phi(G_nu)^2].

The up branch ``W_u x`` contributes the factor ``E[G_nu^2] = nu`` (eq. 48); that factor, below one
for the paper's initialization, is where the contraction comes from.

*Reading that reproduces the paper's numbers.* "Matched initialization" means
``tau_g = tau_s`` (Megatron initializes both output projections with the same
``output_layer_init_method``), the single-branch activation ``phi`` is the exact (erf) GELU, and
``nu = sigma^2 ||x||^2`` with ``sigma = init_method_std = 0.02`` and a LayerNorm/RMSNorm output
with unit gain, ``||x||^2 = d = 960``: ``nu = 0.02^2 * 960 = 0.384``. With ``m = 3840`` and
``r = 2560``:

* GEGLU (``psi = phi = GELU``): the moment ratio is exactly 1 and ``rho_0 = (2/3) * 0.384 = 0.256``;
* SwiGLU (``psi = SiLU``): ``E[SiLU(G)^2] / E[GELU(G)^2] = 0.84476`` and ``rho_0 = 0.21626``,
  the paper's 0.216.

*How the expectations are computed.* ``E[GELU(G_nu)^2]`` has a closed form, derived with Stein's
identity ``E[Z^2 f(Z)] = E[f(Z)] + E[f''(Z)]`` and
``E[Phi(aZ)^2] = 1/4 + arcsin(a^2/(1+a^2))/(2 pi)`` for ``Z ~ N(0, 1)``::

    E[GELU(G_nu)^2] = nu * (1/4 + arcsin(nu / (1 + nu)) / (2 pi)
                            + nu / (pi (1 + nu) sqrt(1 + 2 nu))).

``E[ReLU(G_nu)^2] = nu / 2``. SiLU has no closed form; with ``sigmoid(g)^2 + sigmoid(-g)^2 =
1 - 2 sigmoid'(g)`` and the symmetry of ``G_nu``, ``E[SiLU(G_nu)^2] = nu/2 - E[G_nu^2
sigmoid'(G_nu)]``, and the remaining expectation (whose integrand decays like ``e^{-|g|}``) is a
trapezoid sum on a uniform grid. The trapezoid rule converges geometrically for integrands
analytic in a strip around the real axis (error ~ ``exp(-2 pi a / h)``, ``a`` the strip
half-width); the step ``h = min(sqrt(nu), 1) / 16`` keeps both the Gaussian scale and sigmoid's
poles at ``+-i pi`` far beyond that, so the result is accurate to rounding for every ``nu > 0``
with at most a few thousand nodes. :func:`gaussian_expectation` exposes the same rule for any
function (the tests check it against Gauss-Hermite, the closed form and Monte Carlo).

**Eq. (12): logit range needed for low-entropy attention.** If one of ``N`` causal keys receives
softmax probability ``p_i >= 1 - eps``, then ``max_j z_j - min_j z_j >= log((N-1)(1-eps)/eps)``.
Proof: ``p_i = 1 / (1 + sum_{j != i} exp(z_j - z_i))`` and each ``z_j - z_i >= -(max - min)``, so
``p_i <= 1 / (1 + (N-1) exp(-range))`` (:func:`max_top_probability`); solving
``1 / (1 + (N-1) exp(-range)) >= 1 - eps`` for ``range`` gives eq. (12). The bound is achieved by
one logit ``L = log((N-1)(1-eps)/eps)`` above ``N-1`` equal others (:func:`extremal_logits`). When
``eps >= (N-1)/N`` the right-hand side is ``<= 0`` and the uniform distribution (range 0) already
qualifies, so :func:`logit_range_bound` returns ``max(0, log(...))``, the smallest achievable range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ACTIVATIONS = ("gelu", "silu", "relu")
GATE_ACTIVATIONS = ("gelu", "silu")
# The paper's names for a gated FFN with each gate activation.
GATED_FFN_NAMES = {"gelu": "GEGLU", "silu": "SwiGLU", "relu": "ReGLU"}

# Trapezoid grid: step = min(sqrt(nu), 1) / _STEPS_PER_SCALE, window = _GAUSS_WINDOW std devs.
_STEPS_PER_SCALE = 16
_GAUSS_WINDOW = 12.0
# |g| beyond which g^2 sigmoid'(g) is below e^-75 relative to its peak (used for SiLU).
_SIGMOID_WINDOW = 80.0


def _check_nu(nu: float) -> float:
    nu = float(nu)
    if not math.isfinite(nu) or nu <= 0.0:
        raise ValueError(f"nu must be a finite number > 0 (nu = sigma^2 ||x||^2), got {nu!r}")
    return nu


def _check_activation(activation: str, allowed: tuple[str, ...], name: str) -> str:
    if activation not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {activation!r}")
    return activation


def _check_width(width: int, name: str) -> int:
    if isinstance(width, bool) or not isinstance(width, int | np.integer) or width < 1:
        raise ValueError(f"{name} must be a positive integer, got {width!r}")
    return int(width)


def activation_fn(activation: str) -> Callable[[np.ndarray], np.ndarray]:
    """Return the elementwise activation ``activation`` as a numpy function.

    Args:
        activation: ``"gelu"`` (exact erf form ``x Phi(x)``, not the tanh approximation),
            ``"silu"`` (``x sigmoid(x)``) or ``"relu"``.

    Returns:
        A function mapping an array to an array of the same shape.

    Raises:
        ValueError: for an unknown activation name.
    """
    _check_activation(activation, ACTIVATIONS, "activation")
    if activation == "gelu":
        erf = np.vectorize(math.erf, otypes=[float])
        return lambda x: 0.5 * x * (1.0 + erf(np.asarray(x, dtype=float) / math.sqrt(2.0)))
    if activation == "silu":
        return lambda x: x * (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float))))
    return lambda x: np.maximum(np.asarray(x, dtype=float), 0.0)


def gaussian_expectation(
    fn: Callable[[np.ndarray], np.ndarray], nu: float, *, window: float | None = None
) -> float:
    """``E[fn(G)]`` for ``G ~ N(0, nu)`` by the trapezoid rule on a uniform grid.

    The grid has step ``min(sqrt(nu), 1) / 16`` and covers ``|g| <= 12 sqrt(nu)`` (or ``window``
    if smaller, for integrands that decay faster than the Gaussian). For ``fn`` analytic in the
    strip ``|Im g| < a`` with ``a`` of order one or more (GELU, SiLU and their squares: SiLU's
    nearest singularities are at ``+-i pi``) the error is ``O(exp(-2 pi a / h))``, i.e. at
    rounding level; non-smooth functions (ReLU) converge only algebraically.

    Args:
        fn: Vectorised function of a 1-D float array.
        nu: Variance of ``G`` (> 0).
        window: Optional half-width of the integration interval (absolute units).

    Returns:
        The expectation as a float.
    """
    nu = _check_nu(nu)
    scale = math.sqrt(nu)
    half = _GAUSS_WINDOW * scale if window is None else min(_GAUSS_WINDOW * scale, float(window))
    step = min(scale, 1.0) / _STEPS_PER_SCALE
    n = int(math.ceil(half / step))
    g = np.arange(-n, n + 1, dtype=float) * step
    density = np.exp(-g * g / (2.0 * nu)) / math.sqrt(2.0 * math.pi * nu)
    return float(step * np.sum(np.asarray(fn(g), dtype=float) * density))


def activation_second_moment(activation: str, nu: float) -> float:
    """``E[act(G_nu)^2]`` for ``G_nu ~ N(0, nu)``: the per-unit energy in eqs. (41)/(42), (46)/(48).

    GELU uses the closed form
    ``nu (1/4 + arcsin(nu/(1+nu))/(2 pi) + nu / (pi (1+nu) sqrt(1+2nu)))`` (see the module
    docstring for the derivation), ReLU ``nu / 2``, SiLU ``nu/2 - E[G^2 sigmoid'(G)]`` with the
    last term by :func:`gaussian_expectation`.

    Args:
        activation: ``"gelu"``, ``"silu"`` or ``"relu"``.
        nu: Pre-activation variance ``nu = sigma^2 ||x||^2`` (> 0).

    Returns:
        The second moment as a float.
    """
    _check_activation(activation, ACTIVATIONS, "activation")
    nu = _check_nu(nu)
    if activation == "relu":
        return nu / 2.0
    if activation == "gelu":
        return nu * (
            0.25
            + math.asin(nu / (1.0 + nu)) / (2.0 * math.pi)
            + nu / (math.pi * (1.0 + nu) * math.sqrt(1.0 + 2.0 * nu))
        )

    def g2_dsigmoid(g: np.ndarray) -> np.ndarray:
        return g * g * 0.25 / np.cosh(0.5 * g) ** 2

    return nu / 2.0 - gaussian_expectation(g2_dsigmoid, nu, window=_SIGMOID_WINDOW)


def nu_from_init(init_std: float, hidden_size: int) -> float:
    """``nu = sigma^2 ||x||^2`` for a unit-gain LayerNorm/RMSNorm input, ``||x||^2 = hidden_size``.

    Args:
        init_std: Standard deviation ``sigma`` of the FFN input weights (``init_method_std``).
        hidden_size: Model width ``d``.

    Returns:
        ``init_std**2 * hidden_size`` (0.384 for the paper's 270M model: 0.02, 960).
    """
    if not math.isfinite(init_std) or init_std <= 0.0:
        raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
    return float(init_std) ** 2 * _check_width(hidden_size, "hidden_size")


def rho_zero(
    single_width: int,
    gated_width: int,
    nu: float,
    gate_activation: str,
    *,
    single_activation: str = "gelu",
    output_variance_ratio: float = 1.0,
) -> float:
    """Theorem 2's gated-to-single FFN output-energy ratio ``rho_0`` (eqs. 9, 43, 44).

    ``rho_0 = (tau_g^2/tau_s^2) (r/m) nu E[psi(G_nu)^2] / E[phi(G_nu)^2]`` with ``G_nu ~ N(0, nu)``.

    Args:
        single_width: Hidden width ``m`` of the single-branch FFN (3840 in the paper).
        gated_width: Gated width ``r`` of the gated FFN (2560 in the paper).
        nu: ``sigma^2 ||x||^2``, the pre-activation variance (0.384 in the paper, see
            :func:`nu_from_init`).
        gate_activation: Gate activation ``psi``: ``"gelu"`` (GEGLU) or ``"silu"`` (SwiGLU).
        single_activation: Activation ``phi`` of the single-branch FFN (GELU in the paper).
        output_variance_ratio: ``tau_g^2 / tau_s^2``; 1 under matched initialization.

    Returns:
        ``rho_0`` (0.256 for GEGLU and 0.2163 for SwiGLU at the paper's setting).

    Raises:
        ValueError: naming the offending argument.
    """
    m = _check_width(single_width, "single_width")
    r = _check_width(gated_width, "gated_width")
    nu = _check_nu(nu)
    _check_activation(gate_activation, GATE_ACTIVATIONS, "gate_activation")
    _check_activation(single_activation, ACTIVATIONS, "single_activation")
    if not math.isfinite(output_variance_ratio) or output_variance_ratio <= 0.0:
        raise ValueError(f"output_variance_ratio must be > 0, got {output_variance_ratio!r}")
    gate = activation_second_moment(gate_activation, nu)
    single = activation_second_moment(single_activation, nu)
    return float(output_variance_ratio) * (r / m) * nu * gate / single


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in the open interval (0, 1), got {epsilon!r}")
    return epsilon


def logit_range_bound(num_keys: int, epsilon: float) -> float:
    """Smallest logit range ``max_j z_j - min_j z_j`` letting one of ``N`` keys get ``>= 1 - eps``.

    Eq. (12): ``range >= log((N-1)(1-eps)/eps)``, evaluated as
    ``log(N-1) + log1p(-eps) - log(eps)`` for accuracy at tiny ``eps``. The bound is tight (see
    :func:`extremal_logits`); when it is negative (``eps >= (N-1)/N``, including ``N = 1``) the
    uniform distribution already qualifies and 0 is returned.

    Args:
        num_keys: Number ``N >= 1`` of causal keys the query attends over.
        epsilon: Probability mass ``eps`` in ``(0, 1)`` left to the other keys.

    Returns:
        The minimal logit range (in logit units, i.e. after the ``1/sqrt(d_k)`` scaling).
    """
    n = _check_width(num_keys, "num_keys")
    eps = _check_epsilon(epsilon)
    if n == 1:
        return 0.0
    return max(0.0, math.log(n - 1) + math.log1p(-eps) - math.log(eps))


def max_top_probability(num_keys: int, logit_range: float) -> float:
    """The largest softmax probability any of ``N`` keys can get when the logit range is ``R``.

    ``p_max = 1 / (1 + (N-1) exp(-R))``: the inverse of eq. (12).

    Args:
        num_keys: Number ``N >= 1`` of keys.
        logit_range: ``max_j z_j - min_j z_j >= 0``.

    Returns:
        The supremum of ``max_i softmax(z)_i`` over logits with that range (attained).
    """
    n = _check_width(num_keys, "num_keys")
    if not logit_range >= 0.0:
        raise ValueError(f"logit_range must be >= 0, got {logit_range!r}")
    return 1.0 / (1.0 + (n - 1) * math.exp(-float(logit_range)))


def extremal_logits(num_keys: int, epsilon: float) -> np.ndarray:
    """Logits attaining eq. (12) with equality: ``[L, 0, ..., 0]``.

    ``L`` is :func:`logit_range_bound`. For ``eps < (N-1)/N`` the first key's softmax
    probability is exactly ``1 - eps``.
    """
    out = np.zeros(_check_width(num_keys, "num_keys"))
    out[0] = logit_range_bound(num_keys, epsilon)
    return out


@dataclass(frozen=True)
class RhoResult:
    """One evaluation of Theorem 2 for a gate activation."""

    gated_ffn: str
    gate_activation: str
    rho_zero: float
    gate_second_moment: float
    single_second_moment: float
    gated_unit_energy: float
    single_unit_energy: float


def evaluate_rho(
    single_width: int,
    gated_width: int,
    nu: float,
    gate_activations: tuple[str, ...] = GATE_ACTIVATIONS,
    *,
    single_activation: str = "gelu",
    output_variance_ratio: float = 1.0,
) -> list[RhoResult]:
    """:func:`rho_zero` with its intermediate moments, for each gate activation.

    ``gated_unit_energy = tau_g^2/tau_s^2 * nu E[psi^2]`` (eq. 48) and
    ``single_unit_energy = E[phi^2]`` (eq. 46) are the per-hidden-unit energies.
    """
    single = activation_second_moment(single_activation, _check_nu(nu))
    results = []
    for act in gate_activations:
        gate = activation_second_moment(
            _check_activation(act, GATE_ACTIVATIONS, "gate_activation"), nu
        )
        results.append(
            RhoResult(
                gated_ffn=GATED_FFN_NAMES[act],
                gate_activation=act,
                rho_zero=rho_zero(
                    single_width,
                    gated_width,
                    nu,
                    act,
                    single_activation=single_activation,
                    output_variance_ratio=output_variance_ratio,
                ),
                gate_second_moment=gate,
                single_second_moment=single,
                gated_unit_energy=output_variance_ratio * nu * gate,
                single_unit_energy=single,
            )
        )
    return results
