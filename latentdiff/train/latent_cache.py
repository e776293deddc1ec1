"""The latent + text-embedding cache of diffusion training: the frozen encoders run once per sample, not per step.

A cache folder holds, for the `data.length` samples of a dataset,
    latents.safetensors   mean, std (N, C, h, w): the autoencoder's posterior, unscaled, so that training
                          still draws z = mean + std·ε afresh each time; caption (N,) index into the table below
    text.safetensors      states (U, L, D), mask (U, L): each distinct caption's token states, cut to the
                          longest caption's L tokens; uncond_states (1, L, D), uncond_mask (1, L): the empty prompt
    cache.json            what the cache was computed from (its key), written last

Cutting the states to L tokens changes nothing the UNet sees: the text transformer is causal, so the
states before the padding do not depend on it, and the UNet's cross-attention masks the padding out.

The folder's name is a hash of its key: the two encoders' weights hashes (and the text encoder's output
layer and context length) and the data config (source, size, length, seed, crop, flip, background; for a
folder of images also its file list, sizes and modification times). A run with the same encoders and
data reuses the folder; a changed encoder or data config gets a new one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import atomic_directory, atomic_write_json, save_tensors
from ..config import to_dict
from ..data.sources import DataConfig
from ..errors import CheckpointError

CACHE_VERSION = 1
KEY_FILE = "cache.json"
DATA_KEY_FIELDS = ("source", "size", "length", "seed", "crop", "flip", "background")


def data_fingerprint(dataset: Dataset) -> str | None:
    """For a folder dataset: a hash of its file names, sizes and modification times (None for shapes)."""
    files = getattr(dataset, "files", None)
    root = getattr(dataset, "root", None)
    if files is None or root is None:
        return None
    digest = hashlib.sha256()
    for name in files:
        stat = (Path(root) / name).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_key(data: DataConfig, dataset: Dataset, autoencoder_hash: str, text_encoder_hash: str,
              text_encoder) -> dict:
    """Everything the cached tensors depend on."""
    data_fields = {k: v for k, v in to_dict(data).items() if k in DATA_KEY_FIELDS}
    if data.source != "shapes":
        data_fields["source"] = str(Path(data.source).expanduser().resolve())
        data_fields["files"] = data_fingerprint(dataset)
    return {"version": CACHE_VERSION, "autoencoder": autoencoder_hash, "text_encoder": text_encoder_hash,
            "output_layer": text_encoder.output_layer, "context_length": text_encoder.context_length,
            "samples": len(dataset), "data": data_fields}


def cache_folder(root: str | Path, key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / name


class LatentCache(Dataset):
    """A loaded cache. Item i is {"mean": (C, h, w), "std": (C, h, w), "caption": index}; `text(index)`
    looks up the (B, L, D) states and (B, L) bool mask of a batch's captions."""

    def __init__(self, latents: dict[str, torch.Tensor], text: dict[str, torch.Tensor], folder: Path):
        self.mean, self.std, self.caption = latents["mean"], latents["std"], latents["caption"]
        self.states, self.mask = text["states"], text["mask"].bool()
        self.uncond_states, self.uncond_mask = text["uncond_states"], text["uncond_mask"].bool()
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path) -> "LatentCache":
        folder = Path(folder)
        try:
            return cls(load_file(str(folder / "latents.safetensors")), load_file(str(folder / "text.safetensors")),
                       folder)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{folder}: unreadable latent cache ({err}); delete the folder to rebuild it"
                                  ) from None

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"mean": self.mean[index], "std": self.std[index], "caption": self.caption[index]}

    def to(self, device: torch.device | str) -> "LatentCache":
        """Move the caption table to `device` (batches are moved by the training loop)."""
        self.states, self.mask = self.states.to(device), self.mask.to(device)
        self.uncond_states, self.uncond_mask = self.uncond_states.to(device), self.uncond_mask.to(device)
        return self

    def text(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.states.device)
        return self.states[index], self.mask[index]

    def unconditional(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning (1, L, D) / (1, L): what conditioning dropout substitutes."""
        return {"context": self.uncond_states, "context_mask": self.uncond_mask}


@torch.no_grad()
def compute_cache(dataset: Dataset, autoencoder, text_encoder, batch_size: int, num_workers: int = 0,
                  progress: bool = True) -> tuple[dict, dict]:
    """(latents, text) tensors of `dataset`, in index order; the encoders run on their own device."""
    device = next(autoencoder.parameters()).device
    # A private generator: iterating a DataLoader otherwise draws a seed from the global RNG, which would
    # make a run that builds the cache start differently from one that reuses it.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())
    means, stds, caption_index = [], [], []
    table: dict[str, int] = {}
    states, masks = [], []  # per batch of new captions, each cut to that batch's longest caption

    def encode(prompts: list[str]) -> None:
        ids, mask = text_encoder.tokenize(prompts)
        used = int(mask.sum(1).max())  # causal text transformer: the padding after `used` changes nothing before it
        on = text_encoder.device
        encoding = text_encoder.encode_tokens(ids[:, :used].to(on), mask[:, :used].to(on))
        states.append(encoding.states.float().cpu())
        masks.append(encoding.mask.bool().cpu())

    for batch in tqdm(loader, desc="caching latents", disable=not progress, dynamic_ncols=True):
        posterior = autoencoder.encode(batch["image"].to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        new = [c for c in dict.fromkeys(batch["caption"]) if c not in table]
        for caption in new:
            table[caption] = len(table)
        if new:
            encode(new)
        caption_index.append(torch.tensor([table[c] for c in batch["caption"]]))
    encode([""])
    length = max(s.shape[1] for s in states)

    def pad(t: torch.Tensor) -> torch.Tensor:  # (B, l, ...) -> (B, length, ...) with zeros
        return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1]) if t.ndim == 3 else (0, length - t.shape[1]))

    all_states = torch.cat([pad(s) for s in states])
    all_masks = torch.cat([pad(m) for m in masks])
    latents = {"mean": torch.cat(means), "std": torch.cat(stds), "caption": torch.cat(caption_index)}
    text = {"states": all_states[:-1], "mask": all_masks[:-1],
            "uncond_states": all_states[-1:], "uncond_mask": all_masks[-1:]}
    return latents, text


def load_or_build_cache(root: str | Path, dataset: Dataset, key: dict, autoencoder, text_encoder, *,
                        batch_size: int = 64, num_workers: int = 0, log: Callable[[str], None] = print,
                        progress: bool = True) -> LatentCache:
    """The cache for `key` under `root`: loaded if it exists, else computed and written atomically."""
    folder = cache_folder(root, key)
    key_file = folder / KEY_FILE
    if key_file.is_file() and json.loads(key_file.read_text()).get("key") == key:
        log(f"latent cache: reusing {folder}")
        return LatentCache.load(folder)
    log(f"latent cache: encoding {len(dataset)} samples into {folder}")
    latents, text = compute_cache(dataset, autoencoder, text_encoder, batch_size, num_workers, progress)
    with atomic_directory(folder) as tmp:
        save_tensors(latents, tmp / "latents.safetensors")
        save_tensors(text, tmp / "text.safetensors")
        atomic_write_json(tmp / KEY_FILE, {"key": key, "samples": len(latents["mean"]),
                                           "captions": len(text["states"]), "tokens": text["states"].shape[1]})
    return LatentCache.load(folder)
