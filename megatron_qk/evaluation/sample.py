"""Text generation from a checkpoint (``megatron-qk sample``), to look at what a model learned.

The way nanoGPT's ``sample.py`` is used: load a checkpoint (any TP/PP/DP layout, restored into
one unsharded fp32 model by :func:`~megatron_qk.training.restore.load_checkpoint_for_analysis`),
encode a prompt with the run's tokenizer, then extend it one token at a time: greedy (argmax)
or sampled at a temperature from the top-k / nucleus (top-p) set, with a seeded generator so a
sample can be reproduced. Each token is one full forward pass over the last ``seq_length``
tokens (no KV cache: short generations from small models, not serving). Logits beyond the real
vocabulary (Megatron's padding rows) are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen.

    Attributes:
        max_new_tokens: tokens generated after the prompt (fewer if ``stop_at_eod`` fires).
        greedy: take the argmax (temperature, top-k and top-p are then unused).
        temperature: divides the logits before sampling (> 0).
        top_k: sample among the k most likely tokens (0: all).
        top_p: sample among the most likely tokens whose probabilities add up to p (1.0: all).
        seed: the sampling generator's seed.
        stop_at_eod: stop after generating the end-of-document token.
    """

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    stop_at_eod: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 (use --greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (1-D) with every token outside the top-k and the top-p set at ``-inf``.

    The most likely token always stays, so the result can be sampled from.
    """
    logits = logits.clone()
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -torch.inf
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p.
        drop = cumulative - torch.softmax(ordered, dim=-1) >= top_p
        logits[order[drop]] = -torch.inf
    return logits


def next_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """Choose the next token from one position's logits (real vocabulary only)."""
    if settings.greedy:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: list[int],
    settings: SamplingSettings,
    *,
    seq_length: int,
    vocab_size: int,
    eod_id: int | None,
    device: torch.device,
) -> list[int]:
    """Extend ``prompt`` (token ids) by up to ``settings.max_new_tokens`` tokens.

    Args:
        model: a bare megatron-core ``GPTModel`` in eval mode.
        prompt: the prompt's token ids (at least one).
        settings: how tokens are chosen.
        seq_length: the model's context; longer inputs keep their last ``seq_length`` tokens.
        vocab_size: the real vocabulary (padding rows of the logits are cut off).
        eod_id: the end-of-document id (ends generation with ``settings.stop_at_eod``).
        device: where the model runs.

    Returns:
        The generated ids (without the prompt).
    """
    if not prompt:
        raise ValueError("the prompt encodes to no tokens: give some text")
    generator = torch.Generator().manual_seed(settings.seed)
    tokens, new = list(prompt), []
    for _ in range(settings.max_new_tokens):
        window = tokens[-seq_length:]
        ids = torch.tensor([window], dtype=torch.long, device=device)
        positions = torch.arange(len(window), dtype=torch.long, device=device).unsqueeze(0)
        logits = model(ids, positions, attention_mask=None)[0, -1, :vocab_size]
        token = next_token(logits, settings, generator)
        tokens.append(token)
        new.append(token)
        if settings.stop_at_eod and token == eod_id:
            break
    return new
