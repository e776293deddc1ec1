"""Stage 3: train the UNet on the latents of the frozen autoencoder, conditioned on the frozen text encoder.

    latentdiff train-diffusion --autoencoder DIR --text-encoder DIR [--config FILE] [--out DIR] [--steps N] [k=v ...]

Images and captions are encoded once into a latent + text cache (latent_cache.py); each step draws
z = (mean + std·ε)·scale_factor from the cached posterior, replaces a `objective.cond_dropout` share of the
captions by the empty prompt (so that classifier-free guidance works), and takes a DiffusionLoss step.
Every `train.sample_every` steps the pipeline draws a preview grid of `preview_prompts` (one row each, the
prompt beside it) and logs its CLIP score by the frozen text encoder's image tower, when it has one.
The exported UNet records the stages it was trained with and its sampling defaults (stages.py).
With `objective.grounding_weight` > 0 (shapes data), the cache also holds each named object's mask and
word tokens, and each step from `objective.grounding_start` on adds the grounding loss on the UNet's
cross-attention (diffusion/grounding.py).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..batch_random import BatchGenerator, draw
from ..config import check_choice
from ..data import DataConfig, build_dataset
from ..data.images import tensor_to_pil
from ..data.shapes_grounding import ShapesGrounding
from ..diffusion import DiffusionLoss, NoiseSchedule, drop_conditioning
from ..diffusion.grounding import grounding_loss
from ..diffusion.losses import ObjectiveConfig, conditioning_dropout
from ..diffusion.schedules import ScheduleConfig
from ..errors import ConfigError
from ..eval_mode import in_eval_mode
from ..eval.clip_score import clip_score
from ..grid import prompt_grid
from ..latent_diffusion import GenerationRequest, LatentDiffusion, seeded_generators
from ..models.attention import recording_cross_attention
from ..models.autoencoder import AutoencoderKL
from ..models.text_encoder import OUTPUT_LAYERS, TextEncoder
from ..models.unet import UNet, UNetConfig
from ..samplers import SamplingConfig
from ..stages import UNetRecord
from .latent_cache import LatentCache, cache_key, load_or_build_cache
from .loop import TrainConfig, TrainingRun
from .optim import adamw


# drawn every train.sample_every steps, one row each (the UNet trainers' default)
PREVIEW_PROMPTS = ("a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right",
                   "a yellow star", "two purple diamonds", "an orange cross above a cyan circle")


@dataclass(frozen=True)
class DiffusionTrainingConfig:
    autoencoder: str = ""             # trained stage-1 folder (--autoencoder); frozen, encodes images to latents
    text_encoder: str = ""            # trained stage-2 folder (--text-encoder); frozen, encodes captions
    text_layer: str = ""              # text states the UNet reads: "last", "penultimate" ("" = the text encoder's own)
    # 4.5M parameters; transformers at 8x8, 4x4 and in the middle. Without the 8x8 ones a step costs 2/3
    # but objects land in the named 3x3 region less often (single-object judge 0.66 / 0.64 vs 0.78 / 0.81).
    model: UNetConfig = field(default_factory=lambda: UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=4))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(prediction="eps", weighting="min_snr"))
    data: DataConfig = field(default_factory=lambda: DataConfig(length=8192))  # the cache holds `length` samples
    # Objects move into their named region late and fast. Single-object judge (train / held-out, 200
    # prompts each) on one autoencoder + text encoder: lr 6e-4: 0.32 / 0.33 at step 1,000, 0.82 / 0.75 at
    # 1,400, 0.92 / 0.84 at 1,600, 0.95 / 0.92 at 1,700; lr 3e-4 got there ~300 steps later, 1e-3 was worse.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1700, batch_size=64, lr=6e-4, warmup_steps=100, ema_decay=0.995, log_every=25,
        sample_every=500, checkpoint_every=500))
    # previews and the pipeline's defaults; guidance 5 placed single objects best (one model: 3 -> 0.55,
    # 5 -> 0.66, 7.5 -> 0.56 on 64 prompts). Euler at 10 steps: the sampler x steps sweep (README) found it
    # close to DPM++ 2M at 20 (judge mean 0.61 / 0.55 vs 0.61 / 0.59) at half the UNet evaluations, where
    # DPM++ 2M with this spacing falls apart below 20 steps (0.39 / 0.38 at 8)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(sampler="euler", steps=10,
                                                                            guidance_scale=5.0))
    preview_prompts: tuple[str, ...] = PREVIEW_PROMPTS
    preview_images: int = 4           # images per preview prompt (seeds 0, 1, ...)
    cache_dir: str = ""               # latent + text cache root ("" = latent_cache/ beside the run folder)

    def __post_init__(self):
        check_choice("text_layer", self.text_layer, ("", *OUTPUT_LAYERS))
        if self.objective.grounding_weight > 0 and self.data.source != "shapes":
            raise ConfigError("objective.grounding_weight needs data.source=shapes: only the built-in shapes "
                              "know where each object they name lies")
        if self.objective.grounding_weight > 0 and self.model.self_condition:
            raise ConfigError("objective.grounding_weight does not go with model.self_condition: the grounding "
                              "loss reads one UNet call per step, and self-conditioning makes two")
        if self.preview_images < 0:
            raise ConfigError(f"preview_images: must be at least 0, got {self.preview_images}")


METRICS = ["loss", "grad_norm", "lr", "clip_score"]
GROUNDING_METRICS = ["grounding_loss"]  # a column only when grounding is on


def load_frozen_stages(cfg: DiffusionTrainingConfig) -> tuple[AutoencoderKL, TextEncoder]:
    """The trained autoencoder and text encoder named by the config, in eval mode without gradients."""
    for name, flag in (("autoencoder", "--autoencoder"), ("text_encoder", "--text-encoder")):
        if not getattr(cfg, name):
            raise ConfigError(f"train-diffusion needs the trained {name.replace('_', ' ')}: {flag} DIR")
    autoencoder = AutoencoderKL.from_pretrained(cfg.autoencoder)
    text_encoder = TextEncoder.from_pretrained(cfg.text_encoder, output_layer=cfg.text_layer or None)
    for module in (autoencoder, text_encoder):
        module.eval().requires_grad_(False)
    return autoencoder, text_encoder


def check_fits(cfg: DiffusionTrainingConfig, autoencoder: AutoencoderKL, text_encoder: TextEncoder) -> None:
    """The UNet config must fit the frozen stages and the image size."""
    model, z = cfg.model, autoencoder.config.z_channels
    if model.context_dim != text_encoder.width:
        raise ConfigError(f"model.context_dim is {model.context_dim} but the text encoder at {cfg.text_encoder} "
                          f"makes states {text_encoder.width} wide; set model.context_dim={text_encoder.width}")
    if model.in_channels != z or model.out_channels != z:
        raise ConfigError(f"model.in_channels/out_channels are {model.in_channels}/{model.out_channels} but the "
                          f"autoencoder at {cfg.autoencoder} has {z} latent channels; set both to {z}")
    f = autoencoder.downsample_factor
    if cfg.data.size % (f * model.downsample_factor):
        raise ConfigError(f"data.size {cfg.data.size} is not a multiple of {f * model.downsample_factor} (the "
                          f"autoencoder's factor {f} times the UNet's {model.downsample_factor})")


def step_generator(seed: int, step: int) -> torch.Generator:
    """This step's randomness (timesteps, noise, posterior samples, dropout), a function of (seed, step), so a
    resumed run draws exactly what an uninterrupted one would, on any device; every process draws for the
    global batch and keeps its own rows (TrainingRun.batch_generator)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009)


