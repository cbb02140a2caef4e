"""The resume path under Apex/Transformer Engine's ``FusedAdam``, checked on the CPU.

TE is not installed here, so the distributed optimizer's inner ``torch.optim.AdamW`` is given the
one property of ``FusedAdam`` that matters for a load (TE ``optimizers/fused_adam.py``): its
``state_dict`` converts each per-parameter state entry through a map from state name to dtype
that knows only ``exp_avg``, ``exp_avg_sq`` and ``master_param`` (``step`` lives in the param
groups), and Megatron's ``HAVE_APEX_OR_TE`` flag is set as it is where TE imports.
"""

from __future__ import annotations

import pytest
import torch

from megatron_qk.config.loader import load_config


class DtypeMapAdam(torch.optim.AdamW):
    """``AdamW`` with ``FusedAdam``'s state-dict contract: unknown per-parameter keys raise."""

    name_to_dtype_map = {
        "exp_avg": torch.float32,
        "exp_avg_sq": torch.float32,
        "master_param": torch.float32,
    }

    def state_dict(self):
        out = super().state_dict()
        for state in out["state"].values():
            for name in state:
                _ = self.name_to_dtype_map[name]  # KeyError: 'step', as FusedAdam raises
        return out


def _distributed_optimizer(tmp_path):
    from megatron_qk.training.distributed import setup_distributed
    from megatron_qk.training.loop import Trainer

    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={tmp_path / 'run'}",
            "parallel.use_distributed_optimizer=true",
            "logging.progress_bar=false",
        ],
    )
    trainer = Trainer(cfg, setup_distributed(cfg))
    chained = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return trainer.optimizer, chained[0]


@pytest.mark.parametrize("have_apex_or_te", [True, False], ids=["fused-adam", "torch-adamw"])
def test_prepare_for_load_adds_step_only_without_apex_or_te(
    tmp_path, single_rank, monkeypatch, have_apex_or_te
):
    """Item: every resume of a distributed-optimizer run crashed with ``KeyError: 'step'`` where
    TE is installed, because a per-parameter ``step`` was added unconditionally."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    from megatron_qk.training.resume_layout import prepare_optimizer_for_load

    optimizer, dist_opt = _distributed_optimizer(tmp_path)
    assert isinstance(dist_opt, dopt.DistributedOptimizer)
    inner = dist_opt.optimizer
    if have_apex_or_te:
        inner.__class__ = DtypeMapAdam
    monkeypatch.setattr(dopt, "HAVE_APEX_OR_TE", have_apex_or_te)
    prepare_optimizer_for_load(optimizer)
    states = [inner.state[p] for g in inner.param_groups for p in g["params"]]
    assert states and all("exp_avg" in s and "exp_avg_sq" in s for s in states)
    # torch's AdamW needs a per-parameter step to load; FusedAdam must not get one.
    assert all(("step" in s) is (not have_apex_or_te) for s in states)
    inner.state_dict()  # what sharded_state_dict(is_loading=True) calls first
