"""PipelineSpec: what resolving a request needs to know of a pipeline, and nothing that needs torch.

    spec = PipelineSpec.from_folder("weights/diffusion")   # JSON and safetensors headers only: milliseconds
    spec = pipe.spec                                        # the same description of a loaded pipeline

A pipeline folder (written by Text2ImagePipeline.save_pretrained) holds pipeline.json (the sampling defaults)
and the three stage folders; a diffusion run folder holds the UNet, whose record (stages.UNetRecord) names the
other two stages. `PipelineFolder.find` is the one reader of that layout: Text2ImagePipeline.from_pretrained
loads the stages it finds, PipelineSpec.from_folder reads their configs. generation_request.py resolves a
request against a spec, so the CLI refuses a bad one before torch and the weights load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (CONFIG_NAME, FORMAT_VERSION, SAFETENSORS_SUFFIX, WEIGHTS_NAME, read_config_file,
                         read_json, read_model_config, read_tensor_sizes)
from .config import from_dict
from .errors import CheckpointError, ConfigError
from .models.autoencoder_config import CHECKPOINT_KIND as AUTOENCODER_KIND, AutoencoderConfig
from .models.unet_config import CHECKPOINT_KIND as UNET_KIND, UNetConfig
from .sampling_config import SamplingConfig
from .stages import UNetRecord

PIPELINE_FILE = "pipeline.json"
STAGE_FOLDERS = {"autoencoder": "autoencoder", "text_encoder": "text_encoder", "unet": "unet"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' names of the float dtypes
LOADED_ITEMSIZE = 4  # from_pretrained builds every stage in float32, whatever its weights' dtype on disk


@dataclass(frozen=True)
class PipelineFolder:
    """Where a pipeline's three stages are, and a pipeline folder's own sampling defaults."""
    autoencoder: Path
    text_encoder: Path
    unet: Path
    sampling: SamplingConfig | None   # pipeline.json's defaults; None for a run folder (the UNet record's)

    @classmethod
    def find(cls, folder: str | Path) -> "PipelineFolder":
        """The stages of a pipeline folder (pipeline.json + autoencoder/, text_encoder/, unet/) or of a
        diffusion run folder (the UNet, whose record says where the other two are)."""
        folder = Path(folder)
        if (folder / PIPELINE_FILE).is_file():
            info = read_json(folder / PIPELINE_FILE)
            if info.get("format_version", 0) > FORMAT_VERSION:
                raise CheckpointError(f"{folder / PIPELINE_FILE}: format version {info['format_version']} is newer "
                                      f"than this latentdiff reads ({FORMAT_VERSION}); upgrade latentdiff")
            stages = {name: folder / info.get("stages", {}).get(name, sub) for name, sub in STAGE_FOLDERS.items()}
            try:
                sampling = from_dict(SamplingConfig, info.get("sampling", {}), "sampling")
            except ConfigError as err:
                raise CheckpointError(f"{folder / PIPELINE_FILE}: {err}") from None
            return cls(stages["autoencoder"], stages["text_encoder"], stages["unet"], sampling)
        if (folder / CONFIG_NAME).is_file():
            metadata = read_config_file(folder, UNET_KIND).get("metadata", {})
            record = UNetRecord.from_metadata(metadata, folder)
            return cls(record.stage_path("autoencoder", folder), record.stage_path("text_encoder", folder), folder,
                       None)
        raise CheckpointError(f"{folder}: neither a pipeline folder (no {PIPELINE_FILE}) nor a diffusion run folder "
                              f"(no {CONFIG_NAME})")


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline as request resolution sees it: its stages' configs, sampling defaults and training size, the
    size of its weights (for the memory estimate, request_limits.py) and the device it runs on."""
    autoencoder: AutoencoderConfig
    unet: UNetConfig
    sampling: SamplingConfig          # the default sampling settings
    image_size: int                   # the training image size (0 = unknown: 8 times the size multiple)
    weight_bytes: int                 # the three stages' weights (and saved buffers) together
    unet_itemsize: int                # bytes per number of the UNet's weights, and so of its activations
    autoencoder_itemsize: int         # the same for the autoencoder
    device: str = "cpu"               # "cpu", "cuda", "cuda:1", ...

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel, on each side (the autoencoder's downsampling)."""
        return self.autoencoder.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the UNet's."""
        return self.latent_factor * self.unet.downsample_factor

    def latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the latents for images of height x width pixels (default: the training size)."""
        default = self.image_size or 8 * self.size_multiple
        height, width = height or default, width or default
        m, f = self.size_multiple, self.latent_factor
        if height % m or width % m or height < m or width < m:
            raise ConfigError(f"image size {width}x{height} is not a positive multiple of {m} on both sides "
                              f"(the autoencoder's latent factor {f} times the UNet's {self.unet.downsample_factor})")
        return batch, self.unet.in_channels, height // f, width // f

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu") -> "PipelineSpec":
        """The spec of the pipeline `Text2ImagePipeline.from_pretrained(folder)` loads, read from its JSON files
        and safetensors headers (no torch, no weights); whether the stages belong together is the load's check."""
        found = PipelineFolder.find(folder)
        unet, info = read_model_config(found.unet, UNET_KIND, UNetConfig)
        record = UNetRecord.from_metadata(info.get("metadata", {}), found.unet)
        autoencoder, _ = read_model_config(found.autoencoder, AUTOENCODER_KIND, AutoencoderConfig)
        weights = sum(loaded_bytes(stage_weight_files(path)) for path in (found.autoencoder, found.text_encoder,
                                                                          found.unet))
        return cls(autoencoder, unet, found.sampling or record.sampling, record.image_size, weights,
                   LOADED_ITEMSIZE, LOADED_ITEMSIZE, device)


def stage_weight_files(path: Path) -> list[Path]:
    """The safetensors files a stage at `path` loads: the file itself (a whole checkpoint counts whole: the
    estimate errs on the side of refusing); a folder's model.safetensors, else its shards; or those of the
    text_encoder/ folder inside it (a folder holding a text encoder one level down)."""
    if path.is_file():
        return [path] if path.suffix.lower() == SAFETENSORS_SUFFIX else []
    if not (path / CONFIG_NAME).is_file() and (path / "text_encoder").is_dir():
        return stage_weight_files(path / "text_encoder")
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    return sorted(path.glob(f"*{SAFETENSORS_SUFFIX}"))


def loaded_bytes(files: list[Path]) -> int:
    """Bytes of the tensors in these safetensors files once loaded: floats in float32, the others as stored."""
    return sum(elements * LOADED_ITEMSIZE if dtype in FLOAT_DTYPES else size
               for file in files for dtype, elements, size in read_tensor_sizes(file).values())
