"""Parameter selection by global layer + role, Megatron config overrides, and the optimizer.

Selection reads the attributes set by ``megatron_qk.models.params.annotate_param_roles``:
``param.mqk_layer_number`` (global 1-based layer, None outside transformer layers) and
``param.mqk_role``. Names are never used: Megatron's local layer indices restart on every
pipeline stage, the global layer number does not.

Each rule becomes one ``ParamKey -> ParamGroupOverride`` entry added to Megatron's standard
overrides (no weight decay on biases and 1-D params). Its override holds only constants:
``mqk_rule: <name>`` (how the scheduler finds the group) and ``lr_mult: "mqk_rule:<name>"``
(the identity tag: 0.16.1 matches checkpointed groups to live groups by
``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)`` and its scheduler ignores
``lr_mult``). The learning-rate factor itself is applied at runtime by
:class:`megatron_qk.optim.scheduler.MultiplierScheduler` and never stored in the group keys.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamKey,
    ParamPredicate,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from megatron_qk.config.optim import explicit_layers
from megatron_qk.models.layers import all_layers, lower_layers, upper_layers
from megatron_qk.models.params import LAYER_ATTR, ROLE_ATTR
from megatron_qk.optim.scheduler import RULE_KEY, MultiplierScheduler, build_scheduler

if TYPE_CHECKING:
    from megatron_qk.config.optim import MultiplierRuleConfig
    from megatron_qk.config.schema import ExperimentConfig

TAG_PREFIX = "mqk_rule:"
_FUSED_QKV_ROLE = "qkv"


def rule_tag(name: str) -> str:
    """The constant ``lr_mult`` identity tag of a rule's groups."""
    return f"{TAG_PREFIX}{name}"


def parse_layers(spec: str, num_layers: int, where: str = "layers") -> frozenset[int]:
    """Global 1-based layer numbers selected by ``spec``.

    Args:
        spec: ``upper_half`` (``layer > num_layers / 2``), ``lower_half`` (the rest), ``all``,
            or comma-separated numbers and inclusive ranges such as ``"11-20,3"``.
        num_layers: total transformer layers of the model (all pipeline stages).
        where: the YAML path used in error messages.

    Raises:
        ConfigError: on a malformed spec or a layer outside ``1..num_layers``.
    """
    spec = spec.strip()
    if spec == "upper_half":
        return upper_layers(num_layers)
    if spec == "lower_half":
        return lower_layers(num_layers)
    if spec == "all":
        return all_layers(num_layers)
    return explicit_layers(spec, num_layers, where)


# Roles whose 1-D parameters are linear-layer biases (a norm's 1-D parameters are its weights).
_LINEAR_ROLES = frozenset({"q", "k", "v", "qkv", "o", "fc1", "fc2"})


def _selected(
    layers: frozenset[int],
    roles: frozenset[str],
    param: torch.nn.Parameter,
    biases: bool = True,
) -> bool:
    layer = getattr(param, LAYER_ATTR, None)
    role = getattr(param, ROLE_ATTR, None)
    if layer is None or layer not in layers or role not in roles:
        return False
    # A linear layer's weight is 2-D (also as a TP shard); its bias is 1-D.
    return biases or role not in _LINEAR_ROLES or param.dim() > 1


def rule_predicates(
    rules: Sequence[MultiplierRuleConfig], num_layers: int
) -> dict[str, ParamPredicate]:
    """One Megatron ``ParamPredicate`` per rule (named ``mqk_rule:<name>``)."""
    preds = {}
    for i, rule in enumerate(rules):
        layers = parse_layers(rule.layers, num_layers, where=f"optim.rules[{i}].layers")
        fn = functools.partial(_selected, layers, frozenset(rule.roles), biases=rule.biases)
        preds[rule.name] = ParamPredicate(name=rule_tag(rule.name), fn=fn)
    return preds


def rule_config_overrides(
    rules: Sequence[MultiplierRuleConfig],
    optimizer_config: OptimizerConfig,
    num_layers: int,
) -> dict[ParamKey, ParamGroupOverride]:
    """Megatron's standard overrides plus one constant, uniquely tagged override per rule.

    The rule overrides carry no ``wd_mult``/``max_lr``/``min_lr``, so Megatron's merge of all
    matching overrides never conflicts with the standard no-weight-decay entry (a rule may
    select biases and norms) or with a decoupled embedding lr.
    """
    overrides: dict[ParamKey, ParamGroupOverride] = dict(
        get_standard_config_overrides(optimizer_config)
    )
    for name, pred in rule_predicates(rules, num_layers).items():
        overrides[ParamKey(predicate=pred)] = ParamGroupOverride(
            lr_mult=rule_tag(name), **{RULE_KEY: name}
        )
    return overrides


def _named_params(model_chunks: Iterable[torch.nn.Module]):
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                yield name, param


