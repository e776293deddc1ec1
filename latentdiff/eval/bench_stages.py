"""`latentdiff bench --all`: where the time goes, one row per piece of work, ours beside diffusers' twin.

Rows: the GEMM peak (fp32 and bf16 `torch.mm`, measured first on the same device), the autoencoder,
text-encoder and UNet training steps (forward + loss + backward, no optimizer), the UNet forward, the VAE
decode and end-to-end generation (DPM++ 2M against diffusers' StableDiffusionPipeline loaded from our
pipeline exported to diffusers format, the same prompts and initial noise; the same with the padding tokens
hidden from our UNet, as a pipeline trained here does; and our pipeline sampling as each kind of distilled
student does, padding hidden, against the same diffusers call: a consistency student in 4 unguided steps, a
guidance student as the diffusion preset samples but unguided). Weights are random, built from
the shapes presets with no zero layer, so that the twins' outputs differ where their arithmetic does.

In bf16 (or fp16) the autoencoder and text-encoder steps run as their trainers' mixed precision does (fp32
weights, autocast forward); the UNet rows and generation cast both twins' weights, as `bench` always has.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import apply_overrides
from ..models.autoencoder import AutoencoderKL
from ..models.text_encoder_openclip import OpenCLIPTextEncoder
from ..quickstart import PROMPTS
from ..train.autoencoder import AutoencoderTrainingConfig
from ..train.autoencoder_loss import AutoencoderLoss
from ..train.diffusion import DiffusionTrainingConfig
from ..train.distill import METHODS, DistillConfig, student_sampling
from ..train.text_encoder import TextEncoderTrainingConfig
from .bench import BenchCase
from .bench_timing import GEMM_SIZE, GEMM_TRIES, gemm_peak, time_in_turn
from .bench_unet import IMPLEMENTATIONS, bench_unet, quiet_diffusers, randomize_zeros, unet_for_bench


@dataclass(frozen=True)
class Workload:
    """The stages `bench --all` builds (each at its training batch) and how it generates."""
    autoencoder: AutoencoderTrainingConfig = field(default_factory=AutoencoderTrainingConfig)
    text_encoder: TextEncoderTrainingConfig = field(default_factory=TextEncoderTrainingConfig)
    diffusion: DiffusionTrainingConfig = field(default_factory=DiffusionTrainingConfig)
    generation_batch: int = 16       # images per generation call (one prompt and seed each), and the decode batch
    steps: int = 20
    guidance_scale: float = 5.0
    sampler: str = "dpmpp_2m"        # diffusers' DPMSolverMultistepScheduler in the export
    spacing: str = "trailing"        # where both space timesteps alike (diffusers' DPM++ has its own "leading")


def student_samplings(workload: Workload) -> dict[str, dict]:
    """Each kind of distilled student (train/distill.py METHODS) and the pipeline arguments it samples with by
    default, a student of the diffusion preset: the consistency student in 4 steps; the guidance student as
    its teacher does, without guidance."""
    samplings = {method: student_sampling(DistillConfig(method=method), workload.diffusion.sampling)
                 for method in METHODS}
    return {method: {"sampler": s.sampler, "num_inference_steps": s.steps, "guidance_scale": s.guidance_scale}
            for method, s in samplings.items()}


def shapes_workload() -> Workload:
    return Workload()


@dataclass(frozen=True)
class Row:
    """One piece of work: per implementation ("latentdiff", "diffusers"), median seconds and FLOPs per call."""
    name: str
    batch: int | None
    seconds: dict[str, float]
    flops: dict[str, int]
    max_diff: float | None = None    # largest difference between the twins' outputs

    def gflops_per_second(self, implementation: str) -> float | None:
        if implementation not in self.seconds:
            return None
        return self.flops[implementation] / self.seconds[implementation] / 1e9

    @property
    def ratio(self) -> float | None:
        """latentdiff's time / diffusers' (None without a twin)."""
        return self.seconds["latentdiff"] / self.seconds["diffusers"] if "diffusers" in self.seconds else None


@dataclass(frozen=True)
class BenchTable:
    peaks: list[Row]                 # the GEMM peaks: fp32, bf16 (and the run's dtype)
    rows: list[Row]                  # the work
    peak: Row                        # the GEMM of the run's dtype: what "% peak" divides by
    device: str
    dtype: str
    repeats: int
    gemm_size: int


def _row(name: str, batch: int | None, calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
         difference: Callable[[Any, Any], float] | None = None) -> Row:
    measured = time_in_turn(calls, repeats, device)
    diff = None
    if difference is not None and len(calls) == 2:
        diff = difference(*(measured.outputs[name] for name in IMPLEMENTATIONS))
    return Row(name, batch, measured.seconds, measured.flops, diff)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def autocast(device: torch.device, dtype: torch.dtype):
    """What the trainers' mixed precision does for `dtype`: fp32 weights, the forward pass autocast."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype)


