"""diffusers folders: import into a Text2ImagePipeline and export from one, checked against diffusers itself
(a test-only reference) on tiny random SD 1.x- and 2.x-like pipelines (tests/tiny_sd.py)."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from safetensors.torch import load_file, save_file
from tiny_sd import CONFIGS, CONTEXT, IMAGE, LATENT, diffusers_pipeline, initial_noise, load_reference, \
    save_diffusers_pipeline

from latentdiff.convert import ContextMaskWarning, load_diffusers, save_diffusers
from latentdiff.convert.scheduler_config import schedule_from_diffusers
from latentdiff.errors import CheckpointError
from latentdiff.pipeline import Text2ImagePipeline

PROMPTS = ["a red circle", "two blue squares on the left", ""]
STEPS = 5


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def name(request):
    return request.param


@pytest.fixture(scope="module")
def built(name, tmp_path_factory):
    """(diffusers' pipeline, the folder it saved itself to)."""
    reference = diffusers_pipeline(name)
    folder = tmp_path_factory.mktemp(name) / "diffusers"
    reference.save_pretrained(str(folder))
    return reference, folder


@pytest.fixture(scope="module")
def folder(built):
    return built[1]


@pytest.fixture(scope="module")
def reference(built):
    return built[0]


@pytest.fixture(scope="module")
def imported(folder):
    """The import under test; tests that change its sampling settings work on a copy (see `with_sampling`)."""
    return load_diffusers(folder)


def with_sampling(pipe: Text2ImagePipeline, sampling) -> Text2ImagePipeline:
    return copy.copy(pipe).with_sampling(sampling)  # shares the modules, not the sampling settings


def generate_ours(pipe: Text2ImagePipeline, seed: int, guidance: float = 4.0) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=STEPS, guidance_scale=guidance, height=IMAGE, width=IMAGE,
                seed=seed, output_type="np").images


def generate_theirs(reference, seed: int, guidance: float = 4.0) -> np.ndarray:
    return reference("a red circle", num_inference_steps=STEPS, guidance_scale=guidance, height=IMAGE, width=IMAGE,
                     latents=initial_noise(seed), output_type="np").images


# ---------------------------------------------------------------------------------------------
# Import: each stage against its diffusers / transformers original
# ---------------------------------------------------------------------------------------------

def test_imported_stages_match_diffusers(imported, reference):
    pipe = imported
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, LATENT, LATENT, generator=gen), torch.randn(2, CONTEXT, pipe.unet.config.context_dim,
                                                                              generator=gen)
    t = torch.tensor([3.0, 917.0])
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=gen) * 2 - 1
    with torch.no_grad():
        ours, theirs = pipe.unet(x, t, context), reference.unet(x, t, encoder_hidden_states=context).sample
        assert theirs.abs().mean() > 0.05
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

        posterior, dist = pipe.autoencoder.encode(images), reference.vae.encode(images).latent_dist
        torch.testing.assert_close(posterior.mean, dist.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(posterior.std, dist.std, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pipe.autoencoder.decode(x), reference.vae.decode(x).sample, atol=1e-4, rtol=1e-4)

        ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True,
                                  return_tensors="pt").input_ids
        encoding = pipe.text_encoder.encode(PROMPTS)
        assert torch.equal(pipe.text_encoder.tokenize(PROMPTS).ids, ids)
        torch.testing.assert_close(encoding.states, reference.text_encoder(ids)[0], atol=1e-4, rtol=1e-4)
    assert pipe.autoencoder.config.scale_factor == reference.vae.config.scaling_factor
    assert not pipe.record.context_mask  # SD attends to every token


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_generation_matches_stable_diffusion_pipeline(imported, reference, sampler):
    """The same scheduler config on both sides, the same initial noise: the same image."""
    original = reference.scheduler
    scheduler_class = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                       "unipc": UniPCMultistepScheduler}[sampler]
    reference.scheduler = scheduler_class.from_config(original.config, timestep_spacing="trailing", steps_offset=0,
                                                      **({"set_alpha_to_one": True, "clip_sample": False}
                                                         if sampler == "ddim" else {}))
    try:
        schedule, prediction, sampling = schedule_from_diffusers(dict(reference.scheduler.config), "scheduler")
        assert (schedule, prediction) == (imported.record.schedule, imported.record.prediction)
        assert sampling.sampler == sampler and sampling.spacing == "trailing"
        pipe = with_sampling(imported, sampling)
        theirs = generate_theirs(reference, seed=11)
    finally:
        reference.scheduler = original
    ours = generate_ours(pipe, seed=11)
    assert ours.shape == theirs.shape == (1, IMAGE, IMAGE, 3) and theirs.std() > 0.02
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert np.abs(generate_ours(pipe, seed=12) - ours).max() > 1e-2  # the noise matters


