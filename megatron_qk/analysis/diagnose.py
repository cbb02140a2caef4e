"""The mechanism probes, Q/K ablation and locality on checkpoints (``megatron-qk diagnose``).

For each checkpoint: the same probes as the live ``diag`` lines (entropy, logit, copy score, FFN
writes, Q/K bilinear singular value and its displacement from the run's initialisation, which is
rebuilt from the recipe's seed), the perplexity increase when upper-half Q, K or both are zeroed
(:mod:`megatron_qk.diagnostics.ablation`) and the Appendix-I locality diagnostic
(:mod:`megatron_qk.diagnostics.locality`). Results are merged by step into the output JSON, so
diagnosing checkpoints one at a time or all at once (``--all-checkpoints``) builds the same file,
which ``megatron-qk plot`` reads (``RUN_DIR/diagnose.json`` by default).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_qk.diagnostics.ablation import ABLATIONS, upper_qk_ablation
from megatron_qk.diagnostics.locality import locality_diagnostic
from megatron_qk.diagnostics.recorder import AttentionRecorder
from megatron_qk.rundir.atomic import write_text_atomic
from megatron_qk.training.data import build_datasets, collate_samples
from megatron_qk.training.restore import (
    LoadedCheckpoint,
    build_initial_model,
    load_checkpoint_for_analysis,
    reload_weights,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT_NAME = "diagnose.json"


def _indexed_sequences(
    prefix: str, count: int, seq_length: int, vocab: int, at_most: bool = False
) -> torch.Tensor:
    """The first ``count`` packed sequences of ``seq_length + 1`` tokens of an indexed dataset.

    ``at_most``: return as many whole sequences as the dataset holds when it has fewer.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).exists():
            raise FileNotFoundError(
                f"--data {prefix}: {prefix + suffix} does not exist (pass the prefix without "
                "extension, e.g. corpus_text_document)"
            )
    dataset = IndexedDataset(prefix)
    need = count * (seq_length + 1)
    pieces, have = [], 0
    for i in range(len(dataset)):
        doc = torch.from_numpy(dataset[i].astype("int64"))
        pieces.append(doc)
        have += doc.numel()
        if have >= need:
            break
    if have < need and at_most and have >= seq_length + 1:
        count = have // (seq_length + 1)
        need = count * (seq_length + 1)
    if have < need:
        raise ValueError(
            f"--data {prefix} holds {have} tokens; {count} sequences of {seq_length + 1} need "
            f"{need} (lower --num-sequences)"
        )
    tokens = torch.cat(pieces)[:need].view(count, seq_length + 1)
    if int(tokens.max()) >= vocab:
        raise ValueError(
            f"--data {prefix} has token id {int(tokens.max())} >= the model's vocabulary {vocab}: "
            "it was tokenized with another tokenizer"
        )
    return tokens