def autoencoder_train_step(cfg: AutoencoderTrainingConfig, repeats: int, device: torch.device,
                           dtype: torch.dtype) -> Row:
    """Forward (encode, sample, decode) + the L1/KL loss + backward, on random images (no PatchGAN)."""
    model = AutoencoderKL(cfg.model).to(device).train()
    objective = AutoencoderLoss(cfg.loss, discriminator=None)
    batch, size = cfg.train.batch_size, cfg.data.size
    images = torch.rand(batch, cfg.model.in_channels, size, size, device=device) * 2 - 1

    def step() -> None:
        with autocast(device, dtype):
            recon, posterior = model(images)
            loss, _ = objective.generator_loss(images, recon, posterior, 0, model.decoder.conv_out.weight)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return _row("autoencoder train step", batch, {"latentdiff": step}, repeats, device)


def text_encoder_train_step(cfg: TextEncoderTrainingConfig, repeats: int, device: torch.device,
                            dtype: torch.dtype) -> Row:
    """Both CLIP towers + the contrastive loss + backward, on random images and shapes captions."""
    from open_clip import ClipLoss

    model = OpenCLIPTextEncoder(cfg.model).to(device).train()
    batch, size = cfg.train.batch_size, cfg.data.size
    ids, mask = (t.to(device) for t in model.tokenize([PROMPTS[i % len(PROMPTS)] for i in range(batch)]))
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    contrastive = ClipLoss()

    def step() -> None:
        with autocast(device, dtype):
            loss = contrastive(*model(images, ids, mask))
        loss.backward()
        model.zero_grad(set_to_none=True)
    return _row("text encoder train step", batch, {"latentdiff": step}, repeats, device)


def unet_rows(case: BenchCase, batch: int | None, repeats: int, device: str, dtype: torch.dtype) -> list[Row]:
    rows = []
    for name, backward in (("UNet train step", True), ("UNet forward", False)):
        report = bench_unet(case, batch, repeats, backward, device, dtype)
        ran = [n for n in IMPLEMENTATIONS if f"{n}_seconds" in report]
        rows.append(Row(name, report["batch"], {n: report[f"{n}_seconds"] for n in ran},
                        {n: report[f"{n}_flops"] for n in ran}, report.get("max_abs_diff")))
    return rows


def diffusers_vae(autoencoder: AutoencoderKL) -> torch.nn.Module | None:
    """diffusers' AutoencoderKL holding `autoencoder`'s weights (None without diffusers)."""
    diffusers = quiet_diffusers()
    if diffusers is None:
        return None
    from ..convert.vae_keys import vae_config_to_diffusers, vae_to_diffusers

    cfg = autoencoder.config
    twin = diffusers.AutoencoderKL(**{k: v for k, v in vae_config_to_diffusers(cfg).items() if not k.startswith("_")})
    twin.load_state_dict(vae_to_diffusers(autoencoder.state_dict(), cfg), strict=True)
    return twin


@torch.no_grad()
def vae_decode(autoencoder: AutoencoderKL, batch: int, latent_size: int, repeats: int, device: torch.device,
               dtype: torch.dtype) -> Row:
    twin = diffusers_vae(autoencoder)
    z = torch.randn(batch, autoencoder.config.z_channels, latent_size, latent_size, device=device, dtype=dtype)
    calls = {"latentdiff": lambda: autoencoder.decode(z)}
    if twin is not None:
        twin.to(device, dtype).eval()
        calls["diffusers"] = lambda: twin.decode(z).sample
    return _row("VAE decode", batch, calls, repeats, device, _max_abs_diff)


