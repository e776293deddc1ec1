"""`latentdiff quickstart` on tiny presets: trains the three stages, draws the grid, skips finished stages."""
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_shared_cores import sleeping_trainer, thread_counting_trainer, two_threads  # noqa: F401 (a fixture)
from test_train_autoencoder import TINY as TINY_AE
from test_train_text_encoder import TINY as TINY_TE
from tiny_stages import TINY_TRAINING

from latentdiff import Text2ImagePipeline, quickstart
from latentdiff.cli import main
from latentdiff.config import apply_overrides, load_config
from latentdiff.eval.evaluate import evaluate
from latentdiff.train.autoencoder import AutoencoderTrainingConfig
from latentdiff.train.diffusion import DiffusionTrainingConfig
from latentdiff.train.loop import completed_steps
from latentdiff.train.text_encoder import TextEncoderTrainingConfig


ROOT = Path(__file__).resolve().parent.parent


SHIPPED_PLAN = quickstart.quickstart_plan


def tiny_plan(root: Path, quality: bool = False):
    """The shipped plan (its folders, stage paths and levers) on tiny models and steps."""
    (autoencoder, _, _), (text_encoder, _, text_cfg), (diffusion, _, diffusion_cfg) = SHIPPED_PLAN(root, quality)
    diffusion_cfg = apply_overrides(DiffusionTrainingConfig(), TINY_TRAINING + [
        f"autoencoder={diffusion_cfg.autoencoder}", f"text_encoder={diffusion_cfg.text_encoder}",
        f"train.steps={8 if quality else 4}"])
    return [(autoencoder, quickstart.train_autoencoder, apply_overrides(AutoencoderTrainingConfig(), TINY_AE)),
            (text_encoder, quickstart.train_text_encoder, apply_overrides(text_cfg, TINY_TE)),
            (diffusion, quickstart.train_diffusion, diffusion_cfg)]


def test_quickstart_trains_everything_then_skips_what_is_done(tmp_path, monkeypatch, capsys, two_threads):
    monkeypatch.setattr(quickstart, "quickstart_plan", tiny_plan)
    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # on 2 threads the text encoder trains in a process of its own on 1 of them, its output in its folder, and
    # the autoencoder beside it in another
    log = tmp_path / "text_encoder" / "train.log"
    assert f"in a process of its own on 1 of 2 threads (its output: {log})" in out
    assert "beside it on 1 of 2 threads" in out
    assert "text_encoder: 100%" in log.read_text() and "autoencoder + text_encoder side by side" in out
    assert torch.get_num_threads() == 2
    grid = Image.open(tmp_path / "quickstart_grid.png")
    rows = len(quickstart.PROMPTS)
    assert grid.height == 4 + rows * (4 * 16 + 4)  # one row per prompt, tiles enlarged 4x
    assert [completed_steps(tmp_path / n) for n in ("autoencoder", "text_encoder", "diffusion")] == [6, 6, 4]
    assert str(tmp_path / "quickstart_grid.png") in out
    assert f"latentdiff distill --teacher {tmp_path / 'diffusion'} --out {tmp_path / 'distilled'}" in out

    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == 3

    # --quality: its own text encoder and UNet beside the quickstart's, on the quickstart's autoencoder
    assert main(["quickstart", "--out", str(tmp_path), "--quality"]) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == 1 and "text_encoder_quality: training (6 steps)" in out
    assert [completed_steps(tmp_path / n) for n in ("text_encoder", "text_encoder_quality", "diffusion_quality")
            ] == [6, 6, 8]
    assert (tmp_path / "quality_grid.png").is_file() and f"--pipeline {tmp_path / 'diffusion_quality'}" in out
    unet_config = load_config(DiffusionTrainingConfig, tmp_path / "diffusion_quality" / "train_config.yaml")
    assert unet_config.text_encoder == str(tmp_path / "text_encoder_quality")


def test_sequential_trains_the_stages_one_after_another(tmp_path, monkeypatch, capsys, two_threads):
    monkeypatch.setattr(quickstart, "quickstart_plan", tiny_plan)
    assert main(["quickstart", "--out", str(tmp_path), "--sequential"]) == 0
    out = capsys.readouterr().out
    assert "process of its own" not in out and not (tmp_path / "text_encoder" / "train.log").exists()
    assert [completed_steps(tmp_path / n) for n in ("autoencoder", "text_encoder", "diffusion")] == [6, 6, 4]


