"""QK-clip (MuonClip) after the optimizer step, with Megatron-Core's per-group semantics.

Megatron-Core 0.16.1 (``optimizer/qk_clip.py``, ``SelfAttention.clip_qk``): each layer's
per-head max pre-softmax logit over the step is reduced (MAX) over the data-parallel group; a
query group whose max (over its heads) exceeds the threshold gets ``eta = threshold / max``; its
W_Q rows are scaled by ``eta**alpha`` and its W_K rows by ``eta**(1 - alpha)``, on the model
weight and on the optimizer's fp32 master copy. :class:`QKClip` does the same for
:class:`~megatron_qk.models.split_qkv.SplitQKVLinear` (``linear_q`` / ``linear_k``) and for the
fused ``linear_qkv`` weight, with three deliberate differences:

* the Q/K biases are scaled with their weights, so every logit of the same inputs shrinks by
  exactly ``eta`` (Megatron leaves biases alone, and a biased logit then is not bounded);
* the distributed optimizer's master *shard* (a flat slice of the parameter) is scaled by the
  slice of the row factors it holds; Megatron reshapes ``main_param`` as a whole weight, which
  a shard is not;
* only groups over the threshold are touched (Megatron computes ``eta`` for every group once
  any exceeds, which is NaN for a group whose max logit is negative).

The logits are collected by the capturing core attention
(:mod:`megatron_qk.models.qk_capture`); the training callback
(``training/callbacks/qk_clip.py``) switches collection on for the step's forward passes and
calls :meth:`QKClip.after_step` after ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_qk.config.optim import QKClipConfig
from megatron_qk.models.params import bare_model
from megatron_qk.models.split_qkv import SplitQKVLinear, split_qkv_to_fused
from megatron_qk.optim.param_groups import parse_layers


def group_etas(max_logits: torch.Tensor, num_groups: int, threshold: float) -> torch.Tensor:
    """Per query group ``eta = threshold / max`` where the group's max logit exceeds the
    threshold, else 1 (``max_logits``: ``[heads]``, heads of a group consecutive)."""
    grouped = max_logits.view(num_groups, -1).amax(dim=1)
    return torch.where(grouped > threshold, threshold / grouped, torch.ones_like(grouped))


def qk_row_scales(
    etas: torch.Tensor, q_per_group: int, head_dim: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row factors of W_Q (``eta**alpha`` per row of the group's query heads) and of W_K
    (``eta**(1-alpha)`` per row of the group's key head).

    The powers are taken on tensors of Megatron's shapes (Q: one eta per row, K: one per group):
    ``pow``'s vectorised and scalar kernels can differ in the last bit, and this keeps the
    update bit-identical to ``SelfAttention.clip_qk`` (tests/test_qk_clip.py).
    """
    q = torch.pow(etas.repeat_interleave(q_per_group * head_dim), alpha)
    k = torch.pow(etas, 1 - alpha).repeat_interleave(head_dim)
    return q, k


