"""The shipped presets: every YAML loads into its stage's config; the gpu256 ones build at full size and train
2 steps each on the CPU (shapes data at 64 px, a batch of 2, the widths shrunk: see NARROW).
Also the hint a train-* command prints for your own data without --config, and scripts/make_emoji_dataset.py
on a small made-up package (the tests never fetch the real one)."""
import dataclasses
import io
import json
import runpy
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from latentdiff.cli import main, parse_command_line, training_config
from latentdiff.config import apply_overrides, load_config
from latentdiff.data.imagefolder import ImageFolderDataset
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder
from latentdiff.models.unet import UNet
from latentdiff.train.autoencoder import AutoencoderTrainingConfig
from latentdiff.train.diffusion import DiffusionTrainingConfig
from latentdiff.train.distill import DistillConfig
from latentdiff.train.text_encoder import TextEncoderTrainingConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
STAGES = {"autoencoder": AutoencoderTrainingConfig, "text_encoder": TextEncoderTrainingConfig,
          "diffusion": DiffusionTrainingConfig, "distill": DistillConfig}
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "accelerate")
# 2 steps of each stage on shapes at 64 px, batch 2. At full width they took 8, 15 and 42 s of training on 2
# shared cores (the UNet 6.6 GB of memory and a 4 GB checkpoint), so the widths shrink here; depths, levels,
# attention placement, heads, f=8 and the 77-token context stay as shipped (the full sizes build below).
SMALL = ["--steps", "2", "--batch-size", "2", "data.size=64", "data.num_workers=0", "train.log_every=1"]
NARROW = {"autoencoder": ["model.ch=32"],
          "text_encoder": ["model.width=128", "model.embed_dim=128", "model.vision_width=32", "model.image_size=64"],
          "diffusion": ["model.model_channels=64", "model.context_dim=128"]}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_preset_loads_into_its_stage_config(path):
    load_config(STAGES[path.parent.name], path)


def gpu256(stage: str, narrow: bool = False):
    cfg = load_config(STAGES[stage], CONFIGS / stage / "gpu256.yaml")
    return apply_overrides(cfg, NARROW[stage]) if narrow else cfg


@pytest.mark.parametrize("stage, model_class, millions", [
    ("autoencoder", AutoencoderKL, 47), ("text_encoder", OpenCLIPTextEncoder, 81), ("diffusion", UNet, 219)])
def test_gpu256_models_build_at_full_size(stage, model_class, millions):
    model = model_class(gpu256(stage).model)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions  # as the preset's comment says


def test_gpu256_stages_fit_each_other():
    unet = gpu256("diffusion").model
    assert unet.context_dim == gpu256("text_encoder").model.width
    assert unet.in_channels == unet.out_channels == gpu256("autoencoder").model.z_channels
    assert {gpu256(stage).data.size for stage in ("autoencoder", "diffusion")} == {256}


def train(command: str, out: Path, *extra: str) -> None:
    stage = out.name
    assert main([command, "--config", str(CONFIGS / stage / "gpu256.yaml"), "--out", str(out), *SMALL,
                 *NARROW[stage], *extra]) == 0


@pytest.fixture(scope="module")
def gpu256_stages(tmp_path_factory):
    """The gpu256 autoencoder (with the discriminator on at step 2) and text encoder, 2 steps each."""
    root = tmp_path_factory.mktemp("gpu256")
    train("train-autoencoder", root / "autoencoder", "loss.disc_start=2", "scale_batches=1", "eval_batches=1")
    train("train-text-encoder", root / "text_encoder", "eval_batch_size=2", "eval_batches=1")
    return root


def test_gpu256_autoencoder_and_text_encoder_train(gpu256_stages):
    autoencoder = AutoencoderKL.from_pretrained(gpu256_stages / "autoencoder")
    expected = gpu256("autoencoder", narrow=True).model
    assert autoencoder.config == dataclasses.replace(expected, scale_factor=autoencoder.config.scale_factor)
    assert autoencoder.downsample_factor == 8 and autoencoder.identity.metadata["step"] == 2
    text_encoder = OpenCLIPTextEncoder.from_latentdiff_folder(gpu256_stages / "text_encoder")
    assert text_encoder.config == gpu256("text_encoder", narrow=True).model


