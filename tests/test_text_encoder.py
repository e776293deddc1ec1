"""The TextEncoder interface over its three backends, checked against open_clip and transformers called directly.

Every model here is tiny and random; nothing is downloaded (sockets are blocked for the whole module).
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402
from open_clip.tokenizer import default_bpe  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_stages import register_open_clip  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from latentdiff.checkpoint import save_model_files  # noqa: E402
from latentdiff.config import ConfigError, apply_overrides  # noqa: E402
from latentdiff.errors import CheckpointError  # noqa: E402
from latentdiff.eval import clip_score, distinct_caption_batches, retrieval_accuracy  # noqa: E402
from latentdiff.data.shapes_fit import shapes_caption_fits  # noqa: E402
from latentdiff.models.text_encoder import PromptTruncatedWarning, TextEncoder, TextEncoderConfig  # noqa: E402
from latentdiff.models.text_encoder_hf import HFCLIPTextEncoder  # noqa: E402
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder  # noqa: E402

PROMPTS = ["a red circle", "", "a big blue square on the left of a small green triangle"]
LONG_PROMPT = " ".join(["red"] * 30)  # 30 words, 1 token each: 32 tokens with start and end
TINY_OPEN_CLIP = "latentdiff-test-tiny-ViT"  # registered with open_clip below, as a user would a custom model
TINY = TextEncoderConfig(context_length=16, width=32, layers=3, heads=2, embed_dim=24, image_size=16, patch_size=8,
                         vision_width=32, vision_layers=1, vision_head_width=16)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a text-encoder test tried to open a network connection")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- fixtures: one tiny model per backend, saved the way users have them --------------------------

def write_clip_tokenizer(folder, max_length: int) -> None:
    """A transformers CLIPTokenizer with the real CLIP BPE (taken from open_clip's bundled file)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = open_clip.SimpleTokenizer().encoder
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in encoder.items()}))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length).save_pretrained(str(folder))


def tiny_text_config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=24, **kw)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A latentdiff folder written by save_pretrained."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ours") / "text_encoder"
    OpenCLIPTextEncoder(TINY).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    """A tiny OpenCLIP model saved as a weights file (safetensors; pickles: test_weights_pickle.py), its
    architecture registered under a name."""
    folder = tmp_path_factory.mktemp("open_clip")
    register_open_clip(folder, TINY_OPEN_CLIP)
    register_open_clip(folder, f"{TINY_OPEN_CLIP}-wide", text_width=64)  # another architecture, for the mismatch test
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_OPEN_CLIP)
    torch.nn.init.normal_(model.text_projection, std=0.2)  # non-trivial everywhere
    path = folder / "open_clip_model.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def hf_text_folder(tmp_path_factory):
    """The SD 1.x layout of a diffusers pipeline: text_encoder/ (CLIPTextModel) beside tokenizer/."""
    root = tmp_path_factory.mktemp("sd1")
    torch.manual_seed(2)
    CLIPTextModel(tiny_text_config()).save_pretrained(str(root / "text_encoder"))
    write_clip_tokenizer(root / "tokenizer", max_length=16)
    return root / "text_encoder"


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    """A whole transformers CLIPModel (text + image towers) with tokenizer and image processor."""
    folder = tmp_path_factory.mktemp("hf_clip")
    config = CLIPConfig(text_config=tiny_text_config().to_dict(), projection_dim=24,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8))
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(str(folder))
    write_clip_tokenizer(folder, max_length=16)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(str(folder))
    return folder


BACKENDS = ["ours", "open_clip_file", "hf_text_folder", "hf_clip_folder"]


def load(request, name) -> TextEncoder:
    path = request.getfixturevalue(name)
    return TextEncoder.from_pretrained(path, open_clip_model=TINY_OPEN_CLIP if name == "open_clip_file" else None)


# -- the interface, for every backend ------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_interface_shapes_and_mask(request, name):
    encoder = load(request, name)
    assert encoder.context_length == 16 and encoder.width == 32
    with torch.no_grad():
        states, pooled, mask = encoder.encode(PROMPTS)
    assert states.shape == (3, 16, 32) and pooled.shape == (3, encoder.pooled_dim) and mask.shape == (3, 16)
    assert mask.sum(1).tolist() == [5, 2, 14]  # start + one token per word + end
    assert torch.isfinite(states).all() and torch.isfinite(pooled).all()
    assert not torch.allclose(states[0], states[2])


