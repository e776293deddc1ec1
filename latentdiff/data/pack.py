"""`latentdiff pack FOLDER OUT`: a folder of captioned images as WebDataset tar shards, for `--data`.

Each sample is the image file's own bytes as KEY.<its suffix> and its caption as KEY.txt (the layout
img2dataset writes). KEY is the image's path in the folder without its suffix, dots made underscores
(webdataset splits a member name at its first dot). The folder is read as the folder dataset reads it:
the same caption rules, and bad files skipped with one warning. Samples go in a fixed pseudo-random
order (a hash of each path), so that every shard mixes the folder's sub-folders. Each shard is written
under a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

DEFAULT_SHARD_SIZE = 1000


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="images with captions: a .txt beside each image, or a metadata.jsonl")
    parser.add_argument("out", help="folder for OUT/00000.tar, 00001.tar, ... (it must hold no .tar files yet)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="samples per shard (default: %(default)s)")


def run_pack(args: argparse.Namespace) -> None:
    shards, count = pack_folder(args.folder, args.out, args.shard_size)
    megabytes = sum(p.stat().st_size for p in shards) / 1e6
    print(f"packed {count} images into {len(shards)} shard(s) in {args.out} ({megabytes:.1f} MB); "
          f"train with --data '{shard_pattern(shards)}'")


def shard_pattern(shards: list[Path]) -> str:
    """The brace pattern that names `shards` (numbered files in one folder)."""
    if len(shards) == 1:
        return str(shards[0])
    return str(shards[0].parent / f"{{{shards[0].stem}..{shards[-1].stem}}}.tar")


def sample_keys(names: list[str]) -> dict[str, str]:
    """{relative path: KEY}: the path without its suffix, dots made underscores, unique (a.png, a.jpg -> a, a_2)."""
    keys, used = {}, set()
    for name in names:
        base = str(PurePosixPath(name).with_suffix("")).replace(".", "_")
        key, number = base, 1
        while key in used:
            number += 1
            key = f"{base}_{number}"
        used.add(key)
        keys[name] = key
    return keys


def pack_folder(folder: str | Path, out: str | Path, shard_size: int = DEFAULT_SHARD_SIZE) -> tuple[list[Path], int]:
    """Write the folder's captioned images into OUT/00000.tar, ...; returns (shard paths, images written)."""
    import hashlib
    import os

    from webdataset import TarWriter

    from ..errors import ConfigError, DataError
    from .imagefolder import scan_folder

    if shard_size < 1:
        raise ConfigError(f"--shard-size: must be at least 1, got {shard_size}")
    root, out = Path(folder).expanduser(), Path(out).expanduser()
    names, captions, _ = scan_folder(root)  # DataError: no folder, no usable image, an image without caption
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(p.suffix == ".tar" and not p.name.startswith(".") for p in out.iterdir()):
        raise DataError(f"{out} already holds .tar files; pack into a new folder (old shards would mix with new ones)")
    out.mkdir(parents=True, exist_ok=True)

    names.sort(key=lambda name: hashlib.sha256(f"pack/{name}".encode()).digest())
    keys = sample_keys(names)
    starts = range(0, len(names), shard_size)
    digits = max(5, len(str(len(starts) - 1)))
    shards = []
    for number, start in enumerate(starts):
        path = out / f"{number:0{digits}d}.tar"
        partial = out / f".{path.name}.partial"  # hidden, and not .tar: never read as a shard
        with open(partial, "wb") as stream, \
                TarWriter(stream, encoder=False, mtime=0.0, format="PAX_FORMAT") as writer:  # PAX: long names
            for name in names[start:start + shard_size]:
                writer.write({"__key__": keys[name], PurePosixPath(name).suffix.lower()[1:]: (root / name).read_bytes(),
                              "txt": captions[name].encode("utf-8")})
        os.replace(partial, path)
        shards.append(path)
    return shards, len(names)
