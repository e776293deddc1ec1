"""The grounding lever of issue 15: the loss on hand-made attention, the training-only attention recording,
the masks and word tokens of the shapes data and their latent cache, and a tiny training run."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_stages import (
    TINY_AE,
    TINY_TEXT,
    save_autoencoder,
    save_text_encoder,
    tiny_training_config,
    unet_config,
)

from latentdiff.config import apply_overrides
from latentdiff.data import ShapesDataset
from latentdiff.data.shapes import render_sample
from latentdiff.data.shapes_captions import object_word_spans
from latentdiff.data.shapes_grounding import GROUPS, ShapesGrounding, token_groups
from latentdiff.data.sources import DataConfig
from latentdiff.diffusion.grounding import grounding_loss
from latentdiff.errors import ConfigError
from latentdiff.models.attention import Attention, recording_cross_attention
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder
from latentdiff.models.unet import UNet
from latentdiff.train.diffusion import DiffusionTrainingConfig, train_diffusion
from latentdiff.train.latent_cache import cache_key, load_or_build_cache


def attention_on(cells: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """(1, heads, N, L) probabilities: token l's attention spread evenly over the cells where cells[:, l]."""
    probs = cells.float() / cells.float().sum(0, keepdim=True)  # (N, L)
    return probs[None, None].expand(1, heads, *probs.shape)


def test_grounding_loss_is_zero_on_the_mask_and_positive_off_it():
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :2] = True  # object 0 top left, object 1 bottom right
    masks[0, 1, 2:, 2:] = True
    tokens = torch.zeros(1, 3, 2, dtype=torch.bool)
    tokens[0, 1, 0] = tokens[0, 2, 1] = True  # token 1 names object 0, token 2 object 1; token 0 names none
    cells = torch.stack([torch.ones(16, dtype=torch.bool), masks[0, 0].flatten(), masks[0, 1].flatten()], 1)
    assert grounding_loss([attention_on(cells)], tokens, masks).item() == 0.0
    # half of object 0's attention on the top right: 0.5 lost of 2 tokens
    off = cells.clone()
    off[:, 1] = masks[0, 0].flatten() | torch.tensor([0, 0, 1, 1] * 2 + [0] * 8, dtype=torch.bool)
    assert grounding_loss([attention_on(off)], tokens, masks).item() == pytest.approx(0.25)
    swapped = cells[:, [0, 2, 1]]  # each word on the other object
    assert grounding_loss([attention_on(swapped)], tokens, masks).item() == pytest.approx(1.0)
    # a coarser layer sees the masks max-pooled (2x2: one cell each); min_size leaves it out
    coarse = torch.eye(4, dtype=torch.bool)[:, [0, 0, 3]]
    assert grounding_loss([attention_on(coarse)], tokens, masks).item() == 0.0
    assert grounding_loss([attention_on(swapped), attention_on(coarse)], tokens, masks, 4).item() == 1.0
    assert grounding_loss([attention_on(swapped)], tokens & False, masks).item() == 0.0  # nothing named


def test_grounding_loss_pulls_attention_onto_the_mask():
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[:, 0, 1:3, 1:3] = True
    tokens = torch.ones(2, 1, 1, dtype=torch.bool)
    logits = torch.zeros(2, 1, 16, 1, requires_grad=True)
    grounding_loss([logits.softmax(2)], tokens, masks).backward()
    inside = masks.flatten(1)[0]
    assert (logits.grad[:, 0, inside] < 0).all() and (logits.grad[:, 0, ~inside] > 0).all()


def test_attention_records_only_inside_the_block():
    torch.manual_seed(0)
    unet = UNet(unet_config(attention_levels=(0, 1))).eval()
    for param in unet.parameters():
        if param.ndim > 1 and not param.any():  # zero-initialised outputs would hide the attention
            torch.nn.init.normal_(param, std=0.05)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        before = unet(x, t, context, mask)
        with recording_cross_attention(unet) as maps:
            recorded = unet(x, t, context, mask)
        after = unet(x, t, context, mask)
    assert torch.equal(before, after)  # off: the SDPA path, bit for bit
    assert all(m.attn2.record is None for m in unet.modules() if hasattr(m, "attn2"))
    torch.testing.assert_close(recorded, before, rtol=1e-4, atol=1e-5)  # on: the same attention, written out
    assert sorted(m.shape[2] for m in maps) == [16] * 4 + [64] * 3  # (B, heads, N, L): down, middle, up
    for probs in maps:
        assert probs.shape[::3] == (2, 5) and probs[0, :, :, 3:].eq(0).all()  # padding gets nothing
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
    unet.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="checkpointing"), recording_cross_attention(unet):
        pass


def test_attention_stops_recording_after_an_error():
    layer = Attention(8, 2, context_dim=4)
    with pytest.raises(RuntimeError), recording_cross_attention(torch.nn.Sequential(layer)):
        raise RuntimeError
    assert layer.record is None


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return OpenCLIPTextEncoder(TINY_TEXT).eval()


