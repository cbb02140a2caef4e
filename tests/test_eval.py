"""``megatron-qk eval``: the lm-eval adapter against a direct computation, local tasks end to end.

A tiny model is trained for a few steps once per module; its checkpoint is scored by the adapter
and, independently, by the helpers below, which run the model on one unpadded sequence at a time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import shutil
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance

from megatron_qk.cli import main as cli_main
from megatron_qk.config.loader import load_config
from megatron_qk.data.tokenizer import EOD_TOKEN_ID, load_gpt2_encoding
from megatron_qk.evaluation.adapter import GenerationNotSupportedError, MegatronLM
from megatron_qk.evaluation.suite import EvalError, TokenizerMismatchError, evaluate_checkpoint
from megatron_qk.training.entry import train_from_config
from megatron_qk.training.restore import load_checkpoint_for_analysis

SEQ = 64  # the tiny preset's seq_length
VOCAB = 50257
ENC = load_gpt2_encoding()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "tiny"
    cfg = load_config(
        "tiny",
        [
            f"training.output_dir={out}",
            "training.train_steps=4",
            "training.eval_interval=0",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    train_from_config(cfg)
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_checkpoint_for_analysis(run_dir, device=torch.device("cpu"))


# ------------------------------------------------------------------ the direct computation
@torch.no_grad()
def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:j+1]) for every j, from one unpadded forward pass (fp64 softmax)."""
    assert 0 < len(ids) <= SEQ
    logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], attention_mask=None)
    return torch.log_softmax(logits[0, :, :VOCAB].double(), dim=-1)


