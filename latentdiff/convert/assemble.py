"""Converted modules into a working Text2ImagePipeline, and the one way an export can differ from it.

The UNet gets the metadata a trained UNet carries (its stages by weights hash, prediction type, schedule,
sampling defaults), so that the pipeline's own checks, save_pretrained and from_pretrained work on it as
on one trained here.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..checkpoint import StageIdentity
from ..diffusion.schedules import ScheduleConfig
from ..errors import CheckpointError
from ..models.autoencoder import AutoencoderKL
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet
from ..pipeline import Text2ImagePipeline
from ..samplers import SamplingConfig
from ..stages import UNetRecord
from .mapping import state_hash


class ContextMaskWarning(UserWarning):
    """An exported pipeline masks padding tokens out of cross-attention, which SD tools do not do."""


def assemble_pipeline(autoencoder: AutoencoderKL, text_encoder: TextEncoder, unet: UNet, *, prediction: str,
                      schedule: ScheduleConfig, sampling: SamplingConfig, image_size: int, source: str | Path,
                      context_mask: bool = False) -> Text2ImagePipeline:
    """The pipeline of three converted stages; SD attends to every token, padding included (context_mask=False)."""
    for module in (autoencoder, text_encoder):  # their identity, as from_pretrained would record it
        module.identity = StageIdentity(state_hash(module.state_dict()))
    record = UNetRecord.for_stages(autoencoder, source, text_encoder, source, source, prediction=prediction,
                                   schedule=schedule, sampling=sampling, image_size=image_size,
                                   context_mask=context_mask)
    unet.identity = StageIdentity(metadata=record.to_metadata(converted_from=str(source)))
    return Text2ImagePipeline.from_stages(autoencoder.eval(), text_encoder.eval(), unet.eval())


def warn_if_masked(pipe: Text2ImagePipeline, target: str) -> None:
    if pipe.record.context_mask:
        warnings.warn(f"this pipeline hides padding tokens from the UNet (it was trained so); {target} readers "
                      f"other than latentdiff attend to every token, so their images will differ from ours",
                      ContextMaskWarning, stacklevel=3)


def refuse_if_not_sd(pipe: Text2ImagePipeline, target: str) -> None:
    """An SD-format reader would run this UNet without what it was trained with: refuse before writing."""
    for switch, what in (("position_embedding", "add no position features"),
                         ("self_condition", "are not given their previous x0 estimate")):
        if getattr(pipe.unet.config, switch):
            raise CheckpointError(f"model.{switch} is on in this UNet: {target} UNets {what}, so it cannot be "
                                  f"written as {target}")
