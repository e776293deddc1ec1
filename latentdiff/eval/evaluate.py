"""`latentdiff eval`: score a pipeline GenEval-style with the shapes judge, plus FID and CLIP score.

    latentdiff eval --pipeline weights/diffusion --per-category 32 --out weights/eval.json

- Judge: per category (single object, two objects, counting, colours, position, colour binding), on
  training-split compositions and on held-out ones (attribute combinations never rendered for training).
- FID: torchmetrics' FrechetInceptionDistance with a feature extractor available offline — the image
  tower of the pipeline's own CLIP (its unit-normalised image embeddings), since Inception weights cannot
  be downloaded here. Real images are renders of the same prompts, so the number compares image
  statistics, not prompt following. It is a "CLIP-FID": comparable between our models, not to published FIDs.
- CLIP score: 100 * cos(image, prompt) with the same CLIP (Hessel et al. 2021).
- Autoencoder ceiling: the judge's scores on the autoencoder's reconstructions of real renders of the
  same prompts. The UNet's images pass through the same decoder, so this bounds what it can score.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from ..checkpoint import atomic_write_json
from ..data.images import pil_to_tensor
from ..data.shapes import render_sample
from ..errors import ConfigError
from .clip_score import clip_score
from .geneval import CATEGORIES, build_prompt_suite, score_images


class CLIPImageFeatures(torch.nn.Module):
    """torchmetrics feature extractor: (N, 3, H, W) images in [0, 1] -> (N, P) CLIP image embeddings."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.num_features = encoder.image_embedding(torch.zeros(1, 3, 32, 32)).shape[-1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.image_embedding(images.float() * 2 - 1).double()  # on the encoder's device


def generate_for(pipe, suite, seed: int, batch_size: int, **sampling) -> list:
    """One image per suite entry (seed + index), generated batch by batch."""
    prompts = [sample.caption for _, sample in suite]
    images = []
    for start in range(0, len(prompts), batch_size):
        result = pipe(prompts[start:start + batch_size], seed=seed + start, **sampling)
        images.extend(result.images)
    return images


def reconstruct(pipe, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] through the pipeline's autoencoder (posterior mode) and back, clamped."""
    out = [pipe.decode_latents(pipe.encode_image(chunk)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(out).clamp(-1, 1)


def evaluate(pipe, per_category: int = 32, seed: int = 0, batch_size: int = 64, *, ceiling: bool = True,
             **sampling) -> dict:
    """Judge scores per category and split, FID and CLIP score of the pipeline's images (see module doc);
    ceiling=False skips the autoencoder ceiling, which does not depend on `sampling` (a sweep needs it once)."""
    encoder = pipe.text_encoder
    if not encoder.has_image_tower:
        raise ConfigError("eval: the pipeline's text encoder has no CLIP image tower, which FID and CLIP score use")
    # the metric's running sums live where the features come out: the encoder's device
    fid = FrechetInceptionDistance(feature=CLIPImageFeatures(encoder), normalize=True).to(
        next(encoder.parameters()).device)
    results: dict = {"per_category": per_category, "seed": seed, "sampling": sampling}
    all_images, all_real, all_prompts = [], [], []
    for split in ("train", "heldout"):
        suite = build_prompt_suite(split, per_category, seed)
        start = time.time()
        images = generate_for(pipe, suite, seed, batch_size, **sampling)
        results[f"generate_seconds_{split}"] = round(time.time() - start, 3)
        results[split] = score_images(suite, images)
        real = torch.stack([pil_to_tensor(render_sample(sample)) for _, sample in suite])  # (N, 3, H, W)
        if ceiling:
            results[f"autoencoder_ceiling_{split}"] = score_images(suite, reconstruct(pipe, real))
        fake = torch.stack([pil_to_tensor(image) for image in images])
        fid.update((real + 1) / 2, real=True)
        fid.update((fake + 1) / 2, real=False)
        all_images.append(fake)
        all_real.append(real)
        all_prompts += [sample.caption for _, sample in suite]
    results["fid_clip"] = float(fid.compute())
    results["clip_score"] = float(clip_score(encoder, torch.cat(all_images), all_prompts).mean())
    results["clip_score_real"] = float(clip_score(encoder, torch.cat(all_real), all_prompts).mean())
    return results


def format_table(results: dict) -> str:
    lines = ["| category | train split | held-out compositions | autoencoder ceiling (train / held-out) |",
             "|---|---|---|---|"]
    for category in CATEGORIES:
        lines.append(f"| {category.replace('_', ' ')} | {results['train'][category]:.2f} | "
                     f"{results['heldout'][category]:.2f} | {results['autoencoder_ceiling_train'][category]:.2f} / "
                     f"{results['autoencoder_ceiling_heldout'][category]:.2f} |")
    lines.append(f"\nCLIP-FID {results['fid_clip']:.2f}; CLIP score {results['clip_score']:.1f} "
                 f"(real renders of the same prompts: {results['clip_score_real']:.1f})")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> dict:
    if args.sweep:
        from .sweep import run_sweep

        return run_sweep(args)
    from ..generate import load_pipeline

    pipe = load_pipeline(args.pipeline, args.device)
    sampling = {k: v for k, v in {"num_inference_steps": args.steps, "guidance_scale": args.cfg,
                                  "sampler": args.sampler}.items() if v is not None}
    results = evaluate(pipe, args.per_category, args.seed, **sampling)
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results)
    return results
