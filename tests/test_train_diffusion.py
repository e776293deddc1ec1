"""Stage-3 training end to end on tiny stages: resume after a kill, the latent cache, what the UNet records."""
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_check import kill_then_resume
from tiny_stages import save_autoencoder, save_text_encoder, tiny_training_config

from latentdiff.checkpoint import weights_hash
from latentdiff.cli import main
from latentdiff.config import apply_overrides, load_config, to_dict
from latentdiff.errors import CheckpointError, ConfigError
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder
from latentdiff.models.unet import UNet
from latentdiff.pipeline import Text2ImagePipeline
from latentdiff.train.diffusion import DiffusionTrainingConfig, train_diffusion


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return save_autoencoder(root / "autoencoder"), save_text_encoder(root / "text_encoder")


def count_calls(monkeypatch, cls, name):
    calls = []
    real = getattr(cls, name)

    def counting(self, *args, **kwargs):
        calls.append(len(args[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counting)
    return calls


def test_killed_run_resumes_to_the_same_weights(frozen, tmp_path, monkeypatch):
    cfg = tiny_training_config(*frozen, "train.ema_decay=0.9", "train.grad_accum=2", "objective.weighting=min_snr",
                               f"cache_dir={tmp_path / 'cache'}")
    train_diffusion(cfg, tmp_path / "straight")

    kill_then_resume(train_diffusion, cfg, tmp_path / "killed", monkeypatch)

    straight, resumed = UNet.from_pretrained(tmp_path / "straight"), UNet.from_pretrained(tmp_path / "killed")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.identity.metadata["step"] == 6
    rows = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert sorted(p.name for p in (tmp_path / "killed" / "samples").iterdir()) == ["preview-0000003.png",
                                                                                   "preview-0000006.png"]


def test_unet_records_what_it_was_trained_with(frozen, tmp_path):
    ae, te = frozen
    cfg = tiny_training_config(ae, te, "objective.prediction=v", "sampling.guidance_scale=2.5", "train.steps=2",
                               "text_layer=penultimate")
    train_diffusion(cfg, tmp_path / "run")
    meta = UNet.from_pretrained(tmp_path / "run").identity.metadata
    assert meta["stages"]["autoencoder"]["weights_hash"] == weights_hash(ae)
    assert meta["stages"]["autoencoder"]["path"] == str(ae)
    assert (tmp_path / "run" / meta["stages"]["autoencoder"]["relative_path"]).resolve() == ae.resolve()
    assert meta["stages"]["autoencoder"]["scale_factor"] == AutoencoderKL.from_pretrained(ae).config.scale_factor == 0.8
    assert meta["stages"]["text_encoder"]["weights_hash"] == weights_hash(te)
    assert meta["stages"]["text_encoder"]["width"] == 32
    assert meta["stages"]["text_encoder"]["output_layer"] == "penultimate"
    assert meta["prediction"] == "v"
    assert meta["schedule"] == to_dict(cfg.schedule)
    assert meta["sampling"] == to_dict(cfg.sampling) and meta["sampling"]["guidance_scale"] == 2.5
    assert meta["image_size"] == 16 and meta["step"] == 2
    # the run folder is a pipeline: the UNet's metadata leads to the other two stages
    pipe = Text2ImagePipeline.from_pretrained(tmp_path / "run")
    assert pipe.record.prediction == "v" and pipe.sampling.guidance_scale == 2.5
    assert pipe.text_encoder.output_layer == "penultimate"  # read out where the UNet learned to read it
    assert pipe("a red circle", seed=0, output_type="np").images.shape == (1, 16, 16, 3)


def test_a_self_conditioned_unet_trains_and_samples_but_is_not_grounded_distilled_or_exported(frozen, tmp_path):
    from latentdiff.convert import save_pipeline
    from latentdiff.train.distill import DistillConfig, distill

    cfg = tiny_training_config(*frozen, "model.self_condition=true", "train.steps=2")
    train_diffusion(cfg, tmp_path / "run")
    pipe = Text2ImagePipeline.from_pretrained(tmp_path / "run")
    assert pipe.unet.config.self_condition and pipe.denoiser.fresh() is not pipe.denoiser
    first = pipe("a red circle", seed=0, output_type="np").images
    assert first.shape == (1, 16, 16, 3) and np.array_equal(first, pipe("a red circle", seed=0, output_type="np").images)
    with pytest.raises(ConfigError, match="self_condition"):
        tiny_training_config(*frozen, "model.self_condition=true", "objective.grounding_weight=0.1")
    with pytest.raises(ConfigError, match="self-conditioned"):
        distill(apply_overrides(DistillConfig(), [f"teacher={tmp_path / 'run'}"]), tmp_path / "student")
    with pytest.raises(CheckpointError, match="model.self_condition"):
        save_pipeline(pipe, tmp_path / "exported", to="diffusers")


def test_cache_is_reused_and_rebuilt_when_an_encoder_changes(frozen, tmp_path, monkeypatch):
    ae, te = frozen
    cache_dir = tmp_path / "cache"
    cfg = tiny_training_config(ae, te, "train.steps=1", f"cache_dir={cache_dir}")
    image_calls = count_calls(monkeypatch, AutoencoderKL, "encode")
    text_calls = count_calls(monkeypatch, OpenCLIPTextEncoder, "encode")

    train_diffusion(cfg, tmp_path / "first")
    assert sum(image_calls) == 24 and text_calls  # every sample encoded once; preview prompts come after
    first = sorted(cache_dir.iterdir())
    assert len(first) == 1 and (first[0] / "cache.json").is_file()
    mtime = (first[0] / "part-00000.safetensors").stat().st_mtime_ns

    image_calls.clear()
    text_calls.clear()
    train_diffusion(apply_overrides(cfg, {"preview_images": 0}), tmp_path / "second")
    assert image_calls == [] and text_calls == []  # nothing re-encoded
    assert (first[0] / "part-00000.safetensors").stat().st_mtime_ns == mtime

    other_te = save_text_encoder(tmp_path / "other_text_encoder", seed=1)
    cfg_other = tiny_training_config(ae, other_te, "train.steps=1", f"cache_dir={cache_dir}", "preview_images=0")
    train_diffusion(cfg_other, tmp_path / "third")
    assert sum(image_calls) == 24
    assert len(list(cache_dir.iterdir())) == 2  # a new cache beside the old one


def test_cache_matches_the_encoders(frozen, tmp_path):
    from latentdiff.data import ShapesDataset
    from latentdiff.train.latent_cache import LatentCache

    ae, te = frozen
    train_diffusion(tiny_training_config(ae, te, "train.steps=1", "preview_images=0"), tmp_path / "run")
    (folder,) = (tmp_path / "latent_cache").iterdir()  # default: latent_cache/ beside the run folder
    cache = LatentCache(folder)
    autoencoder, text_encoder = AutoencoderKL.from_pretrained(ae), OpenCLIPTextEncoder.from_latentdiff_folder(te)
    items = [ShapesDataset(size=16, length=24)[i] for i in (0, 7)]
    with torch.no_grad():
        posterior = autoencoder.encode(torch.stack([it["image"] for it in items]))
        encoding = text_encoder.encode([it["caption"] for it in items])
    cached = torch.utils.data.default_collate([cache[0], cache[7]])
    torch.testing.assert_close(cached["mean"], posterior.mean)
    torch.testing.assert_close(cached["std"], posterior.std)
    states, mask = cached["states"], cached["mask"]
    length = mask.shape[1]
    assert not encoding.mask[:, length:].any()  # only padding was cut
    assert torch.equal(mask, encoding.mask[:, :length].bool())
    torch.testing.assert_close(states[mask], encoding.states[:, :length][mask], atol=2e-3, rtol=1e-3)  # float16
    assert cache.uncond_mask.sum() == 2  # the empty prompt: start and end tokens


def test_resume_with_another_stage_is_refused(frozen, tmp_path):
    ae, te = frozen
    cfg = tiny_training_config(ae, te, "train.steps=2", "preview_images=0")
    train_diffusion(cfg, tmp_path / "run")
    other_ae = save_autoencoder(tmp_path / "other_ae", seed=3)
    cfg = tiny_training_config(other_ae, te, "train.steps=4", "preview_images=0")
    with pytest.raises(CheckpointError, match=f"trained with autoencoder {weights_hash(ae)}"):
        train_diffusion(cfg, tmp_path / "run", resume=True)


def test_cli_trains_and_resumes(frozen, tmp_path):
    ae, te = frozen
    out = str(tmp_path / "run")
    args = ["--autoencoder", str(ae), "--text-encoder", str(te), "--out", out, "--steps", "2", "preview_images=0",
            "data.size=16", "data.length=8", "train.batch_size=2", "model.model_channels=16", "model.num_heads=2",
            "model.channel_mult=[1,2]", "model.attention_levels=[1]", "model.norm_groups=8", "model.context_dim=32"]
    assert main(["train-diffusion", *args]) == 0
    # --resume takes the stages and config from the run's own train_config.yaml
    assert main(["train-diffusion", "--out", out, "--steps", "3", "--resume"]) == 0
    assert UNet.from_pretrained(out).identity.metadata["step"] == 3


def test_cli_errors_are_one_line(frozen, tmp_path, capsys):
    ae, te = frozen
    assert main(["train-diffusion", "--out", str(tmp_path / "a"), "--text-encoder", str(te)]) == 2
    assert "needs the trained autoencoder: --autoencoder DIR" in capsys.readouterr().err
    code = main(["train-diffusion", "--autoencoder", str(ae), "--text-encoder", str(te), "--out",
                 str(tmp_path / "b"), "data.size=16", "model.context_dim=64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "makes states 32 wide; set model.context_dim=32" in err
    assert not (tmp_path / "b").exists()  # refused before a run folder was made
    code = main(["train-diffusion", "--autoencoder", str(ae), "--text-encoder", str(te), "--out",
                 str(tmp_path / "c"), "model.context_dim=32", "data.size=18"])
    assert code == 2 and "data.size 18 is not a multiple of 4" in capsys.readouterr().err
    code = main(["train-diffusion", "--autoencoder", str(ae), "--text-encoder", str(te), "--out",
                 str(tmp_path / "d"), "model.context_dim=32", "sampling.sampler=plms"])
    assert code == 2 and "unknown sampler 'plms'" in capsys.readouterr().err


def test_shapes_preset_file_is_the_dataclass_defaults():
    preset = Path(__file__).resolve().parent.parent / "configs" / "diffusion" / "shapes.yaml"
    assert load_config(DiffusionTrainingConfig, preset) == DiffusionTrainingConfig()
