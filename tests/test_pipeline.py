"""Text2ImagePipeline on tiny random stages: loading, stage pairing, seeds, batches, outputs, bad input."""
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_stages import save_autoencoder, save_stages, save_text_encoder

from latentdiff.checkpoint import weights_hash
from latentdiff.errors import CheckpointError, ConfigError, LatentDiffError
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.pipeline import Text2ImagePipeline
from latentdiff.request_limits import device_memory, format_bytes, generation_memory

STEPS = 4


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_stages(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def pipe(stages):
    return Text2ImagePipeline.from_pretrained(stages["unet"])


def generate(pipe, prompt, **kw):
    return pipe(prompt, num_inference_steps=STEPS, output_type="np", **kw).images


def test_seeds_reproduce_and_differ(pipe):
    first = generate(pipe, "a red circle", seed=7)
    assert np.array_equal(first, generate(pipe, "a red circle", seed=7))
    assert not np.allclose(first, generate(pipe, "a red circle", seed=8))
    assert not np.allclose(first, generate(pipe, "a blue square", seed=7))  # the UNet reads the prompt


def test_an_image_depends_on_its_seed_not_its_batch(pipe):
    batch = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, seed=10, num_inference_steps=STEPS,
                 output_type="latent")
    assert batch.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert batch.seeds == [10, 11, 12, 13]
    alone = pipe("a blue square", seed=13, num_inference_steps=STEPS, output_type="latent").images
    torch.testing.assert_close(batch.images[3:], alone, atol=1e-5, rtol=1e-4)
    generators = [torch.Generator().manual_seed(s) for s in (12, 13)]
    by_generator = pipe("a blue square", num_images_per_prompt=2, generator=generators, num_inference_steps=STEPS,
                        output_type="latent")
    torch.testing.assert_close(by_generator.images, batch.images[2:], atol=1e-5, rtol=1e-4)
    assert by_generator.seeds is None


def test_the_text_loses_its_padding_columns_and_the_denoiser_gives_the_same(pipe):
    prompts = ["a red circle", "a big blue square on the left"]
    assert pipe.record.context_mask  # trained so: the UNet never sees padding
    cond = pipe.encode_prompts(prompts, None, 3.0)
    words, empty = pipe.text_encoder.encode(prompts), pipe.text_encoder.unconditional(2)
    full = {"context": words.states, "context_mask": words.mask.bool(), "uncond_context": empty.states,
            "uncond_context_mask": empty.mask.bool()}
    length = cond["context"].shape[1]
    assert length < words.states.shape[1] and cond["context_mask"][:, -1].any()  # the longest prompt's end
    assert not full["context_mask"][:, length:].any() and not full["uncond_context_mask"][:, length:].any()
    torch.testing.assert_close(cond["context"], words.states[:, :length], atol=0, rtol=0)
    x = torch.randn(pipe.latent_shape(2, None, None), generator=torch.Generator().manual_seed(0))
    guided = pipe.guided_denoiser(3.0)
    torch.testing.assert_close(guided(x, 5.0, cond), guided(x, 5.0, full), atol=1e-4, rtol=1e-4)  # rounding, |x0| ~ 5


def test_output_types(pipe):
    common = dict(num_images_per_prompt=2, seed=0, num_inference_steps=STEPS)
    pil = pipe("a red circle", **common).images
    assert len(pil) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) and i.mode == "RGB" for i in pil)
    arr = pipe("a red circle", output_type="np", **common).images
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.float32 and 0 <= arr.min() <= arr.max() <= 1
    assert np.abs(np.asarray(pil[0]) / 255.0 - arr[0]).max() <= 0.5 / 255 + 1e-6
    pt = pipe("a red circle", output_type="pt", **common).images
    torch.testing.assert_close(pt.permute(0, 2, 3, 1).numpy(), arr)
    latents = pipe("a red circle", output_type="latent", **common).images
    assert latents.shape == (2, 4, 8, 8)
    decoded = pipe.decode_latents(latents)  # latents are scaled: decode divides by the autoencoder's scale_factor
    torch.testing.assert_close(((decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), arr)
    wide = pipe("a red circle", height=16, width=32, output_type="np", seed=0, num_inference_steps=STEPS).images
    assert wide.shape == (1, 16, 32, 3)


def test_guidance_negative_prompt_and_callback(pipe):
    seen = []
    plain = generate(pipe, "a red circle", seed=1, guidance_scale=1.0, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(STEPS)) and seen[0]["x"].shape == (1, 4, 8, 8)
    guided = generate(pipe, "a red circle", seed=1, guidance_scale=4.0)
    negative = generate(pipe, "a red circle", seed=1, guidance_scale=4.0, negative_prompt="a blue square")
    assert not np.allclose(plain, guided) and not np.allclose(guided, negative)
    for sampler in ("euler", "ddim", "heun", "euler_a"):
        assert generate(pipe, "a red circle", seed=1, sampler=sampler).shape == (1, 16, 16, 3)


def test_run_folder_and_saved_pipeline_folder_give_the_same_images(stages, pipe, tmp_path):
    direct = Text2ImagePipeline.from_stages(autoencoder=stages["autoencoder"], text_encoder=stages["text_encoder"],
                                            unet=stages["unet"])
    expected = generate(pipe, "a red circle", seed=3)
    assert np.array_equal(generate(direct, "a red circle", seed=3), expected)

    pipe.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["autoencoder", "pipeline.json", "text_encoder",
                                                                      "unet"]
    shutil.move(tmp_path / "saved", tmp_path / "moved")  # self-contained: the copies are found beside the UNet
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "moved")
    assert np.array_equal(generate(loaded, "a red circle", seed=3), expected)
    assert loaded.sampling == pipe.sampling
    assert loaded.unet.identity.metadata["trained_with"]["autoencoder"]["weights_hash"] == weights_hash(stages["autoencoder"])


