"""The cross-attention UNet: shapes, conditioning, masking, checkpointing, save/load, and equality with
diffusers' UNet2DConditionModel (test-only reference) in parameter count and, for tiny configs, output."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from latentdiff.checkpoint import CONFIG_NAME
from latentdiff.config import from_dict, to_dict
from latentdiff.convert.unet_keys import unet_key_map, unet_to_diffusers
from latentdiff.errors import CheckpointError, ConfigError
from latentdiff.models.attention import (Attention, BasicTransformerBlock, position_features, reusing_text_projections,
                                         written_out)
from latentdiff.models.unet import UNet, UNetConfig

CTX = 16  # context width of the tiny configs

TINY = {
    "one_level": UNetConfig(model_channels=16, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                            num_heads=2, context_dim=CTX, norm_groups=8),
    "two_levels_linear_head_dim": UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                             attention_levels=(1,), head_dim=8, transformer_depth=2,
                                             context_dim=CTX, use_linear_projection=True, norm_groups=8),
    "three_levels_per_level": UNetConfig(model_channels=8, channel_mult=(1, 2, 3), num_res_blocks=2,
                                         attention_levels=(0, 2), num_heads=(1, 2, 4),
                                         transformer_depth=(1, 2, 1), context_dim=CTX, norm_groups=4),
    "three_levels_no_attention": UNetConfig(model_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1,
                                            attention_levels=(), head_dim=(4, 4, 8), context_dim=CTX,
                                            norm_groups=4),
}

SD15 = UNetConfig(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                  num_heads=8, context_dim=768, use_linear_projection=False, norm_groups=32)
SD21 = UNetConfig(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                  head_dim=64, context_dim=1024, use_linear_projection=True, norm_groups=32, upcast_attention=True)


def randomized(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A UNet with every parameter random (the zero-initialised output layers would hide everything)."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def inputs(cfg: UNetConfig, batch: int = 2, size: tuple[int, int] = (8, 12), tokens: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    context = torch.randn(batch, tokens, cfg.context_dim, generator=gen)
    return x, t, context


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Shapes and the forward contract
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(name, batch):
    cfg = TINY[name]
    model = randomized(cfg)
    f = cfg.downsample_factor
    x, t, context = inputs(cfg, batch, size=(2 * f, 3 * f))
    with torch.no_grad():
        out = model(x, t, context)
    assert out.shape == (batch, cfg.out_channels, 2 * f, 3 * f)
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero_and_ldm_layout():
    cfg = TINY["three_levels_per_level"]
    model = UNet(cfg)
    x, t, context = inputs(cfg)
    assert torch.equal(model(x, t, context), torch.zeros_like(x))  # zero-initialised output conv, as ldm
    keys = set(model.state_dict())
    for key in ("time_embed.0.weight", "time_embed.2.weight", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.proj_in.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias", "input_blocks.3.0.op.weight",
                "middle_block.1.transformer_blocks.0.norm3.weight", "middle_block.2.out_layers.0.weight",
                "output_blocks.2.2.conv.weight", "output_blocks.0.0.skip_connection.weight", "out.0.weight",
                "out.2.weight"):
        assert key in keys, key
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in keys  # q/k/v have no bias


@pytest.mark.parametrize("upcast", [False, True])
def test_runs_in_bfloat16_close_to_float32(upcast):
    cfg = dataclasses.replace(TINY["two_levels_linear_head_dim"], upcast_attention=upcast)
    model = randomized(cfg)
    x, t, context = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, context)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_rejects_sizes_the_down_path_cannot_halve():
    cfg = TINY["three_levels_per_level"]
    x, t, context = inputs(cfg, size=(8, 6))
    with pytest.raises(ValueError, match="multiple of 4"):
        UNet(cfg)(x, t, context)


# ---------------------------------------------------------------------------------------------
# Conditioning: timestep and text
# ---------------------------------------------------------------------------------------------

def test_timestep_changes_output_and_continuous_and_scalar_t_work():
    cfg = TINY["two_levels_linear_head_dim"]
    model = randomized(cfg)
    x, _, context = inputs(cfg)
    with torch.no_grad():
        a = model(x, torch.tensor([10.0, 10.0]), context)
        b = model(x, torch.tensor([11.0, 11.0]), context)
        c = model(x, torch.tensor([10.25, 10.25]), context)
        scalar = model(x, 10.0, context)
        scalar_tensor = model(x, torch.tensor(10.0), context)
        integer = model(x, torch.tensor([10, 10]), context)
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-4)
    assert torch.isfinite(c).all()
    torch.testing.assert_close(scalar, a)
    torch.testing.assert_close(scalar_tensor, a)
    torch.testing.assert_close(integer, a)


def test_each_sample_gets_its_own_timestep():
    cfg = TINY["one_level"]
    model = randomized(cfg)
    x, _, context = inputs(cfg)
    x, context = x[:1].expand(2, -1, -1, -1), context[:1].expand(2, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([5.0, 700.0]), context)
        single = model(x[:1], torch.tensor([700.0]), context[:1])
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    torch.testing.assert_close(out[1:], single)


@pytest.mark.parametrize("name", ["one_level", "three_levels_no_attention"])
def test_cross_attention_reads_the_context(name):
    cfg = TINY[name]  # the second has a transformer only in the middle block
    model = randomized(cfg)
    x, t, context = inputs(cfg)
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x, t, context + torch.randn_like(context))
    assert not torch.allclose(a, b, atol=1e-4)


def test_context_mask_hides_padded_tokens():
    cfg = TINY["three_levels_per_level"]
    model = randomized(cfg)
    x, t, context = inputs(cfg, tokens=6)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    changed = context.clone()
    changed[1, 3:] = torch.randn(3, cfg.context_dim)
    with torch.no_grad():
        a = model(x, t, context, mask)
        b = model(x, t, changed, mask)
        unmasked = model(x, t, changed)
        all_true = model(x, t, context, torch.ones(2, 6, dtype=torch.bool))
        plain = model(x, t, context)
    torch.testing.assert_close(a, b)  # padded tokens of sample 1 are invisible
    assert not torch.allclose(b[1], unmasked[1], atol=1e-4)  # ... and without the mask they count
    torch.testing.assert_close(all_true, plain)


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    cfg = TINY["three_levels_per_level"]
    x, t, context = inputs(cfg)
    results = []
    for enabled in (False, True):
        model = randomized(cfg).train()
        model.enable_gradient_checkpointing(enabled)
        ctx = context.clone().requires_grad_(True)
        out = model(x, t, ctx)
        (out ** 2).mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}, ctx.grad))
    (out0, grads0, ctx0), (out1, grads1, ctx1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(ctx1, ctx0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert grads0[name] is not None, name
        torch.testing.assert_close(grads1[name], grads0[name], msg=name)
    assert "gradient_checkpointing" not in to_dict(cfg)  # a runtime switch, not architecture


# ---------------------------------------------------------------------------------------------
# Position embedding (lever of issue 15)
# ---------------------------------------------------------------------------------------------

def test_position_features_name_each_place_by_its_image_fraction():
    feats = position_features(4, 6, 18)  # 18 channels: 4 frequencies per quarter, 2 zero channels
    assert feats.shape == (24, 18) and torch.equal(feats[:, 16:], torch.zeros(24, 2))
    grid = feats.reshape(4, 6, 18)
    assert torch.equal(grid[:, :1, :8].expand(4, 6, 8), grid[..., :8])  # the row quarters vary with y only
    assert torch.equal(grid[:1, :, 8:16].expand(4, 6, 8), grid[..., 8:16])  # the column quarters with x only
    assert (grid[1:, 0, 4] < grid[:-1, 0, 4]).all() and (grid[0, 1:, 12] < grid[0, :-1, 12]).all()  # cos(pi u)
    assert len({tuple(row.tolist()) for row in feats}) == 24  # every place its own
    # a place is a fraction of the image: the centre of a 1x1 map is the centre cell of a 3x3 one
    torch.testing.assert_close(position_features(1, 1, 8), position_features(3, 3, 8)[4:5])


def test_position_embedding_tells_places_apart_without_new_weights():
    cfg = TINY["one_level"]
    plain, placed = randomized(cfg), randomized(dataclasses.replace(cfg, position_embedding=True))
    assert plain.state_dict().keys() == placed.state_dict().keys()  # the SD layout, no extra weights
    placed.load_state_dict(plain.state_dict())
    x = torch.ones(1, cfg.in_channels, 8, 8)  # the same value everywhere: only the borders differ
    _, t, context = inputs(cfg, batch=1)
    block = placed.input_blocks[1][1]  # the level-0 spatial transformer, alone: it sees no borders
    flat = torch.randn(1, block.norm.num_channels, 1, 1).expand(1, -1, 8, 8)
    with torch.no_grad():
        block.position_embedding = False
        assert torch.allclose(block(flat, context), block(flat, context)[..., :1, :1].expand(1, -1, 8, 8))
        block.position_embedding = True
        out = block(flat, context)
        assert not torch.allclose(out[..., 0, 0], out[..., 7, 7], atol=1e-3)
        assert not torch.allclose(placed(x, t, context), plain(x, t, context), atol=1e-4)


def test_reused_text_projections_are_made_once_per_context_and_give_the_same_output():
    cfg = TINY["three_levels_per_level"]
    model = randomized(cfg)
    x, t, context = inputs(cfg)
    calls = []
    for block in model.modules():
        if isinstance(block, BasicTransformerBlock):
            block.attn2.to_k.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        plain = [model(x, t, context), model(x * 0.5, t, context)]
        layers = len(calls) // 2
        calls.clear()
        with reusing_text_projections(model):
            reused = [model(x, t, context), model(x * 0.5, t, context)]
            assert len(calls) == layers  # the second call projected no text
            context.mul_(2.0)  # the same tensor, changed: projected again
            changed = model(x, t, context)
            assert len(calls) == 2 * layers
        model(x, t, context)
        assert len(calls) == 3 * layers  # outside the block nothing is kept
        reference = model(x, t, context)
    for a, b in zip(reused, plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(changed, reference, atol=0, rtol=0)


def test_small_attention_at_inference_is_written_out_and_equals_the_fused_kernel():
    attn = Attention(32, 4, context_dim=16)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(3, 64, 32, generator=gen), torch.randn(3, 10, 16, generator=gen)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 4:] = False
    heads = torch.empty(3, 4, 64, 8), torch.empty(3, 4, 10, 8)  # (B, heads, N or L, d)
    with torch.no_grad():
        assert written_out(*heads)  # 64 queries x 10 keys
        assert not written_out(torch.empty(1, 8, 4096, 40), torch.empty(1, 8, 77, 40))  # SD 1.5 at 512 px: fused
        plain = attn(x, context, mask)
    assert not written_out(*heads)  # with gradients: the fused kernel
    torch.testing.assert_close(plain, attn(x, context, mask).detach(), atol=1e-6, rtol=1e-5)


def test_a_self_conditioned_unet_reads_its_estimate_beside_x():
    cfg = dataclasses.replace(TINY["one_level"], self_condition=True)
    model = randomized(cfg)
    assert model.input_blocks[0][0].weight.shape[1] == 2 * cfg.in_channels
    x, t, context = inputs(cfg)
    with torch.no_grad():
        first = model(x, t, context)
        torch.testing.assert_close(first, model(x, t, context, x0_estimate=torch.zeros_like(x)), atol=0, rtol=0)
        assert not torch.allclose(first, model(x, t, context, x0_estimate=torch.randn_like(x)), atol=1e-4)
        with pytest.raises(ValueError, match="self_condition"):
            randomized(TINY["one_level"])(x, t, context, x0_estimate=x)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def test_config_heads_per_level_and_yaml_lists():
    assert [SD15.heads(level) for level in range(4)] == [8, 8, 8, 8]
    assert [SD21.heads(level) for level in range(4)] == [5, 10, 20, 20]
    cfg = from_dict(UNetConfig, {"num_heads": [1, 2], "transformer_depth": [1, 3], "channel_mult": [1, 2],
                                 "model_channels": 32})
    assert cfg.num_heads == (1, 2) and cfg.depth(1) == 3
    assert from_dict(UNetConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize("changes, message", [
    ({"attention_levels": (2,)}, "attention_levels"),
    ({"num_heads": (2, 2, 2)}, "one entry per level"),
    ({"num_heads": 3}, "heads"),
    ({"head_dim": 48}, "head_dim"),
    ({"norm_groups": 24}, "norm_groups"),
    ({"transformer_depth": 0}, "transformer_depth"),
    ({"channel_mult": ()}, "channel_mult"),
])
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        UNetConfig(**changes)


# ---------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# ---------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    cfg = TINY["three_levels_per_level"]
    model = randomized(cfg, seed=3)
    model.save_pretrained(tmp_path / "unet", metadata={"prediction_type": "eps"})
    loaded = UNet.from_pretrained(tmp_path / "unet")
    assert loaded.config == cfg and loaded.identity.metadata == {"prediction_type": "eps"}
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    x, t, context = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context), model(x, t, context))


def test_load_refuses_weights_of_another_architecture(tmp_path):
    randomized(TINY["one_level"]).save_pretrained(tmp_path / "unet")
    path = tmp_path / "unet" / CONFIG_NAME
    info = json.loads(path.read_text())
    info["config"]["use_linear_projection"] = True  # conv (C, C, 1, 1) weights no longer fit Linear (C, C)
    path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        UNet.from_pretrained(tmp_path / "unet")


# ---------------------------------------------------------------------------------------------
# Against diffusers (test-only reference)
# ---------------------------------------------------------------------------------------------

def diffusers_unet(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel with the architecture of `cfg` (random weights, on the current device)."""
    from diffusers import UNet2DConditionModel

    levels = range(len(cfg.channel_mult))
    down = tuple("CrossAttnDownBlock2D" if lvl in cfg.attention_levels else "DownBlock2D" for lvl in levels)
    up = tuple("CrossAttnUpBlock2D" if lvl in cfg.attention_levels else "UpBlock2D" for lvl in reversed(levels))
    return UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(cfg.width(lvl) for lvl in levels), layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_groups, cross_attention_dim=cfg.context_dim,
        # diffusers' `attention_head_dim` is, for these UNets, the number of heads
        attention_head_dim=tuple(cfg.heads(lvl) for lvl in levels),
        transformer_layers_per_block=tuple(cfg.depth(lvl) for lvl in levels),
        use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention)