def split_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's convention, written out: trailing context spaces go to the continuation,
    the pair is encoded whole and the continuation is what follows the context's tokens."""
    if not context:
        return [EOD_TOKEN_ID], ENC.encode_ordinary(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = ENC.encode_ordinary(context + continuation)
    ctx = ENC.encode_ordinary(context)
    return ctx, whole[len(ctx) :]


def direct_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = split_pair(context, continuation)
    ids = (ctx + cont)[-(SEQ + 1) :]  # the model sees at most SEQ tokens: cut from the left
    lp = next_token_logprobs(model, ids[:-1])[-len(cont) :]
    total = sum(float(lp[j, t]) for j, t in enumerate(cont))
    greedy = all(int(lp[j].argmax()) == t for j, t in enumerate(cont))
    return total, greedy


def direct_rolling(model, text: str) -> float:
    """Sum of log p(t_j | the window's tokens before j); windows end at SEQ, 2 * SEQ, ..."""
    tokens = ENC.encode_ordinary(text)
    full = [EOD_TOKEN_ID] + tokens  # full[j] predicts tokens[j] = full[j + 1]
    total, start = 0.0, 0
    while start < len(tokens):
        end = min(start + SEQ, len(tokens))
        first = max(0, end - SEQ)
        lp = next_token_logprobs(model, full[first:end])
        total += sum(float(lp[j - first, tokens[j]]) for j in range(start, end))
        start = end
    return total


def requests(pairs, kind="loglikelihood"):
    return [Instance(kind, {}, args, i) for i, args in enumerate(pairs)]


# ------------------------------------------------------------------ adapter
LONG_CONTEXT = " ".join(f"item{i}" for i in range(60)) + " and finally"


def greedy_pair(model, contexts: list[str]) -> tuple[str, str]:
    """A context and, as continuation, the model's argmax token, if it tokenises apart."""
    for context in contexts:
        best = int(next_token_logprobs(model, ENC.encode_ordinary(context))[-1].argmax())
        if split_pair(context, ENC.decode([best]))[1] == [best]:
            return context, ENC.decode([best])
    raise AssertionError("every argmax token merges with its context")


def test_loglikelihood_equals_direct_computation(loaded):
    lm = MegatronLM.from_checkpoint(loaded, batch_size=3)  # several padded batches
    model = loaded.model
    pairs = [
        greedy_pair(model, ["The cat sat on the", "Question: what is 2?\nAnswer:", "1, 2, 3"]),
        ("Question: what is 2+2?\nAnswer:", " four"),
        ("The cat sat on the ", "mat"),  # trailing space moves into the continuation
        ("hello wor", "ld!!"),  # merges across the boundary: only "!!" is scored
        ("", "Hello world"),  # empty context: <|endoftext|> stands in
        ("Once upon", " a time, in a land far away"),
        (LONG_CONTEXT, " the end"),  # longer than seq_length: cut from the left
        ("Pick one:", " A"),  # single-token choices share one model input
        ("Pick one:", " B"),
        ("Pick one:", " C or D"),
    ]
    assert split_pair(*pairs[2])[1] == ENC.encode_ordinary(" mat")
    assert split_pair(*pairs[3]) == (ENC.encode_ordinary("hello wor"), ENC.encode_ordinary("!!"))
    assert len(ENC.encode_ordinary(LONG_CONTEXT)) > SEQ + 20
    got = lm.loglikelihood(requests(pairs), disable_tqdm=True)
    want = [direct_loglikelihood(model, c, x) for c, x in pairs]
    for (g_ll, g_greedy), (w_ll, w_greedy) in zip(got, want, strict=True):
        # Batched (padded) vs one-by-one forward passes sum the same fp32 products in another
        # order; the log-softmax over the ~50k padded vocabulary dominates: its log-sum-exp
        # carries ~sqrt(V) * 2^-24 ~ 1.4e-5 absolute per token (random-walk rounding), summed
        # over the <= 10 continuation tokens here: abs 2e-4. A wrong context cut moves it by
        # > 1e-3 (asserted below).
        assert g_ll == pytest.approx(w_ll, abs=2e-4)
        assert g_greedy == w_greedy
    assert want[0][1] and not want[5][1]
    # The cut matters: a shorter context gives another score.
    ctx, cont = split_pair(*pairs[6])
    short = lm.score_token_requests([(ctx[-10:], cont)])[0][0]
    assert abs(short - got[6][0]) > 1e-3


def test_loglikelihood_rolling_equals_direct_computation(loaded):
    lm = MegatronLM.from_checkpoint(loaded, batch_size=2)
    texts = [
        "A short document.",
        " ".join(f"word{i}" for i in range(70)),  # about 140 tokens: three windows
    ]
    assert len(ENC.encode_ordinary(texts[1])) > 2 * SEQ
    got = lm.loglikelihood_rolling(requests([(t,) for t in texts], "loglikelihood_rolling"))
    for g, text in zip(got, texts, strict=True):
        # As above, over ~140 tokens: 140 x 1.4e-5 = 2e-3 if every error had one sign; as
        # independent roundings they add to ~sqrt(140) x 1.4e-5 ~ 2e-4: abs 5e-4.
        assert g == pytest.approx(direct_rolling(loaded.model, text), abs=5e-4)


def test_generation_is_refused(loaded):
    lm = MegatronLM.from_checkpoint(loaded)
    with pytest.raises(GenerationNotSupportedError, match="log-likelihoods only"):
        lm.generate_until(requests([("Q:", {"until": ["\n"]})], "generate_until"))
    with pytest.raises(ValueError, match="more than the model's seq_length"):
        lm.score_token_requests([([1], list(range(SEQ + 1)))])


# ------------------------------------------------------------------ local tasks end to end
MC_QUESTIONS = [
    ("What do cows drink?", ["milk", "water from a well", "tea"]),
    ("Where is the sun at noon?", ["up", "in the sky above us", "below"]),
    ("Which is a color?", ["red", "seven", "a loud noise at night"]),
    ("What do birds do?", ["fly", "swim in deep oceans", "sing songs"]),
    ("Pick a number.", ["12", "one hundred", "3.5"]),
    ("How is the weather?", ["sunny and warm", "cold", "it rains a lot"]),
]
CLOZE_CONTEXTS = [
    "Question: what comes next?\nAnswer:",
    "The cat sat on the",
    "A B C A B C A B",
    "She opened the door and saw",
    "1, 2, 3, 4,",
    "In the beginning there was",
]


def write_task(directory: Path, name: str, data: list[dict], **config) -> None:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(directory / f"{name}.jsonl")},
            "cache_dir": str(directory / "hf_cache"),
        },
        "test_split": "test",
        "metadata": {"version": 1.0},
        **config,
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


