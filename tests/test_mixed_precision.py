"""train.mixed_precision: "auto" picks bf16 only where it is native; stages of different precisions train
in one process (the quickstart does), which accelerate's per-process setting would refuse."""
import torch
from test_train_autoencoder import tiny_config

from latentdiff.train.autoencoder import train_autoencoder
from latentdiff.train.loop import TrainConfig, TrainingRun
from latentdiff.train.optim import resolve_mixed_precision

CPU = torch.device("cpu")


def test_explicit_settings_pass_through():
    for setting in ("no", "fp16", "bf16"):
        assert resolve_mixed_precision(setting, CPU) == setting


def test_auto_is_bf16_only_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_mixed_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_mixed_precision("auto", CPU) == "no"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch without the probe
    assert resolve_mixed_precision("auto", CPU) == "no"


def test_run_autocast_follows_the_setting(tmp_path):
    a = torch.randn(4, 4)
    bf16 = TrainingRun(tmp_path / "bf16", TrainConfig(), TrainConfig(mixed_precision="bf16"))
    with bf16.autocast():
        assert (a @ a).dtype == torch.bfloat16
    fp32 = TrainingRun(tmp_path / "fp32", TrainConfig(), TrainConfig(mixed_precision="no"))
    with fp32.autocast():
        assert (a @ a).dtype == torch.float32


def test_bf16_and_fp32_stages_train_in_one_process(tmp_path):
    first = train_autoencoder(tiny_config("train.mixed_precision=bf16"), tmp_path / "bf16")
    second = train_autoencoder(tiny_config("train.mixed_precision=no"), tmp_path / "fp32")
    assert first["psnr"] > 0 and second["psnr"] > 0
