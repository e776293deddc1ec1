"""Original single-file checkpoints (CompVis layout): export, diffusers' own reader as the cross-check,
re-import (from our metadata, from the weights' shapes and the SD table, from a config folder), refusals,
and the `latentdiff convert` command. Tiny random pipelines from tests/tiny_sd.py."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from tiny_sd import CONTEXT, IMAGE, LATENT, diffusers_pipeline, initial_noise

from latentdiff.cli import main
from latentdiff.convert import ContextMaskWarning, SkippedWeightsWarning, load_diffusers, load_single_file, \
    save_single_file
from latentdiff.errors import CheckpointError
from latentdiff.pipeline import Text2ImagePipeline

PROMPTS = ["a red circle", "two blue squares on the left", ""]
STEPS = 4


@dataclasses.dataclass
class Case:
    name: str
    reference: StableDiffusionPipeline   # diffusers' pipeline
    folder: Path                         # where it saved itself
    pipe: Text2ImagePipeline             # our import of that folder
    path: Path                           # our single-file export of that


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Cases by name, built on first use and shared by the module's tests."""
    built = {}

    def get(name: str) -> Case:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            reference = diffusers_pipeline(name)
            reference.save_pretrained(str(root / "diffusers"))
            pipe = load_diffusers(root / "diffusers")
            save_single_file(pipe, root / "model.safetensors")
            built[name] = Case(name, reference, root / "diffusers", pipe, root / "model.safetensors")
        return built[name]
    return get


@pytest.fixture(params=["sd1", "sd2", "deep"])
def case(request, cases) -> Case:
    return cases(request.param)


def without_metadata(path, out):
    """The same tensors as a file written elsewhere would hold them: no latentdiff metadata."""
    save_file(load_file(path), out)
    return out


def images(pipe: Text2ImagePipeline, seed: int = 2, **kw) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=STEPS, guidance_scale=3.0, height=IMAGE, width=IMAGE, seed=seed,
                output_type="np", **kw).images