@pytest.mark.parametrize("quality, preset", [(False, "shapes.yaml"), (True, "quality.yaml")])
def test_the_quickstart_trains_the_shipped_presets(quality, preset, tmp_path):
    _, text_encoder, diffusion = (cfg for _, _, cfg in quickstart.quickstart_plan(tmp_path, quality))
    shipped = load_config(DiffusionTrainingConfig, ROOT / "configs" / "diffusion" / preset)
    text_folder = "text_encoder_quality" if quality else "text_encoder"
    assert diffusion == apply_overrides(shipped, {"autoencoder": str(tmp_path / "autoencoder"),
                                                  "text_encoder": str(tmp_path / text_folder)})
    assert text_encoder == load_config(TextEncoderTrainingConfig, ROOT / "configs" / "text_encoder" / preset)


@pytest.mark.slow
def test_shipped_presets_place_single_objects(tmp_path):
    """The quickstart with the shipped presets (about 15 minutes on 2 cores): the shapes judge passes
    at least 80% of 100 single-object prompts (colour, shape and region) on each split (measured: 0.98 / 0.97);
    then the distill preset (about 2 minutes) makes a 4-step student of it that passes at least 75% (measured:
    0.97 / 0.96), and with method=guidance (about 2 minutes) an unguided student that passes at least 80% and
    whose judge mean over all 12 cells is at most 0.05 below the teacher's (measured: 0.96 / 0.98, 0.009 below)."""
    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    results = evaluate(Text2ImagePipeline.from_pretrained(tmp_path / "diffusion"), per_category=100)
    assert results["train"]["single_object"] >= 0.8, results
    assert results["heldout"]["single_object"] >= 0.8, results
    assert main(["distill", "--teacher", str(tmp_path / "diffusion"), "--out", str(tmp_path / "distilled")]) == 0
    student = evaluate(Text2ImagePipeline.from_pretrained(tmp_path / "distilled"), per_category=100)
    assert student["train"]["single_object"] >= 0.75, student
    assert student["heldout"]["single_object"] >= 0.75, student
    assert main(["distill", "--teacher", str(tmp_path / "diffusion"), "--out", str(tmp_path / "guided"),
                 "method=guidance"]) == 0
    guided = evaluate(Text2ImagePipeline.from_pretrained(tmp_path / "guided"), per_category=100)
    assert min(guided["train"]["single_object"], guided["heldout"]["single_object"]) >= 0.8, guided
    assert judge_mean(guided) >= judge_mean(results) - 0.05, (guided, results)


def judge_mean(results: dict) -> float:
    """The mean of the shapes judge's cells, every category on both splits."""
    cells = [score for split in ("train", "heldout") for score in results[split].values()]
    return sum(cells) / len(cells)


class Seconds(float):
    """A stage config for the test trainers of test_shared_cores (which read it as seconds), with the step
    count that the quickstart prints."""
    train = type("Train", (), {"steps": 1})


def test_the_stage_still_training_side_by_side_takes_every_thread(tmp_path, two_threads):
    """Either stage may end first: here the text encoder outlasts the autoencoder and widens to 2 threads."""
    for name in ("autoencoder", "text_encoder"):
        (tmp_path / name).mkdir()
    quickstart.run_side_by_side(("autoencoder", sleeping_trainer, Seconds(0.5)),
                                ("text_encoder", thread_counting_trainer, Seconds(60.0)), tmp_path)
    assert (tmp_path / "text_encoder" / "threads.txt").read_text() == "1 2"


def failing_autoencoder_trainer(cfg, folder, resume=False):
    raise ValueError("the autoencoder failed")


def test_a_stage_failing_side_by_side_stops_the_other_at_once(tmp_path, monkeypatch, two_threads):
    def plan(root, quality=False):
        stages = tiny_plan(root, quality)
        text_encoder = apply_overrides(stages[1][2], ["train.steps=100000"])  # would run for many minutes
        return [("autoencoder", failing_autoencoder_trainer, stages[0][2]),
                ("text_encoder", quickstart.train_text_encoder, text_encoder), stages[2]]

    monkeypatch.setattr(quickstart, "quickstart_plan", plan)
    started = time.time()
    with pytest.raises(RuntimeError, match="autoencoder: training failed in its own process"):
        main(["quickstart", "--out", str(tmp_path)])
    assert time.time() - started < 60  # the text encoder's process was stopped, not waited for