def test_shapes_masks_and_word_tokens(text_encoder):
    data = ShapesGrounding(ShapesDataset(size=32, paraphrase=0.5))
    items = [data[i] for i in range(30)]
    groups = token_groups(text_encoder.tokenize, [it["caption"] for it in items],
                          torch.stack([it["object_spans"] for it in items]))
    ids = text_encoder.tokenize([it["caption"] for it in items]).ids
    for i, item in enumerate(items):
        sample = data.dataset.sample(i)
        pixels = torch.from_numpy(np.array(render_sample(sample))).permute(2, 0, 1)  # (3, H, W) uint8
        painted = (pixels != 255).any(0)  # touched at all
        inside = torch.zeros_like(painted)  # wholly covered: exactly an object's colour
        for obj in sample.objects:
            inside |= (pixels == torch.tensor(obj.rgb, dtype=torch.uint8)[:, None, None]).all(0)
        union = item["object_masks"].amax(0).bool()
        assert inside.any() and not (inside & ~union).any() and not (union & ~painted).any()
        named = 1 if sample.kind == "count" else len(sample.objects)
        assert item["object_masks"][:named].flatten(1).any(1).all() and not item["object_masks"][named:].any()
        spans = object_word_spans(sample)
        for g, obj in enumerate(sample.objects[:named]):
            words = text_encoder.tokenizer.decode(ids[i, groups[i, :, g]].tolist())
            (c0, c1), (s0, s1) = spans[g]
            assert words.replace(" ", "") == (item["caption"][c0:c1] + item["caption"][s0:s1]).replace(" ", "")
            if sample.kind == "pair":  # mask g is object g's, the one the caption names g-th
                x0, y0, x1, y1 = obj.box
                assert item["object_masks"][g, y0:y1, x0:x1].sum() == item["object_masks"][g].sum()
        assert not groups[i, :, named:].any()


def test_latent_cache_holds_the_grounding(text_encoder, tmp_path):
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(TINY_AE).eval()
    data = ShapesGrounding(ShapesDataset(size=16, length=6, paraphrase=1.0))
    cache = load_or_build_cache(tmp_path, data, {"test": 1}, autoencoder, text_encoder, shard_size=4, batch_size=3,
                                progress=False, log=lambda _: None)
    for i in range(6):
        item, truth = cache[i], data[i]
        assert item["ground_masks"].shape == (GROUPS, 8, 8) and item["ground_tokens"].shape == (cache.tokens, GROUPS)
        assert torch.equal(item["ground_masks"], F.max_pool2d(truth["object_masks"], 2) > 0)
        expected = token_groups(text_encoder.tokenize, [truth["caption"]], truth["object_spans"][None])[0]
        assert torch.equal(item["ground_tokens"], expected[:cache.tokens])
        assert not (item["ground_tokens"] & ~item["mask"][:, None]).any()
    # the key: grounding and levers only when on, so that caches built without them are still found
    key = cache_key(DataConfig(), ShapesDataset(length=3), "ae", "te", text_encoder)
    assert "grounding" not in key and sorted(key["data"]) == sorted(
        ["source", "size", "length", "seed", "crop", "flip", "background"])
    on = cache_key(DataConfig(paraphrase=0.5), ShapesDataset(length=3), "ae", "te", text_encoder, grounding=True)
    assert on["grounding"] and on["data"]["paraphrase"] == 0.5 and "multi_object_weight" not in on["data"]


def test_training_with_grounding_logs_its_loss(tmp_path):
    ae, te = save_autoencoder(tmp_path / "ae"), save_text_encoder(tmp_path / "te")
    cfg = tiny_training_config(ae, te, "objective.grounding_weight=0.5", "train.steps=2", "train.sample_every=2",
                               "data.multi_object_weight=3", "data.paraphrase=0.5", "model.attention_levels=[0,1]")
    train_diffusion(cfg, tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "grounding_loss" and len(rows) == 3
    losses = [float(r.split(",")[-1]) for r in rows[1:]]
    assert all(0 < g <= 1 for g in losses)
    assert (tmp_path / "run" / "samples" / "preview-0000002.png").exists()  # sampling records nothing
    index = json.loads(next((tmp_path / "latent_cache").glob("*/cache.json")).read_text())
    assert index["key"]["grounding"] is True
    off = tiny_training_config(ae, te, "train.steps=2", "train.sample_every=2")
    train_diffusion(off, tmp_path / "off")
    assert "grounding" not in (tmp_path / "off" / "metrics.csv").read_text()


def test_grounding_waits_for_its_start_step(tmp_path):
    """Before objective.grounding_start a step is a plain denoising step: the weights after it are those of a
    run without grounding; from that step on the grounding loss is logged (and changes the weights)."""
    ae, te = save_autoencoder(tmp_path / "ae"), save_text_encoder(tmp_path / "te")
    common = ["train.steps=3", "train.sample_every=100", "model.attention_levels=[0,1]", "train.ema_decay=0"]
    runs = {}
    for name, extra in (("plain", []), ("late", ["objective.grounding_weight=0.5", "objective.grounding_start=2"]),
                        ("never", ["objective.grounding_weight=0.5", "objective.grounding_start=3"])):
        train_diffusion(tiny_training_config(ae, te, *common, *extra, f"cache_dir={tmp_path / 'cache'}"),
                        tmp_path / name)
        runs[name] = UNet.from_pretrained(tmp_path / name).state_dict()
    assert all(torch.equal(runs["never"][k], v) for k, v in runs["plain"].items())
    assert any(not torch.equal(runs["late"][k], v) for k, v in runs["plain"].items())
    rows = [r.split(",") for r in (tmp_path / "late" / "metrics.csv").read_text().splitlines()]
    assert rows[0][-1] == "grounding_loss" and [r[-1] != "" for r in rows[1:]] == [False, False, True]


def test_grounding_needs_the_shapes_data():
    with pytest.raises(ConfigError, match="grounding"):
        apply_overrides(DiffusionTrainingConfig(), ["objective.grounding_weight=1", "data.source=photos/"])
    with pytest.raises(ConfigError, match="grounding_weight"):
        apply_overrides(DiffusionTrainingConfig(), ["objective.grounding_weight=-1"])
