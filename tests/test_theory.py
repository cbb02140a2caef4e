"""Tests of ``megatron_qk.analysis.theory``: Theorem 2's rho_0 and eq. (12)'s logit-range bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_qk import cli
from megatron_qk.analysis.theory import (
    activation_fn,
    activation_second_moment,
    evaluate_rho,
    extremal_logits,
    gaussian_expectation,
    logit_range_bound,
    max_top_probability,
    nu_from_init,
    rho_zero,
)

# The paper's 270M setting (Section 6 and Appendix B.2).
M, R, NU = 3840, 2560, 0.384
NU_GRID = [1e-4, 1e-2, 0.1, 0.384, 1.0, 3.0, 10.0, 100.0, 1e4]
U64 = 2.0**-53  # float64 unit roundoff
# 0.02**2 * 960: the literal 0.02 (U64, doubled by squaring), two roundings, the literal 0.384.
NU_FROM_INIT_REL = 8 * U64


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------- Theorem 2


def test_paper_numbers_theorem2() -> None:
    """Theorem 2 / eq. (9): GEGLU ~= 0.256, SwiGLU ~= 0.216 at m=3840, r=2560, nu ~= 0.384."""
    assert round(rho_zero(M, R, NU, "gelu"), 3) == 0.256
    assert round(rho_zero(M, R, NU, "silu"), 3) == 0.216
    # nu = sigma^2 ||x||^2 with init_method_std 0.02 and a unit-gain normalized width-960 input.
    assert nu_from_init(0.02, 960) == pytest.approx(NU, rel=NU_FROM_INIT_REL)
    # 0.21626 is the value rounded to 5 decimals: half a unit of the last digit.
    assert rho_zero(M, R, nu_from_init(0.02, 960), "silu") == pytest.approx(0.21626, abs=5e-6)


def test_activations_match_torch() -> None:
    """The exact-erf GELU and SiLU are the functions the models use (torch.nn.functional)."""
    torch = pytest.importorskip("torch")
    x = np.linspace(-9.0, 9.0, 1001)
    t = torch.tensor(x, dtype=torch.float64)
    # Two float64 evaluations of the same formula (erf/tanh/exp within ~1 ulp, a few roundings):
    # rtol 1e-13 (~900 U64) covers them; where 1 + erf(x/sqrt2) or 1 + tanh(x/2) cancels (x << 0)
    # the absolute error is <= |x|/2 * (a few U64 on values <= 2) ~ 9/2 * 2 U64 = 1e-15 = atol.
    np.testing.assert_allclose(
        activation_fn("gelu")(x), torch.nn.functional.gelu(t).numpy(), rtol=1e-13, atol=1e-15
    )
    np.testing.assert_allclose(
        activation_fn("silu")(x), torch.nn.functional.silu(t).numpy(), rtol=1e-13, atol=1e-15
    )
    np.testing.assert_allclose(activation_fn("relu")(x), np.maximum(x, 0.0))


@pytest.mark.parametrize("nu", NU_GRID)
def test_second_moments_match_direct_quadrature(nu: float) -> None:
    """Closed form (GELU) and the sigmoid' identity (SiLU) agree with plain quadrature of act^2."""
    for act in ("gelu", "silu"):
        f = activation_fn(act)
        direct = gaussian_expectation(lambda g, f=f: f(g) ** 2, nu)
        # Trapezoid truncation is exp(-2 pi a / h) ~ nil (module docstring); rounding of a sum of
        # <= 19201 positive terms (nu = 1e4: 12 sqrt(nu) / (1/16) per side) is <= n U64 ~ 2e-12
        # even summed recursively, x2 for SiLU's nu/2 - E[...] at small nu: 1e-11.
        assert activation_second_moment(act, nu) == pytest.approx(direct, rel=1e-11)
    assert activation_second_moment("relu", nu) == nu / 2


