"""Stage-1 training end to end on tiny configs: resume after a kill, image folders, measured scale."""
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from resume_check import kill_then_resume

from latentdiff.cli import main
from latentdiff.config import apply_overrides
from latentdiff.data import ShapesDataset
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.train.autoencoder import AutoencoderTrainingConfig, measure_latent_std, train_autoencoder

TINY = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.resolution=16", "data.size=16", "data.length=64", "train.batch_size=4", "train.steps=6",
        "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=3", "train.warmup_steps=1",
        "scale_batches=2", "eval_batches=1"]


def tiny_config(*extra: str) -> AutoencoderTrainingConfig:
    return apply_overrides(AutoencoderTrainingConfig(), TINY + list(extra))


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = tiny_config("train.ema_decay=0.9", "loss.disc_start=3", "loss.disc_ch=8")
    train_autoencoder(cfg, tmp_path / "straight")

    kill_then_resume(train_autoencoder, cfg, tmp_path / "killed", monkeypatch)

    straight = AutoencoderKL.from_pretrained(tmp_path / "straight")
    resumed = AutoencoderKL.from_pretrained(tmp_path / "killed")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.config.scale_factor == straight.config.scale_factor
    rows = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]


def test_cli_resume_continues_with_more_steps(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train-autoencoder", "--out", out, "--steps", "2", *TINY[:-5]]) == 0
    capsys.readouterr()
    assert main(["train-autoencoder", "--out", out, "--steps", "4", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed from" in captured.out + captured.err
    model = AutoencoderKL.from_pretrained(out)
    assert model.identity.metadata["step"] == 4
    assert (tmp_path / "run" / "samples").is_dir()


def test_scale_factor_is_one_over_the_latent_std(tmp_path):
    cfg = tiny_config()
    results = train_autoencoder(cfg, tmp_path)
    model = AutoencoderKL.from_pretrained(tmp_path)
    dataset = ShapesDataset(size=16, length=64)
    std = measure_latent_std(model, dataset, batch_size=4, batches=2, device="cpu")
    assert math.isclose(model.config.scale_factor, 1.0 / std, rel_tol=1e-6)
    assert math.isclose(results["scale_factor"], model.config.scale_factor)
    assert results["psnr"] > 0 and model.identity.metadata["psnr"] == results["psnr"]
    # pooled over all batches, not the first one alone
    first_only = measure_latent_std(model, dataset, batch_size=4, batches=1, device="cpu")
    assert first_only != std


def write_mixed_folder(root):
    root.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    Image.new("RGB", (20, 24), colours[0]).save(root / "rgb.png")
    Image.new("RGBA", (24, 20), colours[1] + (128,)).save(root / "rgba.png")
    Image.new("L", (16, 16), 90).save(root / "gray.png")
    Image.new("RGB", (16, 16), colours[3]).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    Image.new("RGB", (16, 16), colours[2]).save(root / "extra.png")
    full = (root / "rgb.png").read_bytes()
    Image.new("RGB", (64, 64), colours[2]).save(root / "truncated.png")
    (root / "truncated.png").write_bytes((root / "truncated.png").read_bytes()[:60])
    (root / "notes.png").write_text("not an image")
    for name in ("rgb", "rgba", "gray", "palette", "extra", "truncated", "notes"):
        (root / f"{name}.txt").write_text(f"a picture called {name}")
    return full


def test_trains_on_a_mixed_image_folder_and_reports_skips(tmp_path, capsys):
    write_mixed_folder(tmp_path / "images")
    with pytest.warns(UserWarning, match=r"skipped 2 of 7 files: .*notes.png.*|skipped 2 of 7 files: .*truncated.png"):
        code = main(["train-autoencoder", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                     *TINY[:5], "train.batch_size=2", "train.steps=3", "scale_batches=1", "eval_batches=1"])
    assert code == 0
    assert AutoencoderKL.from_pretrained(tmp_path / "run").identity.metadata["step"] == 3


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train-autoencoder", "--out", str(tmp_path), "model.chmult=[1]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'model.chmult'" in err
    assert main(["train-autoencoder", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                 *TINY]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_diverging_run_stops_with_exit_2_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train-autoencoder", "--out", str(out), *TINY, "train.steps=4"]) == 0
    good = {p.name: (p / "model.safetensors").read_bytes() for p in (out / "checkpoints").iterdir()}
    capsys.readouterr()
    code = main(["train-autoencoder", "--out", str(out), "--resume", "train.steps=30", "train.lr=1e6",
                 "train.max_bad_steps=3"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside the progress bar
    assert code == 2 and len(errors) == 1 and "non-finite gradient" in errors[0] and "train.lr" in errors[0]
    # the checkpoints of the good steps are still there, byte for byte; no saved file holds a NaN
    assert {p.name: (p / "model.safetensors").read_bytes() for p in (out / "checkpoints").iterdir()} == good
    for weights in out.rglob("*.safetensors"):
        for key, tensor in load_file(str(weights)).items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (weights, key)
    assert math.isfinite(AutoencoderKL.from_pretrained(out).config.scale_factor)


def test_grad_norm_is_logged_without_clipping(tmp_path):
    train_autoencoder(tiny_config("train.grad_clip=0"), tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("grad_norm")
    assert all(math.isfinite(float(r.split(",")[column])) for r in rows[1:])
