"""``megatron-qk sample``: generate text from a checkpoint to look at a model.

Examples::

    megatron-qk sample --checkpoint runs/tiny --prompt "The capital of France is" --greedy
    megatron-qk sample --checkpoint runs/tiny --step 40 --prompt "Once" --temperature 0.8 \\
        --top-k 50 --top-p 0.95 --max-new-tokens 100 --num-samples 3 --seed 7

Any checkpoint of any TP/PP/DP layout loads (into one process). Greedy decoding is
deterministic; sampling is reproducible with ``--seed``. The generation itself is
:mod:`megatron_qk.evaluation.sample`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_qk.rundir.cli_args import add_checkpoint_argument
from megatron_qk.training.noise import quiet_megatron_noise


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the sample options."""
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--step", type=int, default=None, help="use the checkpoint taken after this step"
    )
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)"
    )
    parser.add_argument(
        "--greedy", action="store_true", help="take the most likely token (deterministic)"
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens covering this probability (1.0: all)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    parser.add_argument(
        "--num-samples", type=int, default=1, help="samples, seeds SEED, SEED+1, ... (default 1)"
    )
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        help="the run's tokenizer, as given to preprocess (default: gpt2); checked against the "
        "run's vocabulary and data summary",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Megatron-Core's start-up messages"
    )


def run(args: argparse.Namespace) -> int:
    """Generate and print ``--num-samples`` continuations; 1 on a bad checkpoint or option."""
    quiet_megatron_noise(verbose=args.verbose)
    # These import torch and megatron-core (seconds): not for --help.
    import dataclasses

    from megatron_qk.data.tokenizer import TokenizerError, load_tokenizer
    from megatron_qk.evaluation.sample import SamplingSettings, generate
    from megatron_qk.evaluation.suite import EvalError, check_tokenizer
    from megatron_qk.rundir.layout import CONFIG_FILE, checkpoint_name, resolve_checkpoint
    from megatron_qk.training.distributed import teardown_distributed
    from megatron_qk.training.restore import load_checkpoint_for_analysis

    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        settings = SamplingSettings(
            max_new_tokens=args.max_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        ckpt, run_dir = resolve_checkpoint(args.checkpoint)
        if args.step is not None:
            ckpt = run_dir / "checkpoints" / checkpoint_name(args.step)
            if not ckpt.is_dir():
                raise FileNotFoundError(f"{run_dir} has no checkpoint of step {args.step}")
        tok = load_tokenizer(args.tokenizer)
        loaded = load_checkpoint_for_analysis(ckpt)
        check_tokenizer(loaded.cfg, tok, run_dir / CONFIG_FILE)
        prompt = tok.encoding.encode_ordinary(args.prompt)
        for i in range(args.num_samples):
            new = generate(
                loaded.model,
                prompt,
                dataclasses.replace(settings, seed=settings.seed + i),
                seq_length=loaded.cfg.model.seq_length,
                vocab_size=tok.vocab_size,
                eod_id=tok.eod_id,
                device=loaded.device,
            )
            if args.num_samples > 1:
                print(f"--- sample {i + 1} (seed {settings.seed + i}) ---")
            print(args.prompt + tok.encoding.decode(new))
            if settings.greedy:
                break  # every greedy sample is the same
    except (FileNotFoundError, ValueError, TokenizerError, EvalError) as exc:
        print(f"megatron-qk sample: {exc}", file=sys.stderr)
        return 1
    finally:
        teardown_distributed()
    print(f"(checkpoint {ckpt.name} of {run_dir})", file=sys.stderr)
    return 0
