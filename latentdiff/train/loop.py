"""The one training-loop helper every stage uses: a run folder on top of accelerate.

A run folder holds
    config.json, model.safetensors   the exported stage (EMA weights when EMA is on), loadable with from_pretrained
    train_config.yaml                the full training config of the run
    metrics.csv                      one row every `log_every` steps
    samples/                         preview PNGs
    checkpoints/step-NNNNNNN/        the exported stage + training state (modules, optimizers, RNG, step)

Checkpoint folders are written whole to a temporary name and renamed into place, so a crash leaves
the previous checkpoint intact; `--resume` continues from the newest one, with the same data order
and random state as an uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    save_tensors,
)
from ..config import check_choice, save_yaml
from ..errors import CheckpointError, ConfigError
from .ema import EMA

MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")  # resolve_mixed_precision turns "auto" into one of the others
LR_SCHEDULES = ("constant", "cosine")  # what lr_scale does after the warm-up


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000                 # optimizer steps
    batch_size: int = 32              # per process, per accumulation step
    lr: float = 2e-4                  # peak learning rate
    warmup_steps: int = 100           # linear warm-up to lr over this many steps
    lr_schedule: str = "constant"     # after warm-up: "constant", or "cosine" decay to 0 at the last step
    cooldown_fraction: float = 0.0    # this share of the steps, at the end, takes the lr linearly towards 0
    weight_decay: float = 0.0         # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0            # max grad norm (0 = off)
    grad_accum: int = 1               # gradient accumulation steps
    mixed_precision: str = "no"       # "no", "fp16" (accelerate: autocast + loss scaling), "bf16" (autocast), or
                                      # "auto": bf16 where the hardware multiplies bf16 natively (CUDA, a CPU with AMX)
    ema_decay: float = 0.0            # EMA of the weights (0 = off); the EMA weights are what is saved
    seed: int = 0                     # seeds model init and data order
    log_every: int = 25               # steps between metrics rows
    sample_every: int = 500           # steps between preview images
    checkpoint_every: int = 500       # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2         # checkpoints kept on disk (the newest ones)

    def __post_init__(self):
        check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ConfigError(f"train.cooldown_fraction: must be between 0 and 1, got {self.cooldown_fraction}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")


CHECKPOINT_PREFIX = "step-"


class ResumableSampler(Sampler[int]):
    """An endless stream of dataset indices: epoch e is a permutation seeded by (seed, e).

    Sample position p of the stream goes to process p % world_size, so processes see disjoint samples,
    and the stream can start at any position (resume) without replaying the earlier ones.
    """

    def __init__(self, length: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.start, self.rank, self.world_size = length, seed, start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.world_size + self.rank
        while True:
            epoch, offset = divmod(position, self.length)
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            while offset < self.length:
                yield int(order[offset])
                offset += self.world_size
            position = (epoch + 1) * self.length + (offset - self.length)


class MetricsLog:
    """metrics.csv with a fixed set of columns; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int):
        self.path, self.columns = path, ["step"] + columns
        rows = []
        if resume_step and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            row = {"step": step, **{k: f"{v:.6g}" for k, v in values.items()}}
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


