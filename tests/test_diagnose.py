"""Diagnostics on a real tiny model: recorder vs materialised attention, Q/K ablation, the
sharp-entropy event, and ``diagnose`` / ``plot`` end to end on a trained checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_qk.config.loader import load_config


def _materialised_attention(model):
    """Hooks on the local kernel's softmax: scaled scores and probabilities per layer."""
    captured: dict[int, list] = {}
    handles = []
    for layer in model.decoder.layers:
        number = int(layer.layer_number)
        captured[number] = []

        def hook(module, args, output, number=number):
            captured[number].append((args[0].detach().clone(), output.detach().clone()))

        handles.append(
            layer.self_attention.core_attention.scale_mask_softmax.register_forward_hook(hook)
        )
    return captured, handles


def _reference_layer_stats(scores, probs, tokens):
    """Per-head copy mass, normalised entropy, logit RMS and mean |logit| from materialised
    attention."""
    from megatron_qk.diagnostics.probes import previous_occurrence

    b, h, s, _ = probs.shape
    causal = torch.ones(s, s).tril().bool()
    rows = torch.arange(s)
    plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    entropy = -plogp.sum(-1)[..., 1:] / torch.log(rows[1:] + 1.0)  # [b, h, s-1]
    logit_rms = scores[..., causal].pow(2).mean(dim=(0, 2)).sqrt()  # [h]
    logit_abs = scores[..., causal].abs().mean(dim=(0, 2))  # [h]
    prev = previous_occurrence(tokens)
    copy = []
    for head in range(h):
        masses = [
            probs[i, head, j, prev[i, j]] for i in range(b) for j in range(s) if prev[i, j] >= 0
        ]
        copy.append(torch.stack(masses).mean())
    return torch.stack(copy), entropy.mean(dim=(0, 2)), logit_rms, logit_abs


def _close(values: list[float], reference: torch.Tensor) -> None:
    # The recorder recomputes attention in fp32 chunks from captured Q/K; the reference takes the
    # model's own scores. Logits are length-16 dot products (2 gamma(16) ~ 2e-6 relative to
    # sum|q||k|, tests/fp32_bounds.py) on weights scaled by 8: large logits, whose absolute
    # error (relative error x logit size) goes through exp() into the probabilities: rtol 1e-4
    # allows logits up to ~50; atol covers copy masses and entropies near 0.
    got = torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(got, reference.double(), rtol=1e-4, atol=1e-6)


@pytest.fixture
def tiny_model(single_rank):
    from megatron_qk.models.builder import build_gpt_model

    cfg = load_config("tiny", ["model.vocab_size=64", "model.vocab_pad_multiple=8"])
    model = build_gpt_model(cfg, init_seed=3)
    # Sharpen the random model so entropies and copy masses are far from uniform.
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attention.linear_qkv.linear_q.weight.mul_(8.0)
            layer.self_attention.linear_qkv.linear_k.weight.mul_(8.0)
    return cfg, model.eval()