def random_pipeline(workload: Workload):
    """A Text2ImagePipeline of the workload's three stages with random weights (no zero layer), sampling
    with its sampler, steps, guidance and spacing; SD's way of attending to every text token, as diffusers does."""
    from ..convert.assemble import assemble_pipeline

    cfg = workload.diffusion
    sampling = apply_overrides(cfg.sampling, {"sampler": workload.sampler, "steps": workload.steps,
                                              "guidance_scale": workload.guidance_scale,
                                              "spacing": workload.spacing, "steps_offset": 0})
    stages = (randomize_zeros(AutoencoderKL(workload.autoencoder.model)),
              OpenCLIPTextEncoder(workload.text_encoder.model), unet_for_bench(cfg.model))
    return assemble_pipeline(*stages, prediction=cfg.objective.prediction, schedule=cfg.schedule, sampling=sampling,
                             image_size=cfg.data.size, source="latentdiff bench (random weights)")


def generation(workload: Workload, pipe, repeats: int, device: torch.device, dtype: torch.dtype) -> list[Row]:
    """`pipe` against diffusers' StableDiffusionPipeline read from its diffusers export: the same prompts,
    steps, guidance, and initial noise (seed k for image k, drawn as our pipeline draws it); then, against the
    same diffusers call, `pipe` as a pipeline trained here records it (padding tokens hidden from the UNet,
    which diffusers cannot do, so the images differ and no difference is shown), and that pipeline as each
    kind of distilled student samples (student_samplings: the architecture is the student's, so this is the
    time a student takes; its images are not diffusers' either)."""
    from ..latent_diffusion import seeded_generators
    from ..samplers import randn_per_sample

    batch, size = workload.generation_batch, workload.diffusion.data.size
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    options = {"num_inference_steps": workload.steps, "guidance_scale": workload.guidance_scale,
               "output_type": "np"}
    trained_here = copy.copy(pipe)  # the same stages and settings, padding hidden (context_mask) as trained here
    trained_here.record = replace(pipe.record, context_mask=True)
    same = {"latentdiff": lambda: pipe(prompts, seed=0, height=size, width=size, **options).images}
    masked = {"latentdiff": lambda: trained_here(prompts, seed=0, height=size, width=size, **options).images}
    samplings = student_samplings(workload)
    students = {method: {"latentdiff": functools.partial(trained_here, prompts, seed=0, height=size, width=size,
                                                         output_type="np", **sampling)}
                for method, sampling in samplings.items()}
    settings = f"{workload.steps} steps {workload.sampler}, cfg {workload.guidance_scale:g}"
    diffusers = quiet_diffusers()
    with tempfile.TemporaryDirectory() as tmp:
        if diffusers is not None:
            from ..convert.diffusers_format import save_diffusers

            save_diffusers(pipe, Path(tmp) / "diffusers")
            with warnings.catch_warnings():  # its advice to use steps_offset=1 concerns "leading" spacing
                warnings.simplefilter("ignore", FutureWarning)
                twin = diffusers.StableDiffusionPipeline.from_pretrained(
                    str(Path(tmp) / "diffusers"), safety_checker=None, requires_safety_checker=False)
            twin.to(device, dtype)
            twin.set_progress_bar_config(disable=True)
            noise = randn_per_sample(pipe.latent_shape(batch, size, size), seeded_generators(list(range(batch))),
                                     dtype=dtype, device=device)  # (B, C, h, w), as our pipeline draws it
            def diffusers_call():  # the one diffusers call every row is timed against
                return twin(prompts, latents=noise, height=size, width=size, **options).images

            for calls in (same, masked, *students.values()):
                calls["diffusers"] = diffusers_call
        return [_row(f"generation ({settings})", batch, same, repeats, device, lambda a, b: float(np.abs(a - b).max())),
                _row(f"generation, padding hidden as trained here ({settings})", batch, masked, repeats, device),
                *(_row(f"generation, {method} student (ours: {sampling['num_inference_steps']} steps "
                       f"{sampling['sampler']}, no guidance; diffusers: {settings})", batch, students[method], repeats,
                       device) for method, sampling in samplings.items())]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gemm_rows(device: torch.device, dtype: torch.dtype, repeats: int, size: int) -> dict[torch.dtype, Row]:
    """The GEMM peak in fp32, bf16 and `dtype`."""
    rows = {}
    for peak_dtype in (torch.float32, torch.bfloat16, dtype):
        if peak_dtype not in rows:
            best, flops = gemm_peak(peak_dtype, device, repeats, size)
            rows[peak_dtype] = Row(f"GEMM peak {_name(peak_dtype)}", None, {"latentdiff": best}, {"latentdiff": flops})
    return rows


