"""`latentdiff eval`'s flags, in torch-free code so that `latentdiff eval --help` answers at once; the
command itself is evaluate.run_eval (with --sweep, sweep.run_sweep)."""
from __future__ import annotations

import argparse

SWEEP_STEPS = (4, 6, 8, 10, 20, 50)  # `eval --sweep`'s default step counts (issue 14)


def names(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (a comma-separated flag)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def integers(text: str) -> list[int]:
    """'4,6,8' -> [4, 6, 8]."""
    return [int(part) for part in names(text)]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_suite_arguments(parser)
    add_sweep_arguments(parser)


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of one evaluation: which pipeline, how many prompts, how to sample, where to write."""
    parser.add_argument("--pipeline", default="weights/diffusion", help="pipeline or diffusion run folder")
    parser.add_argument("--per-category", type=int, default=32, help="prompts per category and split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--sampler", help="sampler name (default: the pipeline's)")
    parser.add_argument("--out", help="also write the results as JSON to this file (--sweep: needed; rows are "
                                      "written as they finish, and a rerun with the same settings resumes)")
    parser.add_argument("--device", default="cpu")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sweep", "--sweep evaluates every (sampler, spacing, steps) and a reference "
                                               "row (dpmpp_2m, the pipeline's spacing, --reference-steps), then "
                                               "prints a table of the cost and the drop against the reference")
    group.add_argument("--sweep", action="store_true", help="sweep samplers and step counts")
    group.add_argument("--samplers", type=names, metavar="A,B,...", help="samplers to sweep (default: all)")
    group.add_argument("--sweep-steps", type=integers, default=list(SWEEP_STEPS), metavar="N,N,...",
                       help=f"step counts to sweep (default: {','.join(map(str, SWEEP_STEPS))})")
    group.add_argument("--spacings", type=names, metavar="A,B,...",
                       help="sigma spacings to sweep, e.g. leading,trailing,karras (default: the pipeline's)")
    group.add_argument("--reference-steps", type=int, default=100, help="the reference row's steps (default: 100)")