MC_CONFIG = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "label",
    "doc_to_choice": "{{choices}}",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
}
CLOZE_CONFIG = {  # LAMBADA's metrics; acc = the target is the greedy continuation
    "output_type": "loglikelihood",
    "doc_to_text": "{{context}}",
    "doc_to_target": "{{target}}",
    "metric_list": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    ],
}


def make_tasks(model, task_dir: Path) -> dict:
    """Write the tasks with answers chosen from the hand computation; return expected metrics."""
    mc_docs, acc, acc_norm = [], [], []
    for i, (question, choices) in enumerate(MC_QUESTIONS):
        lls = [
            direct_loglikelihood(model, f"Question: {question}\nAnswer:", " " + c)[0]
            for c in choices
        ]
        ranked = sorted(range(len(choices)), key=lambda k: lls[k])
        assert lls[ranked[-1]] - lls[ranked[-2]] > 1e-3 and lls[ranked[1]] - lls[ranked[0]] > 1e-3
        gold = ranked[-1] if i % 3 == 0 else ranked[0]  # a third of the answers are the argmax
        norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        mc_docs.append({"question": question, "choices": choices, "label": gold})
        acc.append(float(gold == ranked[-1]))
        acc_norm.append(float(gold == max(range(len(choices)), key=lambda k: norm[k])))
    cloze_docs, hits, lls = [], [], []
    for i, context in enumerate(CLOZE_CONTEXTS):
        best = int(next_token_logprobs(model, ENC.encode_ordinary(context))[-1].argmax())
        target = ENC.decode([best]) if i % 2 == 0 else " banana"
        ll, greedy = direct_loglikelihood(model, context, target)
        cloze_docs.append({"context": context, "target": target})
        hits.append(float(greedy))
        lls.append(ll)
    assert sum(acc) == 2 and 0 < sum(hits) < len(hits)
    write_task(task_dir, "tiny_mc", mc_docs, **MC_CONFIG)
    write_task(task_dir, "tiny_cloze", cloze_docs, **CLOZE_CONFIG)
    # A group (like mmlu): two subtasks, accuracy averaged by size.
    write_task(task_dir, "tiny_part_a", mc_docs[:4], **MC_CONFIG)
    write_task(task_dir, "tiny_part_b", mc_docs[4:], **MC_CONFIG)
    group = {
        "group": "tiny_group",
        "task": ["tiny_part_a", "tiny_part_b"],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 1},
    }
    (task_dir / "tiny_group.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return {
        "tiny_mc": {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)},
        "tiny_cloze": {"acc": sum(hits) / len(hits), "perplexity": math.exp(-sum(lls) / len(lls))},
        "tiny_group": {"acc": sum(acc) / len(acc)},
    }


