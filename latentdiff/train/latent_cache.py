"""The latent + text-embedding cache of diffusion training: the frozen encoders run once per sample, not per step.

A cache folder holds the N samples of a dataset in shards of SHARD_SIZE consecutive samples (for tar shards
streamed by ShardDataset: one cache shard per input shard, holding that shard's samples of the split):
    part-KKKKK.safetensors  mean, std (n, C, h, w) float32: the autoencoder's posterior, unscaled, so that
                            training still draws z = mean + std·ε afresh each time; states (n, l, D) float16 and
                            mask (n, l) bool: each sample's caption tokens, cut to the shard's longest caption (l);
                            uncond_states (1, l, D), uncond_mask (1, l): the empty prompt
                            with grounding (data/shapes_grounding.py), also ground_masks (n, G, h, w) bool: the
                            latent cells each named object touches, ground_tokens (n, l, G) bool: its words' tokens
    cache.json              the key, N, the shard files and their row counts, L (the longest l), written last

Each sample keeps its own token states: real captions are nearly all distinct, so a table of distinct
captions would grow with the data as much as per-sample rows do, and would have to stay in memory.
Reading streams: an item is a few pread calls into its shard, padded to L tokens. Not safetensors' safe_open,
which reads through a memory map whose touched pages may stay resident (counted in RSS) while it is open.
Cutting the states changes nothing the UNet sees: the text transformer is causal, so the states before
the padding do not depend on it, and the UNet's cross-attention masks the padding out.

Building: process r of W encodes the shards k with k % W == r, each written whole to a temporary name
and renamed; after a barrier process 0 writes cache.json. A folder without cache.json is an unfinished
build (a crash): the next build keeps its complete shards and encodes the rest.

The folder's name is a hash of its key: the two encoders' weights hashes (and the text encoder's output
layer and context length) and the data config (source, size, length, seed, crop, flip, background; the
shapes levers and grounding only when on, so older caches stay valid; for a folder of images also its file
list, sizes and modification times). A run with the same encoders and
data reuses the folder; a changed encoder or data config gets a new one.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import itertools
import json
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_json, save_tensors
from ..config import to_dict
from ..data.shapes_grounding import token_groups
from ..data.shards import ShardDataset
from ..data.sources import DataConfig
from ..errors import CheckpointError

CACHE_VERSION = 2
KEY_FILE = "cache.json"
DATA_KEY_FIELDS = ("source", "size", "length", "seed", "crop", "flip", "background")
LEVER_KEY_FIELDS = ("paraphrase", "multi_object_weight")  # in the key only when not at their defaults
# Samples per shard. A build holds one shard in memory: 4096 SD-sized samples (64x64x4 latents, 77x768
# states) are about 1 GB, the shapes preset's (8x8x4, ~16x256) 40 MB.
SHARD_SIZE = 4096
# Token states on disk: float16 halves the files (LayerNorm outputs, far inside its range; bf16 autocast rounds
# them more coarsely). Tiny-config training losses with float16 vs float32 states: within 5e-5 over 300 steps.
STATES_DTYPE = torch.float16
OPEN_SHARDS = 32  # shard files a reader keeps open (least recently used ones are closed)
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BOOL": torch.bool}


def data_fingerprint(dataset: Dataset) -> str | None:
    """For a folder or tar shards: a hash of the files' names, sizes and modification times (None for shapes)."""
    if isinstance(dataset, ShardDataset):
        paths = [Path(shard) for shard in dataset.shards]
    elif hasattr(dataset, "files") and hasattr(dataset, "root"):
        paths = [Path(dataset.root) / name for name in dataset.files]
    else:
        return None
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_key(data: DataConfig, dataset: Dataset, autoencoder_hash: str, text_encoder_hash: str,
              text_encoder, grounding: bool = False) -> dict:
    """Everything the cached tensors depend on."""
    defaults = to_dict(DataConfig())
    data_fields = {k: v for k, v in to_dict(data).items()
                   if k in DATA_KEY_FIELDS or (k in LEVER_KEY_FIELDS and v != defaults[k])}
    if data.source != "shapes":
        data_fields["source"] = str(Path(data.source).expanduser().resolve())
        data_fields["files"] = data_fingerprint(dataset)
    key = {"version": CACHE_VERSION, "autoencoder": autoencoder_hash, "text_encoder": text_encoder_hash,
           "output_layer": text_encoder.output_layer, "context_length": text_encoder.context_length,
           "samples": None if isinstance(dataset, ShardDataset) else len(dataset), "data": data_fields}
    return {**key, "grounding": True} if grounding else key