@pytest.mark.parametrize("name", BACKENDS)
def test_long_prompts_are_truncated_with_a_warning(request, name):
    encoder = load(request, name)
    with pytest.warns(PromptTruncatedWarning, match="16 tokens dropped"):
        ids, mask = encoder.tokenize([LONG_PROMPT, "a red circle"])
    eos = 49407
    assert ids.shape == (2, 16) and ids[0, -1] == eos and mask[0].all()
    with pytest.warns(PromptTruncatedWarning):
        states, _, _ = encoder.encode(LONG_PROMPT)
    assert states.shape == (1, 16, 32)


@pytest.mark.parametrize("name", BACKENDS)
def test_unconditional_is_the_empty_prompt(request, name):
    encoder = load(request, name)
    with torch.no_grad():
        uncond = encoder.unconditional(4)
        empty = encoder.encode([""])
        prompt = encoder.encode(["a red circle"])
    assert uncond.states.shape == (4, 16, 32) and uncond.mask.sum(1).tolist() == [2] * 4
    assert torch.equal(uncond.states, empty.states.expand(4, -1, -1))
    assert torch.equal(uncond.pooled, empty.pooled.expand(4, -1))
    assert not torch.allclose(uncond.states[0], prompt.states[0])


# -- each backend against its library --------------------------------------------------------------

def test_open_clip_tokenization_is_offline_and_matches_open_clip(ours):
    encoder = TextEncoder.from_pretrained(ours)
    ids, mask = encoder.tokenize(PROMPTS)
    assert torch.equal(ids, open_clip.tokenize(PROMPTS, context_length=16))
    assert torch.equal(mask, (torch.arange(16) <= ids.argmax(1, keepdim=True)).long())


@pytest.mark.parametrize("output_layer", ["last", "penultimate"])
def test_open_clip_file_matches_open_clip(open_clip_file, output_layer):
    encoder = TextEncoder.from_pretrained(open_clip_file, open_clip_model=TINY_OPEN_CLIP, output_layer=output_layer)
    assert isinstance(encoder, OpenCLIPTextEncoder) and encoder.config.open_clip_model == TINY_OPEN_CLIP
    reference = open_clip.create_model(TINY_OPEN_CLIP, pretrained=str(open_clip_file)).eval()
    ids = open_clip.tokenize(PROMPTS, context_length=16)
    with torch.no_grad():
        states, pooled, _ = encoder.encode(PROMPTS)
        blocks = reference.forward_intermediates(text=ids, normalize_intermediates=True)["text_intermediates"]
        torch.testing.assert_close(pooled, reference.encode_text(ids))
        torch.testing.assert_close(states, blocks[-1 if output_layer == "last" else -2])
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (open_clip.OPENAI_DATASET_MEAN,
                                                                  open_clip.OPENAI_DATASET_STD))
        expected = torch.nn.functional.normalize(reference.encode_image(((images + 1) / 2 - mean) / std), dim=-1)
        torch.testing.assert_close(encoder.image_embedding(images), expected)


def test_sd2_checkpoint_text_tower_loads_text_only(open_clip_file, tmp_path):
    """An original SD 2.x checkpoint keeps the text tower under cond_stage_model.model., without visual.*."""
    state = load_file(str(open_clip_file))
    sd2 = {f"cond_stage_model.model.{k}": v for k, v in state.items() if not k.startswith("visual.")}
    sd2["model.diffusion_model.out.0.weight"] = torch.zeros(4)  # the UNet's keys are ignored
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    encoder = TextEncoder.from_pretrained(tmp_path / "sd2.safetensors", open_clip_model=TINY_OPEN_CLIP,
                                          output_layer="penultimate")
    full = TextEncoder.from_pretrained(open_clip_file, open_clip_model=TINY_OPEN_CLIP, output_layer="penultimate")
    assert not encoder.has_image_tower and full.has_image_tower
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(PROMPTS).states, full.encode(PROMPTS).states)
    with pytest.raises(CheckpointError, match="no image tower"):
        encoder.image_embedding(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("output_layer", ["last", "penultimate"])
def test_hf_text_model_matches_transformers(hf_text_folder, output_layer):
    encoder = TextEncoder.from_pretrained(hf_text_folder.parent, output_layer=output_layer)  # the pipeline root
    assert isinstance(encoder, HFCLIPTextEncoder) and encoder.pooled_dim == 32
    model = CLIPTextModel.from_pretrained(str(hf_text_folder)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(hf_text_folder.parent / "tokenizer"))
    inputs = tokenizer(PROMPTS + [LONG_PROMPT], padding="max_length", max_length=16, truncation=True,
                       return_tensors="pt")
    with pytest.warns(PromptTruncatedWarning):
        ids, mask = encoder.tokenize(PROMPTS + [LONG_PROMPT])
    assert torch.equal(ids, inputs.input_ids) and torch.equal(mask, inputs.attention_mask)
    with torch.no_grad():
        states, pooled, _ = encoder.encode_tokens(ids, mask)
        out = model(input_ids=inputs.input_ids, output_hidden_states=True)
        expected = (out.last_hidden_state if output_layer == "last"
                    else getattr(model, "text_model", model).final_layer_norm(out.hidden_states[-2]))
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(pooled, out.pooler_output)


def test_hf_clip_model_embeddings_match_transformers(hf_clip_folder):
    encoder = TextEncoder.from_pretrained(hf_clip_folder)
    model = CLIPModel.from_pretrained(str(hf_clip_folder)).eval()
    ids, _ = encoder.tokenize(PROMPTS)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIPImageProcessor().image_mean,
                                                              CLIPImageProcessor().image_std))
    with torch.no_grad():
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        image = model.visual_projection(model.vision_model(pixel_values=((images + 1) / 2 - mean) / std).pooler_output)
        torch.testing.assert_close(encoder.encode(PROMPTS).pooled, text)
        torch.testing.assert_close(encoder.image_embedding(images), torch.nn.functional.normalize(image, dim=-1))


