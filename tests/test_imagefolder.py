"""Image loading (every mode to RGB) and folders of captioned images, with their bad files."""
import io
import json
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latentdiff.data import ImageFolderDataset, build_dataset, load_image, pil_to_tensor, tensor_to_pil
from latentdiff.data.imagefolder import HELDOUT_FRACTION
from latentdiff.data.images import resize_and_crop
from latentdiff.data.sources import DataConfig
from latentdiff.errors import ConfigError, DataError


def noise_image(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def save_truncated(path, image: Image.Image, fmt: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def write_captioned(path, image: Image.Image, caption: str, **save_args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    path.with_suffix(".txt").write_text(caption)


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (20, 20), 0)  # index 0 transparent, index 1 opaque blue
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))
    return img


@pytest.fixture
def mixed_folder(tmp_path):
    """Six good images of different kinds (one in a sub-folder) and two bad ones, all captioned."""
    root = tmp_path / "images"
    write_captioned(root / "rgb.png", noise_image(0), "noise")
    write_captioned(root / "rgba.png", Image.new("RGBA", (24, 24), (255, 0, 0, 128)), "pink")
    write_captioned(root / "gray.png", Image.new("L", (24, 24), 100), "gray")
    write_captioned(root / "sub" / "palette.png", palette_with_transparency(), "palette", transparency=0)
    write_captioned(root / "deep16.png", Image.fromarray(np.full((24, 24), 32896, dtype=np.uint16)), "16 bit")
    write_captioned(root / "cmyk.jpg", Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "cmyk", quality=95)
    save_truncated(root / "broken.png", noise_image(1), "PNG")
    (root / "broken.txt").write_text("broken")
    (root / "notes.png").write_text("these are notes, not an image")
    (root / "notes.txt").write_text("notes")
    (root / "readme.md").write_text("not an image suffix: ignored without a word")
    return root


# ---------------------------------------------------------------------------------------------
# load_image and friends
# ---------------------------------------------------------------------------------------------

def test_load_image_converts_every_mode_to_rgb(tmp_path):
    cases = {
        "rgba.png": (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), {}, (255, 127, 127)),
        "la.png": (Image.new("LA", (8, 8), (0, 0)), {}, (255, 255, 255)),
        "gray.png": (Image.new("L", (8, 8), 100), {}, (100, 100, 100)),
        "bilevel.png": (Image.new("1", (8, 8), 1), {}, (255, 255, 255)),
        "palette.png": (palette_with_transparency(), {"transparency": 0}, (255, 255, 255)),
        "deep16.png": (Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), {}, (255, 255, 255)),
        "float.tiff": (Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), {}, (128, 128, 128)),
        "int32.tiff": (Image.fromarray(np.full((8, 8), 32896, dtype=np.int32)), {}, (128, 128, 128)),
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), {"quality": 95}, (255, 0, 0)),
    }
    for name, (image, save_args, expected) in cases.items():
        image.save(tmp_path / name, **save_args)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == image.size, name
        assert np.abs(np.asarray(loaded)[-1, -1].astype(int) - expected).max() <= 3, (name, loaded.getpixel((7, 7)))
    # The palette image's opaque half keeps its colour; the background colour is configurable.
    assert load_image(tmp_path / "palette.png").getpixel((0, 0)) == (0, 0, 255)
    assert load_image(tmp_path / "rgba.png", background="black").getpixel((0, 0)) == (128, 0, 0)
    assert load_image(tmp_path / "rgba.png", background="#00ff00").getpixel((0, 0)) == (128, 127, 0)
    with pytest.raises(ConfigError, match="chartreusy"):
        load_image(tmp_path / "rgba.png", background="chartreusy")


