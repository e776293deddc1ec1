"""Tiny random Stable Diffusion pipelines built with diffusers (the test-only reference) and saved with its
save_pretrained, shared by the conversion tests (not a test file).

    "sd1"       SD 1.x-like: conv projections, 8 heads per level, quick-GELU CLIP padded with the end token,
                ε-prediction, DDIM with leading spacing; widths follow SD's rules (GroupNorm 32, text heads
                64 wide), so the single-file SD table describes it from its shapes alone
    "sd2"       SD 2.x-like: linear projections, 64-wide UNet heads, attention upcasting, GELU CLIP padded
                with "!" (id 0), v-prediction, DPM++ 2M with trailing spacing; also fits SD's rules
    "deep"      three levels, 2 blocks each, per-level heads and transformer depths, a level without
                attention, no autoencoder mid attention, x0 ("sample") prediction; fits no SD rule
Latents are 4 x 8 x 8 for 16 x 16 images (the autoencoders downsample by 2).
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from latentdiff.convert.text_encoder_keys import bundled_clip_tokenizer  # noqa: E402

IMAGE = 16       # pixels
LATENT = 8       # latent pixels
CONTEXT = 16     # tokens per prompt
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

CONFIGS = {
    "sd1": dict(
        unet=dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                  attention_head_dim=8, cross_attention_dim=64, norm_num_groups=32),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                  hidden_act="quick_gelu"),
        pad="<|endoftext|>",
        scheduler=(DDIMScheduler, dict(prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                                       clip_sample=False, set_alpha_to_one=True))),
    "sd2": dict(
        unet=dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(64, 128),
                  layers_per_block=1, attention_head_dim=(1, 2), cross_attention_dim=64, norm_num_groups=32,
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32),
        text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1, hidden_act="gelu"),
        pad="!",
        scheduler=(DPMSolverMultistepScheduler, dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                                     algorithm_type="dpmsolver++", solver_order=2,
                                                     final_sigmas_type="zero"))),
    "deep": dict(
        unet=dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                  block_out_channels=(8, 16, 24), layers_per_block=2, attention_head_dim=(1, 2, 4),
                  transformer_layers_per_block=(1, 2, 1), cross_attention_dim=32, norm_num_groups=4),
        vae=dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, mid_block_add_attention=False),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  hidden_act="quick_gelu"),
        pad="<|endoftext|>",
        scheduler=(DDIMScheduler, dict(prediction_type="sample", timestep_spacing="trailing", clip_sample=False,
                                       set_alpha_to_one=True))),
}


def perturb(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Add noise to every parameter, so that no layer keeps a zero (or otherwise special) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def diffusers_pipeline(name: str, seed: int = 0) -> StableDiffusionPipeline:
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=LATENT, **cfg["unet"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, sample_size=IMAGE, scaling_factor=0.18215, **cfg["vae"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=CONTEXT, bos_token_id=49406,
                                        eos_token_id=49407, **cfg["text"]))
    for i, module in enumerate((unet, vae, text)):
        perturb(module, seed + i)
    scheduler_class, options = cfg["scheduler"]
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), unet=unet.eval(),
                                   tokenizer=bundled_clip_tokenizer(CONTEXT, cfg["pad"]),
                                   scheduler=scheduler_class(**BETAS, **options), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_diffusers_pipeline(name: str, folder: Path, seed: int = 0) -> Path:
    diffusers_pipeline(name, seed).save_pretrained(str(folder))
    return folder


def load_reference(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)


def initial_noise(seed: int) -> torch.Tensor:
    """The noise latentdiff draws for one image from `seed` (randn from a CPU generator seeded so), which
    is passed to diffusers as its `latents`."""
    return torch.randn((1, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(seed))