def test_local_tasks_end_to_end(run_dir, loaded, tmp_path, capsys):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    expected = make_tasks(loaded.model, task_dir)
    args = ["eval", "--checkpoint", str(run_dir), "--task-dir", str(task_dir), "--batch-size", "4"]
    assert cli_main([*args, "--tasks", "tiny_mc,tiny_cloze,tiny_group"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())  # the default --out
    assert report["harness"] == {"name": "lm-eval", "version": lm_eval.__version__}
    assert report["checkpoint"] == str((run_dir / "checkpoints" / "iter_0000004").resolve())
    assert report["step"] == 4 and report["arm"] == "control" and report["seed"] == 1234
    tasks = report["tasks"]
    assert list(tasks) == ["tiny_mc", "tiny_cloze", "tiny_group"]
    assert tasks["tiny_mc"]["acc"] == pytest.approx(expected["tiny_mc"]["acc"], abs=1e-12)
    assert tasks["tiny_mc"]["acc_norm"] == pytest.approx(expected["tiny_mc"]["acc_norm"], abs=1e-12)
    assert tasks["tiny_cloze"]["acc"] == pytest.approx(expected["tiny_cloze"]["acc"], abs=1e-12)
    assert "acc_norm" not in tasks["tiny_cloze"]
    assert tasks["tiny_cloze"]["perplexity"] == pytest.approx(
        expected["tiny_cloze"]["perplexity"], rel=1e-4
    )
    assert tasks["tiny_group"]["acc"] == pytest.approx(expected["tiny_group"]["acc"], abs=1e-12)
    assert tasks["tiny_group"]["group"] and tasks["tiny_group"]["subtasks"] == 2
    for name, n in (("tiny_mc", 6), ("tiny_cloze", 6), ("tiny_group", 6)):
        assert tasks[name]["samples"] == tasks[name]["samples_total"] == n
    mean = (tasks["tiny_mc"]["acc"] + tasks["tiny_cloze"]["acc"] + tasks["tiny_group"]["acc"]) / 3
    assert report["mean_acc"] == pytest.approx(mean)
    assert "tiny_mc" in capsys.readouterr().out
    # One checkpoint by name: its own default file; --limit scores fewer documents.
    iter_dir = run_dir / "checkpoints" / "iter_0000004"
    assert cli_main(["eval", "--checkpoint", str(iter_dir), "--task-dir", str(task_dir),
                     "--tasks", "tiny_mc", "--limit", "2"]) == 0  # fmt: skip
    limited = json.loads((run_dir / "eval_iter_0000004.json").read_text())
    assert limited["tasks"]["tiny_mc"]["samples"] == 2
    assert limited["tasks"]["tiny_mc"]["samples_total"] == 6


# ------------------------------------------------------------------ user errors
def test_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = cli_main(
        ["eval", "--checkpoint", str(tmp_path / "nope"), "--tasks", "piqa", "--out", str(out)]
    )
    assert rc == 1 and not out.exists()
    assert f"checkpoint {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        evaluate_checkpoint(tmp_path / "empty_run", ["piqa"])


def test_unknown_task(run_dir, tmp_path, capsys):
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_task(
        task_dir, "tiny_mc", [{"question": "q", "choices": ["a", "b"], "label": 0}], **MC_CONFIG
    )
    rc = cli_main(["eval", "--checkpoint", str(run_dir), "--task-dir", str(task_dir),
                   "--tasks", "tiny_mc,hellaswagg", "--out", str(tmp_path / "e.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "unknown task 'hellaswagg'" in err and "did you mean hellaswag" in err
    with pytest.raises(EvalError, match="is not a directory"):
        evaluate_checkpoint(run_dir, ["tiny_mc"], task_dirs=[tmp_path / "missing"])


def copy_run(run_dir: Path, dest: Path, edit) -> Path:
    """A run directory sharing ``run_dir``'s checkpoints with an edited ``config.yaml``."""
    dest.mkdir()
    (dest / "checkpoints").symlink_to(run_dir / "checkpoints")
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    edit(data)
    (dest / "config.yaml").write_text(yaml.safe_dump(data))
    return dest


def test_tokenizer_mismatch(run_dir, tmp_path, capsys):
    other = copy_run(run_dir, tmp_path / "llama_tok", lambda d: d["model"].update(vocab_size=32000))
    rc = cli_main(["eval", "--checkpoint", str(other), "--tasks", "piqa"])
    err = capsys.readouterr().err
    assert rc == 1 and "model.vocab_size is 32000" in err and "50257" in err
    assert not (other / "eval.json").exists()

    # Same vocabulary size, but the data summary of `preprocess` names other BPE ranks.
    prefix = tmp_path / "corpus"
    summary = {"tokenizer": {"source": "my.tiktoken", "sha256": "ab" * 32, "vocab_size": 50257}}
    Path(f"{prefix}_summary.json").write_text(json.dumps(summary))

    def indexed(d):
        d["data"].update(kind="indexed", train_prefixes=[f"{prefix}_text_document"])

    other = copy_run(run_dir, tmp_path / "other_bpe", indexed)
    with pytest.raises(TokenizerMismatchError, match="corpus_summary.json: the training data"):
        evaluate_checkpoint(other, ["piqa"])
    shutil.rmtree(other)