def test_quadrature_matches_gauss_hermite_and_moments() -> None:
    """The trapezoid rule agrees with 200-node Gauss-Hermite and with Gaussian moments."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    weights = weights / weights.sum()
    for act in ("gelu", "silu"):
        f = activation_fn(act)
        gh = float(np.sum(weights * f(math.sqrt(NU) * nodes) ** 2))
        # Sums of 200 (Gauss-Hermite) and 385 (trapezoid) positive terms: <= 585 U64 ~ 6.5e-14
        # worst case; both rules' truncation errors are far below for these analytic integrands.
        assert activation_second_moment(act, NU) == pytest.approx(gh, rel=1e-13)
    for nu in (0.01, NU, 50.0):
        # Polynomial x Gaussian: truncation nil (12-sigma window, smooth); sums of <= 385
        # positive terms: <= 385 U64 ~ 4.3e-14 worst case.
        assert gaussian_expectation(lambda g: g**2, nu) == pytest.approx(nu, rel=1e-13)
        assert gaussian_expectation(lambda g: g**4, nu) == pytest.approx(3 * nu**2, rel=1e-13)


def test_second_moments_against_monte_carlo() -> None:
    """E[act(G)^2] within 5 standard errors of a fixed-seed 400k-sample Monte Carlo estimate."""
    rng = np.random.default_rng(1234)
    g = rng.standard_normal(400_000) * math.sqrt(NU)
    for act in ("gelu", "silu"):
        samples = activation_fn(act)(g) ** 2
        se = samples.std() / math.sqrt(samples.size)
        assert se < 5e-3 * samples.mean()  # 5 SE < 2.5%, sharp next to SwiGLU/GEGLU's 15% gap
        assert abs(samples.mean() - activation_second_moment(act, NU)) < 5 * se


def test_theorem2_against_simulated_ffns() -> None:
    """Eqs. (41)-(43) with random Gaussian weights: both energies and their ratio, fixed seed."""
    rng = np.random.default_rng(7)
    d, m, r, k, trials = 16, 24, 16, 8, 12_000
    sigma = math.sqrt(NU / d)  # x is normalized to ||x||^2 = d, so sigma^2 ||x||^2 = NU
    x = rng.standard_normal(d)
    x *= math.sqrt(d) / np.linalg.norm(x)
    gelu, silu = activation_fn("gelu"), activation_fn("silu")
    w_i = rng.standard_normal((trials, m, d)) * sigma
    w_o = rng.standard_normal((trials, k, m))  # tau_s = 1; P_out keeps k of the d outputs
    single = np.sum((w_o @ gelu(w_i @ x)[..., None])[..., 0] ** 2, axis=-1)
    w_g = rng.standard_normal((trials, r, d)) * sigma
    w_u = rng.standard_normal((trials, r, d)) * sigma
    w_o_gate = rng.standard_normal((trials, k, r))  # tau_g = tau_s
    gated = np.sum((w_o_gate @ (silu(w_g @ x) * (w_u @ x))[..., None])[..., 0] ** 2, axis=-1)

    se_single = single.std() / math.sqrt(trials)
    se_gated = gated.std() / math.sqrt(trials)
    assert abs(single.mean() - k * m * activation_second_moment("gelu", NU)) < 5 * se_single
    assert abs(gated.mean() - k * r * NU * activation_second_moment("silu", NU)) < 5 * se_gated
    ratio = gated.mean() / single.mean()
    se_ratio = ratio * math.hypot(se_single / single.mean(), se_gated / gated.mean())
    assert se_ratio < 0.02 * ratio
    assert abs(ratio - rho_zero(m, r, NU, "silu")) < 5 * se_ratio


def test_rho_scaling_and_monotonicity() -> None:
    """Facts from eq. (44): linear in r and in tau ratio, inverse in m, GEGLU = (r/m) nu."""
    for gate in ("gelu", "silu"):
        base = rho_zero(M, R, NU, gate)
        # Exact: doubling r, halving via 2m or the 0.5 ratio scales r/m (a correctly rounded
        # quotient) or the first factor by a power of 2, and every later rounding follows it.
        assert rho_zero(M, 2 * R, NU, gate) == 2 * base
        assert rho_zero(2 * M, R, NU, gate) == base / 2
        assert rho_zero(M, R, NU, gate, output_variance_ratio=0.5) == base / 2
        values = [rho_zero(M, R, nu, gate) for nu in NU_GRID]
        assert all(a < b for a, b in zip(values, values[1:], strict=False))
    for nu in NU_GRID:
        # psi = phi: the moment ratio cancels and rho_0 = (r/m) nu, below 1 iff nu < m/r.
        # (r/m) nu * g / g with the same g: one product and one division, <= 2 U64 + U64^2.
        assert rho_zero(M, R, nu, "gelu") == pytest.approx(R / M * nu, rel=3 * U64)
        # SwiGLU injects less energy than GEGLU at every nu ...
        assert rho_zero(M, R, nu, "silu") < rho_zero(M, R, nu, "gelu")
    # ... but the SiLU/GELU moment ratio tends to 1 at both ends (both act like x/2, then relu).
    ratio = [rho_zero(M, R, nu, "silu") / rho_zero(M, R, nu, "gelu") for nu in (1e-8, 1e8)]
    # Expanding both moments: ratio - 1 ~ (3/16 - 3/(2 pi)) / (1/4) nu ~ -1.2e-8 at nu = 1e-8,
    # and O(nu^-1.5) ~ 1e-12 at 1e8 (quadrature at rounding level); a wrong limit is O(0.1).
    assert ratio == pytest.approx([1.0, 1.0], abs=1e-6)
    # The same operations in the same order: exact.
    assert rho_zero(M, R, NU, "silu", single_activation="relu") == (
        R / M * NU * activation_second_moment("silu", NU) / (NU / 2)
    )


def test_evaluate_rho_reports_moments() -> None:
    results = {r.gated_ffn: r for r in evaluate_rho(M, R, NU)}
    assert set(results) == {"GEGLU", "SwiGLU"}
    swiglu = results["SwiGLU"]
    assert swiglu.rho_zero == rho_zero(M, R, NU, "silu")
    # 1.0 * nu * gate: the same single rounding as nu * gate.
    assert swiglu.gated_unit_energy == NU * swiglu.gate_second_moment
    # ((r/m) nu) gate vs (r/m) (nu gate): each product of three within 2 roundings: <= 4 U64.
    assert swiglu.rho_zero == pytest.approx(
        R / M * swiglu.gated_unit_energy / swiglu.single_unit_energy, rel=5 * U64
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"single_width": 0}, "single_width"),
        ({"single_width": -3}, "single_width"),
        ({"gated_width": 2.5}, "gated_width"),
        ({"nu": 0.0}, "nu"),
        ({"nu": -1.0}, "nu"),
        ({"nu": float("nan")}, "nu"),
        ({"gate_activation": "relu"}, "gate_activation"),
        ({"single_activation": "tanh"}, "single_activation"),
        ({"output_variance_ratio": 0.0}, "output_variance_ratio"),
    ],
)
def test_rho_zero_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"single_width": M, "gated_width": R, "nu": NU, "gate_activation": "silu"} | kwargs
    with pytest.raises(ValueError, match=match):
        rho_zero(**args)


# ------------------------------------------------------------------------------- eq. (12)


@pytest.mark.parametrize("num_keys", [2, 3, 17, 1024])
@pytest.mark.parametrize("epsilon", [1e-9, 1e-3, 0.1, 0.4])
def test_logit_range_bound_is_attained(num_keys: int, epsilon: float) -> None:
    """Eq. (12) with equality: one logit L above N-1 equal ones gets exactly 1 - eps."""
    bound = logit_range_bound(num_keys, epsilon)
    # Three logs (<= 1 ulp each) and two additions per side, terms summing to <= 3.5x the result
    # (N=2, eps=0.4): <= 2 * 6 U64 * 3.5 = 42 U64 ~ 4.7e-15.
    assert bound == pytest.approx(math.log((num_keys - 1) * (1 - epsilon) / epsilon), rel=1e-14)
    z = extremal_logits(num_keys, epsilon)
    assert z.max() - z.min() == bound  # exact: bound - 0.0
    # A sum of N <= 1024 terms: <= N U64 ~ 1.1e-13 worst case, plus exp/divide and L's error
    # times (1 - p): a few U64.
    assert _softmax(z)[0] == pytest.approx(1 - epsilon, rel=1e-12)
    # 1 / (1 + (N-1) exp(-L)): 4 roundings + exp's ulp, plus L's <= 42 U64 * 30 absolute error
    # times (1 - p) <= 0.6: < 1e-13.
    assert max_top_probability(num_keys, bound) == pytest.approx(1 - epsilon, rel=1e-13)


def test_logit_range_bound_against_random_softmax() -> None:
    """No logits with range below the bound give any key probability >= 1 - eps."""
    rng = np.random.default_rng(0)
    for num_keys, epsilon in [(2, 0.2), (8, 0.05), (64, 0.1), (1024, 0.01)]:
        bound = logit_range_bound(num_keys, epsilon)
        z = rng.standard_normal((2000, num_keys)) * rng.uniform(0.1, 5.0, (2000, 1))
        z[:500, 0] += rng.uniform(0.0, 3 * bound, 500)  # some near-one-hot rows
        rng_z = z.max(-1) - z.min(-1)
        top = _softmax(z).max(-1)
        # Slack 1e-12: softmax of <= 1024 terms is within N U64 ~ 1.1e-13 (worst case) of p.
        assert np.all(top <= [max_top_probability(num_keys, x) + 1e-12 for x in rng_z])
        assert np.all(top[rng_z < bound] < 1 - epsilon)
        reached = top >= 1 - epsilon
        assert reached.any()  # the check has teeth: some rows concentrate enough
        # Slack 1e-12: range (one subtraction) and bound (three logs) are each within ~1e-14.
        assert np.all(rng_z[reached] >= bound - 1e-12)
        # Scaling a random configuration to range just below the bound never reaches 1 - eps.
        scaled = z / rng_z[:, None] * bound * (1 - 1e-9)
        assert np.all(_softmax(scaled).max(-1) < 1 - epsilon)


def test_logit_range_bound_monotone_and_edge_cases() -> None:
    keys = [2, 4, 16, 256, 4096]
    values = [logit_range_bound(n, 0.05) for n in keys]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    eps = [1e-12, 1e-6, 1e-2, 0.3]
    values = [logit_range_bound(64, e) for e in eps]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    # log(1024) + log1p(-0.5) - log(0.5): the last two cancel up to their 1-ulp libm errors,
    # two additions round by <= U64 * 6.93: < 5 U64 ~ 6e-16.
    assert logit_range_bound(1025, 0.5) == pytest.approx(math.log(1024), rel=1e-15)
    # Tiny eps: log((N-1)(1-eps)/eps) evaluated without cancellation.
    # log(1e-300) within 1 ulp (the literal's U64 shifts it by U64 only), 300 log(10) within
    # 1 ulp + 1 rounding: <= 3 U64 ~ 3.3e-16.
    assert logit_range_bound(2, 1e-300) == pytest.approx(300 * math.log(10), rel=1e-15)
    # Vacuous regime: uniform attention already gives 1/N >= 1 - eps.
    assert logit_range_bound(1, 0.1) == 0.0
    assert logit_range_bound(4, 0.8) == 0.0
    # log 3 + log1p(-0.75) - log(0.75) = 0 up to 3 libm ulps and 2 roundings on values <= 1.39:
    # <= 2.2e-16 * 3 + 1.1e-16 * 2 ~ 8.8e-16.
    assert logit_range_bound(4, 0.75) == pytest.approx(0.0, abs=1e-15)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            logit_range_bound(8, bad)
    with pytest.raises(ValueError, match="num_keys"):
        logit_range_bound(0, 0.1)
    with pytest.raises(ValueError, match="logit_range"):
        max_top_probability(8, -1.0)


# ------------------------------------------------------------------------------- CLI


@pytest.fixture
def theory_only_cli() -> None:
    """``cli.main`` configures only the subcommand it runs, so no megatron-core import here."""


def test_cli_rho_end_to_end(theory_only_cli: None, capsys: pytest.CaptureFixture[str]) -> None:
    """``megatron-qk theory rho`` with the paper's setting prints both paper numbers."""
    argv = ["theory", "rho", "--single-width", "3840", "--gated-width", "2560", "--nu", "0.384"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "GEGLU" in out and "rho_0 = 0.2560" in out
    assert "SwiGLU" in out and "rho_0 = 0.2163" in out


def test_cli_rho_json_and_init_std(
    theory_only_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["theory", "rho", "--single-width", "3840", "--gated-width", "2560"]
    assert cli.main([*argv, "--init-std", "0.02", "--hidden-size", "960", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["nu"] == pytest.approx(NU, rel=NU_FROM_INIT_REL)  # JSON round-trips exactly
    assert [r["gated_ffn"] for r in payload["results"]] == ["GEGLU", "SwiGLU"]
    assert [round(r["rho_zero"], 3) for r in payload["results"]] == [0.256, 0.216]

    assert cli.main([*argv, "--nu", "0.384", "--gate-activation", "silu", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["results"]) == 1
    assert payload["results"][0]["rho_zero"] == rho_zero(M, R, NU, "silu")

    assert cli.main([*argv, "--nu", "0.384", "--gate-activation", "gelu"]) == 0
    out = capsys.readouterr().out
    assert "GEGLU" in out and "SwiGLU" not in out


def test_cli_logit_range(theory_only_cli: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["theory", "logit-range", "--num-keys", "1024", "--epsilon", "0.1"]) == 0
    out = capsys.readouterr().out
    assert f"{math.log(1023 * 0.9 / 0.1):.4f}" in out
    assert cli.main(["theory", "logit-range", "--num-keys", "3", "--epsilon", "0.9", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload == {"equation": "(12)", "num_keys": 3, "epsilon": 0.9, "logit_range_bound": 0.0}


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["rho", "--single-width", "-3", "--gated-width", "2560", "--nu", "0.4"], "--single-width"),
        (["rho", "--single-width", "3840", "--gated-width", "0", "--nu", "0.4"], "--gated-width"),
        (["rho", "--single-width", "3840", "--gated-width", "2560", "--nu", "0"], "--nu"),
        (["rho", "--single-width", "3840", "--gated-width", "2560", "--nu", "x"], "--nu"),
        (
            [
                "rho",
                "--single-width",
                "3",
                "--gated-width",
                "2",
                "--nu",
                "1",
                "--gate-activation",
                "relu",
            ],
            "--gate-activation",
        ),
        (["rho", "--single-width", "3840", "--gated-width", "2560"], "--nu"),
        (["logit-range", "--num-keys", "8", "--epsilon", "1"], "--epsilon"),
        (["logit-range", "--num-keys", "8", "--epsilon", "0"], "--epsilon"),
        (["logit-range", "--num-keys", "0", "--epsilon", "0.1"], "--num-keys"),
        ([], "QUANTITY"),
    ],
)
def test_cli_rejects_bad_input(
    theory_only_cli: None, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["theory", *argv])
    assert excinfo.value.code == 2
    assert flag in capsys.readouterr().err


def test_cli_init_std_needs_hidden_size(
    theory_only_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["theory", "rho", "--single-width", "3840", "--gated-width", "2560"]
    assert cli.main([*argv, "--init-std", "0.02"]) == 2
    assert "--init-std needs --hidden-size" in capsys.readouterr().err
    assert cli.main([*argv, "--nu", "0.384", "--hidden-size", "960"]) == 2
    assert "--hidden-size needs --init-std" in capsys.readouterr().err


def test_module_exposes_cli_contract() -> None:
    from megatron_qk.cli import theory as theory_cli

    assert cli.SUBCOMMANDS["theory"][0] == theory_cli.__name__
    assert callable(theory_cli.configure_parser) and callable(theory_cli.run)
