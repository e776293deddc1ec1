"""The CLIP text encoder between open_clip's layout (SD 2.x checkpoints, under `cond_stage_model.model.`)
and transformers' CLIPTextModel (SD 1.x checkpoints under `cond_stage_model.transformer.`, every diffusers
folder), and the CLIP tokenizer files a diffusers folder needs.

    open_clip                                  transformers CLIPTextModel
    token_embedding.weight                     embeddings.token_embedding.weight
    positional_embedding                       embeddings.position_embedding.weight
    transformer.resblocks.i.ln_1 / ln_2        encoder.layers.i.layer_norm1 / layer_norm2
    transformer.resblocks.i.attn.in_proj_*     encoder.layers.i.self_attn.q_proj / k_proj / v_proj (split in 3)
    transformer.resblocks.i.attn.out_proj      encoder.layers.i.self_attn.out_proj
    transformer.resblocks.i.mlp.c_fc / c_proj  encoder.layers.i.mlp.fc1 / fc2
    ln_final                                   final_layer_norm
    text_projection (D, P), logit_scale        (none: CLIPTextModel ends at the pooled state; SD never uses either)
"""
from __future__ import annotations

import functools
import gzip
import json
import math
import re
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import default_bpe
from open_clip.transformer import QuickGELU
from transformers import CLIPTextConfig, CLIPTokenizer

from ..errors import CheckpointError, short_list

START, END = "<|startoftext|>", "<|endoftext|>"
PAD_TOKENS = {"eos": END, "zero": "!"}  # SD 1.x pads with the end token; SD 2.x (open_clip) with id 0, which is "!"
_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_FIXED = {"token_embedding.weight": "embeddings.token_embedding.weight",
          "positional_embedding": "embeddings.position_embedding.weight",
          "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)")  # in_proj_weight: "_"
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
NOT_IN_CLIP_TEXT_MODEL = ("text_projection", "logit_scale")


def open_clip_to_transformers(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """An open_clip text tower's state dict as a CLIPTextModel's, keeping blocks 0..layers-1.

    Left out, by design: blocks from `layers` on (a penultimate-layer encoder never runs its last block)
    and NOT_IN_CLIP_TEXT_MODEL; any other key that does not map is an error.
    """
    out, unmapped = {}, []
    for key, value in state.items():
        if key in _FIXED:
            out[_FIXED[key]] = value
            continue
        m = _RESBLOCK.fullmatch(key)
        if key in NOT_IN_CLIP_TEXT_MODEL or (m and int(m.group(1)) >= layers):
            continue
        if m is None or (m.group(2) not in _LAYER and m.group(2) != "attn.in_proj"):
            unmapped.append(key)
            continue
        i, name, kind = m.groups()
        if name == "attn.in_proj":
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"encoder.layers.{i}.self_attn.{part}_proj.{kind}"] = chunk.clone()
        else:
            out[f"encoder.layers.{i}.{_LAYER[name]}.{kind}"] = value
    if unmapped:
        raise CheckpointError(f"text encoder: open_clip keys with no place in a CLIPTextModel: {short_list(unmapped)}")
    return out


