"""``megatron-qk theory``: the command-line front end of :mod:`megatron_qk.analysis.theory`.

``theory rho`` evaluates Theorem 2's rho_0 (gated vs single-branch FFN residual energy);
``theory logit-range`` the eq. (12) logit range a sharp attention row needs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from megatron_qk.analysis.theory import (
    ACTIVATIONS,
    GATE_ACTIVATIONS,
    evaluate_rho,
    logit_range_bound,
    nu_from_init,
)


# argparse prefixes these messages with "argument --flag:", so they need not name the flag.
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _open_unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in the open interval (0, 1), got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``rho`` and ``logit-range`` sub-subcommands."""
    sub = parser.add_subparsers(dest="theory_command", metavar="QUANTITY")
    sub.required = True

    rho = sub.add_parser(
        "rho",
        help="Theorem 2: gated-vs-single FFN output-energy ratio rho_0 at initialization",
        description=(
            "Theorem 2 (eqs. 9, 44): rho_0 = (tau_g^2/tau_s^2) (r/m) nu E[psi(G)^2]/E[phi(G)^2], "
            "G ~ N(0, nu). The paper's setting: --single-width 3840 --gated-width 2560 --nu 0.384 "
            "(= --init-std 0.02 --hidden-size 960)."
        ),
    )
    rho.add_argument(
        "--single-width",
        required=True,
        type=_positive_int,
        metavar="M",
        help="hidden width m of the single-branch FFN (paper: 3840)",
    )
    rho.add_argument(
        "--gated-width",
        required=True,
        type=_positive_int,
        metavar="R",
        help="gated width r of the gated FFN (paper: 2560)",
    )
    nu_group = rho.add_mutually_exclusive_group(required=True)
    nu_group.add_argument(
        "--nu",
        type=_positive_float,
        help="nu = sigma^2 ||x||^2, the pre-activation variance (paper: 0.384)",
    )
    nu_group.add_argument(
        "--init-std",
        type=_positive_float,
        metavar="SIGMA",
        help="derive nu = SIGMA^2 * hidden size (unit-gain normalized input); needs --hidden-size",
    )
    rho.add_argument(
        "--hidden-size",
        type=_positive_int,
        metavar="D",
        help="model width d, with --init-std (paper: 960)",
    )
    rho.add_argument(
        "--gate-activation",
        choices=GATE_ACTIVATIONS,
        help="gate activation psi (gelu = GEGLU, silu = SwiGLU); default: both",
    )
    rho.add_argument(
        "--single-activation",
        choices=ACTIVATIONS,
        default="gelu",
        help="activation phi of the single-branch FFN (default gelu, exact erf form)",
    )
    rho.add_argument(
        "--output-variance-ratio",
        type=_positive_float,
        default=1.0,
        metavar="RATIO",
        help="tau_g^2 / tau_s^2 (default 1: matched initialization)",
    )
    rho.add_argument("--json", action="store_true", help="print JSON instead of text")

    lr = sub.add_parser(
        "logit-range",
        help="eq. (12): logit range needed for one of N keys to get probability >= 1 - eps",
        description=(
            "Eq. (12): if one of N causal keys receives probability >= 1 - eps, then "
            "max_j z_j - min_j z_j >= log((N-1)(1-eps)/eps)."
        ),
    )
    lr.add_argument(
        "--num-keys",
        required=True,
        type=_positive_int,
        metavar="N",
        help="number of causal keys (a query at position t sees t)",
    )
    lr.add_argument(
        "--epsilon",
        required=True,
        type=_open_unit_float,
        metavar="EPS",
        help="mass left to the other keys; the top key gets >= 1 - EPS",
    )
    lr.add_argument("--json", action="store_true", help="print JSON instead of text")


def _run_rho(args: argparse.Namespace) -> int:
    if args.init_std is not None:
        if args.hidden_size is None:
            print("megatron-qk theory rho: error: --init-std needs --hidden-size", file=sys.stderr)
            return 2
        nu = nu_from_init(args.init_std, args.hidden_size)
    else:
        if args.hidden_size is not None:
            print("megatron-qk theory rho: error: --hidden-size needs --init-std", file=sys.stderr)
            return 2
        nu = args.nu
    gates = (args.gate_activation,) if args.gate_activation else GATE_ACTIVATIONS
    results = evaluate_rho(
        args.single_width,
        args.gated_width,
        nu,
        gates,
        single_activation=args.single_activation,
        output_variance_ratio=args.output_variance_ratio,
    )
    if args.json:
        payload = {
            "equation": "Theorem 2, eqs. (9)/(44)",
            "single_width": args.single_width,
            "gated_width": args.gated_width,
            "nu": nu,
            "single_activation": args.single_activation,
            "output_variance_ratio": args.output_variance_ratio,
            "results": [asdict(r) for r in results],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(
        "Theorem 2 (eqs. 9, 44): rho_0 = (tau_g^2/tau_s^2) (r/m) nu E[psi(G)^2] / E[phi(G)^2], "
        "G ~ N(0, nu)"
    )
    print(
        f"single-branch {args.single_activation.upper()} FFN m = {args.single_width}, "
        f"gated width r = {args.gated_width}, nu = {nu:.6g}, "
        f"tau_g^2/tau_s^2 = {args.output_variance_ratio:.6g}, "
        f"E[phi(G)^2] = {results[0].single_second_moment:.6f}"
    )
    for r in results:
        print(
            f"  {r.gated_ffn:<7} (psi = {r.gate_activation}): rho_0 = {r.rho_zero:.4f}"
            f"   (E[psi(G)^2] = {r.gate_second_moment:.6f})"
        )
    return 0


def _run_logit_range(args: argparse.Namespace) -> int:
    bound = logit_range_bound(args.num_keys, args.epsilon)
    if args.json:
        payload = {
            "equation": "(12)",
            "num_keys": args.num_keys,
            "epsilon": args.epsilon,
            "logit_range_bound": bound,
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(
        f"eq. (12): for one of N = {args.num_keys} causal keys to get probability >= "
        f"1 - eps = {1.0 - args.epsilon:.6g},"
    )
    print(f"  max_j z_j - min_j z_j >= log((N-1)(1-eps)/eps) = {bound:.4f}")
    if bound > 0.0:
        print(f"  attained by one logit {bound:.4f} above {args.num_keys - 1} equal others")
    else:
        print("  (vacuous: uniform attention already gives every key probability >= 1 - eps)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate the requested theory quantity and print it."""
    if args.theory_command == "rho":
        return _run_rho(args)
    return _run_logit_range(args)
