import pytest
import torch

from latentdiff.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from latentdiff.errors import CheckpointError
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian

TINY = dict(ch=8, norm_groups=4, num_res_blocks=1, resolution=16)


@pytest.mark.parametrize("ch_mult, z_channels, attn", [
    ((1,), 4, ()),
    ((1, 2), 4, (8,)),
    ((1, 2, 2), 3, (16, 4)),
    ((1, 1, 2, 2), 8, ()),
])
def test_encode_decode_shapes(ch_mult, z_channels, attn):
    cfg = AutoencoderConfig(ch_mult=ch_mult, z_channels=z_channels, attn_resolutions=attn, **TINY)
    model = AutoencoderKL(cfg)
    f = cfg.downsample_factor
    assert f == 2 ** (len(ch_mult) - 1)
    x = torch.randn(2, 3, 16, 24)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, z_channels, 16 // f, 24 // f)
    assert model.decode(posterior.sample()).shape == x.shape


def test_attention_levels_are_built_where_configured():
    model = AutoencoderKL(AutoencoderConfig(ch_mult=(1, 2), attn_resolutions=(8,), **TINY))
    assert len(model.encoder.down[0].attn) == 0 and len(model.encoder.down[1].attn) == 1
    assert len(model.decoder.up[1].attn) == 2 and len(model.decoder.up[0].attn) == 0


def test_size_not_multiple_of_factor_is_an_error():
    model = AutoencoderKL(AutoencoderConfig(ch_mult=(1, 2, 2), **TINY))
    with pytest.raises(ValueError, match="multiple of the latent factor 4"):
        model.encode(torch.randn(1, 3, 18, 16))


def test_diagonal_gaussian_kl_and_sampling():
    moments = torch.zeros(2, 8, 3, 3)  # mean 0, logvar 0: the prior itself
    post = DiagonalGaussian(moments)
    assert torch.allclose(post.kl(), torch.zeros(2))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(post.sample(g1), post.sample(g2))
    moments[:, :4] = 1.0
    assert torch.allclose(DiagonalGaussian(moments).kl(), torch.full((2,), 0.5 * 4 * 9))


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(ch_mult=(1, 2), scale_factor=0.7, **TINY)).eval()
    model.save_pretrained(tmp_path, metadata={"psnr": 31.0})
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.scale_factor == 0.7
    assert loaded.identity.metadata["psnr"] == 31.0
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(loaded.decode(loaded.encode(x).mode()), model.decode(model.encode(x).mode()))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_loading_is_strict_and_names_the_problem(tmp_path):
    AutoencoderKL(AutoencoderConfig(ch_mult=(1, 2), **TINY)).save_pretrained(tmp_path / "a")
    AutoencoderKL(AutoencoderConfig(ch_mult=(1, 2, 2), **TINY)).save_pretrained(tmp_path / "b")
    # weights of b with the config of a: a different architecture
    (tmp_path / "b" / CONFIG_NAME).write_text((tmp_path / "a" / CONFIG_NAME).read_text())
    with pytest.raises(CheckpointError, match="does not match the hash"):
        AutoencoderKL.from_pretrained(tmp_path / "b")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        AutoencoderKL.from_pretrained(tmp_path / "missing")
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        AutoencoderKL.from_pretrained(tmp_path / "a")


def test_mismatched_weights_are_refused_with_key_names(tmp_path):
    from latentdiff.checkpoint import save_model_files
    small = AutoencoderKL(AutoencoderConfig(ch_mult=(1, 2), **TINY))
    big = AutoencoderConfig(ch_mult=(1, 2, 2), **TINY)
    save_model_files(tmp_path, kind="autoencoder", config=big, state_dict=small.state_dict())
    with pytest.raises(CheckpointError, match=r"weights do not fit the model built from its config: missing keys \[decoder\."):
        AutoencoderKL.from_pretrained(tmp_path)


def test_sd_sized_preset_builds_and_runs(tmp_path):
    from latentdiff.config import load_config
    from latentdiff.train.autoencoder import AutoencoderTrainingConfig
    cfg = load_config(AutoencoderTrainingConfig, "configs/autoencoder/sd.yaml").model
    assert cfg.downsample_factor == 8 and cfg.ch_mult == (1, 2, 4, 4) and cfg.ch == 128
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # the SD 1.x/2.x VAE
    model = AutoencoderKL(cfg)  # a real forward pass on a small image
    with torch.no_grad():
        posterior = model.encode(torch.randn(1, 3, 64, 64))
        assert posterior.mean.shape == (1, 4, 8, 8)
        assert model.decode(posterior.mode()).shape == (1, 3, 64, 64)
