"""Which megatron-core releases megatron-qk supports, and every place their behaviour differs.

The supported range is declared once here (``setup.py`` repeats it as its requirement) and each
version branch the package needs lives in this module, so a new release means reading the
internals listed in docs/VERSIONS.md and touching this file. What the releases share (checked by
reading 0.16.1, 0.17.1, 0.18.2 and 0.19.2, see docs/VERSIONS.md) needs no branch:
``param_group_identifier_keys`` is read from the installed megatron-core, never spelled out;
``HAVE_APEX_OR_TE``, ``DistributedOptimizer.init_state_fn``,
``load_parameter_state_from_fully_reshardable`` and ``OptimizerParamScheduler.get_lr/get_wd``
keep their names and signatures across the range.
"""

from __future__ import annotations

import megatron.core
from packaging.version import Version

# The tested range: the CI legs run 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12).
MIN_VERSION = Version("0.16.1")
MAX_VERSION_EXCLUSIVE = Version("0.20")

INSTALLED = Version(str(megatron.core.__version__))

# 0.18 added ``name=`` to ``ColumnParallelLinear`` (and the TE linears) and passes
# ``name=<layer path>.linear_qkv`` to the ``linear_qkv`` builder from ``SelfAttention``.
LINEAR_TAKES_NAME = INSTALLED >= Version("0.18")


def is_supported(version: Version = INSTALLED) -> bool:
    """Whether ``version`` lies in the range megatron-qk is tested with."""
    return MIN_VERSION <= version < MAX_VERSION_EXCLUSIVE


def linear_name_kwargs(name: str | None) -> dict[str, str]:
    """``name=`` for a Megatron linear where the installed release takes it, else nothing.

    Args:
        name: the module path the sub-linear should report (None: megatron-core passed none).
    """
    if name is None or not LINEAR_TAKES_NAME:
        return {}
    return {"name": name}