def _strip_wrappers(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def _selection_id(name: str, param: torch.nn.Parameter) -> str:
    """Layout-independent id: ``L<global layer>:<name inside the layer>``."""
    inner = _strip_wrappers(name)
    marker = ".layers."
    if marker in inner:
        inner = inner.split(marker, 1)[1].split(".", 1)[1]
    return f"L{getattr(param, LAYER_ATTR)}:{inner}"


def _all_gather(obj):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def validate_rule_selection(
    rules: Sequence[MultiplierRuleConfig],
    model_chunks: Sequence[torch.nn.Module],
    num_layers: int,
) -> dict[str, list[str]]:
    """Check the rules against the model on every rank (collective) and describe the selection.

    Every rank raises the same error, so no rank is left waiting in a later collective.

    Returns:
        ``{rule: sorted ids}``, ids ``L<layer>:<name inside the layer>`` gathered over all ranks
        (a TP-sharded tensor appears once): the same for every parallel layout.

    Raises:
        ValueError: parameters are not annotated, a parameter is matched by two rules (naming
            both and the parameter), a q/k/v rule meets a fused QKV weight, or a rule selects
            no parameter on any rank.
    """
    preds = rule_predicates(rules, num_layers)
    selected: dict[str, set[str]] = {name: set() for name in preds}
    overlaps: list[str] = []
    annotated = False
    fused = False
    for name, param in _named_params(model_chunks):
        annotated = annotated or hasattr(param, ROLE_ATTR)
        fused = fused or getattr(param, ROLE_ATTR, None) == _FUSED_QKV_ROLE
        hits = [rule for rule, pred in preds.items() if pred(param)]
        if len(hits) > 1:
            overlaps.append(
                f"{_strip_wrappers(name)} is selected by rules {hits[0]!r} and {hits[1]!r}"
            )
        for rule in hits:
            selected[rule].add(_selection_id(name, param))
    gathered = _all_gather(
        {"sel": selected, "overlaps": overlaps, "annotated": annotated, "fused": fused}
    )
    if not any(g["annotated"] for g in gathered):
        raise ValueError(
            "model parameters carry no role annotation: call "
            "megatron_qk.models.params.annotate_param_roles(model) before build_optimizer"
        )
    all_overlaps = sorted({o for g in gathered for o in g["overlaps"]})
    if all_overlaps:
        raise ValueError(
            "a parameter may belong to one multiplier rule only: " + "; ".join(all_overlaps[:5])
        )
    merged = {name: sorted(set().union(*(g["sel"][name] for g in gathered))) for name in preds}
    any_fused = any(g["fused"] for g in gathered)
    for i, rule in enumerate(rules):
        if merged[rule.name]:
            continue
        if any_fused and set(rule.roles) & {"q", "k", "v"}:
            raise ValueError(
                f"optim.rules[{i}] ({rule.name!r}): roles {rule.roles} need separate Q/K/V "
                "parameters but the model has a fused linear_qkv: set model.split_qkv: true"
            )
        raise ValueError(
            f"optim.rules[{i}] ({rule.name!r}) selects no parameter: layers {rule.layers!r} of "
            f"{num_layers}, roles {rule.roles}"
        )
    return merged


def check_group_identities(optimizer) -> None:
    """Fail if two live groups share Megatron's checkpoint identifier (the collision trap).

    0.16.1 matches saved to live groups by ``param_group_identifier_keys``; two groups with
    the same tuple would silently receive the same saved dict on load.

    Raises:
        RuntimeError: naming the colliding identifier.
    """
    seen: dict[tuple, int] = {}
    for i, group in enumerate(optimizer.param_groups):
        key = tuple(group.get(k) for k in param_group_identifier_keys)
        if key in seen:
            raise RuntimeError(
                f"optimizer groups {seen[key]} and {i} share the checkpoint identity "
                f"{dict(zip(param_group_identifier_keys, key))}: a checkpoint load would "
                "overwrite one with the other. Give each group a distinct constant tag."
            )
        seen[key] = i


def megatron_optimizer_config(cfg: ExperimentConfig, bf16: bool) -> OptimizerConfig:
    """Megatron ``OptimizerConfig`` for the recipe (AdamW; lr and min lr x lr_multiplier)."""
    o, p = cfg.optim, cfg.parallel
    lr = o.lr * o.lr_multiplier
    return OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=o.min_lr_ratio * lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        decoupled_weight_decay=True,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
    )


def _is_bf16(cfg: ExperimentConfig, model_chunks: Sequence[torch.nn.Module]) -> bool:
    tf_config = getattr(model_chunks[0], "config", None)
    if tf_config is not None and hasattr(tf_config, "bf16"):
        return bool(tf_config.bf16)
    precision = cfg.training.precision
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def build_optimizer(
    cfg: ExperimentConfig,
    model_chunks: Sequence[torch.nn.Module],
    bf16: bool | None = None,
) -> tuple[object, MultiplierScheduler]:
    """Megatron optimizer with one group per rule, and the matching scheduler (collective).

    Args:
        cfg: the recipe.
        model_chunks: DDP-wrapped model chunks whose parameters were annotated by
            ``annotate_param_roles``.
        bf16: mixed precision; default: the model's ``TransformerConfig.bf16``.

    Returns:
        ``(optimizer, scheduler)``.

    Raises:
        ValueError: when a rule is invalid for this model (see :func:`validate_rule_selection`).
    """
    if bf16 is None:
        bf16 = _is_bf16(cfg, model_chunks)
    num_layers = cfg.model.num_layers
    rules = cfg.optim.rules
    oc = megatron_optimizer_config(cfg, bf16)
    if rules:
        validate_rule_selection(rules, model_chunks, num_layers)
        overrides = rule_config_overrides(rules, oc, num_layers)
    else:
        # Exactly what Megatron's training.py passes: the control arm is untouched Megatron.
        overrides = get_standard_config_overrides(oc)
    optimizer = get_megatron_optimizer(oc, list(model_chunks), config_overrides=overrides)
    check_group_identities(optimizer)
    scheduler = build_scheduler(cfg, optimizer)
    return optimizer, scheduler
