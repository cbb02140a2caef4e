"""Layer roles by global layer number: which transformer layers are "upper" and "lower".

Layers are numbered globally from 1 to ``num_layers`` across all pipeline stages (Megatron's
``layer.layer_number``), so a selection means the same layers whatever the TP/PP layout. The
paper's intervention and diagnostics split the stack in halves: the upper half is every layer
with ``number > num_layers / 2`` (for an odd count the middle layer is lower).
"""

from __future__ import annotations


def is_upper(layer_number: int, num_layers: int) -> bool:
    """Whether global 1-based ``layer_number`` lies in the upper half of ``num_layers``."""
    return layer_number > num_layers / 2


def first_upper_layer(num_layers: int) -> int:
    """The lowest global layer number of the upper half."""
    return num_layers // 2 + 1


def upper_layers(num_layers: int) -> frozenset[int]:
    """Global 1-based numbers of the upper-half layers (``n > num_layers / 2``)."""
    return frozenset(n for n in range(1, num_layers + 1) if is_upper(n, num_layers))


def lower_layers(num_layers: int) -> frozenset[int]:
    """Global 1-based numbers of the lower-half layers (``n <= num_layers / 2``)."""
    return frozenset(n for n in range(1, num_layers + 1) if not is_upper(n, num_layers))


def all_layers(num_layers: int) -> frozenset[int]:
    """Global 1-based numbers of every layer."""
    return frozenset(range(1, num_layers + 1))
