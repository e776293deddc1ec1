"""The conversion tables, one piece at a time: autoencoder and text-encoder key layouts against diffusers /
transformers / open_clip, scheduler configs against diffusers' scheduler classes, and the SD table's
reading of full-size SD 1.x / 2.x shapes (built on the meta device, so without memory). The UNet's key
table is checked against diffusers in tests/test_unet.py."""
from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff.convert import detect_format
from latentdiff.convert.mapping import check_fixed, rename, state_hash
from latentdiff.convert.scheduler_config import SAMPLER_SCHEDULERS, schedule_from_diffusers, schedule_to_diffusers
from latentdiff.convert.sd_variants import (
    SD_VARIANTS,
    infer_autoencoder_config,
    infer_open_clip_text_config,
    infer_transformers_text_config,
    infer_unet_config,
)
from latentdiff.convert.text_encoder_keys import (
    identity_block,
    open_clip_to_transformers,
    transformers_config_for_open_clip,
    transformers_to_open_clip,
)
from latentdiff.convert.unet_keys import unet_config_from_diffusers, unet_config_to_diffusers, unet_key_map
from latentdiff.convert.vae_keys import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_key_map,
    vae_to_diffusers,
)
from latentdiff.diffusion.schedules import ScheduleConfig
from latentdiff.errors import CheckpointError
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.text_encoder import TextEncoderConfig
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder
from latentdiff.models.unet import UNet
from latentdiff.samplers import SamplingConfig


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# Autoencoder
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    AutoencoderConfig(ch=8, ch_mult=(1,), num_res_blocks=1, norm_groups=4, resolution=8),
    AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, norm_groups=4, resolution=16, scale_factor=0.5),
    AutoencoderConfig(ch=16, ch_mult=(1, 1), num_res_blocks=1, norm_groups=8, mid_attention=False, z_channels=2),
], ids=["one_level", "three_levels", "no_mid_attention"])
def test_autoencoder_matches_diffusers(cfg):
    ours = perturbed(AutoencoderKL(cfg))
    diffusers_config = vae_config_to_diffusers(cfg)
    theirs = diffusers.AutoencoderKL(**{k: v for k, v in diffusers_config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(vae_to_diffusers(ours.state_dict(), cfg), strict=True)
    assert vae_config_from_diffusers(dict(theirs.config), "vae") == cfg
    back = vae_from_diffusers(theirs.state_dict(), cfg, "vae")
    own = ours.state_dict()
    assert back.keys() == own.keys() and all(torch.equal(back[k], v) for k, v in own.items())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior, dist = ours.encode(images), theirs.encode(images).latent_dist
        torch.testing.assert_close(posterior.mean, dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(posterior.logvar, dist.logvar, atol=1e-5, rtol=1e-5)
        z = posterior.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_autoencoder_reads_old_diffusers_attention_names():
    cfg = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    state = vae_to_diffusers(perturbed(AutoencoderKL(cfg)).state_dict(), cfg)
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    assert old.keys() != state.keys()
    assert vae_from_diffusers(old, cfg, "vae").keys() == AutoencoderKL(cfg).state_dict().keys()
    with pytest.raises(CheckpointError, match=r"no place in the model: \[encoder.extra.weight\]"):
        vae_from_diffusers({**state, "encoder.extra.weight": torch.zeros(1)}, cfg, "vae")


# ---------------------------------------------------------------------------------------------
# Text encoder: open_clip <-> transformers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_clip_encoder():
    torch.manual_seed(0)
    encoder = OpenCLIPTextEncoder(TextEncoderConfig(context_length=12, width=32, layers=3, heads=2, embed_dim=24,
                                                    image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                                                    vision_head_width=16))
    encoder.drop_image_tower()
    return perturbed(encoder)


@pytest.mark.parametrize("output_layer", ["last", "penultimate"])
def test_open_clip_tower_as_clip_text_model(open_clip_encoder, output_layer):
    encoder = open_clip_encoder
    encoder.output_layer = output_layer
    layers = 3 - (output_layer == "penultimate")
    model = CLIPTextModel(transformers_config_for_open_clip(encoder.clip, layers, pad_token_id=0)).eval()
    model.load_state_dict(open_clip_to_transformers(encoder.clip.state_dict(), layers), strict=True)
    ids, _ = encoder.tokenize(["a red circle", "", "a very long prompt about two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, encoder.encode_tokens(ids, ids > 0).states,
                                   atol=1e-5, rtol=1e-5)
    if output_layer == "last":  # and back, exactly (the projection and temperature are not CLIPTextModel's)
        back = transformers_to_open_clip(model.state_dict())
        own = encoder.clip.state_dict()
        assert set(own) - set(back) == {"text_projection", "logit_scale"}
        assert all(torch.equal(back[k], own[k]) for k in back)


def test_identity_block_changes_nothing(open_clip_encoder):
    encoder = open_clip_encoder
    block = identity_block(32, 128, 3, encoder.clip.positional_embedding)
    resblock = type(encoder.clip.transformer.resblocks[0])(32, 2)
    resblock.load_state_dict({k.split(".", 3)[3]: v for k, v in block.items()}, strict=True)
    x = torch.randn(2, 12, 32)
    assert torch.equal(resblock(x, attn_mask=encoder.clip.attn_mask), x)


def test_unmapped_text_keys_are_named(open_clip_encoder):
    with pytest.raises(CheckpointError, match=r"\[transformer.resblocks.0.attn.extra\]"):
        open_clip_to_transformers({**open_clip_encoder.clip.state_dict(),
                                   "transformer.resblocks.0.attn.extra": torch.zeros(1)}, 3)
    with pytest.raises(CheckpointError, match=r"\[encoder.layers.0.adapter.weight\]"):
        transformers_to_open_clip({"encoder.layers.0.adapter.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# Scheduler configs
# ---------------------------------------------------------------------------------------------

ROUND_TRIPS = [(sampler, spacing, prediction, zero_snr)
               for sampler in SAMPLER_SCHEDULERS for spacing in ("leading", "trailing", "linspace", "karras")
               for prediction in ("eps", "v") for zero_snr in (False, True)
               if not (spacing == "karras" and sampler not in ("euler", "heun", "dpmpp_2m", "unipc"))
               and not (zero_snr and sampler == "heun")]


@pytest.mark.parametrize("sampler, spacing, prediction, zero_snr", ROUND_TRIPS)
def test_scheduler_config_round_trips_through_diffusers(sampler, spacing, prediction, zero_snr):
    schedule = ScheduleConfig(zero_terminal_snr=zero_snr)
    sampling = SamplingConfig(sampler=sampler, steps=50, guidance_scale=7.5, spacing=spacing,
                              steps_offset=1 if spacing == "leading" else 0)
    config = schedule_to_diffusers(schedule, prediction, sampling)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)  # diffusers accepts every field
    back = schedule_from_diffusers({**scheduler.config, "_class_name": config["_class_name"]}, "scheduler")
    assert back == (schedule, prediction, sampling)


def test_sd_release_scheduler_configs():
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "trained_betas": None, "clip_sample": False}
    schedule, prediction, sampling = schedule_from_diffusers(sd15, "sd15")
    assert schedule == ScheduleConfig() and prediction == "eps"
    assert (sampling.sampler, sampling.spacing, sampling.steps_offset) == ("dpmpp_2m", "leading", 1)  # no PNDM here
    sd21 = {**sd15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    assert schedule_from_diffusers(sd21, "sd21")[1:] == ("v", dataclasses.replace(sampling, sampler="ddim"))
    assert schedule_from_diffusers({"_class_name": "EulerDiscreteScheduler"}, "x")[2].spacing == "linspace"
    with pytest.raises(CheckpointError, match="trained_betas"):
        schedule_from_diffusers({**sd15, "trained_betas": [0.1] * 1000}, "x")
    with pytest.raises(CheckpointError, match="algorithm_type"):
        schedule_from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
                                "x")
    with pytest.raises(CheckpointError, match="solver_order=3.*disable_corrector=\\[0\\]"):
        schedule_from_diffusers({"_class_name": "UniPCMultistepScheduler", "solver_order": 3, "disable_corrector": [0]},
                                "x")


# ---------------------------------------------------------------------------------------------
# Full-size SD 1.x / 2.x: configs and shapes
# ---------------------------------------------------------------------------------------------

SD15_UNET = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
             "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                   "CrossAttnUpBlock2D"]}
SD21_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "use_linear_projection": True, "upcast_attention": True, "sample_size": 96}


def meta_state(module_class, *args) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_class(*args).state_dict()


@pytest.mark.parametrize("variant, diffusers_config", [("sd1", SD15_UNET), ("sd2", SD21_UNET)])
def test_sd_unets_from_configs_and_from_shapes(variant, diffusers_config):
    cfg, sample_size = unet_config_from_diffusers(diffusers_config, "unet")
    assert sample_size == diffusers_config["sample_size"]
    assert cfg.context_dim == diffusers_config["cross_attention_dim"] and cfg.attention_levels == (0, 1, 2)
    heads = [cfg.heads(level) for level in range(4)]
    assert heads == ([8] * 4 if variant == "sd1" else [5, 10, 20, 20])
    inferred = infer_unet_config(meta_state(UNet, cfg), SD_VARIANTS[variant], "unet")
    assert [inferred.heads(level) for level in range(4)] == heads
    assert dataclasses.replace(inferred, num_heads=cfg.num_heads, head_dim=0) == cfg
    written = unet_config_to_diffusers(cfg, sample_size)
    assert {k: written[k] for k in diffusers_config if k != "attention_head_dim"} == \
        {k: v for k, v in diffusers_config.items() if k != "attention_head_dim"}


@pytest.mark.parametrize("diffusers_config", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_full_size_layouts_agree_with_diffusers_own_converters(diffusers_config):
    """diffusers' single-file converters, run on our SD-sized UNet and autoencoder in the CompVis layout (meta
    tensors), put every tensor where our tables do, with the shapes diffusers' models have."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    cfg, _ = unet_config_from_diffusers(diffusers_config, "unet")
    ours = {"model.diffusion_model." + k: v for k, v in meta_state(UNet, cfg).items()}
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**{k: v for k, v in diffusers_config.items()
                                                      if not k.startswith("_")}).state_dict()
    converted = convert_ldm_unet_checkpoint(ours, dict(diffusers_config))
    assert converted.keys() == reference.keys() and all(converted[k].shape == reference[k].shape for k in reference)
    assert all(converted[theirs] is ours["model.diffusion_model." + mine] for mine, theirs in unet_key_map(cfg).items())

    vae = AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=32, resolution=512)
    vae_config = vae_config_to_diffusers(vae)
    ours = {"first_stage_model." + k: v for k, v in meta_state(AutoencoderKL, vae).items()}
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**{k: v for k, v in vae_config.items() if not k.startswith("_")}).state_dict()
    converted = convert_ldm_vae_checkpoint(ours, vae_config)
    assert converted.keys() == reference.keys() and all(converted[k].shape == reference[k].shape for k in reference)
    assert converted.keys() == set(vae_key_map(vae).values())


def test_unsupported_unet_configs_are_named():
    with pytest.raises(CheckpointError, match="addition_embed_type='text_time'"):  # SDXL
        unet_config_from_diffusers({**SD15_UNET, "addition_embed_type": "text_time"}, "unet")
    with pytest.raises(CheckpointError, match="SimpleCrossAttnDownBlock2D"):
        unet_config_from_diffusers({**SD15_UNET, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "unet")
    check_fixed({"only_cross_attention": [False, False]}, {"only_cross_attention": False}, "per-block lists")


def test_sd_autoencoder_and_text_encoders_from_shapes():
    sd_vae = AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=32, resolution=512,
                               scale_factor=0.18215)
    assert infer_autoencoder_config(meta_state(AutoencoderKL, sd_vae), SD_VARIANTS["sd1"], "vae") == sd_vae
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    inferred = infer_transformers_text_config(meta_state(CLIPTextModel, clip_l), SD_VARIANTS["sd1"], "text")
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act")
    assert [getattr(inferred, f) for f in fields] == [getattr(clip_l, f) for f in fields]
    vit_h = TextEncoderConfig(context_length=77, width=1024, layers=24, heads=16, embed_dim=1024,
                              output_layer="penultimate", vision_layers=1)
    with torch.device("meta"):
        clip = OpenCLIPTextEncoder(vit_h).clip
    text_state = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    inferred = infer_open_clip_text_config(text_state, SD_VARIANTS["sd2"], "text")
    assert dataclasses.replace(inferred, vision_layers=1) == vit_h


# ---------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------

def test_rename_names_what_has_no_place():
    assert rename({"a": torch.zeros(1)}, {"a": "b"}, "x").keys() == {"b"}
    with pytest.raises(CheckpointError, match=r"x: keys with no place in the model: \[c\] \(1\)"):
        rename({"a": torch.zeros(1), "c": torch.zeros(1)}, {"a": "b"}, "x")


def test_state_hash_is_an_identity():
    state = {"w": torch.arange(6.0).reshape(2, 3), "s": torch.tensor(1.5)}
    assert state_hash(state) == state_hash({k: v.clone() for k, v in state.items()})
    assert state_hash(state) != state_hash({**state, "s": torch.tensor(1.25)})
    assert state_hash(state) != state_hash({**state, "w": state["w"].double()})
    assert state_hash(state) != state_hash({**state, "w": state["w"].reshape(3, 2)})


def test_detect_format(tmp_path):
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "model_index.json").write_text("{}")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "pipeline.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert detect_format(tmp_path / "diffusers") == "diffusers"
    assert detect_format(tmp_path / "ours") == "latentdiff"
    assert detect_format(tmp_path / "model.safetensors") == "single-file"
    for bad, message in (("notes.txt", "not a checkpoint file"), ("missing", "not found"), (".", "neither")):
        with pytest.raises(CheckpointError, match=message):
            detect_format(tmp_path / bad)
