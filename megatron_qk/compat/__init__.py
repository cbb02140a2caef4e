"""Compatibility layer: megatron-core's training stack on CPU over gloo (see ``cpu.py``)."""

from megatron_qk.compat.cpu import CpuRNGStatesTracker, activate_cpu_compat, is_active

__all__ = ["CpuRNGStatesTracker", "activate_cpu_compat", "is_active"]