def test_high_bit_depth_keeps_its_gradations(tmp_path):
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "ramp.png"))[..., 0], np.arange(256).reshape(16, 16))
    wide = np.linspace(-3.0, 5.0, 64, dtype=np.float32).reshape(8, 8)  # stretched from its own range
    Image.fromarray(wide).save(tmp_path / "wide.tiff")
    pixels = np.asarray(load_image(tmp_path / "wide.tiff"))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and np.all(np.diff(pixels.ravel()) >= 0)


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(DataError, match=r"text\.png.*not an image"):
        load_image(tmp_path / "text.png")
    save_truncated(tmp_path / "cut.jpg", noise_image(2, 64, 64), "JPEG")
    with pytest.raises(DataError, match=r"cut\.jpg.*truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_resize_and_crop():
    wide = Image.new("RGB", (80, 40), (0, 0, 0))
    wide.paste((255, 0, 0), (30, 0, 50, 40))  # a red band in the middle
    centre = resize_and_crop(wide, 16)
    assert centre.size == (16, 16)
    assert centre.getpixel((8, 8))[0] > 200 and centre.getpixel((0, 8))[0] < 60
    crops = {resize_and_crop(wide, 16, "random", random.Random(s)).tobytes() for s in range(10)}
    assert len(crops) > 1
    assert resize_and_crop(Image.new("RGB", (5, 9)), 16).size == (16, 16)  # small images are upscaled
    with pytest.raises(ValueError):
        resize_and_crop(wide, 16, "random")


def test_tensor_round_trip():
    image = noise_image(3)
    tensor = pil_to_tensor(image)
    assert tensor.shape == (3, 30, 40) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert pil_to_tensor(Image.new("RGB", (2, 2), (255, 255, 255))).eq(1).all()
    assert pil_to_tensor(Image.new("RGB", (2, 2), (0, 0, 0))).eq(-1).all()
    assert tensor_to_pil(tensor).tobytes() == image.tobytes()
    assert tensor_to_pil(torch.full((3, 2, 2), 7.0)).getpixel((0, 0)) == (255, 255, 255)  # clipped
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------------------------------------
# ImageFolderDataset
# ---------------------------------------------------------------------------------------------

def load_both_splits(root, **kwargs):
    """(train, heldout, warning messages while building train)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = ImageFolderDataset(root, 16, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heldout = ImageFolderDataset(root, 16, split="heldout", **kwargs)
    return train, heldout, [str(w.message) for w in caught]


def test_mixed_folder_skips_bad_files_with_one_warning(mixed_folder):
    train, heldout, messages = load_both_splits(mixed_folder)
    assert len(messages) == 1
    assert "skipped 2 of 8 files" in messages[0]
    assert "broken.png (truncated)" in messages[0] and "notes.png (not an image)" in messages[0]
    assert train.skipped == {str(mixed_folder / "broken.png"): "truncated",
                             str(mixed_folder / "notes.png"): "not an image"}
    assert not set(train.files) & set(heldout.files)
    assert sorted(train.files + heldout.files) == sorted(
        ["rgb.png", "rgba.png", "gray.png", "sub/palette.png", "deep16.png", "cmyk.jpg"])
    assert len(heldout) >= 1
    items = {name: train[i] for i, name in enumerate(train.files)}
    items.update({name: heldout[i] for i, name in enumerate(heldout.files)})
    for name, item in items.items():
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert items["sub/palette.png"]["caption"] == "palette"
    colour = {name: tuple(((items[name]["image"][:, 8, 8] + 1) * 127.5).round().int().tolist())
              for name in ("rgba.png", "gray.png", "deep16.png")}
    assert colour == {"rgba.png": (255, 127, 127), "gray.png": (100, 100, 100), "deep16.png": (128, 128, 128)}


def test_decode_failure_mid_epoch_is_skipped_not_raised(tmp_path):
    for i in range(6):
        write_captioned(tmp_path / f"good{i}.png", noise_image(i), f"good {i}")
    save_truncated(tmp_path / "cut.jpg", noise_image(9, 64, 64), "JPEG")  # passes verify(), fails decode
    (tmp_path / "cut.txt").write_text("cut")
    seen, skipped = [], {}
    for split in ("train", "heldout"):
        dataset = ImageFolderDataset(tmp_path, 16, split=split)
        pickle.dumps(dataset)  # DataLoader workers may need to pickle it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in DataLoader(dataset, batch_size=4):
                assert batch["image"].shape[1:] == (3, 16, 16)
                seen += batch["caption"]
        skipped.update(dataset.skipped)
        if "cut.jpg" in dataset.files:
            assert any("cut.jpg" in str(w.message) for w in caught)
    assert skipped == {str(tmp_path / "cut.jpg"): "truncated"}
    assert len(seen) == 7 and "cut" not in seen  # the bad one was replaced by a good one


def test_sidecar_and_metadata_captions(tmp_path):
    write_captioned(tmp_path / "a.png", noise_image(0), "a red\n  circle ")
    write_captioned(tmp_path / "deeper" / "b.png", noise_image(1), "a blue square")
    train, heldout, _ = load_both_splits(tmp_path)
    captions = dict(zip(train.files + heldout.files, train.captions + heldout.captions))
    assert captions == {"a.png": "a red circle", "deeper/b.png": "a blue square"}

    # metadata.jsonl wins over sidecars when present
    lines = [{"file_name": "a.png", "text": "from metadata"}, {"file_name": "deeper/b.png", "text": "b too"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    train, heldout, _ = load_both_splits(tmp_path)
    captions = dict(zip(train.files + heldout.files, train.captions + heldout.captions))
    assert captions == {"a.png": "from metadata", "deeper/b.png": "b too"}


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found.*nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        ImageFolderDataset(tmp_path / "empty", 16)

    root = tmp_path / "uncaptioned"
    root.mkdir()
    for i in range(4):
        noise_image(i).save(root / f"img{i}.png")
    (root / "img0.txt").write_text("only this one")
    with pytest.raises(DataError, match=r"3 of 4 images have no caption \(img1\.png, img2\.png, img3\.png\)"):
        ImageFolderDataset(root, 16)
    train, heldout, _ = load_both_splits(root, require_captions=False)
    assert sorted(train.captions + heldout.captions) == ["", "", "", "only this one"]

    metadata = root / "metadata.jsonl"
    metadata.write_text('{"file_name": "img0.png", "text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="metadata.jsonl, line 2: not valid JSON"):
        ImageFolderDataset(root, 16)
    metadata.write_text('{"file_name": "img0.png", "caption": "wrong key"}\n')
    with pytest.raises(DataError, match="line 1: needs string fields"):
        ImageFolderDataset(root, 16)
    metadata.write_text('{"file_name": "ghost.png", "text": "a ghost"}\n')
    with pytest.raises(DataError, match="line 1: file 'ghost.png' does not exist"):
        ImageFolderDataset(root, 16)


def test_heldout_split_is_about_five_percent_and_stable():
    names = [f"folder/image_{i:04d}.png" for i in range(2000)]
    heldout = ImageFolderDataset._split_files(names, "heldout")
    train = ImageFolderDataset._split_files(names, "train")
    assert not set(heldout) & set(train) and len(heldout) + len(train) == len(names)
    assert abs(len(heldout) / len(names) - HELDOUT_FRACTION) < 0.015
    assert set(ImageFolderDataset._split_files(names[:1000], "heldout")) == set(heldout) & set(names[:1000])
    for count in (2, 3, 5):  # small folders still hold one out, and keep the rest for training
        small_heldout = ImageFolderDataset._split_files(names[:count], "heldout")
        small_train = ImageFolderDataset._split_files(names[:count], "train")
        assert len(small_heldout) >= 1 and len(small_train) >= 1
        assert sorted(small_heldout + small_train) == names[:count]
    assert ImageFolderDataset._split_files(names[:1], "heldout") == ImageFolderDataset._split_files(
        names[:1], "train") == names[:1]  # a single image serves both


def test_random_crop_and_flip_are_deterministic_per_seed_and_index(tmp_path):
    for i in range(8):
        write_captioned(tmp_path / f"img{i}.png", noise_image(i, 48, 24), str(i))
    make = lambda seed: ImageFolderDataset(tmp_path, 16, crop="random", flip=True, seed=seed)  # noqa: E731
    a, b, other = make(0), make(0), make(1)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"])
    assert any(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(len(a)))
    centre = ImageFolderDataset(tmp_path, 16)
    assert any(not torch.equal(a[i]["image"], centre[i]["image"]) for i in range(len(a)))


def test_build_dataset_for_folders(tmp_path, mixed_folder):
    with pytest.warns(UserWarning, match="skipped 2"):
        dataset = build_dataset(DataConfig(source=str(mixed_folder), size=16))
    assert isinstance(dataset, ImageFolderDataset) and dataset[0]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="no_such_folder"):
        build_dataset(DataConfig(source=str(tmp_path / "no_such_folder")))
