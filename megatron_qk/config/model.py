"""Recipe sections of the network: the decoder's architecture and its parallel layout.

YAML keys ``model.*`` and ``parallel.*``; each field's comment documents its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_qk.config.errors import ConfigError


@dataclass
class ModelConfig:
    """Decoder architecture (Megatron-Core GPTModel built from layer specs)."""

    # Number of transformer layers.
    num_layers: int = 2
    # Model width.
    hidden_size: int = 64
    # Attention heads.
    num_attention_heads: int = 4
    # Key/value groups for GQA; null means one group per head (MHA).
    num_query_groups: int | None = None
    # Feed-forward network: gelu (single branch), swiglu or geglu (gated; GEGLU uses exact GELU).
    ffn: Literal["gelu", "swiglu", "geglu"] = "gelu"
    # FFN hidden width (per branch for gated FFNs). Paper: GELU 3840, gated 2560.
    ffn_hidden_size: int = 256
    # Normalization: layernorm or rmsnorm.
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    # Biases on the attention and FFN linear layers.
    bias: bool = True
    # Training sequence length (also the RoPE/positional range).
    seq_length: int = 64
    # Tokenizer vocabulary size; padded up to a multiple of ``vocab_pad_multiple * TP``.
    vocab_size: int = 50257
    # Padding multiple for the embedding table (Megatron's make-vocab-size-divisible-by).
    vocab_pad_multiple: int = 128
    # RoPE base frequency.
    rotary_base: int = 10000
    # Tie input embedding and output projection.
    tie_embeddings: bool = True
    # Standard deviation of the normal weight initialisation.
    init_method_std: float = 0.02
    # Dropout after attention/FFN (residual) and on attention probabilities.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Norm epsilon.
    norm_epsilon: float = 1e-5
    # Layer implementation: auto (TE when importable and on GPU, else local), local, or te.
    impl: Literal["auto", "local", "te"] = "auto"
    # Give W_Q, W_K, W_V their own parameters (needed to give Q/K their own learning rate).
    # The split projection re-emits Megatron's fused layout, so the model is the same function.
    split_qkv: bool = True
    # QK-norm (OLMo 2, Qwen3, Gemma 3): normalise each head's query and key, before RoPE, with
    # the recipe's normalization (Megatron-Core's qk_layernorm; weights of size head_dim shared
    # by the heads of a layer, parameter roles q_norm / k_norm).
    qk_layernorm: bool = False
    # Fused bias+activation kernels. Fused GELU/GEGLU use the tanh approximation, unfused exact
    # erf: keep this identical across compared arms. Off on CPU (needs torch.compile).
    bias_activation_fusion: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.seq_length <= 1:
            raise ConfigError("seq_length", f"must be > 1, got {self.seq_length}")
        if self.vocab_size <= 0:
            raise ConfigError("vocab_size", f"must be positive, got {self.vocab_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}",
            )
        groups = self.query_groups
        if groups <= 0 or self.num_attention_heads % groups:
            raise ConfigError(
                "num_query_groups",
                f"{groups} must divide num_attention_heads {self.num_attention_heads}",
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("hidden_size", "head dimension must be even for RoPE")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.bias_activation_fusion and self.ffn == "gelu" and not self.bias:
            raise ConfigError(
                "bias_activation_fusion", "fused GELU needs bias: true (Megatron's bias_gelu)"
            )

    @property
    def query_groups(self) -> int:
        """Number of key/value groups (heads when ``num_query_groups`` is null)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head channel count (Megatron's ``kv_channels``)."""
        return self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """Megatron parallel layout. Data-parallel size = world size / (TP x PP)."""

    # Tensor-model-parallel size.
    tensor_model_parallel_size: int = 1
    # Pipeline-model-parallel size.
    pipeline_model_parallel_size: int = 1
    # Sequence parallelism (requires TP > 1 and a GPU).
    sequence_parallel: bool = False
    # Shard optimizer state over data-parallel ranks (Megatron DistributedOptimizer).
    use_distributed_optimizer: bool = False
    # Overlap the gradient reduce-scatter/all-reduce with backward (bucketed).
    overlap_grad_reduce: bool = False
    # Overlap the parameter all-gather with forward (distributed optimizer only).
    overlap_param_gather: bool = False
    # Communication backend; auto = nccl with CUDA, gloo otherwise.
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("sequence_parallel", "needs tensor_model_parallel_size > 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("overlap_param_gather", "needs use_distributed_optimizer: true")
