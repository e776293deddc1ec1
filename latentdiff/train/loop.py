"""The one training-loop helper every stage uses: a run folder on top of accelerate.

A run folder holds
    config.json, model.safetensors   the exported stage (EMA weights when EMA is on), loadable with from_pretrained
    train_config.yaml                the full training config of the run
    metrics.csv                      one row every `log_every` steps and every `sample_every` step (held-out metrics)
    tensorboard/                     the same values as TensorBoard event files (with the `tb` extra installed)
    samples/                         preview PNGs
    checkpoints/step-NNNNNNN/        the exported stage + training state (modules, optimizers, RNG, step)

Checkpoint folders are written whole to a temporary name and renamed into place, so a crash leaves
the previous checkpoint intact; `--resume` continues from the newest one, with the same data order
and random state as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
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
from ..batch_random import BatchGenerator
from ..errors import CheckpointError, ConfigError, TrainingDiverged, short_list
from .data_order import ResumableSampler
from .distributed import check_same_config, make_accelerator, process_state, sync_batchnorm
from .ema import EMA
from .metrics import MetricsLog
from .optim import LR_SCHEDULES, MIXED_PRECISIONS, lr_scale, resolve_mixed_precision
from .shared_cores import reclaim_threads

_told_no_tensorboard = False  # the note that TensorBoard is not installed is printed once per process


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
    sample_every: int = 500           # steps between previews and held-out metrics
    checkpoint_every: int = 500       # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2         # checkpoints kept on disk (the newest ones)
    max_bad_steps: int = 10           # consecutive steps with a non-finite gradient skipped before the run stops

    def __post_init__(self):
        check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ConfigError(f"train.cooldown_fraction: must be between 0 and 1, got {self.cooldown_fraction}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every",
                     "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")


CHECKPOINT_PREFIX = "step-"


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
        device = accelerator.device if accelerator is not None else process_state().device
        self.precision = resolve_mixed_precision(train.mixed_precision, device)
        # bf16 needs no loss scaling, so it is a plain torch.autocast (see autocast()) rather than accelerate's
        # setting, which is fixed once per process: the quickstart trains stages of different precisions in one.
        self.accelerator = accelerator or make_accelerator(
            "fp16" if self.precision == "fp16" else "no", log_with="tensorboard" if is_tensorboard_available() else None,
            project_dir=str(self.out_dir))
        check_same_config(self.accelerator, config)
        if self.accelerator.num_processes > 1:
            self.print(f"{self.accelerator.num_processes} processes ({self.accelerator.distributed_type.value}, "
                       f"{self.device.type}); batch {train.batch_size} per process")
        self.bad_steps = 0  # consecutive steps skipped for a non-finite gradient
        self.last_step_skipped = False
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.ema: EMA | None = None
        self.ema_name: str | None = None
        self.ema_source: nn.Module | None = None  # the unwrapped module the EMA follows
        # each tracked module's parameters, listed once: walking a UNet's submodules costs ~1 ms per call
        self.parameter_lists: dict[nn.Module, list[nn.Parameter]] = {}
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
        self._start_trackers(resume_step)
        if train.mixed_precision == "auto":
            self.print(f"train.mixed_precision auto: {self.precision} on {self.device}")
        torch.manual_seed(train.seed)

    # -- setup ----------------------------------------------------------------------------------

    def _start_trackers(self, resume_step: int) -> None:
        """TensorBoard event files in RUN/tensorboard/ beside metrics.csv; a resumed run first drops the events
        after its checkpoint (purge_step), as metrics.csv drops those rows."""
        global _told_no_tensorboard
        if self.accelerator.log_with:
            purge = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step else None
            self.accelerator.init_trackers("tensorboard", init_kwargs=purge)
        elif not _told_no_tensorboard:
            _told_no_tensorboard = True
            self.print("TensorBoard is not installed (pip install 'latentdiff[tb]'): metrics go to metrics.csv only")

    def _end_trackers(self) -> None:
        """Close the event files (not accelerator.end_training(), which would also end the process group)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()

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
        """Prepare `module` (and its optimizer) with accelerate and include them in checkpoints; under several
        processes its BatchNorms normalise over every process's batch."""
        if self.accelerator.num_processes > 1:
            module = sync_batchnorm(module)
        if optimizer is None:
            module = self.accelerator.prepare(module)
        else:
            module, optimizer = self.accelerator.prepare(module, optimizer)
            self.optimizers[name] = optimizer
        self.modules[name] = module
        self.parameter_lists[module] = list(module.parameters())
        return (module, optimizer) if optimizer is not None else module

    def use_ema(self, name: str) -> EMA | None:
        """Keep an EMA of tracked module `name` when train.ema_decay > 0; checkpoints then export it."""
        if self.train.ema_decay > 0:
            self.ema_name = name
            self.ema_source = self.unwrap(self.modules[name])
            self.ema = EMA(self.ema_source, self.train.ema_decay).to(self.device)
        return self.ema

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def batch_generator(self, generator: torch.Generator | None = None) -> BatchGenerator:
        """Draws for this step's global batch, kept for this process's rows (see batch_random.py); `generator`
        None draws from torch's default generator, which every process seeds and advances alike."""
        return BatchGenerator(generator, self.accelerator.process_index, self.accelerator.num_processes)

    def set_lr(self, optimizer: torch.optim.Optimizer, peak_lr: float, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * lr_scale(self.train, step)

    # -- the loop -------------------------------------------------------------------------------

    def dataloader(self, dataset: Dataset, start_batch: int = 0) -> DataLoader:
        """This process's batches from step `start_batch` on. A map-style dataset is read in the order of a
        ResumableSampler; a streamed one (IterableDataset, e.g. tar shards) is told its part and position."""
        accel, train = self.accelerator, self.train
        workers = self.config.data.num_workers if hasattr(self.config, "data") else 0
        # A private generator: the DataLoader would otherwise draw its worker seed from the global RNG,
        # so that a resumed run (one more DataLoader) would diverge from an uninterrupted one.
        generator = torch.Generator().manual_seed(train.seed)
        if isinstance(dataset, IterableDataset):
            dataset.configure(rank=accel.process_index, world_size=accel.num_processes, seed=train.seed,
                              start_batch=start_batch * train.grad_accum, batch_size=train.batch_size)
            return DataLoader(dataset, batch_size=train.batch_size, num_workers=workers, generator=generator,
                              drop_last=True)
        sampler = ResumableSampler(len(dataset), train.seed, start_batch * train.batch_size * train.grad_accum,
                                   accel.process_index, accel.num_processes)
        return DataLoader(dataset, batch_size=train.batch_size, sampler=sampler, generator=generator,
                          num_workers=workers, drop_last=True)

    def steps(self, dataset: Dataset) -> Iterator[tuple[int, list[Any]]]:
        """Yield (step, micro-batches) from the resumed step to train.steps; batches are on the device."""
        if self.resume_from is not None:
            self._restore(self.resume_from)
        start = self.step
        batches = iter(self.dataloader(dataset, start_batch=start))
        bar = tqdm(total=self.train.steps, initial=start, disable=not self.is_main, dynamic_ncols=True,
                   desc=self.out_dir.name)
        for step in range(start, self.train.steps):
            reclaim_threads()  # a quickstart stage trained side by side: every thread once the other one ends
            micro = [self._to_device(next(batches)) for _ in range(self.train.grad_accum)]
            for module in self.modules.values():
                module.train()
            yield step, micro
            self.step = step + 1
            bar.update(1)
        bar.close()
        self._end_trackers()

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        return batch

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.train.grad_accum)

    def clip_and_step(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> float:
        """Clip `module`'s gradients (train.grad_clip; 0 = measure only), step, zero; returns the pre-clip
        gradient norm. `module` is one that `track` returned.

        A non-finite norm (the gradients are already averaged over processes, so every process sees the same
        one) skips the step with a warning; train.max_bad_steps such steps in a row stop the run (TrainingDiverged).
        """
        clip = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        norm = float(self.accelerator.clip_grad_norm_(self.parameter_lists[module], clip))
        self.last_step_skipped = not math.isfinite(norm)
        if self.last_step_skipped:
            self.bad_steps += 1
            self.print(f"step {self.step + 1}: gradient norm {norm}; step skipped "
                       f"({self.bad_steps} of at most {self.train.max_bad_steps} in a row)")
            if self.bad_steps >= self.train.max_bad_steps:
                raise TrainingDiverged(f"{self.out_dir}: {self.bad_steps} steps in a row had a non-finite gradient "
                                       f"(step {self.step + 1}); the run stopped, its last checkpoint is kept. Lower "
                                       f"train.lr (now {self.train.lr}) or set train.grad_clip")
        else:
            self.bad_steps = 0
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def update_ema(self) -> None:
        """Call right after the optimizer step of the EMA'd module (before any checkpoint of that step)."""
        if self.ema is not None and not self.last_step_skipped:
            self.ema.update(self.ema_source)

    def due(self, step: int, every: int) -> bool:
        """True after the `every`-th step and after the last one."""
        done = step + 1
        return done % every == 0 or done == self.train.steps

    def log(self, step: int, values: dict[str, float]) -> None:
        """A metrics row (and TensorBoard scalars) every `log_every` steps, and at every `sample_every` step,
        where the stages add their held-out metrics."""
        if self.is_main and (self.due(step, self.train.log_every) or self.due(step, self.train.sample_every)):
            written = self.metrics.write(step + 1, values)
            if self.accelerator.trackers:
                self.accelerator.log(written, step=step + 1)

    # -- checkpoints ----------------------------------------------------------------------------

    def exported_module(self, name: str) -> nn.Module:
        """What a checkpoint exports for `name`: its EMA copy when EMA is on, else the module itself."""
        if self.ema is not None and name == self.ema_name:
            return self.ema.shadow
        return self.unwrap(self.modules[name])

    def maybe_checkpoint(self, step: int, export: Callable[[Path], None]) -> None:
        """Checkpoint when due, but never in a run of skipped steps: the weights that led to a non-finite
        gradient are not kept over the last good checkpoint."""
        if not self.due(step, self.train.checkpoint_every):
            return
        if self.bad_steps:
            self.print(f"step {step + 1}: no checkpoint while steps are being skipped for non-finite gradients")
            return
        self.save_checkpoint(step + 1, export)

    def save_checkpoint(self, step: int, export: Callable[[Path], None]) -> Path:
        """Write checkpoints/step-N atomically: `export(folder)` writes the stage, then training state."""
        self.accelerator.wait_for_everyone()
        self.check_finite(step)
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

    def check_finite(self, step: int) -> None:
        """TrainingDiverged (and nothing written) if a tracked module or the EMA holds a non-finite weight."""
        modules = {name: self.unwrap(m) for name, m in self.modules.items()}
        if self.ema is not None:
            modules["ema"] = self.ema.shadow
        for name, module in modules.items():
            bad = [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise TrainingDiverged(f"{self.out_dir}: at step {step} the {name} weights are not finite "
                                       f"({short_list(bad)}); nothing was saved over the last good checkpoint")

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
