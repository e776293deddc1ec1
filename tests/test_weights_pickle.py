"""Pickled weights files, one rule for every public loader: refused unless allow_pickle=True, and even then
read with torch.load(weights_only=True), so a pickle that carries code never runs it.

The loaders that can meet a pickle: the reader itself (checkpoint.read_weights / read_model_weights),
TextEncoder.from_pretrained (an OpenCLIP .bin, a transformers folder's pytorch_model.bin), the convert
loaders (load_single_file, load_pipeline, convert on a .ckpt; load_diffusers on a folder of .bin files),
and LPIPS.from_folder, which opts in itself (LPIPS exists only as .pth). Nothing is downloaded.
"""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_sd import save_diffusers_pipeline  # noqa: E402
from tiny_stages import register_open_clip  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from latentdiff.checkpoint import read_model_weights, read_weights  # noqa: E402
from latentdiff.convert import convert, load_diffusers, load_pipeline, load_single_file  # noqa: E402
from latentdiff.convert.text_encoder_keys import bundled_clip_tokenizer  # noqa: E402
from latentdiff.errors import CheckpointError  # noqa: E402
from latentdiff.models.text_encoder import TextEncoder  # noqa: E402
from latentdiff.train.perceptual import LPIPS  # noqa: E402

TINY_OPEN_CLIP = "latentdiff-test-pickle-ViT"
PROMPTS = ["a red circle", "a big blue square"]


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file exists afterwards iff the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def save_payload(path, marker, how: str) -> None:
    """A weights-looking file whose unpickling would run code: torch's zip format, or a bare pickle (old .ckpt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"state_dict": {"x": Payload(marker), "w": torch.zeros(2)}}  # the payload is unpickled first
    if how == "torch.save":
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data, protocol=2))  # the protocol torch.save uses


def pickle_weights(safetensors_path, pickled_path) -> None:
    """Replace a .safetensors file with the same tensors, pickled by torch.save."""
    torch.save(load_file(str(safetensors_path)), pickled_path)
    safetensors_path.unlink()


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny OpenCLIP model registered under TINY_OPEN_CLIP, saved as safetensors."""
    folder = tmp_path_factory.mktemp("open_clip")
    register_open_clip(folder, TINY_OPEN_CLIP, text_layers=2)
    torch.manual_seed(0)
    path = folder / "open_clip_model.safetensors"
    save_file(open_clip.create_model(TINY_OPEN_CLIP).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    return save_diffusers_pipeline("sd1", tmp_path_factory.mktemp("sd1") / "diffusers")


def hf_text_folder(root):
    """A transformers CLIPTextModel in root/text_encoder (safetensors), its tokenizer in root/tokenizer."""
    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16)
    CLIPTextModel(config).save_pretrained(str(root / "text_encoder"))
    bundled_clip_tokenizer(16, "<|endoftext|>").save_pretrained(str(root / "tokenizer"))
    return root / "text_encoder"


# -- every loader, as (the pickled file it reads, a call taking allow_pickle) ------------------------------

def reader(tmp_path, _):
    path = tmp_path / "model.ckpt"
    return path, lambda **kw: read_weights(path, **kw)


def folder_reader(tmp_path, _):
    path = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    return path, lambda **kw: read_model_weights(path.parent, "diffusion_pytorch_model", **kw)


def open_clip_file(tmp_path, request):
    request.getfixturevalue("tiny_open_clip")  # registers the architecture
    path = tmp_path / "open_clip_pytorch_model.bin"
    return path, lambda **kw: TextEncoder.from_pretrained(path, open_clip_model=TINY_OPEN_CLIP, **kw)


def transformers_folder(tmp_path, _):
    folder = hf_text_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    return folder / "pytorch_model.bin", lambda **kw: TextEncoder.from_pretrained(tmp_path, **kw)


def single_file(tmp_path, _):
    path = tmp_path / "sd.ckpt"
    return path, lambda **kw: load_single_file(path, **kw)


def any_format(tmp_path, _):
    path = tmp_path / "sd.ckpt"
    return path, lambda **kw: load_pipeline(path, **kw)


def converted(tmp_path, _):
    path = tmp_path / "sd.ckpt"
    return path, lambda **kw: convert(path, tmp_path / "out", to="diffusers", **kw)


