"""The ablation's paired standard error matches the spread of the increase over resamples."""

import math

import torch

from megatron_qk.diagnostics.ablation import ppl_increase_se


def test_delta_method_standard_error_matches_monte_carlo_spread():
    """Sequences of 64 tokens: per-sequence mean loss ~ N(3, 0.3^2), ablation adds ~ N(0.05,
    0.02^2). Over 2000 independent samples of 200 sequences the reported standard error agrees
    with the actual standard deviation of the increase: the sd estimate from 2000 samples has
    relative error ~1/sqrt(2 * 2000) = 1.6%, the delta method's bias at N = 200 is well below
    that, so 8% is a wide margin that a wrong formula (e.g. unpaired errors, ~15x too large, or
    a missing sqrt(N)) cannot meet."""
    gen = torch.Generator().manual_seed(0)
    n_seq, tokens, reps = 200, 64, 2000
    counts = torch.full((n_seq,), float(tokens), dtype=torch.float64)
    increases, errors = [], []
    for _ in range(reps):
        base = 3.0 + 0.3 * torch.randn(n_seq, generator=gen, dtype=torch.float64)
        delta = 0.05 + 0.02 * torch.randn(n_seq, generator=gen, dtype=torch.float64)
        increase, se = ppl_increase_se(base * tokens, (base + delta) * tokens, counts)
        increases.append(increase)
        errors.append(se)
    spread = torch.tensor(increases).std().item()
    mean_se = sum(errors) / reps
    assert abs(mean_se / spread - 1) < 0.08, (mean_se, spread)
    # And the increase itself is exp(L_a) - exp(L_b) of the pooled losses.
    inc, _ = ppl_increase_se(
        torch.tensor([3.0, 5.0], dtype=torch.float64) * 10,
        torch.tensor([3.5, 5.5], dtype=torch.float64) * 10,
        torch.tensor([10.0, 10.0], dtype=torch.float64),
    )
    assert inc == math.exp(4.5) - math.exp(4.0)
    _, single = ppl_increase_se(counts[:1] * 3, counts[:1] * 4, counts[:1])
    assert math.isnan(single)