def transformers_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's state dict in open_clip's layout (text_projection and logit_scale are the caller's)."""
    fixed = {theirs: ours for ours, theirs in _FIXED.items()}
    layer = {theirs: ours for ours, theirs in _LAYER.items()}
    out, qkv, unmapped = {}, {}, []
    for key, value in state.items():
        m = _ENCODER_LAYER.fullmatch(key)
        if key in fixed:
            out[fixed[key]] = value
        elif m and m.group(2) in layer:
            out[f"transformer.resblocks.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv[(int(m.group(1)), m.group(3), m.group(2)[len("self_attn.")])] = value  # (layer, kind, "q"|"k"|"v")
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"text encoder: CLIPTextModel keys with no place in open_clip: {short_list(unmapped)}")
    for i, kind in sorted({(i, kind) for i, kind, _ in qkv}):
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([qkv[(i, kind, p)] for p in "qkv"])
    return out


def identity_block(width: int, mlp_width: int, index: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """An open_clip resblock that passes its input through unchanged (both residual branches output zero).

    Appended to a "last"-layer text tower written in the SD 2.x layout, whose readers take the penultimate
    block: the penultimate block is then our last one, and the states are the same.
    """
    prefix = f"transformer.resblocks.{index}."
    zeros = lambda *shape: torch.zeros(shape, dtype=like.dtype)  # noqa: E731
    ones = lambda *shape: torch.ones(shape, dtype=like.dtype)  # noqa: E731
    return {prefix + k: v for k, v in {
        "ln_1.weight": ones(width), "ln_1.bias": zeros(width),
        "attn.in_proj_weight": zeros(3 * width, width), "attn.in_proj_bias": zeros(3 * width),
        "attn.out_proj.weight": zeros(width, width), "attn.out_proj.bias": zeros(width),
        "ln_2.weight": ones(width), "ln_2.bias": zeros(width),
        "mlp.c_fc.weight": zeros(mlp_width, width), "mlp.c_fc.bias": zeros(mlp_width),
        "mlp.c_proj.weight": zeros(width, mlp_width), "mlp.c_proj.bias": zeros(width)}.items()}


def default_logit_scale(like: torch.Tensor) -> torch.Tensor:
    """CLIP's initial contrastive temperature log(1/0.07), for text towers that never had one."""
    return torch.tensor(math.log(1 / 0.07), dtype=like.dtype)


def open_clip_activation(clip: open_clip.CLIP) -> str:
    """transformers' name for the activation of an open_clip text tower's MLPs."""
    return "quick_gelu" if isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU) else "gelu"


def transformers_config_for_open_clip(clip: open_clip.CLIP, layers: int, pad_token_id: int) -> CLIPTextConfig:
    """The CLIPTextConfig of an open_clip text tower cut to its first `layers` blocks."""
    block = clip.transformer.resblocks[0]
    return CLIPTextConfig(
        vocab_size=clip.token_embedding.num_embeddings, hidden_size=clip.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=layers,
        num_attention_heads=block.attn.num_heads, max_position_embeddings=clip.positional_embedding.shape[0],
        hidden_act=open_clip_activation(clip), layer_norm_eps=clip.ln_final.eps,
        projection_dim=_projection_dim(clip), bos_token_id=clip.token_embedding.num_embeddings - 2,
        eos_token_id=clip.token_embedding.num_embeddings - 1, pad_token_id=pad_token_id,
        architectures=["CLIPTextModel"])


def _projection_dim(clip: open_clip.CLIP) -> int:
    projection = clip.text_projection
    if isinstance(projection, torch.nn.Linear):
        return projection.out_features
    return projection.shape[1] if projection is not None else clip.transformer.width


# ---------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[str, str]:
    """(vocab.json, merges.txt) of CLIP's BPE, from the copy open_clip ships (the same 49,408 tokens as
    SD 1.x's and SD 2.x's tokenizers)."""
    names = {"<start_of_text>": START, "<end_of_text>": END}
    vocab = {names.get(token, token): index for token, index in open_clip.SimpleTokenizer().encoder.items()}
    # the bundled file: a header line, then the merges; CLIP uses the first 49152 - 256 - 2 of them
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def _clip_tokenizer(folder: Path, max_length: int, pad_token: str) -> CLIPTokenizer:
    vocab, merges = _clip_bpe()
    (folder / "vocab.json").write_text(vocab)
    (folder / "merges.txt").write_text(merges)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         pad_token=pad_token, bos_token=START, eos_token=END, unk_token=END)


def write_clip_tokenizer(folder: str | Path, max_length: int, pad_token: str) -> CLIPTokenizer:
    """Write a transformers CLIPTokenizer folder with CLIP's BPE vocabulary; return the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer(folder, max_length, pad_token)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def bundled_clip_tokenizer(max_length: int, pad_token: str) -> CLIPTokenizer:
    """A CLIPTokenizer with CLIP's BPE vocabulary, held in memory (pad_token: see PAD_TOKENS)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _clip_tokenizer(Path(tmp), max_length, pad_token)


def local_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIPTokenizer from local files (vocab.json + merges.txt or tokenizer.json); never downloads."""
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: no CLIP tokenizer files here ({str(err).splitlines()[0]})") from None