def test_gpu256_unet_trains_on_the_gpu256_stages(gpu256_stages):
    out = gpu256_stages / "diffusion"
    train("train-diffusion", out, "--autoencoder", str(gpu256_stages / "autoencoder"),
          "--text-encoder", str(gpu256_stages / "text_encoder"), "data.length=4", "preview_images=1",
          "sampling.steps=2")
    unet = UNet.from_pretrained(out)
    assert unet.config == gpu256("diffusion", narrow=True).model and unet.identity.metadata["step"] == 2
    assert (out / "samples" / "preview-0000002.png").is_file()


@pytest.mark.parametrize("command", ["train-autoencoder", "train-text-encoder", "train-diffusion"])
def test_own_data_without_config_names_the_preset_it_uses(command, capsys):
    stage = command.removeprefix("train-").replace("-", "_")
    cfg = training_config(STAGES[stage], parse_command_line([command, "--data", "my_images"]))
    assert cfg.data.source == "my_images" and cfg.model == STAGES[stage]().model
    hint = capsys.readouterr().out
    assert "shapes preset" in hint and f"--config configs/{stage}/folder64.yaml" in hint
    assert len(hint.splitlines()) == 1
    for quiet in ([command, "--data", "shapes"], [command, "--data", "my_images", "--config",
                                                  str(CONFIGS / stage / "gpu256.yaml")]):
        training_config(STAGES[stage], parse_command_line(quiet))
        assert capsys.readouterr().out == ""


def fake_package(path: Path, images: dict[str, Image.Image], records: list[dict]) -> Path:
    """A .tgz laid out as `npm pack emoji-datasource-twitter` writes it."""
    with tarfile.open(path, "w:gz") as tar:
        members = {"package/emoji.json": json.dumps(records).encode()}
        for name, image in images.items():
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            members[f"package/img/twitter/64/{name}"] = buffer.getvalue()
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_emoji_dataset_from_a_made_up_package(tmp_path, capsys):
    make = runpy.run_path(str(ROOT / "scripts" / "make_emoji_dataset.py"))["main"]
    tone = {"1F3FF": {"image": "1f385-1f3ff.png", "has_img_twitter": True}}
    records = [{"name": "GRINNING FACE WITH SMILING EYES", "image": "1f601.png", "has_img_twitter": True},
               {"name": "France Flag", "image": "1f1eb-1f1f7.png", "has_img_twitter": True},
               {"name": "FATHER CHRISTMAS", "image": "1f385.png", "has_img_twitter": True, "skin_variations": tone},
               {"name": "NO TWITTER IMAGE", "image": "2b55.png", "has_img_twitter": False}]
    images = {r["image"]: Image.new("RGBA", (64, 64), (200, 30, 30, 128)) for r in records}
    images["1f385-1f3ff.png"] = Image.new("RGBA", (64, 64), (90, 60, 30, 255))
    tgz = fake_package(tmp_path / "emoji.tgz", images, records)

    assert make([str(tgz), str(tmp_path / "emoji")]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    dataset = ImageFolderDataset(tmp_path / "emoji", size=32, split="heldout")
    all_captions = set(ImageFolderDataset(tmp_path / "emoji", size=32).captions + dataset.captions)
    assert all_captions == {"grinning face with smiling eyes", "france flag", "father christmas"}
    assert not (tmp_path / "emoji.tmp").exists()

    assert make([str(tgz), str(tmp_path / "tones"), "--skin-tones", "--size", "32"]) == 0
    lines = (tmp_path / "tones" / "metadata.jsonl").read_text().splitlines()
    assert {"file_name": "1f385-1f3ff.png", "text": "father christmas: dark skin tone"} in map(json.loads, lines)
    assert Image.open(tmp_path / "tones" / "1f385.png").size == (32, 32)

    capsys.readouterr()
    for bad, says in ((tmp_path / "missing.tgz", "npm pack emoji-datasource-twitter"),
                      (ROOT / "README.md", "not a readable .tgz")):
        assert make([str(bad), str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "never").exists()
