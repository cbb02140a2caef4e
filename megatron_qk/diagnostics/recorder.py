"""The recorder that turns captured Q/K, FFN writes and Q/K weights into ``diag`` records.

:class:`AttentionRecorder` attaches probes to this rank's layers in two modes:

* :meth:`AttentionRecorder.statistics`: held-out batches, no grad. Per layer and *global* head:
  sums/counts of copy mass, normalised entropy and logit RMS
  (:mod:`megatron_qk.diagnostics.probes`); per layer the FFN residual-write sum of squares (a
  forward hook on the layer's MLP). :meth:`AttentionRecorder.reduce` adds the per-head top
  singular value of the Q/K bilinear form and its displacement from initialisation
  (:mod:`megatron_qk.diagnostics.bilinear`), all-reduces everything over all ranks and returns the
  record, identical on every rank.
* :meth:`AttentionRecorder.entropy_floor`: training batches; the differentiable mean upper-half
  entropy ``H_upper`` of each micro-batch, for the entropy-floor penalty.

Exactly-once accounting across layouts: attention sums come from the ranks that hold the heads
(TP) and layers (PP) for the sequences they ran (DP), so a plain sum is right. Weight statistics
are values, not sums, so only data-parallel rank 0 contributes them. FFN writes are complete on
every tensor-parallel rank after the row-parallel all-reduce, so only TP rank 0 contributes them,
unless sequence parallelism leaves each TP rank a different slice of the sequence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from megatron_qk.diagnostics.bilinear import (
    bilinear_displacement,
    bilinear_top_singular_value,
    qk_logit_factors,
)
from megatron_qk.diagnostics.probes import (
    STATS,
    layer_statistics,
    normalized_entropy_sum,
    uniform_copy_sum,
)
from megatron_qk.models.layers import first_upper_layer, is_upper
from megatron_qk.models.params import bare_model
from megatron_qk.models.qk_capture import softmax_scale

# Per-(layer, head) weight statistics: top singular value, displacement, "has displacement" flag,
# "present" flag.
_WEIGHT_FIELDS = 4


def _ffn_write(output) -> torch.Tensor:
    """The tensor an MLP adds to the residual stream (its output plus a skipped bias)."""
    if isinstance(output, tuple):
        out, bias = output[0], output[1] if len(output) > 1 else None
        return out if bias is None else out + bias
    return output


class AttentionRecorder:
    """Attaches probes to this rank's layers and reduces their results over all ranks.

    Args:
        model_chunks: this rank's model chunks (wrapped or bare ``GPTModel``).
        num_layers: total number of transformer layers (all pipeline stages).
        chunk_size: query rows per chunk when recomputing attention.
    """

    def __init__(self, model_chunks, num_layers: int, chunk_size: int = 256):
        from megatron.core import parallel_state

        self.num_layers = num_layers
        self.chunk_size = chunk_size
        self.layers: dict[torch.nn.Module, int] = {}  # core attention -> global layer number
        self.attention: dict[int, torch.nn.Module] = {}  # layer number -> SelfAttention
        self.mlps: dict[int, torch.nn.Module] = {}
        self.num_heads = 0
        heads_here = 0
        for chunk in model_chunks:
            for layer in bare_model(chunk).decoder.layers:
                core = layer.self_attention.core_attention
                if not hasattr(core, "mqk_probe"):
                    raise TypeError(
                        f"layer {layer.layer_number}: core attention {type(core).__name__} cannot "
                        "capture Q/K; build the model with megatron_qk.models.build_gpt_model"
                    )
                number = int(layer.layer_number)
                self.layers[core] = number
                self.attention[number] = layer.self_attention
                self.mlps[number] = layer.mlp
                self.num_heads = layer.self_attention.config.num_attention_heads
                heads_here = layer.self_attention.num_attention_heads_per_partition
        # Heads are sharded contiguously over tensor-parallel ranks.
        self.head_offset = parallel_state.get_tensor_model_parallel_rank() * heads_here
        self._count_weights = parallel_state.get_data_parallel_rank() == 0
        seq_parallel = any(a.config.sequence_parallel for a in self.attention.values())
        self._count_ffn = seq_parallel or parallel_state.get_tensor_model_parallel_rank() == 0
        # The uniform-attention copy baseline depends only on the tokens: counted once per
        # sequence by the tensor-parallel rank 0 that holds layer 1 (one pipeline stage).
        self._count_uniform = parallel_state.get_tensor_model_parallel_rank() == 0
        self._uniform: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.valid_rows: int | None = None
        self._stats: torch.Tensor | None = None
        self._ffn: torch.Tensor | None = None
        self._initial_qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._entropies: list[tuple[torch.Tensor, int]] = []

    def is_upper(self, layer_number: int) -> bool:
        """Upper half: global 1-based layer number above ``num_layers / 2``."""
        return is_upper(layer_number, self.num_layers)

    def set_tokens(self, tokens: torch.Tensor, valid_rows: int | None = None) -> None:
        """Tokens ``[b, s]`` of the micro-batch about to run forward (copy-score targets).

        Args:
            tokens: the micro-batch's tokens.
            valid_rows: statistics count only the first ``valid_rows`` sequences (the rest pad
                the last held-out micro-batch); None counts all of them.
        """
        self.tokens = tokens
        self.valid_rows = valid_rows

    # -- initial weights (displacement) ------------------------------------------------------
    @torch.no_grad()
    def snapshot_initial_qk(self, model_chunks=None) -> None:
        """Keep a CPU fp32 copy of the upper layers' Q/K weights as the initialisation reference.

        Args:
            model_chunks: take the weights from these chunks (same layout, e.g. a freshly
                initialised copy of a trained model); default: the recorded model itself.
        """
        attention = self.attention
        if model_chunks is not None:
            attention = {
                int(layer.layer_number): layer.self_attention
                for chunk in model_chunks
                for layer in bare_model(chunk).decoder.layers
            }
        self._initial_qk = {}
        for number, attn in attention.items():
            if self.is_upper(number):
                wq, wk = qk_logit_factors(attn)
                self._initial_qk[number] = (wq.float().cpu().clone(), wk.float().cpu().clone())

    # -- hooks -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self, probe) -> Iterator[None]:
        """Attach ``probe(core, query, key)`` to every layer for the duration of the block."""
        for core in self.layers:
            core.mqk_probe = probe
        try:
            yield
        finally:
            for core in self.layers:
                core.mqk_probe = None
            self.tokens = None
            self.valid_rows = None

    @contextlib.contextmanager
    def statistics(self) -> Iterator[None]:
        """Accumulate attention and FFN statistics over the forward passes run inside the block."""
        self._stats = None
        self._ffn = None
        self._uniform = None

        def probe(core, query, key):
            if self.tokens is None:
                raise RuntimeError("AttentionRecorder.set_tokens was not called before forward")
            tokens, rows = self.tokens, self.valid_rows
            if rows is not None:  # padded held-out slots: [s, b, ...] layout, batch is dim 1
                if rows == 0:
                    return
                query, key, tokens = query[:, :rows], key[:, :rows], tokens[:rows]
            if self.layers[core] == 1 and self._count_uniform:
                total, count = uniform_copy_sum(tokens)
                if self._uniform is None:
                    self._uniform = torch.zeros(2, dtype=torch.float64, device=query.device)
                self._uniform[0] += total
                self._uniform[1] += count
            stats = layer_statistics(
                query, key, tokens, softmax_scale(core, query.shape[-1]), self.chunk_size
            )
            if self._stats is None:
                self._stats = torch.zeros(
                    self.num_layers, self.num_heads, len(STATS), 2, dtype=torch.float64,
                    device=stats.device,
                )  # fmt: skip
            heads = slice(self.head_offset, self.head_offset + stats.shape[0])
            self._stats[self.layers[core] - 1, heads] += stats

        def ffn_hook(number):
            def hook(module, args, output):
                if not self._count_ffn:
                    return
                write = _ffn_write(output).detach()
                if self.valid_rows is not None:  # [s, b, h]: drop the padded sequences
                    write = write[:, : self.valid_rows]
                    if write.numel() == 0:
                        return
                if self._ffn is None:
                    self._ffn = torch.zeros(
                        self.num_layers, 2, dtype=torch.float64, device=write.device
                    )
                self._ffn[number - 1, 0] += write.double().pow(2).sum()
                self._ffn[number - 1, 1] += write.numel()

            return hook

        handles = [mlp.register_forward_hook(ffn_hook(n)) for n, mlp in self.mlps.items()]
        try:
            with self.attached(probe):
                yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _weight_statistics(self, device: torch.device) -> torch.Tensor:
        out = torch.zeros(
            self.num_layers, self.num_heads, _WEIGHT_FIELDS, dtype=torch.float64, device=device
        )
        if not self._count_weights:
            return out
        for number, attn in self.attention.items():
            wq, wk = qk_logit_factors(attn)
            heads = slice(self.head_offset, self.head_offset + wq.shape[0])
            row = out[number - 1, heads]
            row[:, 0] = bilinear_top_singular_value(wq.float(), wk.float()).to(device)
            row[:, 3] = 1.0
            if number in self._initial_qk:
                wq0, wk0 = (w.to(wq.device) for w in self._initial_qk[number])
                row[:, 1] = bilinear_displacement(wq.float(), wk.float(), wq0, wk0).to(device)
                row[:, 2] = 1.0
        return out

    # -- entropy floor -----------------------------------------------------------------------
    @contextlib.contextmanager
    def entropy_floor(self) -> Iterator[None]:
        """Collect the differentiable upper-half entropy of each training micro-batch."""
        self._entropies = []

        def probe(core, query, key):
            if self.is_upper(self.layers[core]):
                scale = softmax_scale(core, query.shape[-1])
                # Chunked and recomputed in the backward: no full s x s attention is kept
                # from forward to backward (~4 GB per 270M layer at micro-batch 16).
                self._entropies.append(normalized_entropy_sum(query, key, scale, self.chunk_size))

        with self.attached(probe):
            yield
        self._entropies = []

    def pop_upper_entropy(self) -> torch.Tensor | None:
        """Mean normalised upper-half entropy of the micro-batch just run (differentiable).

        Heads split over tensor-parallel ranks are combined with an all-reduce whose backward is
        the identity, so each rank's gradient reaches its own heads.
        """
        if not self._entropies:
            return None
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        total = torch.stack([s for s, _ in self._entropies]).sum()
        count = float(sum(c for _, c in self._entropies))
        self._entropies = []
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            packed = torch.stack([total, total.new_tensor(count)])
            packed = reduce_from_tensor_model_parallel_region(packed)
            total, count = packed[0], packed[1].detach()
        return total / count

    # -- reduction ---------------------------------------------------------------------------
    def reduce(self, device: torch.device) -> dict:
        """Combine the accumulated statistics over every rank (collective) into a diag record.

        Returns:
            Aggregates (``lower_copy``, ``lower_copy_uniform`` (the copy score of uniform
            causal attention on the same positions), ``upper_copy``, ``upper_entropy``,
            ``lower_entropy``,
            ``upper_logit``, ``lower_logit`` (RMS of the scaled logits), ``upper_logit_abs``,
            ``lower_logit_abs`` (their mean |z|), ``logit_ratio``, ``upper_ffn_write_rms``,
            ``first_upper_ffn_write_rms``, ``lower_ffn_write_rms``, ``upper_qk_sigma``,
            ``upper_qk_sigma_max``, ``upper_qk_displacement``) and ``layers: {layer_number:
            {copy, entropy, logit, logit_abs, ffn_write_rms, qk_sigma, [qk_displacement],
            heads: {name: [value per global head]}}}``; identical on every rank.
        """
        L, H = self.num_layers, self.num_heads
        attn = torch.zeros(L, H, len(STATS), 2, dtype=torch.float64, device=device)
        if self._stats is not None:
            attn += self._stats.to(device)
        ffn = torch.zeros(L, 2, dtype=torch.float64, device=device)
        if self._ffn is not None:
            ffn += self._ffn.to(device)
        weights = self._weight_statistics(device)
        uniform = torch.zeros(2, dtype=torch.float64, device=device)
        if self._uniform is not None:
            uniform += self._uniform.to(device)
        packed = torch.cat([attn.flatten(), ffn.flatten(), weights.flatten(), uniform])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
            dist.broadcast(packed, src=0)  # one bit pattern everywhere: same release decision
        self._stats = self._ffn = self._uniform = None
        packed = packed.cpu()
        n_attn, n_ffn = attn.numel(), ffn.numel()
        attn = packed[:n_attn].view(L, H, len(STATS), 2)
        ffn = packed[n_attn : n_attn + n_ffn].view(L, 2)
        weights = packed[n_attn + n_ffn : -2].view(L, H, _WEIGHT_FIELDS)
        record = _build_record(attn, ffn, weights)
        # Same positions as lower_copy (every query with a previous occurrence of its token).
        uniform_copy = _ratio(packed[-2].item(), packed[-1].item())
        return {
            "lower_copy": record.pop("lower_copy"),
            "lower_copy_uniform": uniform_copy,
            **record,
        }


def _ratio(total: float, count: float) -> float:
    return total / count if count else float("nan")


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _build_record(attn: torch.Tensor, ffn: torch.Tensor, weights: torch.Tensor) -> dict:
    """The diag record from the reduced tensors (see :meth:`AttentionRecorder.reduce`)."""
    L = attn.shape[0]
    half = first_upper_layer(L) - 1  # row index of the first upper layer
    lower, upper = slice(0, half), slice(half, L)

    def pooled(rows: slice, stat: int) -> float:
        value = _ratio(attn[rows, :, stat, 0].sum().item(), attn[rows, :, stat, 1].sum().item())
        return math.sqrt(value) if STATS[stat] == "logit" else value

    def per_head(layer: int, stat: int) -> list[float]:
        values = [_ratio(s.item(), c.item()) for s, c in attn[layer, :, stat]]
        return [math.sqrt(v) for v in values] if STATS[stat] == "logit" else values

    ffn_rms = [math.sqrt(_ratio(ffn[i, 0].item(), ffn[i, 1].item())) for i in range(L)]
    layers = {}
    for i in range(L):
        entry = {name: pooled(slice(i, i + 1), j) for j, name in enumerate(STATS)}
        entry["ffn_write_rms"] = ffn_rms[i]
        heads = {name: per_head(i, j) for j, name in enumerate(STATS)}
        present = weights[i, :, 3] > 0
        if present.any():
            heads["qk_sigma"] = weights[i, :, 0].tolist()
            entry["qk_sigma"] = weights[i, present, 0].mean().item()
        if (weights[i, :, 2] > 0).any():
            heads["qk_displacement"] = weights[i, :, 1].tolist()
            entry["qk_displacement"] = weights[i, weights[i, :, 2] > 0, 1].mean().item()
        entry["heads"] = heads
        layers[str(i + 1)] = entry
    upper_sigma = weights[upper, :, 0][weights[upper, :, 3] > 0]
    upper_disp = weights[upper, :, 1][weights[upper, :, 2] > 0]
    record = {
        "lower_copy": pooled(lower, 0),
        "upper_copy": pooled(upper, 0),
        "upper_entropy": pooled(upper, 1),
        "lower_entropy": pooled(lower, 1),
        "upper_logit": pooled(upper, 2),
        "lower_logit": pooled(lower, 2),
        "upper_logit_abs": pooled(upper, 3),
        "lower_logit_abs": pooled(lower, 3),
    }
    record["logit_ratio"] = (
        record["upper_logit"] / record["lower_logit"] if record["lower_logit"] else float("nan")
    )
    record["upper_ffn_write_rms"] = _mean(ffn_rms[upper])
    record["first_upper_ffn_write_rms"] = ffn_rms[half]
    record["lower_ffn_write_rms"] = _mean(ffn_rms[lower])
    record["upper_qk_sigma"] = upper_sigma.mean().item() if upper_sigma.numel() else float("nan")
    record["upper_qk_sigma_max"] = upper_sigma.max().item() if upper_sigma.numel() else math.nan
    record["upper_qk_displacement"] = (
        upper_disp.mean().item() if upper_disp.numel() else float("nan")
    )
    record["layers"] = layers
    return record
