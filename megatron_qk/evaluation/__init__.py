"""Downstream evaluation with EleutherAI's lm-evaluation-harness (``megatron-qk eval``).

* :mod:`~megatron_qk.evaluation.adapter`: ``MegatronLM``, the in-process harness model
  (log-likelihood scoring of a megatron-core ``GPTModel``; imports ``lm_eval``).
* :mod:`~megatron_qk.evaluation.suite`: task resolution, tokenizer checks, the report.
* :mod:`~megatron_qk.cli.eval`: the ``eval`` subcommand.

The harness is the ``eval`` extra (``pip install -e .[eval]``).
"""
