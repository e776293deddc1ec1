"""Tar shards in the layout img2dataset writes, streamed as {"image": (3, H, W) in [-1, 1], "caption": str}.

A shard is a .tar file whose members are grouped into samples by key: `KEY.jpg` (or .png, .webp, any
format Pillow opens) and a caption, `KEY.txt` or the "caption" field of `KEY.json`. The source names
the shards as a brace pattern (`data/{00000..00099}.tar`, URLs too), a `.txt` list of shard paths or
URLs (one a line, relative to the list's folder), or a folder of `.tar` files (sorted by name).
webdataset reads the tars; samples stream, so memory does not grow with the data set.

Split: a sample is held out when heldout_score(KEY) < HELDOUT_FRACTION, the folder rule applied to
the key. Bad samples (no image, no caption, an image that cannot be decoded, a tar cut short) are
skipped, recorded in `skipped` and named in one warning each, in the process that meets them.

The stream, as the training loop uses it (one process of P, with W DataLoader workers):
    dataset.configure(rank=r, world_size=P, seed=s, start_batch=k, batch_size=B)
    DataLoader(dataset, batch_size=B, num_workers=W, drop_last=True)      # no sampler
  - It is endless. Epoch e reads every shard once, in an order permuted by (s, e). The (epoch, shard)
    pairs, numbered p = e * S + i, are dealt round robin to the P * W slots (slot r * W + w), so each
    key is read by exactly one slot per epoch, and no slot starves when there are fewer shards than
    slots. Within a shard, samples pass a buffer of `shuffle_buffer` (raw bytes) shuffled by (s, e, shard).
  - A position in a slot's stream is a usable sample of the split, known before decoding; an image that
    fails to decode is replaced by the next one that decodes (as in the folder dataset), so positions
    do not move.
  - Resume: k is the number of DataLoader batches this process has consumed (steps x grad_accum). The
    DataLoader takes batch j from worker j % W, so a resumed worker w continues the batches of worker
    (w + k) % W of the uninterrupted run and skips that worker's batches before k, reading their
    samples but not decoding them: the batches from k on are exactly those of an uninterrupted run.
  - Random crops and flips are seeded by (data seed, key): the same for a key in every epoch.

Evaluation: `one_pass()` is a finite, deterministic copy (shards in order, unshuffled, all in this
process, or a process's share of them); `take(n)` its first n samples.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import random
import re
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import torch.utils.data
from torch.utils.data import IterableDataset
from webdataset import filters, tariterators
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from ..config import check_choice
from ..errors import DataError, short_list
from .imagefolder import HELDOUT_FRACTION, SPLITS, clean_caption, heldout_score, image_extensions
from .images import CROPS, UnreadableImageError, decode_image, parse_colour, pil_to_tensor, prepare_image

CAPTION_HELP = 'a caption is KEY.txt, or a "caption" field in KEY.json'
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")  # {00000..00099} or {a,b}


def is_url(name: str) -> bool:
    return "://" in name or name.startswith("pipe:")


def _tar_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.tar") if not p.name.startswith(".") and p.is_file())


def is_shard_source(source: str) -> bool:
    """Whether `source` names tar shards: a brace pattern, a .tar or .txt path or URL, or a folder
    holding .tar files and no images."""
    path = Path(source).expanduser()
    if path.is_dir():
        images = image_extensions()
        return bool(_tar_files(path)) and not any(p.suffix.lower() in images for p in path.iterdir())
    return source.endswith((".tar", ".txt")) or bool(_BRACES.search(source)) or "::" in source


def resolve_shards(source: str) -> list[str]:
    """The shard paths or URLs `source` names; DataError if it names none, or a local one is missing."""
    path = Path(source).expanduser()
    if path.is_dir():
        shards = [str(p) for p in _tar_files(path)]
        if not shards:
            raise DataError(f"{source}: no .tar files in this folder")
        return shards
    if source.endswith(".txt"):
        if not path.is_file():
            raise DataError(f"shard list not found: {source}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        shards = [line if is_url(line) else str(path.parent / Path(line).expanduser())
                  for line in lines if line and not line.startswith("#")]
        if not shards:
            raise DataError(f"{source}: the shard list is empty")
    else:
        shards = [s if is_url(s) else str(Path(s).expanduser()) for s in expand_urls(source)]
    missing = [s for s in shards if not is_url(s) and not Path(s).is_file()]
    if len(missing) == len(shards):
        looked = f" (looked for {short_list(missing, 3)})" if len(shards) > 1 else ""
        raise DataError(f"{source}: no shard file matches{looked}")
    if missing:
        raise DataError(f"{source}: {len(missing)} of {len(shards)} shards do not exist: {short_list(missing)}")
    return shards


def sample_caption(sample: dict) -> str | None:
    """KEY.txt, else the "caption" field of KEY.json (img2dataset writes both), cleaned as folder captions are."""
    if "txt" in sample:
        return clean_caption(sample["txt"].decode("utf-8", errors="replace"))
    try:
        caption = json.loads(sample["json"]).get("caption") if "json" in sample else None
    except (ValueError, AttributeError):  # not JSON, or not an object
        caption = None
    return clean_caption(caption) if isinstance(caption, str) else None


@functools.cache
def _image_suffixes() -> frozenset[str]:
    return frozenset(ext[1:] for ext in image_extensions())  # "png", "jpg", ... as webdataset names members


class Candidate(NamedTuple):
    """A usable sample before decoding: what the shuffle buffer holds."""
    shard: str
    key: str
    ext: str        # the image member's suffix
    data: bytes     # the image file's bytes
    caption: str


class ShardDataset(IterableDataset):
    """Captioned images streamed from tar shards, resized and cropped to size x size (see the module docstring)."""

    def __init__(self, source: str, size: int, crop: str = "center", flip: bool = False,
                 background: str = "white", split: str = "train", seed: int = 0, shuffle_buffer: int = 1000):
        check_choice("crop", crop, CROPS)
        check_choice("split", split, SPLITS)
        parse_colour(background)  # fail now on a bad colour name, not in the first batch
        self.source, self.size, self.crop, self.flip = source, size, crop, flip
        self.background, self.split, self.seed, self.shuffle_buffer = background, split, seed, shuffle_buffer
        self.shards = resolve_shards(source)
        self.skipped: dict[str, str] = {}  # "shard:key" (or a shard) -> reason, met in this process
        self._only_key: str | None = None  # see _probe: tiny shard sets
        self._whole = False
        self._shuffled = True              # shard order and buffer shuffled (one_pass: not)
        self.configure(seed=seed)
        self._probe()

    def configure(self, *, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0,
                  batch_size: int = 1, epochs: int | None = None) -> ShardDataset:
        """This process's part of the stream: process `rank` of `world_size`, shard order seeded by `seed`,
        starting after `start_batch` batches of `batch_size` (see the module docstring), ending after
        `epochs` epochs (None: never). Returns self."""
        if not 0 <= rank < world_size or start_batch < 0 or batch_size < 1 or (epochs is not None and epochs < 1):
            raise ValueError(f"configure: bad rank {rank} / world_size {world_size}, start_batch {start_batch}, "
                             f"batch_size {batch_size} or epochs {epochs}")
        self._rank, self._world, self._order_seed = rank, world_size, seed
        self._start_batch, self._batch_size, self._epochs = start_batch, batch_size, epochs
        return self

    def one_pass(self, rank: int = 0, world_size: int = 1) -> ShardDataset:
        """A finite copy for evaluation or caching: every sample of the split once, shards in order,
        unshuffled; process `rank` of `world_size` reads shards rank, rank + world_size, ... (divided
        among its DataLoader workers, if any)."""
        view = copy.copy(self).configure(rank=rank, world_size=world_size, epochs=1)
        view._shuffled = False
        return view

    def _in_split(self, key: str) -> bool:
        if self._only_key is not None:
            return key == self._only_key
        return self._whole or (heldout_score(key) < HELDOUT_FRACTION) == (self.split == "heldout")

    def _probe(self) -> None:
        """Read shards in order up to the first usable sample of this split (normally the first sample).

        DataError when no sample of any shard has both an image and a caption. When every usable key falls
        in the other split (a handful of samples), "heldout" is the lowest-scoring key and "train" all of
        them, as a folder of one image serves both splits."""
        seen, usable, lowest = 0, 0, None
        for shard in self.shards:
            for sample in self._read(shard, record=False):
                seen += 1
                if isinstance(self._candidate(shard, sample), str):
                    continue
                usable, key = usable + 1, sample["__key__"]
                if self._in_split(key):
                    return
                lowest = key if lowest is None or heldout_score(key) < heldout_score(lowest) else lowest
        if not usable:
            what = f"none of the {seen} samples has an image and a caption ({CAPTION_HELP})" if seen else "no samples"
            raise DataError(f"{self.source}: {what} in {len(self.shards)} shard(s)")
        if self.split == "heldout":
            self._only_key = lowest
        else:
            self._whole = True

    def _read(self, shard: str, record: bool = True) -> Iterator[dict]:
        """One shard's samples as webdataset groups them: {"__key__": KEY, "jpg": bytes, "txt": bytes, ...}."""
        def handler(err: Exception) -> bool:  # a shard that cannot be read, or is cut short: skip the rest
            if record:
                self._skip(shard, f"unreadable tar ({type(err).__name__}: {err.args[0] if err.args else err})")
            return True

        try:
            stream = gopen(shard)
        except OSError as err:
            handler(err)
            return
        with stream:
            files = tariterators.tar_file_expander([{"url": shard, "stream": stream}], handler=handler)
            yield from tariterators.group_by_keys(files, handler=handler)

    @staticmethod
    def _candidate(shard: str, sample: dict) -> Candidate | str:
        """The sample ready to decode, or why it is not usable."""
        ext = next((k for k in sample if k in _image_suffixes()), None)
        if ext is None:
            return "no image"
        caption = sample_caption(sample)
        if caption is None:
            return f"no caption ({CAPTION_HELP})"
        return Candidate(shard, sample["__key__"], ext, sample[ext], caption)

    def _skip(self, name: str, reason: str) -> None:
        if name not in self.skipped:
            self.skipped[name] = reason
            warnings.warn(f"skipping {name}: {reason} ({len(self.skipped)} skipped in this process)", stacklevel=3)

    def _candidates(self, shard: str, epoch: int) -> Iterator[Candidate]:
        """The usable samples of this split in one shard, shuffled in a buffer seeded by (seed, epoch, shard)."""
        def usable() -> Iterator[Candidate]:
            for sample in self._read(shard):
                if self._in_split(sample["__key__"]):
                    found = self._candidate(shard, sample)
                    if isinstance(found, str):
                        self._skip(f"{shard}:{sample['__key__']}", found)
                    else:
                        yield found

        if not self._shuffled or self.shuffle_buffer < 2:
            return usable()
        rng = random.Random(f"shards/{self._order_seed}/{epoch}/{shard}")
        return filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(usable())

    def _shard_order(self, epoch: int) -> list[int]:
        count = len(self.shards)
        if not self._shuffled:
            return list(range(count))
        return random.Random(f"shards/{self._order_seed}/{epoch}").sample(range(count), count)

    def _slot(self, slot: int, slots: int) -> Iterator[Candidate]:
        """Slot `slot`'s share of the stream: the (epoch, shard) pairs p = e * S + i with p % slots == slot."""
        count, order, order_epoch, idle = len(self.shards), [], -1, 0
        end = None if self._epochs is None else self._epochs * count
        for pair in itertools.count(slot, slots):
            if end is not None and pair >= end:
                return
            epoch, index = divmod(pair, count)
            if epoch != order_epoch:
                order, order_epoch = self._shard_order(epoch), epoch
            idle += 1
            for candidate in self._candidates(self.shards[order[index]], epoch):
                idle = 0
                yield candidate
            if idle > 20 * count + slots:  # an endless stream with nothing left to give: say so, do not spin
                raise DataError(f"{self.source}: {idle} shard reads in a row gave no usable {self.split} sample")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        role = (worker + self._start_batch) % workers  # the uninterrupted run's worker whose batches we continue
        skip = max(0, -(-(self._start_batch - role) // workers)) * self._batch_size  # its samples before start
        pending = 0  # positions whose image failed to decode: the next good sample fills them too
        for position, candidate in enumerate(self._slot(self._rank * workers + role, self._world * workers)):
            if position < skip:
                continue
            try:
                sample = self._decode(candidate)
            except UnreadableImageError as err:
                self._skip(f"{candidate.shard}:{candidate.key}", f"cannot read image ({err.reason})")
                pending += 1
                continue
            for _ in range(pending + 1):
                yield sample
            pending = 0

    def _decode(self, candidate: Candidate) -> dict:
        rng = random.Random(f"shards/{self.seed}/{candidate.key}")  # the same crop and flip for a key every epoch
        name = f"{candidate.shard}:{candidate.key}.{candidate.ext}"
        image = decode_image(candidate.data, name, self.background)
        image = prepare_image(image, self.size, self.crop, self.flip, rng)
        return {"image": pil_to_tensor(image), "caption": candidate.caption}  # (3, size, size) in [-1, 1]
