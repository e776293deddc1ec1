"""Stage 1: train the KL autoencoder, then measure its latent scale and held-out PSNR (also logged, on fewer
batches, every `train.sample_every` steps as `heldout_psnr`).

    latentdiff train-autoencoder [--config FILE] [--data shapes|FOLDER] [--out DIR] [--steps N] [key=value ...]
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from ..data import DataConfig, build_dataset, in_order, iter_in_order
from ..errors import TrainingDiverged
from ..eval_mode import in_eval_mode
from ..eval.image_metrics import psnr
from ..models.autoencoder import AutoencoderConfig, AutoencoderKL
from ..models.discriminator import PatchDiscriminator
from .autoencoder_loss import AutoencoderLoss, AutoencoderLossConfig
from .loop import TrainConfig, TrainingRun
from .optim import adamw
from .perceptual import load_perceptual


@dataclass(frozen=True)
class AutoencoderTrainingConfig:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Held-out PSNR / judge ceiling on reconstructions (mean of 6 categories, train split) against steps, 32
    # wide: 1,200 -> 27.4 dB / 0.82, 1,600 at lr 2e-3 -> 29.7 dB / 0.91, 2,400 -> 32.9 dB / 0.97 in one run but
    # 29.7 dB / 0.84 in another (a loss spike at step 1,800 set it back), 3,000 -> 34-36 dB / 0.99. So 3,000:
    # fewer steps save minutes but not reliably the shapes' edges and colours, which the UNet cannot restore.
    # Width (model.ch, README Results): 24 (the preset) costs 40% less per step than 32 and reaches 35.3 dB /
    # 0.99, and the UNet follows prompts better on its latents; 16 reaches 33.3 dB in 70% of 24's time, but the
    # UNet trained on it placed single objects less often (train split, seeds 0 / 1: 0.89 / 0.85 against 0.98 /
    # 0.86).
    # A linear cooldown over the last quarter settles it, a short EMA (0.99) follows it (0.999 lagged up to
    # 3 dB), and bf16 autocast, where the CPU has AMX, makes a step about a third cheaper.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=16, lr=1e-3, grad_clip=0.0, ema_decay=0.99, cooldown_fraction=0.25,
        mixed_precision="auto", log_every=50))
    scale_batches: int = 50           # batches of training data used to measure the latent std
    eval_batches: int = 20            # batches of held-out data used to measure PSNR
    heldout_batches: int = 2          # held-out batches for the PSNR logged every train.sample_every steps


METRICS = ["loss", "recon", "kl", "g_loss", "gan_weight", "d_loss", "grad_norm", "lr", "heldout_psnr"]


def ordered_batches(dataset, batch_size: int, count: int):
    """The first `count` batches of `dataset` in index order (deterministic evaluation data)."""
    # a private generator: the DataLoader would draw its seed from the global RNG, which every process
    # must advance alike (the main process evaluates alone)
    loader = DataLoader(in_order(dataset), batch_size=batch_size, shuffle=False, drop_last=False,
                        generator=torch.Generator())
    for i, batch in enumerate(loader):
        if i >= count:
            break
        yield batch


@torch.no_grad()
def measure_latent_std(model: AutoencoderKL, dataset, batch_size: int, batches: int, device) -> float:
    """Std of posterior samples over many batches (the original code used one batch), pooled over all
    elements; the diffusion stage multiplies latents by 1/std so that they have unit variance."""
    total, total_sq, count = 0.0, 0.0, 0
    generator = torch.Generator(device=device).manual_seed(0)
    for batch in ordered_batches(dataset, batch_size, batches):
        z = model.encode(batch["image"].to(device)).sample(generator).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean ** 2, 1e-12))


@torch.no_grad()
def heldout_psnr(model: AutoencoderKL, dataset, batch_size: int, batches: int, device) -> float:
    """Mean per-image PSNR (dB) of mode reconstructions on held-out data."""
    scores = []
    for batch in ordered_batches(dataset, batch_size, batches):
        images = batch["image"].to(device)
        recon = model.decode(model.encode(images).mode())
        scores.append(psnr(recon, images))
    return torch.cat(scores).mean().item()


def save_reconstruction_grid(model: AutoencoderKL, images: torch.Tensor, path: Path) -> None:
    """Originals on the top row, reconstructions below."""
    with torch.no_grad():
        recon = model.decode(model.encode(images).mode())
    grid = make_grid(torch.cat([images, recon]).clamp(-1, 1) * 0.5 + 0.5, nrow=len(images), padding=1)
    save_image(grid, path)


def preview_and_psnr(model: AutoencoderKL, preview: torch.Tensor, heldout_set, cfg: AutoencoderTrainingConfig,
                     path: Path, batch: int) -> float:
    """Save the reconstruction grid and return the held-out PSNR over `cfg.heldout_batches` batches, in eval mode."""
    with in_eval_mode(model):
        save_reconstruction_grid(model, preview, path)
        return heldout_psnr(model, heldout_set, batch, cfg.heldout_batches, preview.device)


def train_autoencoder(cfg: AutoencoderTrainingConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Train, checkpoint, and export an AutoencoderKL to `out_dir`; returns the final measurements."""
    run = TrainingRun(out_dir, cfg, cfg.train, resume=resume, metrics=METRICS)
    train_set, heldout_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "heldout")
    # channels_last: oneDNN's convolutions skip a layout conversion each call; a CPU step costs ~16% less
    model = AutoencoderKL(cfg.model).to(memory_format=torch.channels_last)
    model, opt_g = run.track("model", model, adamw(model.parameters(), cfg.train))
    discriminator = None
    if cfg.loss.disc_start >= 0:
        disc = PatchDiscriminator(cfg.model.out_channels, cfg.loss.disc_ch, cfg.loss.disc_layers)
        discriminator, opt_d = run.track("discriminator", disc, adamw(
            disc.parameters(), cfg.train, lr=cfg.loss.disc_lr, betas=(0.5, 0.9), weight_decay=0.01))
    perceptual = load_perceptual(cfg.loss, run.print)
    if perceptual is not None:
        perceptual = perceptual.to(run.device)
    objective = AutoencoderLoss(cfg.loss, discriminator, perceptual)
    run.use_ema("model")
    preview = torch.stack([s["image"] for s in iter_in_order(heldout_set, 8)]).to(run.device)
    last_layer = run.unwrap(model).decoder.conv_out.weight
    eval_batch = cfg.train.batch_size * run.accelerator.num_processes  # the same data however many processes
    results: dict = {}

    def export(folder: Path) -> None:
        final = run.exported_module("model")
        if results:  # the last checkpoint carries the measured latent scale and PSNR
            final.config = dataclasses.replace(final.config, scale_factor=results["scale_factor"])
        final.save_pretrained(folder, metadata={"step": step + 1, **results})

    start = time.time()
    for step, micro_batches in run.steps(train_set):
        run.set_lr(opt_g, cfg.train.lr, step)
        logs: dict[str, float] = {}
        for batch in micro_batches:
            images = batch["image"].contiguous(memory_format=torch.channels_last)
            with run.autocast():
                recon, posterior = model(images, generator=run.batch_generator())
                loss, logs = objective.generator_loss(images, recon, posterior, step, last_layer)
            run.backward(loss)
        logs.update(loss=loss.item(), lr=opt_g.param_groups[0]["lr"],
                    grad_norm=run.clip_and_step(opt_g, model))
        run.update_ema()
        if objective.gan_active(step):
            for batch in micro_batches:
                with run.autocast():
                    recon, _ = model(batch["image"], generator=run.batch_generator())
                    d_loss = objective.discriminator_loss(batch["image"], recon)
                run.backward(d_loss)
            logs["d_loss"] = d_loss.item()
            run.clip_and_step(opt_d, discriminator)
        if run.is_main and run.due(step, cfg.train.sample_every):
            logs["heldout_psnr"] = preview_and_psnr(run.exported_module("model"), preview, heldout_set, cfg,
                                                    run.samples_dir / f"recon-{step + 1:07d}.png", eval_batch)
        run.log(step, logs)
        if step + 1 == cfg.train.steps and run.is_main:  # the main process alone measures and exports
            results.update(measure(run.exported_module("model"), cfg, train_set, heldout_set, run.device, eval_batch))
        run.maybe_checkpoint(step, export)
    if results:
        results["train_minutes"] = round((time.time() - start) / 60, 2)
        run.print(f"held-out PSNR {results['psnr']:.2f} dB, latent scale_factor {results['scale_factor']:.5f}, "
                  f"{results['train_minutes']} min; saved to {run.out_dir}")
    else:
        run.print(f"nothing to do: {run.out_dir} already finished {cfg.train.steps} steps")
    return results


def measure(model: AutoencoderKL, cfg: AutoencoderTrainingConfig, train_set, heldout_set, device,
            batch: int) -> dict:
    """Latent scale and held-out PSNR over `batch`-sized batches (the global batch: the same data however
    many processes trained)."""
    model.eval()
    std = measure_latent_std(model, train_set, batch, cfg.scale_batches, device)
    if not (math.isfinite(std) and std > 0):
        raise TrainingDiverged(f"the trained autoencoder's latent std is {std}, so its scale_factor would be "
                               f"{1 / std if std else float('inf')}; the run diverged (lower train.lr); the last "
                               f"good checkpoint is kept")
    return {"scale_factor": 1.0 / std, "latent_std": std,
            "psnr": heldout_psnr(model, heldout_set, batch, cfg.eval_batches, device)}