def cache_folder(root: str | Path, key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / name


def shard_name(k: int) -> str:
    return f"part-{k:05d}.safetensors"


def cache_parts(dataset: Dataset, shard_size: int) -> list[range | None]:
    """What each cache shard holds: a range of sample indices (map-style datasets), or None for "input tar shard
    k, whatever it holds" (ShardDataset: one cache shard per input shard, its count known once read)."""
    if isinstance(dataset, ShardDataset):
        return [None] * len(dataset.shards)
    return shard_ranges(len(dataset), shard_size)


def part_batches(dataset: Dataset, parts: list[range | None], k: int, batch_size: int, num_workers: int):
    """The batches of cache shard k, in order."""
    # A private generator: iterating a DataLoader otherwise draws a seed from the global RNG, which would
    # make a run that builds the cache start differently from one that reuses it.
    options = dict(num_workers=num_workers, generator=torch.Generator())
    if parts[k] is None:  # tar shard k alone, in order
        return DataLoader(dataset.one_pass(rank=k, world_size=len(parts)), batch_size=batch_size, **options)
    batches = [list(range(start, min(start + batch_size, parts[k].stop)))
               for start in range(parts[k].start, parts[k].stop, batch_size)]
    return DataLoader(dataset, batch_sampler=batches, **options)


def empty_name(k: int) -> str:
    return f"part-{k:05d}.empty"  # a tar shard with no sample of the split


def shard_ranges(samples: int, shard_size: int) -> list[range]:
    """The sample indices of each shard: consecutive runs of shard_size, the last one shorter."""
    return [range(start, min(start + shard_size, samples)) for start in range(0, samples, shard_size)]


def pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """(l, ...) -> (length, ...), zeros after the first l rows."""
    out = t.new_zeros((length, *t.shape[1:]))
    out[:len(t)] = t
    return out


class ShardFile:
    """One safetensors shard, read a row at a time with pread (its header says where each tensor lies)."""

    def __init__(self, path: Path):
        self.fd = -1  # for close() if open fails
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, size, 8))
            header.pop("__metadata__", None)
            # name -> (dtype, shape, first byte)
            self.tensors = {name: (DTYPES[t["dtype"]], t["shape"], 8 + size + t["data_offsets"][0])
                            for name, t in header.items()}
            end = 8 + size + max(t["data_offsets"][1] for t in header.values())
        except BaseException:
            self.close()
            raise
        self.complete = os.fstat(self.fd).st_size == end  # a truncated file is not a shard

    def rows(self, name: str, start: int, count: int = 1) -> torch.Tensor:
        """(count, *shape[1:]) rows start.. of tensor `name`."""
        dtype, shape, offset = self.tensors[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        data = os.pread(self.fd, row * count, offset + start * row)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(count, *shape[1:])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close


def complete_shard(path: Path, samples: int | None) -> ShardFile | None:
    """The shard at `path` if it is whole and holds `samples` rows (any number when None), else None."""
    try:
        shard = ShardFile(path)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return shard if shard.complete and samples in (None, shard.tensors["mean"][1][0]) else None


class LatentCache(Dataset):
    """A finished cache folder, read lazily. Item i is {"mean", "std": (C, h, w) float32, "states": (L, D)
    float32, "mask": (L,) bool} (with grounding also "ground_masks": (G, h, w) bool, "ground_tokens": (L, G)
    bool); a DataLoader batches them into what a training step needs."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / KEY_FILE).read_text())
            self.samples, self.tokens, self.files = index["samples"], index["tokens"], index["shards"]
            self.starts = list(itertools.accumulate(index["counts"], initial=0))[:-1]  # each shard's first item
            self._open: OrderedDict[int, ShardFile] = OrderedDict()
            shard = self._shard(0)
            states, mask = shard.rows("uncond_states", 0)[0], shard.rows("uncond_mask", 0)[0]
        except (OSError, ValueError, KeyError, struct.error) as err:
            raise CheckpointError(f"{self.folder}: unreadable latent cache ({err}); delete the folder to "
                                  f"rebuild it") from None
        # the empty prompt's (1, L, D) / (1, L), what conditioning dropout substitutes
        self.uncond_states = pad_tokens(states.float(), self.tokens)[None]
        self.uncond_mask = pad_tokens(mask, self.tokens)[None]

    def _shard(self, k: int) -> ShardFile:
        if k not in self._open:
            if len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
            self._open[k] = ShardFile(self.folder / self.files[k])
        self._open.move_to_end(k)
        return self._open[k]

    def __getstate__(self) -> dict:  # DataLoader workers open their own files
        return {**self.__dict__, "_open": OrderedDict()}

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.samples:
            raise IndexError(f"sample {index} of a {self.samples}-sample latent cache")
        k = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[k]
        shard = self._shard(k)
        mean, std, states, mask = (shard.rows(name, row)[0] for name in ("mean", "std", "states", "mask"))
        item = {"mean": mean, "std": std, "states": pad_tokens(states.float(), self.tokens),
                "mask": pad_tokens(mask, self.tokens)}
        if "ground_masks" in shard.tensors:
            item["ground_masks"] = shard.rows("ground_masks", row)[0]
            item["ground_tokens"] = pad_tokens(shard.rows("ground_tokens", row)[0], self.tokens)
        return item

    def to(self, device: torch.device | str) -> LatentCache:
        """Move the empty prompt's conditioning to `device` (batches are moved by the training loop)."""
        self.uncond_states, self.uncond_mask = self.uncond_states.to(device), self.uncond_mask.to(device)
        return self

    def unconditional(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning (1, L, D) / (1, L): what conditioning dropout substitutes."""
        return {"context": self.uncond_states, "context_mask": self.uncond_mask}


def encode_captions(text_encoder, captions: list[str]) -> list[torch.Tensor]:
    """Each caption's (l_i, D) token states, l_i its own token count, on the CPU in STATES_DTYPE."""
    ids, mask = text_encoder.tokenize(captions)
    used = int(mask.sum(1).max())  # causal text transformer: the padding after `used` changes nothing before it
    on = text_encoder.device
    encoding = text_encoder.encode_tokens(ids[:, :used].to(on), mask[:, :used].to(on))
    lengths = encoding.mask.sum(1).tolist()
    return [s[:n].to("cpu", STATES_DTYPE, copy=True) for s, n in zip(encoding.states, lengths)]


def stack_tokens(states: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_i, D) states -> (n, length, D) states and (n, length) bool mask, zeros after each one's tokens."""
    out = torch.zeros(len(states), length, states[0].shape[1], dtype=STATES_DTYPE)
    mask = torch.zeros(len(states), length, dtype=torch.bool)
    for i, s in enumerate(states):
        out[i, :len(s)], mask[i, :len(s)] = s, True
    return out, mask


def write_shard(path: Path, means: list[torch.Tensor], stds: list[torch.Tensor], states: list[torch.Tensor],
                uncond: torch.Tensor, grounding: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
    """grounding: (n, G, h, w) masks in batches and each sample's (l_i, G) token groups, or None."""
    length = max(len(s) for s in [*states, uncond])
    tensors = dict(zip(("states", "mask"), stack_tokens(states, length)))
    tensors.update(zip(("uncond_states", "uncond_mask"), stack_tokens([uncond], length)))
    if grounding is not None:
        masks, tokens = grounding
        tensors["ground_masks"] = torch.cat(masks)
        tensors["ground_tokens"] = torch.stack([pad_tokens(t, length) for t in tokens])
    save_tensors({"mean": torch.cat(means), "std": torch.cat(stds), **tensors}, path)  # temp name, then rename


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc; elsewhere nothing). A freed large tensor raises
    glibc's mmap threshold, so later ones come from the heap, which fragments around each shard's rows and
    does not shrink: without this, a build's peak RSS grew 30% from 10k to 100k samples."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


@torch.no_grad()
def compute_shards(folder: str | Path, dataset: Dataset, autoencoder, text_encoder, *, rank: int = 0,
                   world_size: int = 1, shard_size: int = SHARD_SIZE, batch_size: int = 64, num_workers: int = 0,
                   progress: bool = True, log: Callable[[str], None] = print) -> list[int]:
    """Encode and write this process's shards (k % world_size == rank) that `folder` does not already hold
    whole; returns those it wrote. The encoders run on their own device."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = cache_parts(dataset, shard_size)
    mine = range(rank, len(parts), world_size)
    todo = [k for k in mine if part_count(folder, parts, k) is None]
    if len(todo) < len(mine):
        log(f"latent cache: {len(mine) - len(todo)} finished shards kept from an earlier build")
    device = next(autoencoder.parameters()).device
    (uncond,) = encode_captions(text_encoder, [""])
    for k in tqdm(todo, desc="caching latents", disable=not progress or len(todo) < 2, dynamic_ncols=True):
        means, stds, captions, table = [], [], [], {}  # table: this shard's distinct captions -> (l, D) states
        masks, groups = [], []  # grounding only
        for batch in part_batches(dataset, parts, k, batch_size, num_workers):
            posterior = autoencoder.encode(batch["image"].to(device))
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            captions += batch["caption"]
            new = [c for c in dict.fromkeys(batch["caption"]) if c not in table]
            if new:
                table.update(zip(new, encode_captions(text_encoder, new)))
            if "object_masks" in batch:  # (B, G, H, W) pixels -> the latent cells each object touches
                masks.append(F.adaptive_max_pool2d(batch["object_masks"], means[-1].shape[-2:]) > 0)
                groups += token_groups(text_encoder.tokenize, batch["caption"], batch["object_spans"]).unbind()
        if captions:
            states = [table[c] for c in captions]
            grounding = (masks, [g[:len(s)] for g, s in zip(groups, states)]) if masks else None
            write_shard(folder / shard_name(k), means, stds, states, uncond, grounding)
        else:  # every sample of this tar shard is in the other split
            atomic_write_json(folder / empty_name(k), {})
        release_free_memory()
    return todo


def part_count(folder: Path, parts: list[range | None], k: int) -> int | None:
    """Rows of cache shard k if it is written whole, else None."""
    if parts[k] is None and (folder / empty_name(k)).is_file():
        return 0
    shard = complete_shard(folder / shard_name(k), None if parts[k] is None else len(parts[k]))
    if shard is None:
        return None
    count = shard.tensors["mean"][1][0]
    shard.close()
    return count


def write_index(folder: str | Path, key: dict, dataset: Dataset, shard_size: int = SHARD_SIZE) -> None:
    """cache.json, once every shard is written (by whichever process): what makes the folder a cache."""
    folder = Path(folder)
    parts = cache_parts(dataset, shard_size)
    names, counts, tokens = [], [], 0
    for k in range(len(parts)):
        count = part_count(folder, parts, k)
        if count is None:
            raise CheckpointError(f"{folder / shard_name(k)}: missing or incomplete latent cache shard")
        if count:
            shard = ShardFile(folder / shard_name(k))
            tokens = max(tokens, shard.tensors["states"][1][1])
            shard.close()
            names.append(shard_name(k))
            counts.append(count)
    if not counts:
        raise CheckpointError(f"{folder}: the data has no training samples to cache")
    for leftover in folder.glob(".part-*.tmp-*"):  # temporary files of a crashed build
        leftover.unlink(missing_ok=True)
    atomic_write_json(folder / KEY_FILE, {"key": key, "samples": sum(counts), "counts": counts, "tokens": tokens,
                                          "shards": names})


def is_finished(folder: Path, key: dict) -> bool:
    """Whether `folder` holds a whole cache for `key`: its cache.json, and every shard it lists complete."""
    try:
        index = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return index.get("key") == key and len(index.get("shards", ())) == len(index.get("counts", ())) and all(
        complete_shard(folder / name, count) is not None for name, count in zip(index["shards"], index["counts"]))


def load_or_build_cache(root: str | Path, dataset: Dataset, key: dict, autoencoder, text_encoder, *,
                        rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
                        shard_size: int = SHARD_SIZE, batch_size: int = 64, num_workers: int = 0,
                        log: Callable[[str], None] = print, progress: bool = True) -> LatentCache:
    """The cache for `key` under `root`: loaded if finished, else built by all `world_size` processes (each
    calls this; `barrier` waits for all of them, e.g. accelerator.wait_for_everyone)."""
    folder = cache_folder(root, key)
    if is_finished(folder, key):
        log(f"latent cache: reusing {folder}")
        return LatentCache(folder)
    log(f"latent cache: encoding {key.get('samples') or 'all the'} samples into {folder}")
    compute_shards(folder, dataset, autoencoder, text_encoder, rank=rank, world_size=world_size,
                   shard_size=shard_size, batch_size=batch_size, num_workers=num_workers, progress=progress, log=log)
    barrier()
    if rank == 0:
        write_index(folder, key, dataset, shard_size)
    barrier()
    return LatentCache(folder)
