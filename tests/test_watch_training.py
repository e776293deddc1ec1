"""Watching a run: held-out metrics in metrics.csv during training, TensorBoard event files, `latentdiff plot`,
diffusion previews with their prompts."""
import csv

import pytest
from PIL import Image
from test_train_autoencoder import tiny_config
from tiny_stages import save_autoencoder, save_text_encoder, tiny_training_config

from latentdiff import plot
from latentdiff.cli import main
from latentdiff.grid import PAD
from latentdiff.train import loop
from latentdiff.train.autoencoder import train_autoencoder
from latentdiff.train.diffusion import train_diffusion
from latentdiff.train.loop import TrainingRun


def read_rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    """A tiny autoencoder run: 6 steps, a metrics row every 4 steps, held-out PSNR every 3."""
    pytest.importorskip("tensorboard")  # the test extra installs it
    run = tmp_path_factory.mktemp("watch") / "autoencoder"
    train_autoencoder(tiny_config("train.log_every=4"), run)
    return run


def test_autoencoder_logs_heldout_psnr_at_sample_steps(autoencoder_run):
    rows = read_rows(autoencoder_run)
    assert [r["step"] for r in rows] == ["3", "4", "6"]  # sample_every steps get a row too
    assert [bool(r["heldout_psnr"]) for r in rows] == [True, False, True]
    assert all(0 < float(r["heldout_psnr"]) < 100 for r in rows if r["heldout_psnr"])


def test_tensorboard_event_files_hold_the_same_values(autoencoder_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((autoencoder_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    psnr = scalars.Scalars("heldout_psnr")
    assert [e.step for e in psnr] == [3, 6]
    csv_psnr = [float(r["heldout_psnr"]) for r in read_rows(autoencoder_run) if r["heldout_psnr"]]
    assert [e.value for e in psnr] == pytest.approx(csv_psnr, rel=1e-4)
    assert [e.step for e in scalars.Scalars("loss")] == [3, 4, 6]


def test_plot_draws_the_curves_of_a_run(autoencoder_run, capsys):
    assert main(["plot", str(autoencoder_run)]) == 0
    assert "curves.png" in capsys.readouterr().out
    image = Image.open(autoencoder_run / "curves.png").convert("RGB")
    columns = [name for name, value in read_rows(autoencoder_run)[0].items() if value and name != "step"]
    assert image.width == plot.PANELS_PER_ROW * plot.PANEL[0]
    assert image.height == -(-len(columns) // plot.PANELS_PER_ROW) * plot.PANEL[1]
    colours = dict((colour, count) for count, colour in image.getcolors(maxcolors=1 << 16))
    assert colours.get(plot.LINE, 0) > 200  # the curves are drawn, not only the frames

    out = autoencoder_run / "elsewhere" / "run.png"
    assert main(["plot", str(autoencoder_run), "--out", str(out)]) == 0
    assert Image.open(out).size == image.size


def test_plot_without_metrics_is_one_error_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "metrics.csv" in err and len(err.splitlines()) == 1


def test_without_tensorboard_metrics_csv_only_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(loop, "_told_no_tensorboard", False)
    cfg = tiny_config()
    for name in ("a", "b"):
        TrainingRun(tmp_path / name, cfg, cfg.train)
    assert capsys.readouterr().out.count("TensorBoard is not installed") == 1
    assert not (tmp_path / "a" / "tensorboard").exists() and (tmp_path / "a" / "metrics.csv").is_file()


def test_diffusion_preview_has_prompts_and_clip_score(tmp_path):
    ae, te = save_autoencoder(tmp_path / "autoencoder"), save_text_encoder(tmp_path / "text_encoder")
    cfg = tiny_training_config(ae, te, "train.steps=3", "train.log_every=2")
    train_diffusion(cfg, tmp_path / "run")
    preview = Image.open(tmp_path / "run" / "samples" / "preview-0000003.png")
    bare = cfg.preview_images * (cfg.data.size + 1) + 1  # the image grid alone, as make_grid drew it
    assert preview.width > 2 * bare + 40 and preview.height == len(cfg.preview_prompts) * (2 * 16 + PAD) + PAD
    rows = read_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == ["2", "3"]
    assert not rows[0]["clip_score"] and 0 <= float(rows[1]["clip_score"]) <= 100