def diffusers(tmp_path, request):
    folder = tmp_path / "diffusers"
    shutil.copytree(request.getfixturevalue("diffusers_folder"), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return folder / "unet" / "diffusion_pytorch_model.bin", lambda **kw: load_diffusers(folder, **kw)


def lpips(tmp_path, _):
    path = tmp_path / "lpips" / "vgg16.pth"
    return path, lambda **kw: LPIPS.from_folder(path.parent)


OPT_IN_LOADERS = [reader, folder_reader, open_clip_file, transformers_folder, single_file, any_format, converted,
                  diffusers]


@pytest.mark.parametrize("loader", OPT_IN_LOADERS, ids=lambda f: f.__name__)
def test_a_pickle_is_refused_unless_allowed(loader, tmp_path, request):
    path, load = loader(tmp_path, request)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True") as refused:
        load()
    assert str(path) in str(refused.value) and "--allow-pickle" in str(refused.value)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("loader", OPT_IN_LOADERS + [lpips], ids=lambda f: f.__name__)
def test_a_code_payload_never_runs_even_when_pickles_are_allowed(loader, how, tmp_path, request):
    path, load = loader(tmp_path, request)
    marker = tmp_path / "payload-ran"
    save_payload(path, marker, how)
    with pytest.raises(CheckpointError, match="weights_only=True") as refused:
        load(allow_pickle=True)
    assert "open" in str(refused.value) and not marker.exists()  # refused for the payload's global, io.open
    if loader is not lpips:  # LPIPS always opts in
        with pytest.raises(CheckpointError, match="allow_pickle=True"):
            load()
        assert not marker.exists()


def test_the_payload_does_run_code_when_unpickled_unsafely(tmp_path):
    """The check above is not vacuous: plain pickle runs this payload."""
    marker = tmp_path / "payload-ran"
    save_payload(tmp_path / "model.ckpt", marker, "pickle")
    pickle.loads((tmp_path / "model.ckpt").read_bytes())
    assert marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "payload-ran"
    save_payload(tmp_path / "model.safetensors", marker, "torch.save")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        read_weights(tmp_path / "model.safetensors", allow_pickle=True)
    assert not marker.exists()


# -- with allow_pickle=True, an honest pickle loads as its safetensors twin ---------------------------------

def test_allowed_pickles_load_like_safetensors(tmp_path, tiny_open_clip):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    torch.save({"state_dict": tensors, "global_step": 7}, tmp_path / "model.ckpt")
    read = read_weights(tmp_path / "model.ckpt", allow_pickle=True)[0]
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)

    torch.save(load_file(str(tiny_open_clip)), tmp_path / "open_clip.bin")
    pickled = TextEncoder.from_pretrained(tmp_path / "open_clip.bin", open_clip_model=TINY_OPEN_CLIP,
                                          allow_pickle=True)
    safe = TextEncoder.from_pretrained(tiny_open_clip, open_clip_model=TINY_OPEN_CLIP)
    with torch.no_grad():
        assert torch.equal(pickled.encode(PROMPTS).states, safe.encode(PROMPTS).states)


def test_allowed_transformers_pickle_loads_like_safetensors(tmp_path):
    safe = TextEncoder.from_pretrained(hf_text_folder(tmp_path / "safe"))
    folder = hf_text_folder(tmp_path / "pickled")
    pickle_weights(folder / "model.safetensors", folder / "pytorch_model.bin")
    pickled = TextEncoder.from_pretrained(folder, allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(pickled.encode(PROMPTS).states, safe.encode(PROMPTS).states)


def test_allowed_diffusers_pickles_load_like_safetensors(tmp_path, diffusers_folder):
    folder = tmp_path / "diffusers"
    shutil.copytree(diffusers_folder, folder)
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        pickled = "pytorch_model.bin" if part == "text_encoder" else f"{stem}.bin"
        pickle_weights(folder / part / f"{stem}.safetensors", folder / part / pickled)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_diffusers(folder)
    pickled, safe = load_diffusers(folder, allow_pickle=True), load_diffusers(diffusers_folder)
    for a, b in ((pickled.unet, safe.unet), (pickled.autoencoder, safe.autoencoder),
                 (pickled.text_encoder, safe.text_encoder)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
