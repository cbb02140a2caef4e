"""``megatron-qk export``: transformers and stock Megatron-Core exports compute our logits.

Tolerance (the issue's rel 1e-5, with an absolute floor of 1e-5 for logits near zero): the
exported model evaluates the same fp32 products as ours and can only differ in summation order
(one fused QKV GEMM vs three, other GEMM blockings). Reordering a length-K fp32 reduction moves
it by about sqrt(K) * 2**-24 * sum|terms| typically (K * 2**-24 * sum|terms| at worst); here
K <= 256, |logits| ~ 1 (tiny models, init std 0.02, 3 steps) and a few reductions act in series,
so a few 1e-6 at most. Measured on the tiny GPT export: 0.0 with eager attention, 4.2e-7 with
SDPA (max |logit| 1.03).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from export_checks import assert_hf_export_matches, assert_megatron_export_matches

from megatron_qk.cli import main as cli_main
from megatron_qk.config.loader import load_config
from megatron_qk.export.hf import ExportError, hf_architecture
from megatron_qk.training.entry import train_from_config
from megatron_qk.training.restore import load_checkpoint_for_analysis

LLAMA = (
    "model.ffn=swiglu",
    "model.normalization=rmsnorm",
    "model.bias=false",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "model.tie_embeddings=false",
)


def _train(out: Path, *overrides: str) -> Path:
    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={out}",
            "training.train_steps=3",
            "training.eval_interval=0",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "model.num_layers=2",
            *overrides,
        ],
    )
    train_from_config(cfg)
    return out


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("gpt") / "run")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("llama") / "run", *LLAMA)


def test_gpt_style_exports_as_gpt_neox_with_our_logits(gpt_run, tmp_path):
    config = assert_hf_export_matches(gpt_run, tmp_path / "hf")
    assert config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["use_parallel_residual"] is False
    assert config["tie_word_embeddings"] is True


def test_llama_style_exports_as_llama_with_our_logits(llama_run, tmp_path):
    config = assert_hf_export_matches(llama_run, tmp_path / "hf")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False


def test_megatron_export_loads_into_stock_gpt_model(gpt_run, llama_run, tmp_path):
    assert_megatron_export_matches(gpt_run, tmp_path / "gpt")
    assert_megatron_export_matches(llama_run, tmp_path / "llama")


@pytest.mark.parametrize(
    "overrides, arch",
    [
        # GEGLU (exact GELU gate) with biases on every Llama projection and tied embeddings.
        (("model.ffn=geglu", "model.normalization=rmsnorm", "model.ffn_hidden_size=128"), "Llama"),
        # Bias-free GPT-style: NeoX's always-present MLP biases are written as zeros.
        (("model.bias=false", "model.tie_embeddings=false"), "GPTNeoX"),
        # QK-norm (per-head RMSNorm before RoPE) with grouped-query attention: Qwen3; the stock
        # Megatron export carries the norms too.
        (
            (
                "model.ffn=swiglu",
                "model.normalization=rmsnorm",
                "model.bias=false",
                "model.qk_layernorm=true",
                "model.num_query_groups=2",
                "model.ffn_hidden_size=128",
            ),
            "Qwen3",
        ),
    ],
    ids=["llama-geglu-bias-tied", "gpt-biasless-untied", "qwen3-qk-norm-gqa"],
)
def test_other_supported_variants_export_with_our_logits(overrides, arch, tmp_path):
    run = _train(tmp_path / "run", *overrides)
    config = assert_hf_export_matches(run, tmp_path / "hf")
    assert config["architectures"] == [f"{arch}ForCausalLM"]
    if arch == "Qwen3":
        # The norm weights moved in training (else a model ignoring them would match too).
        state = load_checkpoint_for_analysis(run, device=torch.device("cpu")).model.state_dict()
        gain = state["decoder.layers.1.self_attention.q_layernorm.weight"]
        assert not torch.equal(gain, torch.ones_like(gain))
        assert_megatron_export_matches(run, tmp_path / "megatron")


@pytest.mark.parametrize(
    "overrides, piece",
    [
        ({"ffn": "swiglu"}, "model.ffn: swiglu with normalization: layernorm"),
        ({"num_query_groups": 2}, "model.num_query_groups"),
        ({"normalization": "rmsnorm"}, "model.ffn: gelu"),
        ({"bias_activation_fusion": True}, "model.bias_activation_fusion"),
        ({"qk_layernorm": True}, "model.qk_layernorm: true is exported as Qwen3"),
        (
            {"qk_layernorm": True, "normalization": "rmsnorm", "ffn": "swiglu", "bias": True},
            "Qwen3's MLP has no biases",
        ),
    ],
)
def test_variants_without_an_exact_transformers_class_are_refused(overrides, piece):
    cfg = load_config("tiny", [f"model.{k}={str(v).lower()}" for k, v in overrides.items()])
    with pytest.raises(ExportError, match=piece):
        hf_architecture(cfg.model)


def test_export_cli_refuses_a_non_empty_output_and_a_missing_step(gpt_run, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep")
    argv = ["export", "--checkpoint", str(gpt_run), "--format", "hf", "--out", str(out)]
    assert cli_main(argv) == 1
    assert "not empty" in capsys.readouterr().err and (out / "x").read_text() == "keep"
    argv = ["export", "--checkpoint", str(gpt_run), "--step", "2", "--format", "hf"]
    assert cli_main([*argv, "--out", str(tmp_path / "o")]) == 1
    assert "--step 2" in capsys.readouterr().err


def test_exported_tokenizer_encodes_like_our_preprocessing(gpt_run, tmp_path):
    from transformers import AutoTokenizer

    from megatron_qk.data.tokenizer import load_gpt2_encoding
    from megatron_qk.export.hf_tokenizer import PROBE_TEXT

    out = tmp_path / "hf"
    assert (
        cli_main(["export", "--checkpoint", str(gpt_run), "--format", "hf", "--out", str(out)]) == 0
    )
    hf = AutoTokenizer.from_pretrained(out)
    enc = load_gpt2_encoding()
    texts = [PROBE_TEXT, "hello world", " leading and trailing  ", "a<|endoftext|>b", "\n\n\n"]
    for text in texts:
        assert hf(text)["input_ids"] == enc.encode_ordinary(text), text
    assert hf.eos_token_id == 50256
    assert torch.equal(
        torch.tensor(hf("Hello, world!")["input_ids"]), torch.tensor([15496, 11, 995, 0])
    )


def _samples(results: dict) -> dict[str, list]:
    """Per-task, per-document (log-likelihood, is_greedy) pairs in document order."""
    return {
        task: [
            [tuple(float(x) for x in r[0]) for r in sorted_doc["resps"]]
            for sorted_doc in sorted(docs, key=lambda d: d["doc_id"])
        ]
        for task, docs in results["samples"].items()
    }


def test_lm_eval_hf_on_the_export_scores_like_megatron_qk_eval(gpt_run, tmp_path):
    """``lm_eval --model hf`` on the export: same per-sample log-likelihoods and accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from test_eval import CLOZE_CONFIG, CLOZE_CONTEXTS, MC_CONFIG, MC_QUESTIONS, write_task

    from megatron_qk.evaluation.adapter import MegatronLM
    from megatron_qk.training.restore import load_checkpoint_for_analysis

    out = tmp_path / "hf"
    assert (
        cli_main(["export", "--checkpoint", str(gpt_run), "--format", "hf", "--out", str(out)]) == 0
    )
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    mc = [
        {"question": q, "choices": c, "label": i % len(c)} for i, (q, c) in enumerate(MC_QUESTIONS)
    ]
    write_task(task_dir, "x_mc", mc, **MC_CONFIG)
    cloze = [{"context": c, "target": " the"} for c in CLOZE_CONTEXTS]
    write_task(task_dir, "x_cloze", cloze, **CLOZE_CONFIG)
    manager = TaskManager(include_path=str(task_dir))
    common = dict(
        tasks=["x_mc", "x_cloze"], task_manager=manager, log_samples=True, bootstrap_iters=0
    )
    loaded = load_checkpoint_for_analysis(gpt_run, device=torch.device("cpu"))
    ours = lm_eval.simple_evaluate(model=MegatronLM.from_checkpoint(loaded, batch_size=4), **common)
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},dtype=float32",
        batch_size=4,
        device="cpu",
        **common,
    )
    a, b = _samples(ours), _samples(theirs)
    assert a.keys() == b.keys() == {"x_mc", "x_cloze"}
    for task in a:
        assert len(a[task]) == len(b[task]) > 0
        for doc_a, doc_b in zip(a[task], b[task], strict=True):
            assert [g for _, g in doc_a] == [g for _, g in doc_b], task
            assert [ll for ll, _ in doc_b] == pytest.approx([ll for ll, _ in doc_a], abs=1e-4)
    for task in a:
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]


@pytest.mark.parametrize("overrides", [(), LLAMA])
def test_written_config_reads_back_with_full_rotary_and_our_base(overrides, tmp_path):
    """transformers reads the config with the whole head rotated (NeoX defaults to a quarter)."""
    import json

    from transformers import AutoConfig

    from megatron_qk.export.hf import hf_config

    cfg = load_config("tiny", [*overrides, "model.rotary_base=500000"])
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, 50257, 50256)))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0
    assert config.dtype == torch.float32 and config.vocab_size == 50257


def test_interrupted_export_leaves_no_partial_model(gpt_run, tmp_path, monkeypatch):
    from megatron_qk.export import hf_tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_tokenizer, "write_hf_tokenizer", interrupted)
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(gpt_run), "--format", "hf", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        cli_main(argv)
    assert not out.exists()
    monkeypatch.undo()
    assert cli_main(argv) == 0 and (out / "model.safetensors").exists()
    assert not (tmp_path / "hf.tmp").exists()
