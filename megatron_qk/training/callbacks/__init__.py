"""Experiment features that hook into the training loop (:class:`~.base.Callback`).

The loop in :mod:`megatron_qk.training.loop` only trains, evaluates and checkpoints; everything a
particular experiment adds (the entropy floor, the held-out attention diagnostics, release and
sharp-entropy logging, preemption, the profiler window) is a callback that saves its own state.
"""
