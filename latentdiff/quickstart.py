"""`latentdiff quickstart`: train all three stages on the built-in shapes data with the CPU presets,
then draw a grid of images for a fixed set of prompts. `--quality` trains a text encoder that reads word
order and colour binding better (configs/text_encoder/quality.yaml: hard negatives, twice the steps) and a
UNet on it 5.5x as long (configs/diffusion/quality.yaml), into folders of their own beside the quickstart's
(text_encoder_quality, diffusion_quality, quality_grid.png); the autoencoder is the same, so a finished
quickstart's is reused.

On a CPU with 2 or more threads the autoencoder and the text encoder train at once, each in a process of
its own on half the threads, and whichever is still training takes every thread once the other is done
(train/shared_cores.py). The autoencoder's rounding then depends on when that happens (thread counts change
the order of some sums), so two runs agree to float noise; `--sequential` trains the stages one after
another, the same bits on every run of a machine.

A stage that already finished is skipped and one that was interrupted is resumed, so running the
command again after a crash continues where it stopped.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import apply_overrides
from .grid import prompt_grid
from .lazy import lazy_attributes

# torch and the trainers load when the command runs, not for `latentdiff quickstart --help`; the trainers
# stay readable as attributes of this module (quickstart.train_autoencoder, ...).
_LAZY = {"train_autoencoder": "train.autoencoder", "train_text_encoder": "train.text_encoder",
         "train_diffusion": "train.diffusion"}
__getattr__ = lazy_attributes(__name__, globals(), _LAZY)

PROMPTS = (
    "a red circle in the top left",
    "a blue square in the center",
    "a green triangle at the bottom right",
    "a yellow star on the left",
    "a purple diamond at the top",
    "two orange crosses",
    "a pink circle above a cyan square",
    "a blue triangle to the left of a yellow diamond",
)
SEEDS_PER_PROMPT = 4
# The quality preset's UNet steps (5.5x the quickstart's 1,700). Judge mean over the categories and splits, on
# the preset's text encoder, 200 prompts: 0.863 at 6,800, 0.882 at 8,500, 0.891 at 10,200 (one run; a second
# 0.855 at 10,200; README, Results). The quality text encoder's hard negatives raise colour binding more than the
# last steps do (at 1,700 UNet steps, two runs: +0.13 to +0.20 per split) and take ~6 more minutes on 2 cores;
# 9,350 steps keep the whole `quickstart --quality` within an hour.
QUALITY_UNET_STEPS = 9350
# The quality preset's text encoder (configs/text_encoder/quality.yaml): 2 hard-negative captions per image
# (swapped colours, a reversed relation, ...) and twice the preset's steps. Text twins (eval/text_twins.py), colours
# swapped / relation reversed, train split: 0.87 / 0.71, against 0.59 / 0.58 for the preset's.
QUALITY_TEXT_ENCODER = {"hard_negatives": 2, "train.steps": 1500}
QUALITY_SUFFIX = "_quality"  # of the folders (and grid) that --quality writes, where they differ from the quickstart's


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="weights", help="folder for the three stages and the grid (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for the final sampling (default: %(default)s)")
    parser.add_argument("--quality", action="store_true",
                        help=f"a text encoder trained with hard negatives (configs/text_encoder/quality.yaml) and a UNet "
                             f"on it trained {QUALITY_UNET_STEPS} steps (configs/diffusion/quality.yaml), into "
                             f"text_encoder{QUALITY_SUFFIX} and diffusion{QUALITY_SUFFIX}: under an hour on 2 cores; "
                             f"a finished quickstart's autoencoder is reused")
    parser.add_argument("--sequential", action="store_true",
                        help="train the stages one after another (by default, on a CPU with 2 or more threads, the "
                             "autoencoder and the text encoder train at once, in two processes)")


def starting(name: str, cfg, folder: Path, done: int) -> str:
    """The line announcing a stage that trains (`done` steps already: it resumes)."""
    return (f"[quickstart] {name}: {'resuming at step ' + str(done) if done else 'training'} "
            f"({cfg.train.steps} steps) into {folder}")


def run_stage(name: str, train, cfg, folder: Path) -> float | None:
    """Train one stage unless it already finished; returns the minutes it took (None when skipped)."""
    from .train.loop import completed_steps

    done = completed_steps(folder)
    if done >= cfg.train.steps:
        print(f"[quickstart] {name}: already trained ({done} steps) in {folder}, skipping")
        return None
    print(starting(name, cfg, folder, done))
    start = time.time()
    train(cfg, folder, resume=done > 0)
    return (time.time() - start) / 60


def side_by_side(plan: list[tuple[str, object, object]], root: Path) -> bool:
    """True when the first two stages (autoencoder, text encoder) both still need training, on a CPU with 2 or
    more threads, in a process that no launcher started among several."""
    import torch

    from .train.distributed import launched_processes
    from .train.loop import completed_steps

    unfinished = all(completed_steps(root / name) < cfg.train.steps for name, _, cfg in plan[:2])
    return (unfinished and torch.get_num_threads() >= 2 and not torch.cuda.is_available()
            and launched_processes() == 1)


def run_side_by_side(first: tuple[str, object, object], second: tuple[str, object, object], root: Path) -> float:
    """Train `first` and `second` at once, each in a process of its own on half the threads; the one still
    training takes every thread once the other is done. Returns the minutes until both are."""
    import multiprocessing
    from multiprocessing.connection import wait

    import torch

    from .train.loop import completed_steps
    from .train.shared_cores import finish, start_training, stop

    threads = torch.get_num_threads()
    (name, train, cfg), (other, other_train, other_cfg) = first, second
    log = root / other / "train.log"
    other_done, done = completed_steps(root / other), completed_steps(root / name)
    print(f"{starting(other, other_cfg, root / other, other_done)}, in a process of its own on {threads // 2} of "
          f"{threads} threads (its output: {log})")
    print(f"{starting(name, cfg, root / name, done)}, beside it on {threads - threads // 2} of {threads} threads")
    start = time.time()
    context = multiprocessing.get_context("spawn")
    beside_may_widen, here_may_widen = context.Event(), context.Event()
    beside = start_training(other_train, other_cfg, root / other, other_done > 0, threads // 2, log,
                            more_threads=(beside_may_widen, threads))
    here = start_training(train, cfg, root / name, done > 0, threads - threads // 2,
                          more_threads=(here_may_widen, threads))
    running = {beside.sentinel: (beside, other, log, here_may_widen),
               here.sentinel: (here, name, None, beside_may_widen)}
    try:
        while running:  # whichever ends first is checked first: a failure stops the other at once
            for ended in wait(list(running)):
                process, what, output, other_may_widen = running.pop(ended)
                finish(process, what, output)
                other_may_widen.set()  # the one still training takes every thread
    except BaseException:
        stop(beside)
        stop(here)
        raise
    return (time.time() - start) / 60


def draw_grid(pipeline_dir: Path, path: Path, device: str) -> None:
    """One row per prompt, labelled, SEEDS_PER_PROMPT columns (seeds 0, 1, ...), enlarged 4x."""
    from .pipeline import Text2ImagePipeline

    pipe = Text2ImagePipeline.from_pretrained(pipeline_dir).to(device)
    result = pipe(list(PROMPTS), num_images_per_prompt=SEEDS_PER_PROMPT, seed=0)
    prompt_grid(result.images, result.prompts, SEEDS_PER_PROMPT).save(path)


def quickstart_plan(root: Path, quality: bool = False) -> list[tuple[str, object, object]]:
    """(stage folder name, trainer, config) for the three stages, in training order: the CPU presets (quality:
    the text encoder with QUALITY_TEXT_ENCODER, the UNet trained QUALITY_UNET_STEPS steps, both in folders
    named with QUALITY_SUFFIX)."""
    from .train.autoencoder import AutoencoderTrainingConfig, train_autoencoder
    from .train.diffusion import DiffusionTrainingConfig, train_diffusion
    from .train.text_encoder import TextEncoderTrainingConfig, train_text_encoder

    folders = {name: name + (QUALITY_SUFFIX if quality else "") for name in ("text_encoder", "diffusion")}
    text_cfg = apply_overrides(TextEncoderTrainingConfig(), QUALITY_TEXT_ENCODER if quality else {})
    diffusion_cfg = apply_overrides(DiffusionTrainingConfig(), {
        "autoencoder": str(root / "autoencoder"), "text_encoder": str(root / folders["text_encoder"]),
        **({"train.steps": QUALITY_UNET_STEPS} if quality else {})})
    return [("autoencoder", train_autoencoder, AutoencoderTrainingConfig()),
            (folders["text_encoder"], train_text_encoder, text_cfg),
            (folders["diffusion"], train_diffusion, diffusion_cfg)]


def run_quickstart(args: argparse.Namespace) -> dict[str, float | None]:
    root = Path(args.out)
    start = time.time()
    plan = quickstart_plan(root, args.quality)
    stages = [name for name, _, _ in plan]
    minutes = {}
    if not args.sequential and side_by_side(plan, root):
        minutes[f"{stages[0]} + {stages[1]} side by side"] = run_side_by_side(plan[0], plan[1], root)
        plan = plan[2:]
    minutes.update({name: run_stage(name, train, cfg, root / name) for name, train, cfg in plan})
    suffix = QUALITY_SUFFIX if args.quality else ""
    pipeline, grid = root / stages[-1], root / ("quality_grid.png" if args.quality else "quickstart_grid.png")
    draw_grid(pipeline, grid, args.device)
    minutes["total"] = (time.time() - start) / 60
    print("[quickstart] done in {:.1f} min ({})".format(minutes["total"], ", ".join(
        f"{name} {m:.1f} min" if m is not None else f"{name} skipped"
        for name, m in minutes.items() if name != "total")))
    print(f"[quickstart] stages: {', '.join(str(root / name) for name in stages)}")
    print(f"[quickstart] grid of {len(PROMPTS)} prompts x {SEEDS_PER_PROMPT} seeds: {grid}")
    print(f'[quickstart] try: latentdiff generate "a red circle in the top left" --pipeline {pipeline} --n 4')
    print(f"[quickstart] a 4-step student (about 2 minutes): latentdiff distill --teacher {pipeline} "
          f"--out {root / ('distilled' + suffix)}")
    print(f"[quickstart] or one that samples as this model does, unguided (about 2 minutes): latentdiff distill "
          f"--teacher {pipeline} --out {root / ('guided' + suffix)} method=guidance")
    return minutes