# -- files ----------------------------------------------------------------------------------------

def test_save_load_round_trip_is_exact_and_strict(ours, tmp_path):
    encoder = TextEncoder.from_pretrained(ours)
    assert isinstance(encoder, OpenCLIPTextEncoder) and encoder.config == TINY and encoder.has_image_tower
    encoder.save_pretrained(tmp_path / "copy", metadata={"steps": 7})
    copy = TextEncoder.from_pretrained(tmp_path / "copy")
    assert copy.identity.metadata == {"steps": 7}
    assert set(load_file(str(tmp_path / "copy" / "model.safetensors"))) == set(encoder.clip.state_dict())
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # resized to the tower's 16x16 on the way in
    with torch.no_grad():
        for a, b in zip(encoder.encode(PROMPTS), copy.encode(PROMPTS)):
            assert torch.equal(a, b)
        assert torch.equal(encoder.image_embedding(images), copy.image_embedding(images))


def test_resnet_image_tower_round_trip(tmp_path):
    """The default image tower is open_clip's ModifiedResNet (4 stages); it saves and loads like the ViT."""
    torch.manual_seed(0)
    config = apply_overrides(TINY, {"vision_layers": [1, 1, 1, 1], "vision_width": 8, "vision_head_width": 32,
                                    "image_size": 32})
    encoder = OpenCLIPTextEncoder(config).eval()
    assert type(encoder.clip.visual).__name__ == "ModifiedResNet" and encoder.image_size == 32
    encoder.save_pretrained(tmp_path)
    copy = TextEncoder.from_pretrained(tmp_path)
    assert copy.config.vision_layers == (1, 1, 1, 1)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        embedding = copy.image_embedding(images)
        assert embedding.shape == (3, 24) and torch.equal(embedding, encoder.image_embedding(images))
    with pytest.raises(ConfigError, match="multiple of 32"):
        apply_overrides(config, {"image_size": 48})


def test_penultimate_layer_from_config_and_override(ours):
    encoder = TextEncoder.from_pretrained(ours, output_layer="penultimate")
    assert encoder.config.output_layer == "penultimate"
    ids = open_clip.tokenize(PROMPTS, context_length=16)
    with torch.no_grad():
        blocks = encoder.clip.forward_intermediates(text=ids, normalize_intermediates=True)["text_intermediates"]
        torch.testing.assert_close(encoder.encode(PROMPTS).states, blocks[-2])
    with pytest.raises(ConfigError, match="output_layer"):
        TextEncoder.from_pretrained(ours, output_layer="middle")


def test_hf_save_pretrained_round_trip(hf_text_folder, tmp_path):
    encoder = TextEncoder.from_pretrained(hf_text_folder)
    encoder.save_pretrained(tmp_path / "saved")
    copy = TextEncoder.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(encoder.encode(PROMPTS).states, copy.encode(PROMPTS).states)


