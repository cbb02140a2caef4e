"""``megatron-qk sample`` on a tiny trained checkpoint: greedy decoding is the argmax of one
plain forward pass, the filters keep what they promise, and the command prints the text."""

from pathlib import Path

import pytest
import torch

from megatron_qk.cli import main as cli_main
from megatron_qk.config.loader import load_config
from megatron_qk.data.tokenizer import load_tokenizer
from megatron_qk.evaluation.sample import SamplingSettings, filter_logits, generate
from megatron_qk.training.entry import train_from_config

PROMPT = '!"#$%&!"#$'  # GPT-2 ids 0..5 then 0..3: the repeated-motif data the tiny run learns


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from megatron_qk.training.distributed import teardown_distributed
    from megatron_qk.training.restore import load_checkpoint_for_analysis

    run_dir = tmp_path_factory.mktemp("sample") / "run"
    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={run_dir}",
            "training.train_steps=8",
            "training.eval_interval=0",
            "diagnostics.enabled=false",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    train_from_config(cfg)
    yield load_checkpoint_for_analysis(run_dir)
    teardown_distributed()


def _generate(loaded, prompt, settings):
    tok = load_tokenizer("gpt2")
    return generate(
        loaded.model,
        prompt,
        settings,
        seq_length=loaded.cfg.model.seq_length,
        vocab_size=tok.vocab_size,
        eod_id=tok.eod_id,
        device=loaded.device,
    )


def test_greedy_decoding_is_the_argmax_of_one_forward_pass(loaded):
    tok = load_tokenizer("gpt2")
    prompt = tok.encoding.encode_ordinary(PROMPT)
    new = _generate(loaded, prompt, SamplingSettings(max_new_tokens=12, greedy=True))
    assert len(new) == 12 and new == _generate(loaded, prompt, SamplingSettings(12, greedy=True))
    # Teacher-forced check: one causal forward pass over prompt + continuation; each generated
    # token is the argmax (over the real vocabulary) of the logits one position before it.
    seq = prompt + new
    with torch.no_grad():
        logits = loaded.model(
            torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), attention_mask=None
        )[0, :, : tok.vocab_size]
    expected = logits[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
    assert new == expected


def test_top_k_1_and_a_tiny_top_p_are_greedy_and_a_seed_reproduces_a_sample(loaded):
    prompt = load_tokenizer("gpt2").encoding.encode_ordinary(PROMPT)
    greedy = _generate(loaded, prompt, SamplingSettings(max_new_tokens=8, greedy=True))
    assert _generate(loaded, prompt, SamplingSettings(max_new_tokens=8, top_k=1)) == greedy
    assert _generate(loaded, prompt, SamplingSettings(max_new_tokens=8, top_p=1e-9)) == greedy
    hot = SamplingSettings(max_new_tokens=8, temperature=5.0, seed=3)
    assert _generate(loaded, prompt, hot) == _generate(loaded, prompt, hot)


def test_filters_keep_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [1, 1, 0, 0]
    # 0.5 + 0.3 covers 0.8: the third token is dropped at top_p 0.8, kept at 0.81.
    assert torch.isfinite(filter_logits(logits, 0, 0.8)).tolist() == [1, 1, 0, 0]
    assert torch.isfinite(filter_logits(logits, 0, 0.81)).tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="--top-p"):
        SamplingSettings(top_p=0.0)


def test_sample_command_prints_the_prompt_and_its_greedy_continuation(loaded, capsys):
    tok = load_tokenizer("gpt2")
    prompt = tok.encoding.encode_ordinary(PROMPT)
    new = _generate(loaded, prompt, SamplingSettings(max_new_tokens=10, greedy=True))
    argv = ["sample", "--checkpoint", str(loaded.run_dir), "--prompt", PROMPT, "--greedy"]
    assert cli_main([*argv, "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out == PROMPT + tok.encoding.decode(new) + "\n"
    assert cli_main([*argv, "--step", "7"]) == 1
    assert "no checkpoint of step 7" in capsys.readouterr().err


def test_sample_from_a_missing_run_says_so(tmp_path: Path, capsys):
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "no"), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err