def test_the_imported_scheduler_is_the_default(name, folder, reference):
    """Without any override, each tiny pipeline's own scheduler (leading + offset, or trailing) reproduces."""
    pipe = load_diffusers(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    expected = {"sd1": ("ddim", "leading"), "sd2": ("dpmpp_2m", "trailing"), "deep": ("ddim", "trailing")}
    assert (pipe.sampling.sampler, pipe.sampling.spacing) == expected[name]
    assert pipe.sampling.steps_offset == config["steps_offset"]
    np.testing.assert_allclose(generate_ours(pipe, seed=5), generate_theirs(reference, seed=5), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def test_export_loads_in_diffusers_and_round_trips_exactly(folder, imported, tmp_path):
    pipe = imported
    save_diffusers(pipe, tmp_path / "exported")
    # the export of an import is the original, tensor for tensor
    for part in ("unet", "vae"):
        original = load_file(folder / part / "diffusion_pytorch_model.safetensors")
        exported = load_file(tmp_path / "exported" / part / "diffusion_pytorch_model.safetensors")
        assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    # diffusers loads it and, with the scheduler we wrote, draws our image
    theirs = generate_theirs(load_reference(tmp_path / "exported"), seed=3)
    np.testing.assert_allclose(generate_ours(pipe, seed=3), theirs, atol=1e-3, rtol=0)
    # and it comes back exactly
    back = load_diffusers(tmp_path / "exported")
    for part in ("unet", "autoencoder", "text_encoder"):
        mine, yours = getattr(pipe, part).state_dict(), getattr(back, part).state_dict()
        assert mine.keys() == yours.keys() and all(torch.equal(mine[k], yours[k]) for k in mine)
    assert back.record == dataclasses.replace(pipe.record, stages=back.record.stages)  # stages: other paths
    assert np.array_equal(generate_ours(back, seed=3), generate_ours(pipe, seed=3))


def test_own_pipeline_with_open_clip_exports_to_diffusers(tmp_path):
    """A pipeline trained here (open_clip text encoder, penultimate layer, padding masked) -> diffusers."""
    from tiny_stages import save_stages

    from latentdiff.config import apply_overrides

    stages = save_stages(tmp_path / "stages")
    pipe = Text2ImagePipeline.from_pretrained(stages["unet"])
    pipe.text_encoder.output_layer = "penultimate"
    sampling = apply_overrides(pipe.sampling, {"sampler": "ddim", "spacing": "trailing"})
    pipe.record = dataclasses.replace(pipe.record, context_mask=False, sampling=sampling)
    save_diffusers(pipe, tmp_path / "exported")
    reference = load_reference(tmp_path / "exported")
    assert reference.text_encoder.config.num_hidden_layers == len(pipe.text_encoder.clip.transformer.resblocks) - 1
    with torch.no_grad():
        ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=pipe.text_encoder.context_length,
                                  truncation=True, return_tensors="pt").input_ids
        assert torch.equal(pipe.text_encoder.tokenize(PROMPTS).ids, ids)
        torch.testing.assert_close(reference.text_encoder(ids)[0], pipe.text_encoder.encode(PROMPTS).states,
                                   atol=1e-5, rtol=1e-5)
    theirs = reference("a red circle", num_inference_steps=STEPS, guidance_scale=3.0, latents=initial_noise(4),
                       output_type="np").images
    np.testing.assert_allclose(pipe("a red circle", num_inference_steps=STEPS, guidance_scale=3.0, seed=4,
                                    output_type="np").images, theirs, atol=1e-3, rtol=0)

    pipe.record = dataclasses.replace(pipe.record, context_mask=True)  # as trained: diffusers cannot do that
    with pytest.warns(ContextMaskWarning):
        save_diffusers(pipe, tmp_path / "masked")
    assert load_diffusers(tmp_path / "masked").record.context_mask  # but latentdiff reads it back


def test_a_unet_with_position_features_is_not_exported(tmp_path):
    from tiny_stages import save_stages

    pipe = Text2ImagePipeline.from_pretrained(save_stages(tmp_path / "stages")["unet"])
    pipe.unet.config = dataclasses.replace(pipe.unet.config, position_embedding=True)  # diffusers has none
    with pytest.raises(CheckpointError, match="model.position_embedding"):
        save_diffusers(pipe, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------

def test_unmapped_weights_and_foreign_pipelines_are_refused(tmp_path):
    folder = save_diffusers_pipeline("sd1", tmp_path / "sd1")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        load_diffusers(folder)
    (folder / "model_index.json").write_text(json.dumps(index))

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({**state, "add_embedding.linear_1.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(CheckpointError, match=r"no place in the model: \[add_embedding.linear_1.weight\]"):
        load_diffusers(folder)
    save_file({k: v for k, v in state.items() if k != "conv_in.bias"}, weights)
    with pytest.raises(CheckpointError, match=r"missing keys \[input_blocks.0.0.bias\]"):
        load_diffusers(folder)
    save_file(state, weights)

    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(CheckpointError, match="class_embed_type"):
        load_diffusers(folder)
    (folder / "unet" / "config.json").write_text(json.dumps(config))

    (weights.parent / "diffusion_pytorch_model.bin").write_bytes(b"")
    weights.unlink()
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_diffusers(folder)
