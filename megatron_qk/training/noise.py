"""Megatron-Core's known start-up noise, kept out of stderr unless ``--verbose``.

A 5-step ``train tiny`` printed ~90 stderr lines before its first step, none about the run: the
"Transformer Engine and Apex are not installed" / "Apex is not installed" warnings of several
modules (issued at import, so the filter goes in before megatron-core is imported), Megatron's
own default ``cuda_graph_scope`` deprecation warning, the Megatron-FSDP notices of a run that
uses no FSDP, the DDP and optimizer config dumps, and the "Params for bucket" list of every
parameter. :func:`quiet_megatron_noise` is the one place that silences them; everything else
megatron-core says (warnings of other kinds, any WARNING-level log) still reaches stderr.
"""

from __future__ import annotations

import logging
import warnings

# The UserWarnings megatron-core 0.16.1 issues on every start on a machine without TE/Apex.
NOISE_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",  # Megatron's own default cuda_graph_scope
)

# Loggers whose INFO lines are start-up chatter; their warnings still show.
CHATTY_LOGGERS = (
    "megatron.core.distributed.fsdp",  # "Using Megatron-FSDP ..." without FSDP
    "megatron.core.distributed.distributed_data_parallel",  # the DDP config dump
    "megatron.core.distributed.param_and_grad_buffer",  # bucket count, "Params for bucket" list
    "megatron.core.optimizer",  # the OptimizerConfig dump
    "megatron.core.optimizer_param_scheduler",  # "> learning rate decay style"
)

# Log records of other libraries that megatron-core's imports set off on a CPU host: the CUDA
# build of torch (the py312 leg's) warns from cpp_extension that no CUDA runtime is found.
NOISE_LOG_RECORDS = {"torch.utils.cpp_extension": "No CUDA runtime is found"}

_quieted = False


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_megatron_noise(verbose: bool = False) -> bool:
    """Silence the known noise once per process (no-op with ``verbose``).

    Call it before megatron-core is imported: several of the warnings are issued at import.

    Returns:
        True when the noise is (already) silenced.
    """
    global _quieted
    if verbose:
        return _quieted
    if not _quieted:
        for pattern in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        for name, prefix in NOISE_LOG_RECORDS.items():
            logging.getLogger(name).addFilter(_DropMessage(prefix))
        _quieted = True
    return True