def test_saved_pipeline_keeps_edited_sampling_defaults_and_other_dtypes(stages, tmp_path):
    source = Text2ImagePipeline.from_pretrained(stages["unet"])
    source.with_sampling({"steps": 2, "guidance_scale": 1.5}).to(dtype=torch.float64)
    source.save_pretrained(tmp_path / "saved")  # float64 copies: new hashes, recorded in the saved UNet
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "saved")
    assert loaded.sampling.steps == 2 and loaded.sampling.guidance_scale == 1.5
    assert loaded.dtype == torch.float32  # from_pretrained reads into float32; .to() is the caller's choice
    assert loaded("a red circle", seed=0, output_type="np").images.shape == (1, 16, 16, 3)


def test_mismatched_stages_are_refused_with_what_differs(stages, tmp_path):
    other = save_autoencoder(tmp_path / "other_autoencoder", seed=5)
    with pytest.raises(CheckpointError) as err:
        Text2ImagePipeline.from_stages(autoencoder=other, text_encoder=stages["text_encoder"], unet=stages["unet"])
    message = str(err.value)
    assert (f"unet was trained with autoencoder {weights_hash(stages['autoencoder'])} ({stages['autoencoder']}), "
            f"got {weights_hash(other)} ({other})") in message
    assert "text encoder" not in message  # only what differs is named

    rescaled = save_autoencoder(tmp_path / "rescaled", scale_factor=1.25)  # same weights, another latent scale
    with pytest.raises(CheckpointError, match=r"latents scaled by 0.8, the autoencoder's scale_factor is 1.25"):
        Text2ImagePipeline.from_stages(rescaled, stages["text_encoder"], stages["unet"])

    other_te = save_text_encoder(tmp_path / "other_text_encoder", seed=2)
    expected = f"unet was trained with text encoder {weights_hash(stages['text_encoder'])}"
    with pytest.raises(CheckpointError, match=expected):
        Text2ImagePipeline.from_stages(stages["autoencoder"], other_te, stages["unet"])

    # a loaded module carries its identity too
    with pytest.raises(CheckpointError, match="trained with autoencoder"):
        Text2ImagePipeline.from_stages(AutoencoderKL.from_pretrained(other), stages["text_encoder"], stages["unet"])


def test_run_folder_whose_stages_moved_is_explained(tmp_path):
    stages = save_stages(tmp_path / "weights")
    shutil.rmtree(stages["autoencoder"])
    with pytest.raises(CheckpointError, match="trained with the autoencoder at .* which is not there any more"):
        Text2ImagePipeline.from_pretrained(stages["unet"])
    with pytest.raises(CheckpointError, match="neither a pipeline folder"):
        Text2ImagePipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=18), "image size 16x18 is not a positive multiple of 4"),
    (dict(width=6), "image size 6x16 is not a positive multiple of 4"),
    (dict(sampler="plms"), "unknown sampler 'plms' \\(known: ddpm, ddim, euler"),
    (dict(output_type="jpeg"), "output_type 'jpeg' is not one of"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt: must be at least 1"),
    (dict(num_inference_steps=5000), "steps: 5000 must be between 1 and the 1000 training timesteps"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
    (dict(negative_prompt=["a", "b"]), "got 2 negative prompts for 1 prompts"),
    (dict(guidance_scale=float("nan")), "guidance_scale: must be a finite number, got nan"),
    (dict(guidance_scale=float("-inf")), "guidance_scale: must be a finite number, got -inf"),
    (dict(guidance_scale="3"), "guidance_scale: must be a finite number, got '3'"),
    (dict(num_inference_steps=2.5), "num_inference_steps: must be a whole number, got 2.5"),
    (dict(seed=float("nan")), "seed: must be a finite number, got nan"),
])
def test_bad_inputs_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        pipe("a red circle", **kwargs)
    assert isinstance(err.value, LatentDiffError)


def test_empty_prompt_list_is_refused(pipe):
    with pytest.raises(ConfigError, match="prompt: expected a string or a non-empty list"):
        pipe([])


def test_requests_too_large_for_memory_are_refused_before_any_work(pipe):
    with pytest.raises(ConfigError, match=r"^1 image\(s\) of 100000x100000 would need about [\d.]+ [KMGTPE]iB of "
                                          r"memory \(.*\), more than the [\d.]+ [KMGT]iB of memory this machine has"):
        pipe.request("a red circle", height=100_000, width=100_000)
    with pytest.raises(ConfigError, match=r"^10000000 image\(s\) of 16x16"):
        pipe.request("a red circle", num_images_per_prompt=10_000_000)

    spec = pipe.spec
    needed, _ = generation_memory(spec, 2, 16, 16, guided=True)
    assert generation_memory(spec, 4, 16, 16, guided=True)[0] > needed >= generation_memory(spec, 2, 16, 16, False)[0]
    assert generation_memory(spec, 2, 32, 32, guided=True)[0] > needed
    pipe.request("a red circle", num_images_per_prompt=2, memory_limit=needed)  # fits exactly
    with pytest.raises(ConfigError, match=f"more than the memory limit of {re.escape(format_bytes(needed - 1))}"):
        pipe.request("a red circle", num_images_per_prompt=2, memory_limit=needed - 1)
    total, what = device_memory(torch.device("cpu"))
    assert total > 2 ** 20 and what.endswith("of memory this machine has")
