"""Bidirectional text attention (issue 15's second text-encoder lever, `model.causal=false`)."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from test_text_encoder import TINY
from tiny_stages import register_open_clip

from latentdiff.config import apply_overrides
from latentdiff.models.text_encoder import TextEncoder
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder

BIDIRECTIONAL = apply_overrides(TINY, {"causal": False})


def encoder(config) -> OpenCLIPTextEncoder:
    torch.manual_seed(0)
    return OpenCLIPTextEncoder(config).eval()


@pytest.mark.parametrize("causal", [True, False])
def test_only_bidirectional_attention_sees_later_tokens(causal):
    model = encoder(apply_overrides(TINY, {"causal": causal}))
    ids, mask = model.tokenize(["a red circle", "a red square"])  # differ in token 3 only
    assert torch.equal(ids[0, :3], ids[1, :3]) and ids[0, 3] != ids[1, 3]
    with torch.no_grad():
        states = model.encode_tokens(ids, mask).states  # (2, L, D)
    earlier_changed = not torch.allclose(states[0, :3], states[1, :3])  # start, 'a', 'red'
    assert earlier_changed == (not causal)
    assert not torch.allclose(states[0, 3], states[1, 3])  # the changed token itself, either way


def test_bidirectional_padding_is_masked_out():
    """Padding never reaches a prompt token, so cutting it (as training does) changes nothing."""
    model = encoder(BIDIRECTIONAL)
    ids, mask = model.tokenize(["a red circle", "two small green triangles on the left"])
    used = int(mask[0].sum())
    with torch.no_grad():
        full = model.encode_tokens(ids, mask)
        cut = model.encode_tokens(ids[:1, :used], mask[:1, :used])
        different_padding = model.encode_tokens(ids[:1].masked_fill(mask[:1] == 0, 7), mask[:1])
        torch.testing.assert_close(cut.states, full.states[:1, :used])
        torch.testing.assert_close(cut.pooled, full.pooled[:1])
        torch.testing.assert_close(different_padding.states[:, :used], full.states[:1, :used])
        _, text_features, _ = model(torch.zeros(2, 3, 16, 16), ids, mask)  # the training path
        torch.testing.assert_close(text_features, torch.nn.functional.normalize(full.pooled, dim=-1))


def test_causal_false_round_trips_and_old_folders_load_causal(tmp_path):
    model = encoder(BIDIRECTIONAL)
    model.save_pretrained(tmp_path / "bidirectional")
    copy = TextEncoder.from_pretrained(tmp_path / "bidirectional")
    assert copy.config.causal is False and copy.config == BIDIRECTIONAL
    with torch.no_grad():
        assert torch.equal(copy.encode(["a red circle"]).states, model.encode(["a red circle"]).states)

    encoder(TINY).save_pretrained(tmp_path / "old")  # a folder saved before the switch: no "causal" key
    config_file = tmp_path / "old" / "config.json"
    info = json.loads(config_file.read_text())
    del info["config"]["causal"]
    config_file.write_text(json.dumps(info))
    assert TextEncoder.from_pretrained(tmp_path / "old").config.causal is True


def test_a_pretrained_open_clip_file_loads_causal(tmp_path):
    """An OpenCLIP file was trained causal: it loads causal and matches open_clip's own (causal) encode_text."""
    register_open_clip(tmp_path, "latentdiff-test-causal-ViT")
    torch.manual_seed(1)
    model = open_clip.create_model("latentdiff-test-causal-ViT")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = TextEncoder.from_pretrained(tmp_path / "model.safetensors", open_clip_model="latentdiff-test-causal-ViT")
    assert loaded.config.causal is True
    ids = open_clip.tokenize(["a red circle above a blue square"], context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(["a red circle above a blue square"]).pooled, model.encode_text(ids))