def adamw(params, train: TrainConfig, lr: float | None = None, betas: tuple[float, float] | None = None,
          weight_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW with the run's settings (each overridable); fused: one kernel for all parameters, which
    makes the optimizer step about 3x faster on a CPU (an eighth of a small UNet's training step)."""
    return torch.optim.AdamW(params, lr=train.lr if lr is None else lr, betas=betas or train.betas,
                             weight_decay=train.weight_decay if weight_decay is None else weight_decay, fused=True)


def lr_scale(train: TrainConfig, step: int) -> float:
    """The learning rate at `step` (0-based) as a share of the peak: a linear warm-up over
    train.warmup_steps, then constant or a cosine decay to 0 at train.steps; train.cooldown_fraction > 0
    also scales the last N = fraction * steps steps linearly down (1, ..., 1/N). A function of the step
    alone, so resume is exact."""
    warmup, total = max(1, train.warmup_steps), train.steps
    cooldown = round(train.cooldown_fraction * total)
    scale = min(1.0, (step + 1) / warmup)
    if train.lr_schedule == "cosine" and step >= warmup:
        scale = 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if cooldown and step >= total - cooldown:
        scale *= (total - step) / cooldown
    return scale


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively on `device`: a CUDA GPU with bf16 support, or a CPU with
    AMX tiles (Intel Sapphire Rapids and later; elsewhere bf16 on a CPU is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(amx and amx())
    return False


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """The precision a run uses ("no", "fp16" or "bf16"): "auto" becomes "bf16" where native_bf16, else "no"."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "no"


def completed_steps(out_dir: str | Path) -> int:
    """Steps finished by the run in `out_dir`, from its newest checkpoint (0 when it has none)."""
    checkpoints = Path(out_dir) / "checkpoints"
    found = sorted(p for p in checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file()) \
        if checkpoints.is_dir() else []
    return TrainingRun._read_step(found[-1]) if found else 0


class TrainingRun:
    """Owns the accelerator, the run folder, checkpointing/resume, EMA, metrics and the progress bar.

    Usage (see train/autoencoder.py):
        run = TrainingRun(out_dir, cfg, cfg.train, resume=..., metrics=[...])
        model, opt = run.track("model", model, opt)           # accelerate-prepared, saved in checkpoints
        run.use_ema("model")                                  # optional
        for step, batches in run.steps(dataset):              # resumes where the last checkpoint ended
            ... run.backward(loss); run.clip_and_step(opt, model); run.update_ema()
            ... run.log(step, {...}); run.maybe_checkpoint(step, export)
    """

    def __init__(self, out_dir: str | Path, config: Any, train: TrainConfig, *, resume: bool = False,
                 metrics: list[str] = (), accelerator: Accelerator | None = None):
        self.out_dir, self.config, self.train = Path(out_dir), config, train
        device = accelerator.device if accelerator is not None else PartialState().device
        self.precision = resolve_mixed_precision(train.mixed_precision, device)
        # bf16 needs no loss scaling, so it is a plain torch.autocast (see autocast()) rather than accelerate's
        # setting, which is fixed once per process: the quickstart trains stages of different precisions in one.
        self.accelerator = accelerator or Accelerator(mixed_precision="fp16" if self.precision == "fp16" else "no")
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.ema: EMA | None = None
        self.ema_name: str | None = None
        self.step = 0
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.samples_dir = self.out_dir / "samples"
        latest = self.latest_checkpoint()
        if latest is not None and not resume:
            raise ConfigError(f"{self.out_dir} already holds a training run ({latest.name}); "
                              f"pass --resume to continue it, or choose another --out")
        if resume and latest is None:
            self.print(f"--resume: no checkpoint in {self.checkpoint_dir}, starting from scratch")
        self.resume_from = latest if resume else None
        if self.is_main:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(config, self.out_dir / "train_config.yaml")
        resume_step = self._read_step(self.resume_from) if self.resume_from else 0
        self.metrics = MetricsLog(self.out_dir / "metrics.csv", list(metrics), resume_step) if self.is_main else None
        if train.mixed_precision == "auto":
            self.print(f"train.mixed_precision auto: {self.precision} on {self.device}")
        torch.manual_seed(train.seed)

    # -- setup ----------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self):
        """The context for forward passes: bf16 autocast, accelerate's fp16 autocast, or nothing."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def print(self, *args) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    def track(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Prepare `module` (and its optimizer) with accelerate and include them in checkpoints."""
        if optimizer is None:
            module = self.accelerator.prepare(module)
        else:
            module, optimizer = self.accelerator.prepare(module, optimizer)
            self.optimizers[name] = optimizer
        self.modules[name] = module
        return (module, optimizer) if optimizer is not None else module

    def use_ema(self, name: str) -> EMA | None:
        """Keep an EMA of tracked module `name` when train.ema_decay > 0; checkpoints then export it."""
        if self.train.ema_decay > 0:
            self.ema_name = name
            self.ema = EMA(self.unwrap(self.modules[name]), self.train.ema_decay).to(self.device)
        return self.ema

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def set_lr(self, optimizer: torch.optim.Optimizer, peak_lr: float, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * lr_scale(self.train, step)

    # -- the loop -------------------------------------------------------------------------------

    def dataloader(self, dataset: Dataset, start_batch: int = 0) -> DataLoader:
        per_step = self.train.batch_size * self.train.grad_accum
        sampler = ResumableSampler(len(dataset), self.train.seed, start_batch * per_step,
                                   self.accelerator.process_index, self.accelerator.num_processes)
        # A private generator: the DataLoader would otherwise draw its worker seed from the global RNG,
        # so that a resumed run (one more DataLoader) would diverge from an uninterrupted one.
        return DataLoader(dataset, batch_size=self.train.batch_size, sampler=sampler,
                          generator=torch.Generator().manual_seed(self.train.seed),
                          num_workers=self.config.data.num_workers if hasattr(self.config, "data") else 0,
                          drop_last=True)

    def steps(self, dataset: Dataset) -> Iterator[tuple[int, list[Any]]]:
        """Yield (step, micro-batches) from the resumed step to train.steps; batches are on the device."""
        if self.resume_from is not None:
            self._restore(self.resume_from)
        start = self.step
        batches = iter(self.dataloader(dataset, start_batch=start))
        bar = tqdm(total=self.train.steps, initial=start, disable=not self.is_main, dynamic_ncols=True,
                   desc=self.out_dir.name)
        for step in range(start, self.train.steps):
            micro = [self._to_device(next(batches)) for _ in range(self.train.grad_accum)]
            for module in self.modules.values():
                module.train()
            yield step, micro
            self.step = step + 1
            bar.update(1)
        bar.close()

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        return batch

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.train.grad_accum)

    def clip_and_step(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> float:
        """Clip gradients (train.grad_clip), step, zero; returns the pre-clip gradient norm."""
        norm = float("nan")
        if self.train.grad_clip > 0:
            norm = float(self.accelerator.clip_grad_norm_(module.parameters(), self.train.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def update_ema(self) -> None:
        """Call right after the optimizer step of the EMA'd module (before any checkpoint of that step)."""
        if self.ema is not None:
            self.ema.update(self.unwrap(self.modules[self.ema_name]))

    def due(self, step: int, every: int) -> bool:
        """True after the `every`-th step and after the last one."""
        done = step + 1
        return done % every == 0 or done == self.train.steps

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.is_main and self.due(step, self.train.log_every):
            self.metrics.write(step + 1, values)

    # -- checkpoints ----------------------------------------------------------------------------

    def exported_module(self, name: str) -> nn.Module:
        """What a checkpoint exports for `name`: its EMA copy when EMA is on, else the module itself."""
        if self.ema is not None and name == self.ema_name:
            return self.ema.shadow
        return self.unwrap(self.modules[name])

    def maybe_checkpoint(self, step: int, export: Callable[[Path], None]) -> None:
        if self.due(step, self.train.checkpoint_every):
            self.save_checkpoint(step + 1, export)

    def save_checkpoint(self, step: int, export: Callable[[Path], None]) -> Path:
        """Write checkpoints/step-N atomically: `export(folder)` writes the stage, then training state."""
        self.accelerator.wait_for_everyone()
        path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
        if self.is_main:
            with atomic_directory(path) as tmp:
                export(tmp)
                tensors = {f"{name}.{k}": v for name, m in self.modules.items()
                           for k, v in self.unwrap(m).state_dict().items()}
                if self.ema is not None:
                    tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
                tensors["rng.torch"] = torch.get_rng_state()
                save_tensors(tensors, tmp / "training_state.safetensors")
                torch.save({k: o.state_dict() for k, o in self.optimizers.items()}, tmp / "optimizers.pt")
                atomic_write_json(tmp / "state.json", {"step": step})
            self._prune_checkpoints()
            self._publish(path)
        self.accelerator.wait_for_everyone()
        return path

    def _publish(self, checkpoint: Path) -> None:
        """Copy the checkpoint's exported stage to the run folder's top level (weights first, config last)."""
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            atomic_write_bytes(self.out_dir / name, (checkpoint / name).read_bytes())

    def _prune_checkpoints(self) -> None:
        for old in self.list_checkpoints()[:-self.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.iterdir()
                      if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file())

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    @staticmethod
    def _read_step(path: Path) -> int:
        try:
            return int(json.loads((path / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path / 'state.json'}: unreadable training state ({err})") from None

    def _restore(self, path: Path) -> None:
        """Load modules, EMA, optimizers, RNG and step from a checkpoint folder (strictly)."""
        tensors = load_file(str(path / "training_state.safetensors"))
        for name, module in self.modules.items():
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            try:
                self.unwrap(module).load_state_dict(own, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"{path}: the '{name}' weights do not fit this config "
                                      f"(was the config changed since the run started?): {err}") from None
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
        states = torch.load(path / "optimizers.pt", map_location="cpu", weights_only=True)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[name])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = self._read_step(path)
        self.print(f"resumed from {path} at step {self.step}")