def bench_all(workload: Workload, unet_case: BenchCase, unet_batch: int | None = None, repeats: int = 5,
              device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
              gemm_size: int | None = None) -> BenchTable:
    """Every row of the table, the GEMM peaks first (see the module doc); `gemm_size` defaults to GEMM_SIZE."""
    dev = torch.device(device)
    gemm_size = gemm_size or GEMM_SIZE
    peaks = gemm_rows(dev, dtype, repeats, gemm_size)
    torch.manual_seed(seed)
    rows = [autoencoder_train_step(workload.autoencoder, repeats, dev, dtype),
            text_encoder_train_step(workload.text_encoder, repeats, dev, dtype),
            *unet_rows(unet_case, unet_batch, repeats, device, dtype)]
    pipe = random_pipeline(workload).to(dev, dtype)
    latent_size = workload.diffusion.data.size // pipe.autoencoder.downsample_factor
    rows.append(vae_decode(pipe.autoencoder, workload.generation_batch, latent_size, repeats, dev, dtype))
    rows.extend(generation(workload, pipe, repeats, dev, dtype))
    return BenchTable(list(peaks.values()), rows, peaks[dtype], device, _name(dtype), repeats, gemm_size)


def format_table(table: BenchTable) -> str:
    peak = table.peak.gflops_per_second("latentdiff")
    size, tries = table.gemm_size, max(table.repeats, GEMM_TRIES)
    lines = [f"latentdiff bench --all: {table.device} {table.dtype}, {torch.get_num_threads()} threads, median of "
             f"{table.repeats}; GEMM peak: torch.mm of {size}x{size}, best of {tries}; GFLOP per call by "
             f"torch.utils.flop_counter; % of the {table.dtype} GEMM peak, {peak:.0f} GFLOP/s",
             "| row | batch | latentdiff ms | diffusers ms | ratio | GFLOP | latentdiff GFLOP/s (% peak) "
             "| diffusers GFLOP/s (% peak) | max diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table.peaks + table.rows:
        cells = [row.name, "" if row.batch is None else str(row.batch)]
        cells += [f"{row.seconds[n] * 1000:.1f}" if n in row.seconds else "-" for n in IMPLEMENTATIONS]
        cells.append("-" if row.ratio is None else f"{row.ratio:.2f}")
        cells.append(f"{row.flops['latentdiff'] / 1e9:.2f}")
        for rate in map(row.gflops_per_second, IMPLEMENTATIONS):
            cells.append("-" if rate is None else f"{rate:.1f} ({100 * rate / peak:.0f}%)")
        cells.append("-" if row.max_diff is None else f"{row.max_diff:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    if any((row.gflops_per_second(n) or 0) > peak for row in table.rows for n in IMPLEMENTATIONS):
        lines.append(f"(above 100%: kernels faster than torch.mm's {table.dtype} GEMM here, e.g. oneDNN's "
                     "convolutions beside MKL's GEMM on an AMD CPU; the peak is torch.mm's, not the machine's)")
    if not any("diffusers" in row.seconds for row in table.rows):
        lines.append("(diffusers is not installed: `pip install diffusers` to time it alongside)")
    return "\n".join(lines)
