"""Stage pairing: `UNetRecord`, the one record of what a UNet was trained with, and the checks built on it.

A UNet only works with the autoencoder whose latent space it learned (at that latent scale) and the text
encoder whose token states it learned to read. Its checkpoint metadata therefore records

    "stages": {"autoencoder":  {"path", "relative_path", "weights_hash", "scale_factor", "z_channels"},
               "text_encoder": {"path", "relative_path", "weights_hash", "width", "output_layer"}}
    "prediction", "schedule" (ScheduleConfig), "sampling" (SamplingConfig), "image_size", "context_mask"

beside whatever else its writer adds (the training step and results, "trained_with", "converted_from").
`UNetRecord.to_metadata` is the only writer of those entries and `UNetRecord.from_metadata` the only reader.

`relative_path` is the stage's folder relative to the UNet's folder (so that a weights/ tree can be moved
whole); `path` is the folder as it was given, for messages. Identity is the weights hash alone: paths only
help to find a stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_NAME, read_config_file, sha256_file, weights_hash
from .config import from_dict, to_dict
from .diffusion.prediction_names import prediction_names
from .diffusion.schedule_config import ScheduleConfig
from .errors import CheckpointError, ConfigError
from .sampling_config import SamplingConfig

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
    """The weights hash of a loaded stage (from_pretrained records it in `module.identity`), else of its folder."""
    if module.identity.weights_hash:
        return module.identity.weights_hash
    if path is None:
        raise CheckpointError(f"cannot identify the {name.replace('_', ' ')}: it was not loaded with from_pretrained "
                              f"and no path was given; save it and load it from its folder")
    return stage_hash(path)


def _relative(path: str | Path, unet_folder: str | Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(unet_folder).resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


@dataclass(frozen=True)
class StageRef:
    """One stage a UNet was trained with: where it was, its identity, and what the UNet relies on."""
    path: str                         # the folder as it was given (for messages)
    relative_path: str                # the folder relative to the UNet's folder (to find it again)
    weights_hash: str                 # the stage's identity
    scale_factor: float | None = None  # autoencoder: the latent scale the UNet was trained at
    z_channels: int | None = None     # autoencoder: latent channels
    width: int | None = None          # text encoder: width of the token states
    output_layer: str | None = None   # text encoder: the layer whose states the UNet read

    @classmethod
    def of(cls, name: str, module: Any, path: str | Path, unet_folder: str | Path,
           weights_hash: str | None = None) -> "StageRef":
        """The reference to `module`, the `name` stage ("autoencoder" or "text_encoder") saved at `path`."""
        ref = cls(str(path), _relative(path, unet_folder), weights_hash or module_hash(module, path, name))
        if name == "autoencoder":
            return replace(ref, scale_factor=module.config.scale_factor, z_channels=module.config.z_channels)
        return replace(ref, width=module.width, output_layer=module.output_layer)

    def as_metadata(self) -> dict:
        return {key: value for key, value in to_dict(self).items() if value is not None}


@dataclass(frozen=True)
class UNetRecord:
    """What a UNet was trained with (its two stages, by weights hash) and how to sample from it."""
    stages: dict[str, StageRef]       # "autoencoder", "text_encoder"
    prediction: str                   # a name in diffusion.prediction.PREDICTIONS
    schedule: ScheduleConfig
    sampling: SamplingConfig          # the pipeline's default sampling settings
    image_size: int = 0               # the training image size (0 = unknown)
    context_mask: bool = True         # padding tokens are hidden from cross-attention (SD attends to all)

    FIELDS = ("stages", "prediction", "schedule", "sampling", "image_size", "context_mask")

    @classmethod
    def for_stages(cls, autoencoder: Any, autoencoder_path: str | Path, text_encoder: Any,
                   text_encoder_path: str | Path, unet_folder: str | Path, **settings) -> "UNetRecord":
        """The record of a UNet in `unet_folder` trained on these two loaded stages; `settings` are the
        other fields (prediction, schedule, sampling, image_size, context_mask)."""
        stages = {"autoencoder": StageRef.of("autoencoder", autoencoder, autoencoder_path, unet_folder),
                  "text_encoder": StageRef.of("text_encoder", text_encoder, text_encoder_path, unet_folder)}
        return cls(stages, **settings)

    def to_metadata(self, **extra) -> dict:
        """The UNet checkpoint's metadata: `extra` entries (step, results, ...) and the record."""
        return {**extra, "stages": {name: ref.as_metadata() for name, ref in self.stages.items()},
                "prediction": self.prediction, "schedule": to_dict(self.schedule), "sampling": to_dict(self.sampling),
                "image_size": self.image_size, "context_mask": self.context_mask}

    @staticmethod
    def extras(metadata: dict) -> dict:
        """The entries of a UNet's metadata that are not part of its record."""
        return {key: value for key, value in metadata.items() if key not in UNetRecord.FIELDS}

    @classmethod
    def from_metadata(cls, metadata: dict, where: str | Path) -> "UNetRecord":
        missing = [k for k in ("stages", "prediction", "schedule") if k not in metadata]
        if missing or any(s not in metadata["stages"] for s in STAGES):
            raise CheckpointError(f"{where}: the UNet records no training stages ({', '.join(missing) or 'stages'} "
                                  f"missing from its metadata); it was not saved by train-diffusion or a pipeline")
        try:
            stages = {name: from_dict(StageRef, metadata["stages"][name], f"stages.{name}") for name in STAGES}
            schedule = from_dict(ScheduleConfig, metadata["schedule"], "schedule")
            sampling = from_dict(SamplingConfig, metadata.get("sampling", {}), "sampling")
        except ConfigError as err:
            raise CheckpointError(f"{where}: {err}") from None
        if metadata["prediction"] not in prediction_names():
            raise CheckpointError(f"{where}: unknown prediction type {metadata['prediction']!r} "
                                  f"(known: {', '.join(prediction_names())})")
        return cls(stages, metadata["prediction"], schedule, sampling, int(metadata.get("image_size", 0)),
                   bool(metadata.get("context_mask", True)))

    def stage_path(self, name: str, unet_folder: str | Path) -> Path:
        """Where the `name` stage is: relative to the UNet's folder, else the path as recorded."""
        ref = self.stages[name]
        candidates = [Path(unet_folder) / ref.relative_path, Path(ref.path)]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        raise CheckpointError(f"{unet_folder}: the UNet was trained with the {name.replace('_', ' ')} at "
                              f"{ref.path}, which is not there any more (looked in "
                              f"{', '.join(str(c) for c in candidates)}); pass it explicitly")

    def check_stages(self, unet, autoencoder, text_encoder, *, autoencoder_path=None, text_encoder_path=None) -> None:
        """CheckpointError naming every way these stages differ from the ones the UNet was trained with."""
        problems = []
        for name, module, path in (("autoencoder", autoencoder, autoencoder_path),
                                   ("text_encoder", text_encoder, text_encoder_path)):
            expected, got = self.stages[name], module_hash(module, path, name)
            if got != expected.weights_hash:
                where = f" ({path})" if path is not None else ""
                problems.append(f"unet was trained with {name.replace('_', ' ')} {expected.weights_hash} "
                                f"({expected.path}), got {got}{where}")
        ae_scale, recorded_scale = autoencoder.config.scale_factor, self.stages["autoencoder"].scale_factor
        if recorded_scale not in (None, ae_scale):
            problems.append(f"unet was trained on latents scaled by {recorded_scale}, the autoencoder's scale_factor "
                            f"is {ae_scale}")
        if unet.config.in_channels != autoencoder.config.z_channels:
            problems.append(f"unet takes {unet.config.in_channels} latent channels, the autoencoder makes "
                            f"{autoencoder.config.z_channels}")
        if unet.config.context_dim != text_encoder.width:
            problems.append(f"unet reads text states of width {unet.config.context_dim}, the text encoder's are "
                            f"{text_encoder.width} wide")
        recorded_layer = self.stages["text_encoder"].output_layer
        if recorded_layer not in (None, text_encoder.output_layer):
            problems.append(f"unet was trained on the text encoder's {recorded_layer!r} layer, it is set to "
                            f"{text_encoder.output_layer!r}")
        if problems:
            raise CheckpointError("stages do not match: " + "; ".join(problems))

    def check_resume(self, checkpoint_folder: str | Path) -> None:
        """On --resume: the run must continue with the stages it started with (by weights hash)."""
        metadata = read_config_file(checkpoint_folder, "unet").get("metadata", {})
        before = UNetRecord.from_metadata(metadata, checkpoint_folder).stages
        for name in STAGES:
            if before[name].weights_hash != self.stages[name].weights_hash:
                raise CheckpointError(f"{checkpoint_folder}: this run was trained with {name.replace('_', ' ')} "
                                      f"{before[name].weights_hash} ({before[name].path}), got "
                                      f"{self.stages[name].weights_hash} ({self.stages[name].path}); resume with "
                                      f"the same stages or start a new run")
