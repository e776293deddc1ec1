"""`latentdiff quickstart`: train all three stages on the built-in shapes data with the CPU presets,
then draw a grid of images for a fixed set of prompts. `--quality` trains the UNet 6x as long
(configs/diffusion/quality.yaml): two objects, counting and colour binding keep improving up to there.

On a CPU with 2 or more threads the autoencoder and the text encoder train at once, each in a process of
its own on half the threads, and the autoencoder takes every thread once the text encoder is done
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
# The quality preset's UNet steps (6x the quickstart's 1,700; the learning rate is constant, so a finished
# quickstart's UNet continues to it). Judge mean over the categories and splits, 50 prompts, on a 32-wide
# autoencoder: 0.57 at 1,700 steps, 0.70 at 3,400, 0.77 at 5,100, 0.79 at 6,800; on the 24-wide preset, 200
# prompts: 0.863 at 6,800, 0.882 at 8,500, 0.891 at 10,200 (one run; a second 0.855 at 10,200; README,
# Results). 10,200 keeps the whole `quickstart --quality` within an hour on 2 cores (55.7 min).
QUALITY_UNET_STEPS = 10200


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="weights", help="folder for the three stages and the grid (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for the final sampling (default: %(default)s)")
    parser.add_argument("--quality", action="store_true",
                        help=f"train the UNet {QUALITY_UNET_STEPS} steps, 6x the preset's (configs/diffusion/quality.yaml; "
                             f"about 41 more minutes on 2 cores); continues a finished quickstart's UNet")
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
    """Train `first` and `second` at once, each in a process of its own on half the threads; `first` takes
    every thread once `second` is done. Returns the minutes until both are."""
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
    print(f"{starting(name, cfg, root / name, done)}, beside it on {threads - threads // 2} of {threads} threads, "
          f"then on all")
    start = time.time()
    second_done = multiprocessing.get_context("spawn").Event()
    beside = start_training(other_train, other_cfg, root / other, other_done > 0, threads // 2, log)
    here = start_training(train, cfg, root / name, done > 0, threads - threads // 2,
                          more_threads=(second_done, threads))
    running = {beside.sentinel: (beside, other, log), here.sentinel: (here, name, None)}
    try:
        while running:  # whichever ends first is checked first: a failure stops the other at once
            for ended in wait(list(running)):
                process, what, output = running.pop(ended)
                finish(process, what, output)
                if process is beside:
                    second_done.set()
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
    the UNet trained QUALITY_UNET_STEPS steps)."""
    from .train.autoencoder import AutoencoderTrainingConfig, train_autoencoder
    from .train.diffusion import DiffusionTrainingConfig, train_diffusion
    from .train.text_encoder import TextEncoderTrainingConfig, train_text_encoder

    diffusion_cfg = apply_overrides(DiffusionTrainingConfig(), {
        "autoencoder": str(root / "autoencoder"), "text_encoder": str(root / "text_encoder"),
        **({"train.steps": QUALITY_UNET_STEPS} if quality else {})})
    return [("autoencoder", train_autoencoder, AutoencoderTrainingConfig()),
            ("text_encoder", train_text_encoder, TextEncoderTrainingConfig()),
            ("diffusion", train_diffusion, diffusion_cfg)]


def run_quickstart(args: argparse.Namespace) -> dict[str, float | None]:
    root = Path(args.out)
    start = time.time()
    plan = quickstart_plan(root, args.quality)
    minutes = {}
    if not args.sequential and side_by_side(plan, root):
        minutes["autoencoder + text_encoder side by side"] = run_side_by_side(plan[0], plan[1], root)
        plan = plan[2:]
    minutes.update({name: run_stage(name, train, cfg, root / name) for name, train, cfg in plan})
    grid = root / "quickstart_grid.png"
    draw_grid(root / "diffusion", grid, args.device)
    minutes["total"] = (time.time() - start) / 60
    print("[quickstart] done in {:.1f} min ({})".format(minutes["total"], ", ".join(
        f"{name} {m:.1f} min" if m is not None else f"{name} skipped"
        for name, m in minutes.items() if name != "total")))
    print(f"[quickstart] stages: {root / 'autoencoder'}, {root / 'text_encoder'}, {root / 'diffusion'}")
    print(f"[quickstart] grid of {len(PROMPTS)} prompts x {SEEDS_PER_PROMPT} seeds: {grid}")
    print(f'[quickstart] try: latentdiff generate "a red circle in the top left" --pipeline {root / "diffusion"} --n 4')
    print(f"[quickstart] a 4-step student (about 2 minutes): latentdiff distill --teacher {root / 'diffusion'} "
          f"--out {root / 'distilled'}")
    print(f"[quickstart] or one that samples as this model does, unguided (about 2 minutes): latentdiff distill "
          f"--teacher {root / 'diffusion'} --out {root / 'guided'} method=guidance")
    return minutes