def heldout_batches(
    loaded, data_prefix: str | None, num_sequences: int, batch_size: int, at_most: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Held-out micro-batches on the model's device.

    ``at_most``: fewer sequences when ``--data`` holds fewer (the ablation's upper bound).
    """
    cfg = loaded.cfg
    seq = cfg.model.seq_length
    if data_prefix is not None:
        tokens = _indexed_sequences(data_prefix, num_sequences, seq, cfg.model.vocab_size, at_most)
        samples = [{"tokens": t[:-1], "labels": t[1:]} for t in tokens]
    else:
        datasets = build_datasets(cfg, cfg.planned_steps(), str(loaded.run_dir))
        valid = datasets.valid
        # Never repeat a sequence: a repeat would shrink the ablation's standard error falsely.
        samples = [valid[i] for i in range(min(num_sequences, len(valid)))]
    batches = []
    num_sequences = len(samples)
    for start in range(0, num_sequences, batch_size):
        batch = collate_samples(samples[start : start + batch_size])
        batches.append({k: v.to(loaded.device) for k, v in batch.items()})
    return batches


def diagnose_checkpoint(
    loaded,
    batches,
    recorder,
    locality_rank: int | None,
    ablation_batches=None,
    ablation_target_se: float | None = None,
    ablation_min_sequences: int = 0,
    ablations: tuple[str, ...] = ABLATIONS,
) -> dict:
    """Probes, ablation and locality of one loaded checkpoint.

    Args:
        loaded: the checkpoint (:class:`megatron_qk.training.restore.LoadedCheckpoint`).
        batches: held-out batches (:func:`heldout_batches`) of the probes and locality.
        recorder: an ``AttentionRecorder`` on ``loaded.model`` holding the run's initial Q/K.
        locality_rank: rank of the immature subspace (None: the head dimension).
        ablation_batches: held-out batches of the ablation (default: ``batches``), read until
            ``ablation_target_se`` is met (see :func:`upper_qk_ablation`).
        ablations: which upper Q/K ablations to run (``q``, ``k``, ``qk``).
    """
    cfg, model = loaded.cfg, loaded.model
    with torch.no_grad(), recorder.statistics():
        for batch in batches:
            recorder.set_tokens(batch["tokens"])
            model(batch["tokens"], batch["position_ids"], attention_mask=None)
    probes = recorder.reduce(loaded.device)
    return {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "frac": loaded.step / cfg.planned_steps(),
        "tokens": loaded.step * cfg.tokens_per_step(),
        "arm": cfg.arm,
        "seed": cfg.training.seed,
        "sequences": sum(int(b["tokens"].shape[0]) for b in batches),
        "probes": probes,
        "ablation": upper_qk_ablation(
            model,
            recorder,
            batches if ablation_batches is None else ablation_batches,
            ablation_target_se,
            ablation_min_sequences,
            ablations,
        ),
        "locality": locality_diagnostic(model, batches, cfg.model.num_layers, locality_rank),
    }


def _summary_line(result: dict) -> str:
    p, a, loc = result["probes"], result["ablation"], result["locality"]
    return (
        f"step {result['step']}: upper entropy {p['upper_entropy']:.3f}, upper logit "
        f"{p['upper_logit']:.3f}, lower copy {p['lower_copy']:.4f}, ppl "
        f"{a['base_ppl']:.2f} ({a['qk']['ppl_increase']:+.2f} ± "
        f"{a['qk'].get('ppl_increase_se', float('nan')):.2f} with upper Q/K zeroed, "
        f"{a.get('sequences', '?')} sequences), "
        f"lambda_Q {loc['lambda_q']:.3f} lambda_K {loc['lambda_k']:.3f} "
        f"R_P/|X|^2 {loc['rp_fraction']:.3f}"
    )


def initial_model_device(loaded: LoadedCheckpoint) -> torch.device | None:
    """The device to rebuild ``loaded``'s initialisation on, for the Q/K displacement.

    A run's initial weights are drawn on the device it was built for (CUDA and CPU generators
    give different numbers for one seed), recorded in its checkpoints. Rebuilt anywhere else,
    the displacement would silently be measured from another model's start.

    Returns:
        That device, or None (with a warning) when the run was initialised on a GPU and none is
        here: the displacement is then left out of the results.
    """
    recorded = getattr(loaded.model, "init_device", "cpu")
    if recorded == loaded.device.type:
        return loaded.device
    if recorded == "cpu" or torch.cuda.is_available():
        return torch.device(recorded)
    logger.warning(
        "%s was initialised on a GPU; its initialisation cannot be rebuilt on %s, so the Q/K "
        "displacement is not measured (run diagnose on a GPU host for it)",
        loaded.run_dir,
        loaded.device,
    )
    return None


def diagnose_checkpoints(
    checkpoints: list[Path],
    run_dir: Path,
    out: Path,
    data_prefix: str | None = None,
    num_sequences: int | None = None,
    batch_size: int = 4,
    locality_rank: int | None = None,
    chunk_size: int = 256,
    skip_done: bool = False,
    echo=print,
    ablation_sequences: int = 0,
    ablation_min_sequences: int = 0,
    ablation_target_se: float | None = None,
    ablations: tuple[str, ...] = ABLATIONS,
) -> list[dict]:
    """Diagnose checkpoints of one run, merging each result into ``out`` as soon as it is done.

    The model, the held-out batches and the initial Q/K weights (rebuilt from the recipe's seed)
    are made once; later checkpoints are loaded into the same model.

    Args:
        num_sequences: held-out sequences of the probes; None: the run's own
            ``diagnostics.num_sequences`` (128 in the paper recipes), so a checkpoint's probes
            read the sample the training's diag lines read.
        skip_done: leave out checkpoints whose step ``out`` already holds.
        ablation_sequences: most held-out sequences of the ablation (0: the probes' batches).
        ablation_min_sequences, ablation_target_se, ablations: see :func:`upper_qk_ablation`.
        echo: called with one summary line per checkpoint (None: silent).

    Raises:
        FileNotFoundError, ValueError: bad ``data_prefix`` (see :func:`heldout_batches`).
    """
    if skip_done and out.exists():
        done = {r["step"] for r in json.loads(out.read_text(encoding="utf-8"))["results"]}
        checkpoints = [c for c in checkpoints if int(c.name.split("_")[1]) not in done]
    results: list[dict] = []
    loaded = recorder = batches = ablation_batches = None
    for ckpt in tqdm(checkpoints, desc="diagnose", unit="ckpt", disable=len(checkpoints) < 2):
        if loaded is None:
            loaded = load_checkpoint_for_analysis(ckpt)
            if num_sequences is None:
                num_sequences = loaded.cfg.diagnostics.num_sequences
            batches = heldout_batches(loaded, data_prefix, num_sequences, batch_size)
            if ablation_sequences:
                ablation_batches = heldout_batches(
                    loaded, data_prefix, ablation_sequences, batch_size, at_most=True
                )
            recorder = AttentionRecorder([loaded.model], loaded.cfg.model.num_layers, chunk_size)
            init_device = initial_model_device(loaded)
            if init_device is not None:
                recorder.snapshot_initial_qk([build_initial_model(loaded.cfg, init_device)])
        else:
            loaded = reload_weights(loaded, ckpt)
        result = diagnose_checkpoint(
            loaded,
            batches,
            recorder,
            locality_rank,
            ablation_batches,
            ablation_target_se,
            ablation_min_sequences,
            ablations,
        )
        results.append(result)
        merge_results(out, run_dir, [result])  # keep what is done if interrupted
        if echo is not None:
            echo(_summary_line(result))
    return results


def merge_results(out: Path, run_dir: Path, results: list[dict]) -> dict:
    """Merge ``results`` into ``out`` by step (a rerun of a step replaces it); write atomically."""
    data = {"run_dir": str(run_dir), "results": []}
    if out.exists():
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{out} exists but is not JSON ({exc}); move it away") from None
    by_step = {r["step"]: r for r in data.get("results", [])}
    by_step.update({r["step"]: r for r in results})
    data["run_dir"] = str(run_dir)
    data["results"] = [by_step[s] for s in sorted(by_step)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(data, indent=1) + "\n")
    return data
