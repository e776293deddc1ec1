"""Stage pairing: what a UNet was trained with, and the check that a set of stages belongs together.

A UNet only works with the autoencoder whose latent space it learned (at that latent scale) and the text
encoder whose token states it learned to read. Its checkpoint metadata therefore records

    "stages": {"autoencoder":  {"path", "relative_path", "weights_hash", "scale_factor", "z_channels"},
               "text_encoder": {"path", "relative_path", "weights_hash", "width", "output_layer"}}
    "prediction", "schedule" (ScheduleConfig), "sampling" (SamplingConfig), "image_size", "context_mask"

`relative_path` is the stage's folder relative to the UNet's run folder (so that a weights/ tree can be
moved whole); `path` is the folder as it was given, for messages. Identity is the weights hash alone:
paths only help to find a stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_NAME, read_config_file, sha256_file, weights_hash
from .config import DiffusionTrainingConfig, SamplingConfig, ScheduleConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError

STAGES = ("autoencoder", "text_encoder")


def stage_hash(path: str | Path) -> str:
    """The identity (16 hex digits) of a saved stage: a latentdiff folder's recorded weights hash, or the
    SHA-256 of a single weights file (an OpenCLIP checkpoint, a transformers folder's weights)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)[:16]
    if (path / CONFIG_NAME).is_file():
        try:
            return weights_hash(path)
        except (ValueError, OSError, KeyError):
            pass
        for name in ("model.safetensors", "pytorch_model.bin"):  # a transformers folder
            if (path / name).is_file():
                return sha256_file(path / name)[:16]
    if (path / "text_encoder").is_dir():  # a folder holding the text encoder one level down
        return stage_hash(path / "text_encoder")
    raise CheckpointError(f"{path}: no stage weights found to identify")


def module_hash(module: Any, path: str | Path | None, name: str) -> str:
    """The weights hash a loaded stage carries (from_pretrained sets it), else the hash of its folder."""
    found = getattr(module, "weights_hash", None)
    if found:
        return found
    if path is None:
        raise CheckpointError(f"cannot identify the {name}: it was not loaded with from_pretrained and no path "
                              f"was given; save it and load it from its folder")
    return stage_hash(path)


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def stage_record(name: str, module, path: str | Path, run_dir: str | Path, weights_hash: str | None = None) -> dict:
    """What a UNet records about one stage ("autoencoder" or "text_encoder") it is paired with."""
    record = {"path": str(path), "relative_path": _relative(path, run_dir),
              "weights_hash": weights_hash or module_hash(module, path, name.replace("_", " "))}
    if name == "autoencoder":
        record.update(scale_factor=module.config.scale_factor, z_channels=module.config.z_channels)
    else:
        record.update(width=module.width, output_layer=module.output_layer)
    return record


def stage_records(autoencoder, autoencoder_path: str | Path, text_encoder, text_encoder_path: str | Path,
                  run_dir: str | Path) -> dict:
    """The "stages" entry of a UNet's metadata for these two loaded stages."""
    return {"autoencoder": stage_record("autoencoder", autoencoder, autoencoder_path, run_dir),
            "text_encoder": stage_record("text_encoder", text_encoder, text_encoder_path, run_dir)}


def training_record(cfg: DiffusionTrainingConfig, stages: dict) -> dict:
    """Everything a UNet checkpoint records about how to use it (its metadata, less the step)."""
    return {"stages": stages, "prediction": cfg.objective.prediction, "schedule": to_dict(cfg.schedule),
            "sampling": to_dict(cfg.sampling), "image_size": cfg.data.size, "context_mask": True}


@dataclass(frozen=True)
class UNetRecord:
    """A UNet's metadata, parsed: its stages and how to sample from it."""
    stages: dict
    prediction: str
    schedule: ScheduleConfig
    sampling: SamplingConfig
    image_size: int
    context_mask: bool

    @classmethod
    def from_metadata(cls, metadata: dict, where: str | Path) -> "UNetRecord":
        missing = [k for k in ("stages", "prediction", "schedule") if k not in metadata]
        if missing or any(s not in metadata["stages"] for s in STAGES):
            raise CheckpointError(f"{where}: the UNet records no training stages ({', '.join(missing) or 'stages'} "
                                  f"missing from its metadata); it was not saved by train-diffusion or a pipeline")
        try:
            schedule = from_dict(ScheduleConfig, metadata["schedule"], "schedule")
            sampling = from_dict(SamplingConfig, metadata.get("sampling", {}), "sampling")
        except ConfigError as err:
            raise CheckpointError(f"{where}: {err}") from None
        return cls(metadata["stages"], metadata["prediction"], schedule, sampling,
                   int(metadata.get("image_size", 0)), bool(metadata.get("context_mask", True)))

    def stage_path(self, name: str, unet_folder: str | Path) -> Path:
        """Where the `name` stage is: relative to the UNet's folder, else the path as recorded."""
        record = self.stages[name]
        candidates = [Path(unet_folder) / record["relative_path"], Path(record["path"])]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        raise CheckpointError(f"{unet_folder}: the UNet was trained with the {name.replace('_', ' ')} at "
                              f"{record['path']}, which is not there any more (looked in "
                              f"{', '.join(str(c) for c in candidates)}); pass it explicitly")


def check_stages(record: UNetRecord, unet, autoencoder, text_encoder, *, autoencoder_path=None,
                 text_encoder_path=None) -> None:
    """CheckpointError naming every way these stages differ from the ones the UNet was trained with."""
    problems = []
    for name, module, path in (("autoencoder", autoencoder, autoencoder_path),
                               ("text_encoder", text_encoder, text_encoder_path)):
        expected = record.stages[name]
        got = module_hash(module, path, name.replace("_", " "))
        if got != expected["weights_hash"]:
            where = f" ({path})" if path is not None else ""
            problems.append(f"unet was trained with {name.replace('_', ' ')} {expected['weights_hash']} "
                            f"({expected['path']}), got {got}{where}")
    ae_scale = autoencoder.config.scale_factor
    if record.stages["autoencoder"].get("scale_factor") not in (None, ae_scale):
        problems.append(f"unet was trained on latents scaled by {record.stages['autoencoder']['scale_factor']}, "
                        f"the autoencoder's scale_factor is {ae_scale}")
    if unet.config.in_channels != autoencoder.config.z_channels:
        problems.append(f"unet takes {unet.config.in_channels} latent channels, the autoencoder makes "
                        f"{autoencoder.config.z_channels}")
    if unet.config.context_dim != text_encoder.width:
        problems.append(f"unet reads text states of width {unet.config.context_dim}, the text encoder's are "
                        f"{text_encoder.width} wide")
    recorded_layer = record.stages["text_encoder"].get("output_layer")
    if recorded_layer not in (None, text_encoder.output_layer):
        problems.append(f"unet was trained on the text encoder's {recorded_layer!r} layer, it is set to "
                        f"{text_encoder.output_layer!r}")
    if problems:
        raise CheckpointError("stages do not match: " + "; ".join(problems))


def check_run_stages(checkpoint_folder: str | Path, stages: dict) -> None:
    """On --resume: the run must continue with the stages it started with (by weights hash)."""
    info = read_config_file(checkpoint_folder, "unet")
    recorded = info.get("metadata", {}).get("stages", {})
    for name in STAGES:
        before, now = recorded.get(name, {}), stages[name]
        if before and before.get("weights_hash") != now["weights_hash"]:
            raise CheckpointError(f"{checkpoint_folder}: this run was trained with {name.replace('_', ' ')} "
                                  f"{before['weights_hash']} ({before.get('path')}), got {now['weights_hash']} "
                                  f"({now['path']}); resume with the same stages or start a new run")
