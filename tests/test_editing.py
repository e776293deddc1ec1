"""img2img and inpainting on a tiny random pipeline."""
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_stages import save_stages

from latentdiff.data import ShapesDataset
from latentdiff.errors import ConfigError
from latentdiff.pipeline import Text2ImagePipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Text2ImagePipeline.from_pretrained(save_stages(tmp_path_factory.mktemp("editing"))["unet"])


@pytest.fixture(scope="module")
def image():
    return ShapesDataset(size=16)[3]["image"]  # (3, 16, 16) in [-1, 1]


def test_img2img_strength_0_returns_the_reconstruction(pipe, image):
    out = pipe.img2img("a red circle", image, strength=0.0, num_inference_steps=4, output_type="pt").images
    with torch.no_grad():
        recon = pipe.autoencoder.decode(pipe.autoencoder.encode(image[None]).mode())
    assert torch.allclose(out[0], (recon[0].clamp(-1, 1) + 1) / 2, atol=1e-6)


def test_img2img_strength_moves_away_from_the_image_and_seeds_reproduce(pipe, image):
    def run(strength, seed=0):
        return pipe.img2img("a red circle", image, strength=strength, num_inference_steps=4, seed=seed,
                            output_type="np").images[0]
    low, high = run(0.25), run(1.0)
    base = run(0.0)
    assert np.abs(low - base).mean() < np.abs(high - base).mean()
    assert np.array_equal(run(0.5, seed=3), run(0.5, seed=3))
    assert not np.array_equal(run(0.5, seed=3), run(0.5, seed=4))


def test_img2img_accepts_pil_and_checks_strength(pipe, image):
    pil = Image.fromarray(((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    assert pipe.img2img("a red circle", pil, strength=0.5, num_inference_steps=2).images[0].size == (16, 16)
    with pytest.raises(ConfigError, match="strength"):
        pipe.img2img("a red circle", pil, strength=1.5)


def test_inpainting_keeps_the_unmasked_region_exactly(pipe, image):
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1  # repaint the middle
    out = pipe.inpaint(["a blue square", "a red circle"], image, mask, num_inference_steps=4, seed=1,
                       output_type="pt").images  # (2, 3, 16, 16) in [0, 1]
    original = (image + 1) / 2
    keep = mask == 0
    for picture in out:
        assert torch.allclose(picture[:, keep], original[:, keep], atol=1e-6)
        assert not torch.allclose(picture[:, ~keep], original[:, ~keep], atol=1e-2)


def test_inpainting_latent_keeps_the_known_latent(pipe, image):
    mask = torch.zeros(16, 16)
    mask[:, 8:] = 1  # repaint the right half; latent cells 0..3 of 8 are kept
    latents = pipe.inpaint("a red circle", image, mask, num_inference_steps=3, output_type="latent").images
    known = pipe.encode_image(image[None])
    assert torch.allclose(latents[..., :4], known[..., :4], atol=1e-5)


def test_mask_of_the_wrong_size_is_refused(pipe, image):
    with pytest.raises(ConfigError, match="mask: size"):
        pipe.inpaint("a red circle", image, torch.zeros(8, 8))
