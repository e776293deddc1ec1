"""prompt_grid: tiles enlarged pixel for pixel, one labelled row per prompt."""
import numpy as np
import pytest
from PIL import Image

from latentdiff.grid import PAD, prompt_grid


def test_tiles_are_the_images_enlarged_and_rows_carry_their_prompt():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
    prompts = ["a red circle"] * 3 + ["two blue squares, a much longer prompt"] * 3
    grid = prompt_grid(images, prompts, columns=3, scale=2)
    assert grid.height == PAD + 2 * (16 + PAD)
    label_w = grid.width - PAD - 3 * (16 + PAD)
    pixels = np.asarray(grid)
    for k, image in enumerate(images):
        row, col = divmod(k, 3)
        x, y = label_w + PAD + col * (16 + PAD), PAD + row * (16 + PAD)
        expected = np.asarray(image).repeat(2, axis=0).repeat(2, axis=1)
        assert np.array_equal(pixels[y:y + 16, x:x + 16], expected), k
    labels = pixels[:, :label_w].min(axis=-1)  # (H, label_w): dark where text was written
    assert (labels[PAD:PAD + 16] < 128).any() and (labels[2 * PAD + 16:2 * PAD + 32] < 128).any()
    # the longer prompt sets the label column's width
    assert label_w > prompt_grid(images[:3], prompts[:3], columns=3, scale=2).width - PAD - 3 * (16 + PAD)


def test_a_prompt_per_image_is_required():
    image = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        prompt_grid([image, image], ["a"], columns=2)