def assert_same_stages(pipe: Text2ImagePipeline, reference: StableDiffusionPipeline, atol: float = 1e-4) -> None:
    """UNet output, autoencoder decode and text states of our pipeline against diffusers' own modules."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, LATENT, LATENT, generator=gen)
    context = torch.randn(2, CONTEXT, pipe.unet.config.context_dim, generator=gen)
    t = torch.tensor([20.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, context), reference.unet(x, t, encoder_hidden_states=context).sample,
                                   atol=atol, rtol=atol)
        torch.testing.assert_close(pipe.autoencoder.decode(x), reference.vae.decode(x).sample, atol=atol, rtol=atol)
        ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=CONTEXT, return_tensors="pt").input_ids
        assert torch.equal(pipe.text_encoder.tokenize(PROMPTS).ids, ids)
        torch.testing.assert_close(pipe.text_encoder.encode(PROMPTS).states, reference.text_encoder(ids)[0],
                                   atol=atol, rtol=atol)


# ---------------------------------------------------------------------------------------------
# Export: the CompVis layout, read back by diffusers' own single-file loader
# ---------------------------------------------------------------------------------------------

def test_export_is_the_compvis_layout(case):
    name, pipe, path = case.name, case.pipe, case.path
    keys = set(load_file(path))
    expected = {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "model.diffusion_model.out.2.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.quant_conv.weight",
                "first_stage_model.decoder.up.0.block.0.norm1.weight", "first_stage_model.post_quant_conv.weight",
                "alphas_cumprod", "betas"}
    text = {"sd1": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "deep": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"}[name]
    assert expected | {text} <= keys
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model", "betas",
                                               "alphas_cumprod"}
    assert len(keys) == len(pipe.unet.state_dict()) + len(pipe.autoencoder.state_dict()) + 2 + sum(
        k.startswith("cond_stage_model.") for k in keys)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_reads_our_export(name, cases):
    """diffusers' from_single_file (given the original folder for the configs) rebuilds the original weights."""
    case = cases(name)
    theirs = StableDiffusionPipeline.from_single_file(str(case.path), config=str(case.folder), safety_checker=None,
                                                      requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        original, read = getattr(case.reference, part).state_dict(), getattr(theirs, part).state_dict()
        assert original.keys() == read.keys() and all(torch.equal(original[k], read[k]) for k in original), part
    assert theirs.scheduler.config.prediction_type == case.reference.scheduler.config.prediction_type


def test_sd2_text_tower_is_what_sd2_reads(cases):
    """SD 2.x's conditioning, computed as ldm does (open_clip blocks but the last, then ln_final) on the open_clip
    model built from the exported tensors, equals diffusers' text states: the appended identity block makes
    the penultimate block our last one."""
    import open_clip

    reference, path = cases("sd2").reference, cases("sd2").path
    state = {k[len("cond_stage_model.model."):]: v for k, v in load_file(path).items()
             if k.startswith("cond_stage_model.model.")}
    width, layers = state["positional_embedding"].shape[1], 1 + max(int(k.split(".")[2]) for k in state
                                                                   if k.startswith("transformer.resblocks."))
    model = open_clip.CLIP(state["text_projection"].shape[1],
                           dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
                           dict(context_length=CONTEXT, vocab_size=49408, width=width, heads=width // 64,
                                layers=layers))
    del model.visual
    model.load_state_dict(state, strict=True)
    ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=CONTEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        for block in model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
        torch.testing.assert_close(model.ln_final(x), reference.text_encoder(ids)[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Import: our metadata, the SD table, a config folder
# ---------------------------------------------------------------------------------------------

def test_round_trip_through_our_metadata_is_exact(case):
    reference, pipe = case.reference, case.pipe
    back = load_single_file(case.path)
    for ours, again in ((pipe.unet, back.unet), (pipe.autoencoder, back.autoencoder)):
        mine, yours = ours.state_dict(), again.state_dict()
        assert mine.keys() == yours.keys() and all(torch.equal(mine[k], yours[k]) for k in mine)
    assert (back.record.prediction, back.record.schedule, back.sampling, back.record.image_size) == \
        (pipe.record.prediction, pipe.record.schedule, pipe.sampling, pipe.record.image_size)
    assert_same_stages(back, reference)
    np.testing.assert_allclose(images(back), images(pipe), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, variant", [("sd1", None), ("sd2", None), ("sd2", "sd2-base")])
def test_sd_table_describes_weights_without_configs(cases, name, variant, tmp_path):
    """Files written elsewhere carry no configs: SD's rules and the tensors' shapes rebuild the architecture."""
    case = cases(name)
    bare = without_metadata(case.path, tmp_path / "bare.safetensors")
    back = load_single_file(bare, variant=variant)
    assert_same_stages(back, case.reference)
    expected = {("sd1", None): "eps", ("sd2", None): "v", ("sd2", "sd2-base"): "eps"}[name, variant]
    assert back.record.prediction == expected and back.autoencoder.config.scale_factor == 0.18215
    assert back.text_encoder.output_layer == {"sd1": "last", "sd2": "penultimate"}[name]
    assert (back.sampling.spacing, back.sampling.steps_offset) == ("leading", 1)
    if variant is None:  # with the sampling settings it was exported with, the same images
        np.testing.assert_allclose(images(back.with_sampling(case.pipe.sampling)), images(case.pipe), atol=1e-5, rtol=0)
    if name == "sd2":
        with pytest.raises(CheckpointError, match="--tokenizer is for SD 1.x"):
            load_single_file(bare, tokenizer=tmp_path)


def test_sd_table_refuses_what_it_cannot_describe(cases, tmp_path):
    bare = without_metadata(cases("deep").path, tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="--config"):  # 32-wide text heads, GroupNorm(4): no SD release
        load_single_file(bare)
    with pytest.raises(CheckpointError, match="variant 'sd2' has a open_clip text encoder"):
        load_single_file(bare, variant="sd2")


def test_config_folder_describes_any_architecture(case, tmp_path):
    reference, pipe = case.reference, case.pipe
    back = load_single_file(without_metadata(case.path, tmp_path / "bare.safetensors"), config=case.folder)
    assert_same_stages(back, reference)
    assert (back.record.prediction, back.sampling) == (pipe.record.prediction, pipe.sampling)
    theirs = reference("a red circle", num_inference_steps=STEPS, guidance_scale=3.0, height=IMAGE, width=IMAGE,
                       latents=initial_noise(2), output_type="np").images
    np.testing.assert_allclose(images(back), theirs, atol=1e-3, rtol=0)


def test_own_pipeline_round_trip(tmp_path):
    """A pipeline trained here: open_clip text encoder (last layer, so an identity block is appended), padding
    masked (recorded in the metadata, with a warning that SD tools cannot do it)."""
    from tiny_stages import save_stages

    pipe = Text2ImagePipeline.from_pretrained(save_stages(tmp_path / "stages")["unet"])
    with pytest.warns(ContextMaskWarning):
        save_single_file(pipe, tmp_path / "own.safetensors")
    blocks = {k.split(".")[4] for k in load_file(tmp_path / "own.safetensors") if ".resblocks." in k}
    assert len(blocks) == len(pipe.text_encoder.clip.transformer.resblocks) + 1
    back = load_single_file(tmp_path / "own.safetensors")
    assert back.record.context_mask and back.text_encoder.output_layer == "penultimate"
    torch.testing.assert_close(back.text_encoder.encode(PROMPTS).states, pipe.text_encoder.encode(PROMPTS).states,
                               atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(images(back), images(pipe), atol=1e-5, rtol=0)


def test_a_unet_with_position_features_is_refused_before_anything_is_written(tmp_path):
    from tiny_stages import save_stages

    pipe = Text2ImagePipeline.from_pretrained(save_stages(tmp_path / "stages")["unet"])
    pipe.unet.config = dataclasses.replace(pipe.unet.config, position_embedding=True)
    with pytest.raises(CheckpointError, match="model.position_embedding"):
        save_single_file(pipe, tmp_path / "own.safetensors")
    assert not (tmp_path / "own.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Refusals, skipped groups, pickles
# ---------------------------------------------------------------------------------------------

def test_what_does_not_fit_is_refused_and_named(cases, tmp_path):
    path = cases("sd1").path
    state = load_file(path)
    label_emb = {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(2)}  # a class-conditional UNet's
    save_file({**state, **label_emb, "cond_stage_model.proj": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"no Stable Diffusion stage: \[cond_stage_model.proj\]"):
        load_single_file(tmp_path / "extra.safetensors")
    save_file({**state, **label_emb}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[label_emb.0.0.weight\]"):
        load_single_file(without_metadata(tmp_path / "extra.safetensors", tmp_path / "bare.safetensors"))
    save_file({**state, "alphas_cumprod": state["alphas_cumprod"] ** 1.1}, tmp_path / "schedule.safetensors")
    with pytest.raises(CheckpointError, match="noise schedule"):
        load_single_file(tmp_path / "schedule.safetensors")


def test_ema_copy_is_skipped_with_a_warning_and_pickles_need_consent(cases, tmp_path):
    pipe, state = cases("sd1").pipe, load_file(cases("sd1").path)
    with_ema = {**state, "model_ema.decay": torch.tensor(0.999), "model_ema.diffusion_modelout2weight": torch.zeros(1)}
    torch.save({"state_dict": with_ema, "global_step": 7}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_single_file(tmp_path / "model.ckpt")
    with pytest.warns(SkippedWeightsWarning, match=r"skipped 2 tensors of the EMA copy"):
        back = load_single_file(tmp_path / "model.ckpt", allow_pickle=True)
    assert torch.equal(back.unet.out[2].weight, pipe.unet.out[2].weight)
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_single_file(pipe, tmp_path / "out.ckpt")


def test_older_transformers_layout_and_position_ids(cases, tmp_path):
    """SD 1.x files from older transformers: no text_model. level, and a saved position_ids buffer."""
    case = cases("sd1")
    prefix = "cond_stage_model.transformer."
    state = {k.replace(prefix + "text_model.", prefix): v for k, v in load_file(case.path).items()}
    save_file({**state, prefix + "embeddings.position_ids": torch.arange(CONTEXT)[None]}, tmp_path / "old.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_single_file(tmp_path / "old.safetensors")
    torch.testing.assert_close(back.text_encoder.encode(PROMPTS).states, case.pipe.text_encoder.encode(PROMPTS).states)
    defect = torch.arange(CONTEXT, dtype=torch.float32)[None] * 0.9  # drifted, as in some merged checkpoints
    save_file({**state, prefix + "embeddings.position_ids": defect}, tmp_path / "old.safetensors")
    with pytest.warns(SkippedWeightsWarning, match="position_ids"):
        load_single_file(tmp_path / "old.safetensors")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def test_convert_command(cases, tmp_path, capsys):
    case = cases("sd2")
    assert main(["convert", str(case.path), str(tmp_path / "ours"), "--to", "latentdiff"]) == 0
    assert "latentdiff" in capsys.readouterr().out
    saved = Text2ImagePipeline.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(v, case.pipe.unet.state_dict()[k]) for k, v in saved.unet.state_dict().items())
    assert saved.text_encoder.output_layer == "penultimate" and saved.sampling == case.pipe.sampling
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "half"), "--to", "diffusers",
                 "--dtype", "fp16"]) == 0
    assert load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype \
        == torch.float16
    sd1 = cases("sd1")  # a transformers text encoder in a latentdiff folder
    assert main(["convert", str(sd1.folder), str(tmp_path / "sd1"), "--to", "latentdiff"]) == 0
    np.testing.assert_array_equal(images(Text2ImagePipeline.from_pretrained(tmp_path / "sd1")), images(sd1.pipe))
    assert main(["convert", str(case.folder), str(tmp_path / "x.safetensors"), "--to", "single-file",
                 "--variant", "sd1"]) == 2
    assert "only apply to single-file" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y"), "--to", "diffusers"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
