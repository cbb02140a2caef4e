"""lm-evaluation-harness adapter: a megatron-core ``GPTModel`` scored in-process.

:class:`MegatronLM` is an ``lm_eval.api.model.TemplateLM`` (itself an ``LM``). The harness turns
every task into log-likelihood requests; the adapter tokenises them with the offline GPT-2 BPE,
batches them (longest first, right-padded; the model is causal, so padding after a sequence never
changes its logits) and scores them with one forward pass per batch.

Conventions, identical to the harness's Hugging Face backend (``HFLM``) so scores are comparable:

* ``(context, continuation)`` pairs are split by ``TemplateLM._encode_pair``: trailing spaces of
  the context move to the continuation, ``context + continuation`` is encoded as a whole and the
  continuation tokens are the ids after the first ``len(encode(context))`` ones. An empty context
  is replaced by ``<|endoftext|>``.
* The model sees at most ``max_length`` (the run's ``seq_length``) tokens: a longer context is
  truncated from the left, keeping the continuation and the nearest context tokens.
* ``loglikelihood_rolling`` (perplexity tasks) splits a text into disjoint windows of
  ``max_length`` predictions, the first conditioned on ``<|endoftext|>``
  (``lm_eval.utils.get_rolling_token_windows`` with ``context_len=1``).

Generation is not supported: ``generate_until`` raises :class:`GenerationNotSupportedError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from megatron_qk.data.tokenizer import EOD_TOKEN_ID

if TYPE_CHECKING:
    import tiktoken

    from megatron_qk.training.restore import LoadedCheckpoint

logger = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(tokens[b, s], position_ids[b, s]) -> logits[b, s, >= vocab_size]``."""

# One scored window: (cache key or None, context ids, continuation ids).
TokenRequest = tuple[Any, Sequence[int], Sequence[int]]


class GenerationNotSupportedError(NotImplementedError):
    """A task asked for free-form generation, which the adapter does not implement."""


