"""The pipelines the page offers: the pipeline folders under weights/ and any given with --pipeline, each
loaded on first use (refused with the CLI's message when its stages do not belong together), described by
its UNetRecord, and used by one generation at a time (its lock)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import CONFIG_NAME, read_json
from ..errors import CheckpointError, LatentDiffError
from ..generate import load_pipeline
from ..pipeline import PIPELINE_FILE, Text2ImagePipeline


def is_pipeline_folder(folder: Path) -> bool:
    """A saved (or converted) pipeline folder, or a diffusion run folder (its config.json holds a UNet)."""
    if (folder / PIPELINE_FILE).is_file():
        return True
    try:
        return (folder / CONFIG_NAME).is_file() and read_json(folder / CONFIG_NAME).get("kind") == "unet"
    except (OSError, ValueError):
        return False


@dataclass
class PipelineEntry:
    folder: str                                  # as given or found; recorded in the PNGs, as the CLI does
    pipe: Text2ImagePipeline | None = None       # loaded on first use
    error: str | None = None                     # why it could not be loaded
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time


class PipelineCatalog:
    """Folder -> PipelineEntry, in the order offered."""

    def __init__(self, folders: list[str], device: str):
        self.entries = {folder: PipelineEntry(folder) for folder in folders}
        self.device = device
        self._loading = threading.Lock()

    @classmethod
    def discover(cls, weights: str | Path, given: list[str], device: str) -> "PipelineCatalog":
        root = Path(weights)
        found = sorted(str(p) for p in root.iterdir() if p.is_dir() and is_pipeline_folder(p)) if root.is_dir() else []
        for folder in given:
            if not Path(folder).exists():
                raise CheckpointError(f"pipeline not found: {folder}")
        folders = list(dict.fromkeys([*given, *found]))  # --pipeline first, no duplicates
        if not folders:
            raise CheckpointError(f"no pipeline to serve: none in {root}/ and no --pipeline given (train one with "
                                  f"`latentdiff quickstart`, or convert one with `latentdiff convert`)")
        return cls(folders, device)

    @property
    def folders(self) -> list[str]:
        return list(self.entries)

    def get(self, folder: str) -> PipelineEntry:
        """The entry, loaded; LatentDiffError (the CLI's message) if it is unknown or cannot be loaded."""
        entry = self.entries.get(folder)
        if entry is None:
            raise CheckpointError(f"unknown pipeline {folder!r} (offered: {', '.join(self.entries)})")
        with self._loading:
            if entry.pipe is None and entry.error is None:
                try:
                    entry.pipe = load_pipeline(folder, self.device, image_tower=False)  # the page only generates
                except LatentDiffError as err:
                    entry.error = str(err)
        if entry.error is not None:
            raise CheckpointError(entry.error)
        return entry


def describe(pipe: Text2ImagePipeline) -> str:
    """What the pipeline's UNet was trained with (its UNetRecord), as Markdown."""
    record, meta = pipe.record, pipe.unet.identity.metadata
    ae, te = record.stages["autoencoder"], record.stages["text_encoder"]
    schedule, sampling = record.schedule, record.sampling
    height, width = pipe.latent_shape(1, None, None)[2:]
    f = pipe.autoencoder.downsample_factor
    lines = [
        f"- **UNet** `{pipe.unet.identity.weights_hash}`: {record.prediction}-prediction, "
        f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M parameters, default size "
        f"{width * f}x{height * f}" + (f", step {meta['step']}" if "step" in meta else "")
        + (f", converted from `{meta['converted_from']}`" if meta.get("converted_from") else ""),
        f"- **autoencoder** `{ae.weights_hash}` ({ae.path}): latent scale {ae.scale_factor:.4g}, "
        f"{ae.z_channels} channels, factor {f}",
        f"- **text encoder** `{te.weights_hash}` ({te.path}): {te.width} wide, {te.output_layer} layer"
        + ("" if record.context_mask else ", padding tokens attended (as SD)"),
        f"- **schedule** {schedule.kind}, {schedule.num_train_timesteps} timesteps"
        + (", zero terminal SNR" if schedule.zero_terminal_snr else "") + "; **defaults** "
        f"{sampling.sampler}, {sampling.steps} steps, guidance {sampling.guidance_scale:g}, {sampling.spacing} spacing",
    ]
    return "\n".join(lines)