class QKClip:
    """Collects the max attention logit of every layer and clips the selected layers.

    Args:
        cfg: ``optim.qk_clip``.
        model_chunks: this rank's model chunks (wrapped or bare ``GPTModel``), built with the
            capturing core attention.
        optimizer: the Megatron optimizer (its fp32 master copies are clipped too).
        num_layers: total transformer layers (all pipeline stages), for ``cfg.layers``.
    """

    def __init__(
        self, cfg: QKClipConfig, model_chunks: Sequence[torch.nn.Module], optimizer, num_layers: int
    ):
        from megatron.core import parallel_state

        self.cfg = cfg
        self.optimizer = optimizer
        self.attentions: dict[int, torch.nn.Module] = {}
        for chunk in model_chunks:
            for layer in bare_model(chunk).decoder.layers:
                core = layer.self_attention.core_attention
                if not hasattr(core, "mqk_collect_max_logit"):
                    raise TypeError(
                        f"layer {layer.layer_number}: core attention {type(core).__name__} cannot "
                        "collect the max logit; build the model with megatron_qk.models"
                    )
                self.attentions[int(layer.layer_number)] = layer.self_attention
        self.selected = parse_layers(cfg.layers, num_layers, "optim.qk_clip.layers")
        self._dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        # The etas applied by the last clip, by layer (inspection and tests).
        self.last_etas: dict[int, torch.Tensor] = {}

    def collect(self, on: bool) -> None:
        """Start (reset) or stop collecting the max logit in every layer's core attention."""
        for attention in self.attentions.values():
            core = attention.core_attention
            if on:
                core.current_max_attn_logits = None
            core.mqk_collect_max_logit = on

    @torch.no_grad()
    def after_step(self) -> float:
        """Reduce the step's max logits, clip the selected layers (when enabled), reset.

        Collective over all ranks. Returns the max attention logit over all layers and heads
        of the model, the same number on every rank.
        """
        numbers = sorted(self.attentions)
        maxima = []
        for number in numbers:
            attention = self.attentions[number]
            held = attention.core_attention.current_max_attn_logits
            if held is None:  # no forward pass this step: nothing to clip
                held = torch.full(
                    (attention.num_attention_heads_per_partition,),
                    -torch.inf,
                    device=attention.linear_proj.weight.device,
                )
            maxima.append(held.float())
        stacked = torch.stack(maxima)
        torch.distributed.all_reduce(stacked, torch.distributed.ReduceOp.MAX, group=self._dp_group)
        self.last_etas = {}
        for number, logits in zip(numbers, stacked):
            attention = self.attentions[number]
            attention.core_attention.current_max_attn_logits = None
            if self.cfg.enabled and number in self.selected:
                self.clip_layer(number, attention, logits)
        overall = stacked.amax().reshape(1)
        # Every rank logs the same number: the max over tensor- and pipeline-parallel ranks too.
        torch.distributed.all_reduce(overall, torch.distributed.ReduceOp.MAX)
        return float(overall.item())

    def clip_layer(self, number: int, attention, max_logits: torch.Tensor) -> None:
        """Clip one ``SelfAttention`` given its reduced per-head max logits."""
        groups = attention.num_query_groups_per_partition
        etas = group_etas(max_logits, groups, self.cfg.threshold)
        if not bool((etas < 1).any()):
            return
        self.last_etas[number] = etas
        q_per_group = attention.num_attention_heads_per_partition // groups
        head_dim = attention.hidden_size_per_attention_head
        q_scale, k_scale = qk_row_scales(etas, q_per_group, head_dim, self.cfg.alpha)
        linear = attention.linear_qkv
        if isinstance(linear, SplitQKVLinear):
            targets = [(linear.linear_q, q_scale), (linear.linear_k, k_scale)]
        else:
            v_scale = torch.ones_like(k_scale)
            heads = q_per_group * groups
            fused = split_qkv_to_fused(q_scale, k_scale, v_scale, heads, groups, head_dim)
            targets = [(linear, fused)]
        for module, rows in targets:
            for param in (module.weight, getattr(module, "bias", None)):
                if param is not None:
                    self._scale_rows(param, rows)

    def _scale_rows(self, param: torch.nn.Parameter, rows: torch.Tensor) -> None:
        """Scale ``param``'s rows by ``rows``, and the optimizer's fp32 master copy with them.

        Without the master, the next step would compute from the unclipped master and copy it
        back over the model weight (the distributed optimizer's all-gather), undoing the clip.
        """
        rows = rows.to(param.device)
        param.data.mul_(rows.view(-1, *([1] * (param.dim() - 1))))
        main = getattr(param, "main_param", None)
        if main is None:  # fp32 without a copy, or no master shard of it on this rank
            return
        if getattr(param, "main_param_sharded", False):
            # The distributed optimizer's shard: a flat slice of the parameter.
            cols = param.numel() // param.shape[0]
            start, end = self._shard_range(param)
            main.data.mul_(rows.repeat_interleave(cols)[start:end].to(main.device))
        else:
            main.data.mul_(rows.view(-1, *([1] * (main.dim() - 1))).to(main.device))

    def _shard_range(self, param: torch.nn.Parameter) -> tuple[int, int]:
        """The flat index range of ``param`` whose master this rank's distributed optimizer
        holds (``DistributedOptimizer._get_model_param_range_map``, 0.16.1 to 0.19.2)."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if param in getattr(opt, "model_param_gbuf_map", {}):
                found = opt._get_model_param_range_map(param)["param"]
                return found.start, found.end
        raise AssertionError("a sharded master parameter outside every distributed optimizer")