def megatron_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap a bare megatron-core ``GPTModel`` as a :data:`LogitsFn`.

    Without labels, ``GPTModel.forward`` returns batch-first logits ``[b, s, padded_vocab]``;
    ``attention_mask=None`` selects the causal mask of the layer spec, as in training.
    """

    def forward(tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return model(tokens, position_ids, attention_mask=None)

    return forward


class MegatronLM(TemplateLM):
    """Score log-likelihood requests of lm-evaluation-harness with a causal LM.

    Args:
        logits_fn: the model (see :func:`megatron_logits_fn`).
        vocab_size: real vocabulary size; logits beyond it (Megatron's padding) are ignored.
        max_length: the longest input the model accepts (the run's ``seq_length``).
        device: where inputs are placed.
        batch_size: sequences per forward pass.
        encoding: the tokenizer (default: the offline GPT-2 BPE).
        eot_token_id: ``<|endoftext|>``, used as the context of empty-context requests.
        autocast_dtype: run the forward pass under ``torch.autocast`` in this dtype (e.g.
            ``torch.bfloat16`` on CUDA); log-softmax is always computed in fp32.
        tokenizer_name: name recorded by the harness in request caches.
    """

    backend = "causal"

    def __init__(
        self,
        logits_fn: LogitsFn,
        *,
        vocab_size: int,
        max_length: int,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        encoding: tiktoken.Encoding | None = None,
        eot_token_id: int = EOD_TOKEN_ID,
        autocast_dtype: torch.dtype | None = None,
        tokenizer_name: str = "gpt2",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if encoding is None:
            from megatron_qk.data.tokenizer import load_gpt2_encoding

            encoding = load_gpt2_encoding()
        self._logits_fn = logits_fn
        self._encoding = encoding
        self._vocab_size = vocab_size
        self._max_length = max_length
        self._device = torch.device(device)
        self._eot_token_id = eot_token_id
        self._tokenizer_name = tokenizer_name
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype

    @classmethod
    def from_checkpoint(
        cls,
        loaded: LoadedCheckpoint,
        *,
        batch_size: int = 16,
        encoding: tiktoken.Encoding | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> MegatronLM:
        """Build the adapter for a model restored by ``load_checkpoint_for_analysis``."""
        loaded.model.eval()
        return cls(
            megatron_logits_fn(loaded.model),
            vocab_size=loaded.cfg.model.vocab_size,
            max_length=loaded.cfg.model.seq_length,
            device=loaded.device,
            batch_size=batch_size,
            encoding=encoding,
            # The tokenizer's own <|endoftext|> (cl100k: 100257), not GPT-2's.
            eot_token_id=encoding.eot_token if encoding is not None else EOD_TOKEN_ID,
            autocast_dtype=autocast_dtype,
            tokenizer_name=encoding.name if encoding is not None else "gpt2",
        )

    # ------------------------------------------------------------------ harness interface
    @property
    def eot_token_id(self) -> int:
        """``<|endoftext|>``; also the prefix of empty contexts and rolling windows."""
        return self._eot_token_id

    @property
    def max_length(self) -> int:
        """Longest model input in tokens."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        """Device of the model inputs."""
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """Tokenizer name used by the harness to fingerprint request caches."""
        return self._tokenizer_name

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Encode like the preprocessing pipeline: no special tokens, no BOS."""
        return self._encoding.encode_ordinary(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        """Decode ids to text."""
        return self._encoding.decode(list(tokens))

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Score tokenised ``(key, context, continuation)`` requests.

        Returns:
            ``(sum of continuation log-probabilities, whether every continuation token is the
            model's argmax)`` per request, in request order.
        """
        results = self.score_token_requests(
            [(ctx, cont) for _, ctx, cont in requests], disable_tqdm=disable_tqdm
        )
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text, in disjoint windows of ``max_length`` tokens."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(i)
        scores = self.score_token_requests(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Not supported: this adapter scores log-likelihoods only."""
        raise GenerationNotSupportedError(
            "megatron-qk eval scores log-likelihoods only (multiple_choice, loglikelihood and "
            "loglikelihood_rolling tasks); a selected task asks for free-form generation "
            f"(output_type generate_until, {len(requests)} requests). Remove it from --tasks."
        )

    # ------------------------------------------------------------------ scoring
    def score_token_requests(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        disable_tqdm: bool = True,
    ) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context (token ids).

        Args:
            requests: ``(context_ids, continuation_ids)`` pairs. The context must not be empty
                unless the continuation is; contexts longer than fits are cut from the left.
            disable_tqdm: hide the progress bar.

        Returns:
            ``(logprob, is_greedy)`` per request, in order.

        Raises:
            ValueError: when a continuation alone exceeds ``max_length`` tokens or a non-empty
                continuation has no context.
        """
        inputs: dict[tuple[int, ...], list[int]] = {}  # distinct model input -> request indices
        targets: list[list[int]] = []
        for i, (ctx, cont) in enumerate(requests):
            cont = list(cont)
            if len(cont) > self.max_length:
                raise ValueError(
                    f"request {i}: the continuation has {len(cont)} tokens, more than the model's "
                    f"seq_length {self.max_length}; it cannot be scored in one window"
                )
            if cont and not ctx:
                raise ValueError(f"request {i}: a non-empty continuation needs a context token")
            targets.append(cont)
            if cont:
                whole = (list(ctx) + cont)[-(self.max_length + 1) :]
                inputs.setdefault(tuple(whole[:-1]), []).append(i)
        # Choices of one question scored by single tokens (MMLU's " A".." D") share one input:
        # one forward pass serves them all. Longest first keeps the padding small.
        order = sorted(inputs, key=len, reverse=True)
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for batch in tqdm(batches, desc="Scoring", disable=disable_tqdm or not batches):
            members = [(row, i) for row, inp in enumerate(batch) for i in inputs[inp]]
            scored = self._score_batch(batch, [(row, targets[i]) for row, i in members])
            for (_, i), answer in zip(members, scored, strict=True):
                results[i] = answer
        return results

    @torch.no_grad()
    def _score_batch(
        self, inputs: list[tuple[int, ...]], scored: list[tuple[int, list[int]]]
    ) -> list[tuple[float, bool]]:
        """Score ``(input row, continuation)`` pairs; a continuation fills its row's last slots."""
        width = max(len(inp) for inp in inputs)
        tokens = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for row, inp in enumerate(inputs):
            tokens[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        rows, cols = [], []
        for row, cont in scored:
            rows += [row] * len(cont)
            cols += range(len(inputs[row]) - len(cont), len(inputs[row]))
        tokens = tokens.to(self.device)
        positions = torch.arange(width, device=self.device).unsqueeze(0).expand_as(tokens)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self._logits_fn(tokens, positions)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
            raise RuntimeError(
                f"expected logits [batch, seq, vocab] = [{tokens.shape[0]}, {tokens.shape[1]}, "
                f"...], got {tuple(logits.shape)}"
            )
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        picked = logits[index][:, : self._vocab_size].float()
        target = torch.tensor([t for _, cont in scored for t in cont], device=picked.device)
        token_logprob = torch.log_softmax(picked, dim=-1).gather(1, target[:, None])[:, 0]
        hit = picked.argmax(dim=-1) == target
        out = []
        start = 0
        for _, cont in scored:
            end = start + len(cont)
            out.append((float(token_logprob[start:end].sum()), bool(hit[start:end].all())))
            start = end
        return out