def test_bad_paths_give_clear_errors(tmp_path, ours):
    with pytest.raises(CheckpointError, match="not found"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a text encoder checkpoint"):
        TextEncoder.from_pretrained(tmp_path / "notes.txt")
    (tmp_path / "weights.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="open_clip_model"):
        TextEncoder.from_pretrained(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        TextEncoder.from_pretrained(tmp_path / "weights.bin", open_clip_model="ViT-B-32")
    with pytest.raises(CheckpointError, match="cannot be read"):
        TextEncoder.from_pretrained(tmp_path / "weights.bin", open_clip_model="ViT-B-32", allow_pickle=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        TextEncoder.from_pretrained(tmp_path / "other")


def test_mismatched_checkpoints_give_clear_errors(tmp_path, ours, open_clip_file, hf_text_folder):
    # a latentdiff folder of another stage
    save_model_files(tmp_path / "vae", kind="autoencoder", config=TINY, state_dict={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'autoencoder' checkpoint, expected 'text_encoder'"):
        TextEncoder.from_pretrained(tmp_path / "vae")
    # weights of a wider model under this config
    wider = OpenCLIPTextEncoder(apply_overrides(TINY, {"width": 64}))
    save_model_files(tmp_path / "mixed", kind="text_encoder", config=TINY, state_dict=wider.clip.state_dict())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        TextEncoder.from_pretrained(tmp_path / "mixed")
    # an OpenCLIP file named with the wrong architecture
    with pytest.raises(CheckpointError, match="do not fit"):
        TextEncoder.from_pretrained(open_clip_file, open_clip_model=f"{TINY_OPEN_CLIP}-wide")
    with pytest.raises(CheckpointError, match="unknown open_clip architecture"):
        TextEncoder.from_pretrained(open_clip_file, open_clip_model="ViT-Q-99")
    # a transformers folder missing a tensor (transformers alone would silently re-initialise it)
    broken = tmp_path / "sd1" / "text_encoder"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text((hf_text_folder / "config.json").read_text())
    weights = load_file(str(hf_text_folder / "model.safetensors"))
    weights.pop(next(k for k in weights if "final_layer_norm.weight" in k))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    write_clip_tokenizer(tmp_path / "sd1" / "tokenizer", max_length=16)
    with pytest.raises(CheckpointError, match="missing keys"):
        TextEncoder.from_pretrained(broken)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="output_layer"):
        TextEncoderConfig(output_layer="first")
    with pytest.raises(ConfigError, match="heads"):
        TextEncoderConfig(width=250, heads=4)
    with pytest.raises(ConfigError, match="4 stages"):
        TextEncoderConfig(vision_layers=(1, 1, 1))
    with pytest.raises(ConfigError, match="patch_size"):
        TextEncoderConfig(vision_layers=2, vision_width=64, patch_size=5)


# -- CLIP score and retrieval ---------------------------------------------------------------------

def test_clip_score_matches_transformers_clip_processor(hf_clip_folder):
    """The CLIPScore formula on the embeddings transformers' own CLIPProcessor + CLIPModel give."""
    from PIL import Image
    from transformers import CLIPProcessor

    encoder = TextEncoder.from_pretrained(hf_clip_folder)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=generator)
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    prompts = ["a red circle", "a blue square", "two green triangles"]
    scores = clip_score(encoder, images, prompts)
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()

    model = CLIPModel.from_pretrained(str(hf_clip_folder)).eval()
    inputs = CLIPProcessor.from_pretrained(str(hf_clip_folder))(text=prompts, images=images, padding=True,
                                                               return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=inputs.pixel_values).pooler_output)
        text = model.text_projection(model.text_model(input_ids=inputs.input_ids,
                                                      attention_mask=inputs.attention_mask).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0), atol=1e-3, rtol=1e-4)
    # a tensor in [-1, 1] scores like the PIL images it came from
    torch.testing.assert_close(clip_score(encoder, pixels.float() / 127.5 - 1, prompts), scores)


def test_retrieval_accuracy():
    emb = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert retrieval_accuracy(emb, emb) == {"i2t_top1": 1.0, "t2i_top1": 1.0, "i2t_top5": 1.0, "t2i_top5": 1.0}
    collapsed = retrieval_accuracy(emb, torch.ones(8, 16))  # every caption looks the same: ties count as misses
    assert collapsed["i2t_top1"] == 0.0 and collapsed["i2t_top5"] == 0.0
    shifted = retrieval_accuracy(emb, emb.roll(1, dims=0), ks=(1,))  # every image sits nearest the wrong caption
    assert shifted["i2t_top1"] == 0.0


def test_distinct_caption_batches_skip_repeats():
    samples = [{"caption": c} for c in "a b a c b d e f".split()]
    batches = distinct_caption_batches(samples, batch_size=3, batches=5)
    assert [[s["caption"] for s in b] for b in batches] == [["a", "b", "c"], ["b", "d", "e"]]
    with pytest.raises(Exception, match="fewer than 9 distinct captions"):
        distinct_caption_batches(samples, batch_size=9, batches=1)


def test_shapes_caption_fits_knows_what_a_caption_leaves_open():
    from dataclasses import replace

    from latentdiff.data.shapes import ObjectSpec, make_sample

    def single(caption, size, region):
        return replace(make_sample("single", [ObjectSpec("green", "star", size, region)], rng=0), caption=caption)

    left = single("a green star on the left", "large", "left")
    right = single("a small green star on the right", "small", "right")
    anywhere = single("a green star", "large", "center")
    assert shapes_caption_fits(anywhere, left) and shapes_caption_fits(anywhere, right)
    assert not shapes_caption_fits(left, right) and not shapes_caption_fits(right, left)
    assert shapes_caption_fits(left, single("a green star on the left", "small", "left"))  # size left open
    assert not shapes_caption_fits(right, single("a green star on the right", "large", "right"))

    circle, square = ObjectSpec("red", "circle"), ObjectSpec("blue", "square", "small")
    above = make_sample("pair", [circle, square], "above", rng=1)
    below = make_sample("pair", [square, circle], "below", rng=2)  # the same picture, said the other way
    beside = make_sample("pair", [circle, square], "left of", rng=3)
    both = make_sample("pair", [square, circle], None, rng=4)
    assert shapes_caption_fits(above, below) and shapes_caption_fits(below, above)
    assert not shapes_caption_fits(above, beside)
    assert shapes_caption_fits(both, above) and shapes_caption_fits(both, beside)
    swapped = make_sample("pair", [ObjectSpec("blue", "circle"), ObjectSpec("red", "square")], "above", rng=1)
    assert not shapes_caption_fits(above, swapped) and not shapes_caption_fits(both, swapped)


def test_unambiguous_heldout_batches_hold_no_caption_that_fits_another_picture():
    from latentdiff.data import ShapesDataset
    from latentdiff.eval.retrieval import shapes_captions_conflict

    dataset = ShapesDataset(size=16, length=400, split="heldout")
    samples = ({"caption": dataset.sample(i).caption, "truth": dataset.sample(i)} for i in range(len(dataset)))
    plain = distinct_caption_batches(({"caption": dataset.sample(i).caption, "truth": dataset.sample(i)}
                                      for i in range(len(dataset))), 32, 2)
    clear = distinct_caption_batches(samples, 32, 2, shapes_captions_conflict)
    conflicts = lambda batch: sum(shapes_captions_conflict(a, b) for a, b in itertools.combinations(batch, 2))
    assert sum(map(conflicts, plain)) > 0  # distinct captions alone still describe the same picture
    assert sum(map(conflicts, clear)) == 0


def test_retrieval_ceiling_is_what_a_perfect_model_scores_with_random_tie_breaks():
    from latentdiff.data import ShapesDataset
    from latentdiff.eval.retrieval import retrieval_ceiling

    dataset = ShapesDataset(size=16, length=400, split="heldout")
    ceiling = retrieval_ceiling(dataset, batch_size=32, batches=2)
    assert 0.5 < ceiling["t2i_top1"] < 1.0 and 0.5 < ceiling["i2t_top1"] < 1.0
    # A perfect model scores 1 where a caption fits a picture, 0 elsewhere; ties break at random.
    truths = [{"caption": dataset.sample(i).caption, "truth": dataset.sample(i)} for i in range(len(dataset))]
    generator = torch.Generator().manual_seed(0)
    measured = {"t2i_top1": 0.0, "i2t_top1": 0.0}
    draws = 200
    for batch in distinct_caption_batches(truths, 32, 2):
        fits = torch.tensor([[float(shapes_caption_fits(t["truth"], i["truth"])) for i in batch] for t in batch])
        for _ in range(draws):
            noisy = fits + 1e-3 * torch.rand(fits.shape, generator=generator)  # (captions, images)
            scores = retrieval_accuracy(torch.eye(len(batch)), noisy, ks=(1,))  # sim[image, caption] = noisy.T
            for name in measured:
                measured[name] += scores[name] / (2 * draws)
    for name in measured:
        assert abs(measured[name] - ceiling[name]) < 0.02, (name, measured[name], ceiling[name])


def test_image_embedding_follows_the_tower_dtype():
    import open_clip  # noqa: F401  (the trained backend)
    from tiny_stages import TINY_TEXT

    from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder

    encoder = OpenCLIPTextEncoder(TINY_TEXT).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1  # float32, as generated images and renders come
    full = encoder.image_embedding(images)
    half = encoder.to(torch.bfloat16).image_embedding(images)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), full, atol=0.05)
