"""Layer-indexed learning-rate multipliers with maturity-triggered release, in Megatron's optimizer.

Use::

    optimizer, scheduler = build_optimizer(cfg, model_chunks)   # collective
    ...optimizer.step(); scheduler.step(increment=cfg.training.global_batch_size)
    events = scheduler.pop_events()                              # forced/fixed releases
    score = recorder.reduce(device)["lower_copy"]                # collective, bit-identical
    scheduler.observe_evaluation(step, score); scheduler.pop_events()   # maturity releases
    record.update({f"mult/{k}": v for k, v in scheduler.multipliers().items()})
    state = scheduler.state_dict()  /  scheduler.load_state_dict(state)

Design notes
------------
*Separate Q/K parameters, not row scaling.* Megatron fuses W_Q, W_K, W_V into one
``linear_qkv`` weight, and the distributed optimizer assigns whole parameters to groups, so a
per-group learning rate on the fused weight would slow V as well; scaling gradients does nothing
under Adam. Scaling the *update* rows of the fused weight works but couples to private
DistributedOptimizer internals (shard ranges, main-param copies) and breaks with the
precision-aware optimizer and Megatron-FSDP. With ``model.split_qkv`` W_Q, W_K and W_V are
ordinary parameters (the split projection re-emits the fused layout, so the model is the same
function), and a rule is just a Megatron parameter group: it works unchanged with DDP, the
distributed optimizer, TP, PP, bf16 main params and checkpoints.

*A scheduler subclass, not group edits.* Megatron 0.16.1's ``OptimizerParamScheduler`` ignores
``lr_mult``; a per-group lr has to come from ``max_lr``/``min_lr`` or from the scheduler.
Mutating ``max_lr`` at release time would put changing values into the group dicts (and at
Megatron >= 0.19 into the checkpoint identity). :class:`MultiplierScheduler` instead multiplies
``get_lr(group)`` by the rule's release-controlled factor each step; the group dicts stay
constant and the controllers' state is saved in the scheduler's ``state_dict``. It counts
samples like Megatron's, so 3% / 12% / 1% of training are all measured in the same unit
(completed optimizer steps = samples // global batch).

*The identity tag.* On load, 0.16.1 pairs saved and live groups by ``(wd_mult, lr_mult,
is_expert_parallel, is_decoupled_lr)``; a group differing from the default only in lr silently
takes the default group's saved dict (or gives it its own). Each rule's override therefore sets
``lr_mult`` to the constant string ``"mqk_rule:<name>"`` (unique per rule; 0.16.1 never does
arithmetic on it, and a string cannot be mistaken for a live multiplier) plus ``mqk_rule: <name>``,
which the scheduler uses to find the group. :func:`check_group_identities` runs at build time and
refuses any optimizer whose groups share an identifier.
"""
