"""W_Q, W_K, W_V as separate parameters behind Megatron's fused ``linear_qkv`` slot.

Megatron-Core fuses the query, key and value projections into one ``linear_qkv`` weight whose rows
are group-major and interleaved: for each key/value group ``g`` the rows hold that group's query
heads, then its key head, then its value head (``attention.py:1399-1460`` in 0.16.1). A learning
rate for W_Q/W_K alone is impossible on that tensor (optimizer groups hold whole parameters), so
:class:`SplitQKVLinear` keeps three column-parallel projections and re-emits their outputs in the
fused interleaved layout. ``SelfAttention`` is unchanged and the model computes the same function
as the stock fused model given de-interleaved weights (``fused_qkv_to_split``).

Tensor parallelism: ``ColumnParallelLinear`` gives rank ``r`` the contiguous rows
``[r * n / tp, (r + 1) * n / tp)`` of each projection, i.e. query heads and key/value groups
``[r * ng / tp, ...)``, which is exactly the slice of groups the fused weight gives rank ``r``.
This requires ``num_query_groups % tp == 0``.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule

from megatron_qk.compat.versions import linear_name_kwargs


class SplitQKVLinear(MegatronModule):
    """Drop-in for ``SelfAttentionSubmodules.linear_qkv`` with separate Q, K, V parameters.

    Parameters are ``linear_q.weight`` ``[np*hn/tp, h]``, ``linear_k.weight`` and
    ``linear_v.weight`` ``[ng*hn/tp, h]`` (plus biases when enabled). The arguments are those of
    ``SelfAttention``'s ``linear_qkv`` call; ``name`` (the module path, passed from megatron-core
    0.18 on) is handed to the projections where the installed ``ColumnParallelLinear`` takes it.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        gather_output: bool,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None = None,
        tp_group: torch.distributed.ProcessGroup | None = None,
        name: str | None = None,
    ):
        super().__init__(config=config)
        if gather_output or skip_bias_add or is_expert:
            raise ValueError("SplitQKVLinear supports only SelfAttention's linear_qkv call")
        if config.attention_output_gate:
            raise ValueError("SplitQKVLinear does not support attention_output_gate")
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        head_dim = config.kv_channels
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = tp_group.size() if tp_group is not None else 1
        if groups % tp:
            raise ValueError(
                f"split Q/K/V needs num_query_groups ({groups}) divisible by tensor parallel "
                f"size ({tp}); set model.split_qkv: false or change the layout"
            )
        if output_size != (heads + 2 * groups) * head_dim:
            raise ValueError(f"unexpected linear_qkv output size {output_size}")
        self.groups_per_rank = groups // tp
        self.q_per_group = heads // groups
        self.head_dim = head_dim
        common = dict(
            config=config,
            init_method=init_method,
            gather_output=False,
            bias=bias,
            skip_bias_add=False,
            is_expert=False,
            tp_group=tp_group,
        )
        self.linear_q = ColumnParallelLinear(
            input_size,
            heads * head_dim,
            tp_comm_buffer_name=f"{tp_comm_buffer_name}_q",
            **common,
            **linear_name_kwargs(name and f"{name}.linear_q"),
        )
        self.linear_k = ColumnParallelLinear(
            input_size,
            groups * head_dim,
            tp_comm_buffer_name=f"{tp_comm_buffer_name}_k",
            **common,
            **linear_name_kwargs(name and f"{name}.linear_k"),
        )
        self.linear_v = ColumnParallelLinear(
            input_size,
            groups * head_dim,
            tp_comm_buffer_name=f"{tp_comm_buffer_name}_v",
            **common,
            **linear_name_kwargs(name and f"{name}.linear_v"),
        )
        # The three projections only hold parameters (Megatron's local class on both backends, so
        # TE and local checkpoints have one key layout). Forward runs one GEMM on the
        # re-interleaved weight instead of three GEMMs and an output concat: the stock fused
        # projection's computation and cost, with one sequence-parallel all-gather. The runner
        # owns no parameters; it supplies Megatron's TP/SP communication around the GEMM.
        self.fused_runner = ColumnParallelLinear(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            skip_weight_param_allocation=True,
            tp_comm_buffer_name=tp_comm_buffer_name,
            tp_group=tp_group,
            **linear_name_kwargs(name),
        )
        # The interleaved weight is a fresh tensor without ``main_grad``; the fused wgrad kernel
        # would write there. Autograd routes its gradient to linear_q/k/v instead.
        self.fused_runner.gradient_accumulation_fusion = False

    def _interleave(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rows (or bias entries) of this rank's Q, K, V in the fused group-major order."""
        groups = self.groups_per_rank
        return split_qkv_to_fused(q, k, v, groups * self.q_per_group, groups, self.head_dim)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Project ``[s, b, h]`` to the fused group-major ``[s, b, ng_p*(np/ng+2)*hn]`` layout."""
        if self.fused_runner is not None:
            lq, lk, lv = self.linear_q, self.linear_k, self.linear_v
            weight = self._interleave(lq.weight, lk.weight, lv.weight)
            mixed, _ = self.fused_runner(hidden_states, weight=weight)
            if lq.bias is not None:
                mixed = mixed + self._interleave(lq.bias, lk.bias, lv.bias)
            return mixed, None
        q, _ = self.linear_q(hidden_states)
        k, _ = self.linear_k(hidden_states)
        v, _ = self.linear_v(hidden_states)
        s, b = q.shape[0], q.shape[1]
        g, hn = self.groups_per_rank, self.head_dim
        # [s, b, g, (q_per_group + 2) * hn]: the group's query heads, then its key, then its value.
        mixed = torch.cat(
            [
                q.view(s, b, g, self.q_per_group * hn),
                k.view(s, b, g, hn),
                v.view(s, b, g, hn),
            ],
            dim=-1,
        )
        return mixed.view(s, b, -1), None

    def backward_dw(self) -> None:
        """Delayed weight-gradient hook of the LinearQkv protocol (nothing is delayed here)."""
        return None


def fused_qkv_to_split(
    fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused ``linear_qkv`` weight ``[(np+2ng)*hn, h]`` (or bias) into Q, K, V.

    Works on a full tensor or on one TP rank's shard (pass that rank's head/group counts).
    """
    q_per_group = num_heads // num_groups
    rows = fused.view(num_groups, (q_per_group + 2) * head_dim, *fused.shape[1:])
    q = rows[:, : q_per_group * head_dim]
    k = rows[:, q_per_group * head_dim : (q_per_group + 1) * head_dim]
    v = rows[:, (q_per_group + 1) * head_dim :]
    tail = fused.shape[1:]
    return (
        q.reshape(num_heads * head_dim, *tail).clone(),
        k.reshape(num_groups * head_dim, *tail).clone(),
        v.reshape(num_groups * head_dim, *tail).clone(),
    )


def split_qkv_to_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_groups: int,
    head_dim: int,
) -> torch.Tensor:
    """Inverse of :func:`fused_qkv_to_split`: the fused group-major interleaved tensor."""
    q_per_group = num_heads // num_groups
    tail = q.shape[1:]
    parts = [
        q.view(num_groups, q_per_group * head_dim, *tail),
        k.view(num_groups, head_dim, *tail),
        v.view(num_groups, head_dim, *tail),
    ]
    return torch.cat(parts, dim=1).reshape((num_heads + 2 * num_groups) * head_dim, *tail)