@pytest.mark.parametrize("name", sorted(TINY))
def test_matches_diffusers_tiny(name):
    """Same parameter count, same parameter shapes under a renaming, and the same output."""
    cfg = TINY[name]
    ours = randomized(cfg)
    torch.manual_seed(0)
    theirs = diffusers_unet(cfg).eval()
    assert count(ours) == count(theirs)
    own, reference = ours.state_dict(), theirs.state_dict()
    names = unet_key_map(cfg)  # ours -> diffusers (the library's conversion table)
    assert names.keys() == own.keys() and sorted(names.values()) == sorted(reference)
    assert all(reference[names[k]].shape == own[k].shape for k in own)
    theirs.load_state_dict(unet_to_diffusers(own, cfg), strict=True)

    x, t, context = inputs(cfg, size=(cfg.downsample_factor * 2, cfg.downsample_factor * 3), tokens=6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        for m in (None, mask):
            ref = theirs(x, t, context, encoder_attention_mask=None if m is None else m.float()).sample
            torch.testing.assert_close(ours(x, t, context, m), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg, expected", [(SD15, 859_520_964), (SD21, None)], ids=["sd15", "sd21"])
def test_sd_sized_unets_on_meta(cfg, expected):
    """SD 1.5 / 2.x architectures: built without memory, the forward shape, and diffusers' parameter count."""
    from accelerate import init_empty_weights

    with torch.device("meta"):
        model = UNet(cfg)
        out = model(torch.empty(2, 4, 64, 48), torch.empty(2), torch.empty(2, 77, cfg.context_dim))
    assert out.shape == (2, 4, 64, 48) and out.device.type == "meta"
    with init_empty_weights():
        reference = diffusers_unet(cfg)
    assert count(model) == count(reference)
    if expected is not None:
        assert count(model) == expected
