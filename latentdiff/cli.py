"""The `latentdiff` command: one sub-command per job; scripts/*.py are the same commands as files.

Errors a user can cause (a bad flag, config key, path or checkpoint) end in one line on stderr and
exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

from .errors import LatentDiffError
from .generate import add_generate_arguments, run_generate

DEFAULT_OUT = {
    "train-autoencoder": "weights/autoencoder",
    "train-text-encoder": "weights/text_encoder",
    "train-diffusion": "weights/diffusion",
    "distill": "weights/distilled",
}


def add_training_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """The flags every train-* command shares."""
    parser.add_argument("--config", help="YAML config (default: the CPU preset for the built-in shapes data)")
    parser.add_argument("--data", help="'shapes' (built in), a folder of images with captions, or tar shards "
                                       "('DIR/{00000..00099}.tar', a .txt list of shards, or a folder of .tar)")
    parser.add_argument("--out", default=DEFAULT_OUT[stage], help="run folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override any config field, e.g. model.ch_mult=[1,2,4] train.lr=1e-4")


def training_config(config_class: type, args: argparse.Namespace):
    """Defaults ← --config (or, with --resume, the run's own train_config.yaml) ← flags ← key=value."""
    from .config import apply_overrides, load_config, parse_override

    config_file = args.config
    saved = Path(args.out) / "train_config.yaml"
    if config_file is None and args.resume and saved.is_file():
        config_file = saved
    overrides = dict(parse_override(o) for o in args.overrides)
    flags = {"data.source": args.data, "train.steps": args.steps, "train.batch_size": args.batch_size}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if config_file is None and overrides.get("data.source", "shapes") != "shapes" and args.command.startswith("train-"):
        stage = Path(DEFAULT_OUT[args.command]).name  # autoencoder, text_encoder, diffusion
        print(f"no --config: using the shapes preset (the {config_class.__name__} defaults) on your data; "
              f"for 64-px images of your own try --config configs/{stage}/folder64.yaml")
    return apply_overrides(load_config(config_class, config_file), overrides)


def run_train_autoencoder(args: argparse.Namespace) -> None:
    from .train.autoencoder import AutoencoderTrainingConfig, train_autoencoder

    train_autoencoder(training_config(AutoencoderTrainingConfig, args), args.out, resume=args.resume)


def run_train_text_encoder(args: argparse.Namespace) -> None:
    from .train.text_encoder import TextEncoderTrainingConfig, train_text_encoder

    train_text_encoder(training_config(TextEncoderTrainingConfig, args), args.out, resume=args.resume)


def add_diffusion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--autoencoder", metavar="DIR", help="trained autoencoder folder (stage 1)")
    parser.add_argument("--text-encoder", metavar="DIR", help="trained text encoder folder (stage 2)")
    add_training_arguments(parser, "train-diffusion")


def run_train_diffusion(args: argparse.Namespace) -> None:
    from .config import apply_overrides
    from .train.diffusion import DiffusionTrainingConfig, train_diffusion

    cfg = training_config(DiffusionTrainingConfig, args)
    stages = {"autoencoder": args.autoencoder, "text_encoder": args.text_encoder}
    cfg = apply_overrides(cfg, {k: v for k, v in stages.items() if v is not None})  # else: --config / the resumed run's
    train_diffusion(cfg, args.out, resume=args.resume)


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", metavar="DIR", help="trained diffusion run or pipeline folder to distil")
    add_training_arguments(parser, "distill")


def run_distill(args: argparse.Namespace) -> None:
    from .config import apply_overrides
    from .train.distill import DistillConfig, distill

    cfg = training_config(DistillConfig, args)
    if args.teacher is not None:
        cfg = apply_overrides(cfg, {"teacher": args.teacher})
    distill(cfg, args.out, resume=args.resume)


def deferred(module: str, add_arguments: str, run: str, run_module: str | None = None) -> tuple[Callable, Callable]:
    """A command whose modules load only when it is used, so that `latentdiff --help` starts at once.
    `module` defines the arguments without importing torch (tests/test_cli_help.py), so that `latentdiff
    CMD --help` answers at once too; `run`, in `run_module` (default: `module`), loads what the command
    needs (torch, diffusers, gradio, ...)."""
    def load(name: str):
        return importlib.import_module(name, __package__)
    return (lambda parser: getattr(load(module), add_arguments)(parser),
            lambda args: getattr(load(run_module or module), run)(args))


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "train-autoencoder": ("train the KL autoencoder (stage 1)",
                          lambda p: add_training_arguments(p, "train-autoencoder"), run_train_autoencoder),
    "train-text-encoder": ("train the CLIP text encoder (stage 2)",
                           lambda p: add_training_arguments(p, "train-text-encoder"), run_train_text_encoder),
    "train-diffusion": ("train the text-conditioned UNet on the frozen stages 1 and 2 (stage 3)",
                        add_diffusion_arguments, run_train_diffusion),
    "distill": ("distil a trained UNet into a student with guidance built in: a few-step consistency student "
                "(the lcm sampler; method=consistency, the default) or one that samples as its teacher at one UNet "
                "call per step (method=guidance)", add_distill_arguments, run_distill),
    "generate": ("generate images from prompts (PNGs carry their parameters)",
                 add_generate_arguments, run_generate),
    "eval": ("score a pipeline: shapes judge per category (train and held-out compositions), FID, CLIP score",
             *deferred(".eval.command", "add_eval_arguments", "run_eval", run_module=".eval.evaluate")),
    "quickstart": ("train all three stages on the built-in shapes data, then draw a grid of samples",
                   *deferred(".quickstart", "add_quickstart_arguments", "run_quickstart")),
    "convert": ("convert a pipeline between the latentdiff, diffusers and original SD single-file formats",
                *deferred(".convert.command", "add_convert_arguments", "run_convert")),
    "bench": ("time our UNet against diffusers' with the same weights, side by side in one process "
              "(--all: a table of where the time goes, from the GEMM peak to end-to-end generation)",
              *deferred(".eval.bench", "add_bench_arguments", "run_bench")),
    "pack": ("write a folder of captioned images as WebDataset tar shards (KEY.jpg|png|... + KEY.txt) for --data",
             *deferred(".data.pack", "add_pack_arguments", "run_pack")),
    "plot": ("draw a training run's loss and metric curves (its metrics.csv) to a PNG",
             *deferred(".plot", "add_plot_arguments", "run_plot")),
    "serve": ("a local web page to generate, compare and keep images (needs the ui extra: gradio)",
              *deferred(".serve", "add_serve_arguments", "run_serve")),
}


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `latentdiff` parser and each sub-command's own parser; with `only`, just that sub-command gets its
    arguments (defining them imports the command's module, and `latentdiff --help` should not wait for torch)."""
    parser = argparse.ArgumentParser(prog="latentdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            add_arguments(commands[name])
    return parser, commands


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """A sub-command's arguments are parsed intermixed, so positionals (prompts, key=value overrides)
    may come before or after flags: `train-diffusion --steps 500 train.lr=1e-4` works."""
    parser, commands = build_parser(only=argv[0] if argv else "")
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # --help, or the usage error for a missing / unknown command
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """Entry point; `command` fixes the sub-command (used by scripts/*.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        argv = [command] + argv
    args = parse_command_line(argv)
    try:
        COMMANDS[args.command][2](args)
    except LatentDiffError as err:
        print(f"latentdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