def test_recorder_equals_materialised_attention(tiny_model):
    from megatron_qk.diagnostics.recorder import AttentionRecorder

    cfg, model = tiny_model
    tokens = torch.randint(0, 12, (3, 64), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(64).expand(3, -1)
    recorder = AttentionRecorder([model], cfg.model.num_layers, chunk_size=24)
    recorder.snapshot_initial_qk()
    captured, handles = _materialised_attention(model)
    # FFN write reference: the layer output minus its input to the pre-MLP norm.
    mids, outs = {}, {}

    def keep_mid(n):
        return lambda module, args: mids.__setitem__(n, args[0].detach().clone())

    def keep_out(n):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            outs[n] = out.detach().clone()

        return hook

    for layer in model.decoder.layers:
        n = int(layer.layer_number)
        handles.append(layer.pre_mlp_layernorm.register_forward_pre_hook(keep_mid(n)))
        handles.append(layer.register_forward_hook(keep_out(n)))
    try:
        with torch.no_grad(), recorder.statistics():
            recorder.set_tokens(tokens)
            model(tokens, pos, attention_mask=None)
    finally:
        for handle in handles:
            handle.remove()
    record = recorder.reduce(torch.device("cpu"))
    for layer in model.decoder.layers:
        n = int(layer.layer_number)
        ((scores, probs),) = captured[n]
        copy, entropy, logit, logit_abs = _reference_layer_stats(scores, probs, tokens)
        heads = record["layers"][str(n)]["heads"]
        _close(heads["copy"], copy)
        _close(heads["entropy"], entropy)
        _close(heads["logit"], logit)
        _close(heads["logit_abs"], logit_abs)
        write = outs[n] - mids[n]
        assert record["layers"][str(n)]["ffn_write_rms"] == pytest.approx(
            write.pow(2).mean().sqrt().item(), rel=1e-4
        )
        # Dense reference of sigma_1((W_q^h)^T W_k^h); weights were scaled by 8 after init, so
        # the upper heads' displacement from the snapshot (taken after scaling) is 0.
        wq = layer.self_attention.linear_qkv.linear_q.weight.view(4, 16, 64)
        wk = layer.self_attention.linear_qkv.linear_k.weight.view(4, 16, 64)
        dense = torch.linalg.matrix_norm(wq.transpose(1, 2) @ wk, ord=2)
        _close(heads["qk_sigma"], dense)
        if n > 2:
            assert max(heads["qk_displacement"]) < 1e-9
        else:
            assert "qk_displacement" not in heads
    lower = torch.tensor([record["layers"][str(n)]["copy"] for n in (1, 2)])
    # Equal counts: the record's pooled mean and this mean of two per-layer means differ only by
    # the fp32 rounding of two divisions and a sum (a few ulps, 6e-8 each).
    assert record["lower_copy"] == pytest.approx(lower.mean().item(), rel=1e-6)
    assert record["logit_ratio"] == pytest.approx(record["upper_logit"] / record["lower_logit"])
    assert record["first_upper_ffn_write_rms"] == record["layers"]["3"]["ffn_write_rms"]
    assert 0.05 < record["upper_entropy"] < 0.95  # the sharpened model is far from uniform


@pytest.mark.parametrize("which", ["q", "k", "qk"])
def test_zeroing_upper_qk_gives_uniform_causal_attention(tiny_model, which):
    from megatron_qk.diagnostics.ablation import zeroed_upper_qk
    from megatron_qk.diagnostics.recorder import AttentionRecorder

    cfg, model = tiny_model
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(2))
    recorder = AttentionRecorder([model], cfg.model.num_layers)
    captured, handles = _materialised_attention(model)
    try:
        with torch.no_grad(), zeroed_upper_qk(recorder, which):
            model(tokens, torch.arange(64).expand(2, -1), attention_mask=None)
    finally:
        for handle in handles:
            handle.remove()
    uniform = torch.ones(64, 64).tril() / torch.arange(1, 65)[:, None]
    for n in (3, 4):
        probs = captured[n][0][1]
        torch.testing.assert_close(probs, uniform.expand_as(probs), rtol=0, atol=1e-6)
    for n in (1, 2):  # lower layers untouched: far from uniform
        probs = captured[n][0][1]
        assert (probs - uniform.expand_as(probs)).abs().max() > 0.3


def test_ablation_readout_on_a_sharp_model(tiny_model):
    """Zeroing Q, K or both gives the same perplexity (all upper logits zero); it differs from
    the intact model, whose loss is the direct computation."""
    from megatron_qk.diagnostics.ablation import upper_qk_ablation
    from megatron_qk.diagnostics.recorder import AttentionRecorder

    cfg, model = tiny_model
    tokens = torch.randint(0, 64, (2, 65), generator=torch.Generator().manual_seed(4))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(2, 64),
        "position_ids": torch.arange(64).expand(2, -1),
    }
    result = upper_qk_ablation(model, AttentionRecorder([model], 4), [batch])
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], attention_mask=None)
    # Megatron's loss runs over the padded vocabulary too.
    direct = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].flatten()
    )
    # Same logits, a fp32 cross-entropy over 128 tokens reduced in another order (token sums
    # in the readout vs torch's mean): gamma(128) ~ 8e-6 relative.
    assert result["base_loss"] == pytest.approx(direct.item(), rel=1e-5)
    assert result["q"]["ppl"] == pytest.approx(result["k"]["ppl"], rel=1e-6)
    assert result["qk"]["ppl"] == pytest.approx(result["q"]["ppl"], rel=1e-6)
    assert abs(result["qk"]["ppl_increase"]) > 1e-4 * result["base_ppl"]