def sample_latents(batch: dict, scale_factor: float, generator: BatchGenerator) -> torch.Tensor:
    """(B, C, h, w) z = (mean + std·ε)·scale_factor from the cached posterior of each image."""
    mean, std = batch["mean"], batch["std"]
    noise = draw(torch.randn, tuple(mean.shape), generator, mean, dtype=mean.dtype)
    return (mean + std * noise) * scale_factor


def open_latent_cache(cfg, run: TrainingRun, record: UNetRecord, autoencoder: AutoencoderKL,
                      text_encoder: TextEncoder, grounding: bool = False) -> LatentCache:
    """The latent + text cache of `cfg.data` under these stages (built on first use, under `cfg.cache_dir` or
    latent_cache/ beside the run folder), on the run's device; every process encodes its share of the
    shards and the main one then writes the index."""
    dataset = build_dataset(cfg.data, "train")
    if grounding:
        dataset = ShapesGrounding(dataset)
    key = cache_key(cfg.data, dataset, record.stages["autoencoder"].weights_hash,
                    record.stages["text_encoder"].weights_hash, text_encoder, grounding=grounding)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else run.out_dir.parent / "latent_cache"
    cache = load_or_build_cache(
        cache_root, dataset, key, autoencoder, text_encoder, rank=run.accelerator.process_index,
        world_size=run.accelerator.num_processes, barrier=run.accelerator.wait_for_everyone,
        batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, log=run.print, progress=run.is_main)
    return cache.to(run.device)


def save_preview(model: LatentDiffusion, cfg: DiffusionTrainingConfig, path: Path) -> tuple[torch.Tensor, list[str]]:
    """One row per preview prompt, written beside it, `preview_images` seeds per row (seeds 0, 1, ..., the same
    every time), drawn with the run's default sampling settings; returns the (B, 3, H, W) images and prompts."""
    n, sampling = cfg.preview_images, model.sampling
    prompts = [p for p in cfg.preview_prompts for _ in range(n)]
    seeds = list(range(len(prompts)))
    request = GenerationRequest(prompts, None, seeds, seeded_generators(seeds), sampling.steps,
                                sampling.guidance_scale, sampling.sampler, cfg.data.size, cfg.data.size)
    with in_eval_mode(model.unet):
        images = model.decode_latents(model.text_to_latents(request))  # (B, 3, H, W) about [-1, 1]
    prompt_grid([tensor_to_pil(image) for image in images], prompts, columns=n, scale=2).save(path)
    return images, prompts