def test_ablation_reads_batches_until_the_standard_error_target(tiny_model):
    """A loose target stops after the first batch; a zero target reads every batch."""
    from megatron_qk.diagnostics.ablation import upper_qk_ablation
    from megatron_qk.diagnostics.recorder import AttentionRecorder

    _, model = tiny_model
    gen = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        tokens = torch.randint(0, 64, (2, 65), generator=gen)
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": torch.ones(2, 64),
                "position_ids": torch.arange(64).expand(2, -1),
            }
        )
    recorder = AttentionRecorder([model], 4)
    loose = upper_qk_ablation(model, recorder, batches, target_se=1e9)
    assert loose["sequences"] == 2 and loose["tokens"] == 128 and loose["target_met"] is True
    full = upper_qk_ablation(model, recorder, batches, target_se=0.0)
    assert full["sequences"] == 6 and full["target_met"] is False
    for which in ("q", "k", "qk"):
        assert math.isfinite(full[which]["ppl_increase_se"]) and full[which]["ppl_increase_se"] > 0
    assert full["base_loss"] != loose["base_loss"]  # the first batch alone is another sample


def test_ablation_runs_only_the_ablations_asked_for(tiny_model):
    """The quickstart runs the both-zeroed ablation alone: the same numbers as in the full
    readout, no ``q``/``k`` entries; an unknown name is refused."""
    from megatron_qk.diagnostics.ablation import upper_qk_ablation
    from megatron_qk.diagnostics.recorder import AttentionRecorder

    _, model = tiny_model
    tokens = torch.randint(0, 64, (3, 65), generator=torch.Generator().manual_seed(6))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(3, 64),
        "position_ids": torch.arange(64).expand(3, -1),
    }
    recorder = AttentionRecorder([model], 4)
    full = upper_qk_ablation(model, recorder, [batch])
    only = upper_qk_ablation(model, recorder, [batch], ablations=("qk",))
    assert "q" not in only and "k" not in only
    assert only["qk"] == pytest.approx(full["qk"]) and only["base_loss"] == full["base_loss"]
    with pytest.raises(ValueError, match="subset"):
        upper_qk_ablation(model, recorder, [batch], ablations=("v",))


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 12-step tiny run with checkpoints at steps 6 and 12 (in-process)."""
    from megatron_qk.training.entry import train_from_config

    root = tmp_path_factory.mktemp("diag_run")
    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={root / 'run'}",
            "training.train_steps=12",
            "training.eval_interval=3",
            "training.save_interval=6",
            "logging.progress_bar=false",
            "optim.lr=1e-2",
            "diagnostics.sharp_entropy_threshold=0.999",
        ],
    )
    train_from_config(cfg)
    return root / "run"


def test_diag_lines_and_sharp_entropy_event(trained_run):
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    diags = [r for r in records if r["kind"] == "diag"]
    assert [r["step"] for r in diags] == [0, 3, 6, 9, 12]
    for r in diags:
        for key in ("logit_ratio", "upper_ffn_write_rms", "first_upper_ffn_write_rms",
                    "upper_qk_sigma", "upper_qk_displacement"):  # fmt: skip
            assert math.isfinite(r[key]), key
        # Both logit magnitudes are logged; mean |z| <= RMS (Jensen).
        assert 0 < r["upper_logit_abs"] <= r["upper_logit"]
        assert 0 < r["lower_logit_abs"] <= r["lower_logit"]
        assert len(r["layers"]["4"]["heads"]["qk_displacement"]) == 4
    assert diags[0]["upper_qk_displacement"] == pytest.approx(0.0, abs=1e-9)
    assert diags[-1]["upper_qk_displacement"] > 0
    below = [r for r in diags if r["upper_entropy"] < 0.999]
    events = [r for r in records if r["kind"] == "event"]
    assert below and below[0]["step"] > 0  # the recipe crosses mid-run
    assert [(e["event"], e["step"]) for e in events] == [
        ("sharp_entropy_crossing", below[0]["step"])
    ]
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["sharp_entropy_crossing"]["step"] == below[0]["step"]


def test_diagnose_and_plot_end_to_end(trained_run, tmp_path):
    from data_fixtures import pydoc_docs, run_preprocess, text_records, write_jsonl
    from matplotlib.image import imread

    from megatron_qk.analysis.plot import PANELS
    from megatron_qk.cli import main

    assert main(["diagnose", "--checkpoint", str(trained_run), "--all-checkpoints",
                 "--num-sequences", "6", "--batch-size", "4"]) == 0  # fmt: skip
    data = json.loads((trained_run / "diagnose.json").read_text())
    assert [r["step"] for r in data["results"]] == [6, 12]
    last = data["results"][-1]
    # The checkpoint's held-out loss on the run's own validation samples.
    assert math.isfinite(last["ablation"]["base_ppl"])
    # With biases, zeroing Q or K (post-projection) both give all-zero upper logits.
    for which in ("q", "k"):
        assert last["ablation"][which]["ppl"] == pytest.approx(last["ablation"]["qk"]["ppl"])
    assert last["ablation"]["qk"]["ppl_increase"] == pytest.approx(
        last["ablation"]["qk"]["ppl"] - last["ablation"]["base_ppl"]
    )
    # The ablation reads its own sample (up to the run's 16 validation sequences, never
    # repeating one) and reports the standard error of each increase against the target.
    ablation = last["ablation"]
    assert 2 <= ablation["sequences"] <= 16 and ablation["tokens"] == 64 * ablation["sequences"]
    errors = [ablation[w]["ppl_increase_se"] for w in ("q", "k", "qk")]
    assert all(math.isfinite(se) and se > 0 for se in errors)
    assert ablation["target_se"] == 0.035
    assert ablation["target_met"] == all(se < 0.035 for se in errors)
    if ablation["sequences"] < 16:  # stopping early only once the target is met
        assert ablation["target_met"]
    loc = last["locality"]
    assert loc["rank"] == 16 and set(loc["layers"]) == {"3", "4"}
    for layer in loc["layers"].values():
        assert 0 < layer["rp_fraction"] <= 1 + 1e-9
        # Corollary 1 (eq. 31): ||X W W^T P|| <= ||X|| ||W||^2, i.e. lambda <= ||X|| / ||X_P||.
        for key in ("lambda_q", "lambda_k"):
            assert 0 < layer[key] <= (1 + 1e-9) / math.sqrt(layer["rp_fraction"])
    diag12 = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    diag12 = [r for r in diag12 if r["kind"] == "diag" and r["step"] == 12][0]
    # Weight statistics do not depend on the data: the checkpoint gives the live values.
    assert last["probes"]["upper_qk_sigma"] == pytest.approx(diag12["upper_qk_sigma"], rel=1e-6)
    assert last["probes"]["upper_qk_displacement"] == pytest.approx(
        diag12["upper_qk_displacement"], rel=1e-6
    )

    # Held-out data from an indexed dataset written by our preprocessing tool.
    src = write_jsonl(tmp_path / "docs.jsonl", text_records(pydoc_docs(40)))
    run_preprocess(tmp_path / "corpus", [src])
    out = tmp_path / "indexed.json"
    ckpt = trained_run / "checkpoints" / "iter_0000006"
    assert main(["diagnose", "--checkpoint", str(ckpt), "--data",
                 str(tmp_path / "corpus_text_document"), "--out", str(out),
                 "--num-sequences", "4", "--locality-rank", "8",
                 "--ablation-sequences", "8"]) == 0  # fmt: skip
    result = json.loads(out.read_text())["results"]
    assert [r["step"] for r in result] == [6] and result[0]["locality"]["rank"] == 8
    with pytest.raises(SystemExit, match="does not exist"):
        main(["diagnose", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope")])

    assert main(["plot", str(trained_run), "--out", str(tmp_path / "plots")]) == 0
    for name in (*PANELS, "figure3"):
        file = "figure3.png" if name == "figure3" else f"panel_{name}.png"
        image = imread(tmp_path / "plots" / file)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # not a blank canvas


def test_diag_lines_reach_tensorboard(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = (
        "diag/upper_entropy",
        "diag/lower_copy",
        "diag/logit_ratio",
        "diag/upper_qk_sigma",
        "diag/upper_qk_displacement",
        "diag/first_upper_ffn_write_rms",
        "diag/L3/qk_sigma",
        "diag/L1/ffn_write_rms",
    )
    assert set(expected) <= tags, set(expected) - tags
    steps = [e.step for e in events.Scalars("diag/upper_entropy")]
    assert steps == [0, 3, 6, 9, 12]