def preview_if_due(run: TrainingRun, cfg, step: int, model: LatentDiffusion, logs: dict) -> None:
    """Every `train.sample_every` steps, on the main process: the preview grid (save_preview) into samples/,
    and its CLIP score into `logs` when the text encoder has an image tower (a cheap measure of prompt
    following)."""
    if not (run.is_main and cfg.preview_images and cfg.preview_prompts and run.due(step, cfg.train.sample_every)):
        return
    images, prompts = save_preview(model, cfg, run.samples_dir / f"preview-{step + 1:07d}.png")
    if model.text_encoder.has_image_tower:
        logs["clip_score"] = clip_score(model.text_encoder, images, prompts).mean().item()


def finish_step(run: TrainingRun, cfg, step: int, logs: dict, model: LatentDiffusion, results: dict, start: float,
                export: Callable[[Path], None]) -> None:
    """The end of a UNet training step: the EMA update, a preview when due, the metrics row, the final
    results on the last step (into `results`, before `export` writes them) and a checkpoint when due."""
    run.update_ema()
    preview_if_due(run, cfg, step, model, logs)
    run.log(step, logs)
    if step + 1 == cfg.train.steps:
        results.update(final_loss=round(logs["loss"], 5), train_minutes=round((time.time() - start) / 60, 2))
    run.maybe_checkpoint(step, export)


def report(run: TrainingRun, cfg, results: dict, done: str) -> dict:
    """Print how the run ended ("<done> N steps in M min", or that it had already finished); returns `results`."""
    if results:
        run.print(f"{done} {cfg.train.steps} steps in {results['train_minutes']} min; saved to {run.out_dir}")
    else:
        run.print(f"nothing to do: {run.out_dir} already finished {cfg.train.steps} steps")
    return results


def train_diffusion(cfg: DiffusionTrainingConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Train and checkpoint a text-conditioned UNet into `out_dir`; returns the final measurements."""
    autoencoder, text_encoder = load_frozen_stages(cfg)
    check_fits(cfg, autoencoder, text_encoder)
    grounding = cfg.objective.grounding_weight > 0
    run = TrainingRun(out_dir, cfg, cfg.train, resume=resume, metrics=METRICS + GROUNDING_METRICS * grounding)
    unet = UNet(cfg.model)  # first after TrainingRun seeds the global RNG: the same init on every (re)start
    unet, optimizer = run.track("unet", unet, adamw(unet.parameters(), cfg.train))
    autoencoder.to(run.device)
    text_encoder.to(run.device)
    record = UNetRecord.for_stages(autoencoder, cfg.autoencoder, text_encoder, cfg.text_encoder, run.out_dir,
                                   prediction=cfg.objective.prediction, schedule=cfg.schedule, sampling=cfg.sampling,
                                   image_size=cfg.data.size, context_mask=True)
    if run.resume_from is not None:
        record.check_resume(run.resume_from)

    cache = open_latent_cache(cfg, run, record, autoencoder, text_encoder, grounding=grounding)
    uncond = cache.unconditional()

    run.use_ema("unet")
    objective = DiffusionLoss(NoiseSchedule.from_config(cfg.schedule), cfg.objective, cfg.model.self_condition)
    scale_factor = autoencoder.config.scale_factor
    results: dict = {}

    def export(folder: Path) -> None:
        run.exported_module("unet").save_pretrained(folder, metadata=record.to_metadata(step=step + 1, **results))

    previewer = LatentDiffusion(autoencoder, text_encoder, run.exported_module("unet"), record)  # the exported weights
    start = time.time()
    for step, micro_batches in run.steps(cache):
        run.set_lr(optimizer, cfg.train.lr, step)
        generator = run.batch_generator(step_generator(cfg.train.seed, step))
        grounding_now = grounding and step >= cfg.objective.grounding_start
        for batch in micro_batches:
            z = sample_latents(batch, scale_factor, generator)
            drop = conditioning_dropout(batch["states"], cfg.objective.cond_dropout, generator)
            cond = drop_conditioning({"context": batch["states"], "context_mask": batch["mask"]}, uncond,
                                     cfg.objective.cond_dropout, drop=drop)
            with run.autocast(), (recording_cross_attention(unet) if grounding_now else nullcontext()) as maps:
                loss = objective(unet, z, cond, generator)
                if grounding_now:  # a dropped caption names nothing
                    ground = grounding_loss(maps, batch["ground_tokens"] & ~drop[:, None, None],
                                            batch["ground_masks"], cfg.objective.grounding_min_size)
            run.backward(loss + cfg.objective.grounding_weight * ground if grounding_now else loss)
        logs = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": run.clip_and_step(optimizer, unet)}
        if grounding_now:
            logs["grounding_loss"] = ground.item()
        finish_step(run, cfg, step, logs, previewer, results, start, export)
    return report(run, cfg, results, "trained")
