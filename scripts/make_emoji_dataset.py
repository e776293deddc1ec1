#!/usr/bin/env python
"""Build a captioned image folder from the emoji of the npm package emoji-datasource-twitter (MIT-licensed).

    npm pack emoji-datasource-twitter      # you fetch it: writes emoji-datasource-twitter-VERSION.tgz
    python scripts/make_emoji_dataset.py emoji-datasource-twitter-*.tgz data/emoji
    latentdiff train-autoencoder --data data/emoji --config configs/autoencoder/folder64.yaml

One PNG per emoji that has a Twitter image (64x64, transparency kept: the dataset composites it onto
data.background), captioned in OUT/metadata.jsonl by its name in lower case ("grinning face with
smiling eyes", "france flag"). Skin-tone variations only with --skin-tones ("father christmas: dark
skin tone"). Nothing is downloaded; the folder is written as OUT.tmp and renamed when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from PIL import Image

from latentdiff.data.imagefolder import METADATA_NAME, clean_caption

INDEX = "package/emoji.json"
IMAGES = "package/img/twitter/64/"
SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
              "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}


class InputError(Exception):
    """Bad input: reported in one line, exit status 2."""


def read_package(tgz: Path) -> tuple[list[dict], dict[str, bytes]]:
    """(emoji.json's records, {image file name: PNG bytes}) in one streaming pass over the tarball."""
    if not tgz.is_file():
        raise InputError(f"{tgz} not found; fetch it first with `npm pack emoji-datasource-twitter`")
    index, images = None, {}
    try:
        with tarfile.open(tgz, "r|gz") as tar:
            for member in tar:
                if member.isfile() and (member.name == INDEX or member.name.startswith(IMAGES)):
                    data = tar.extractfile(member).read()
                    if member.name == INDEX:
                        index = data
                    else:
                        images[member.name[len(IMAGES):]] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise InputError(f"{tgz} is not a readable .tgz ({err})") from None
    if index is None:
        raise InputError(f"{tgz} holds no {INDEX}: not the tarball `npm pack emoji-datasource-twitter` writes")
    try:
        records = json.loads(index)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{tgz}: {INDEX} is not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise InputError(f"{tgz}: {INDEX} is not a list of emoji records")
    return records, images


def tone_names(tones: str) -> str:
    """'1F3FB-1F3FF' -> 'light skin tone, dark skin tone' (a tone repeated for two people is named once)."""
    return ", ".join(dict.fromkeys(SKIN_TONES.get(code.upper(), code.lower()) for code in tones.split("-")))


def captioned_images(records: list[dict], skin_tones: bool) -> Iterator[tuple[str, str]]:
    """(image file name, caption) for every emoji with a Twitter image, and for its skin tones if asked."""
    for record in records:
        try:
            name = clean_caption(record["name"].lower())
            if record.get("has_img_twitter"):
                yield record["image"], name
            variations = (record.get("skin_variations") or {}).items() if skin_tones else ()
            for tones, variation in variations:
                if variation.get("has_img_twitter"):
                    yield variation["image"], f"{name}: {tone_names(tones)}"
        except (KeyError, TypeError, AttributeError):
            raise InputError(f"{INDEX}: a record without a string name and image: {str(record)[:80]}") from None


def write_png(data: bytes, path: Path, size: int) -> None:
    """The PNG as it is when it is size x size already, else resized with its alpha channel."""
    with Image.open(io.BytesIO(data)) as img:
        if img.size == (size, size):
            path.write_bytes(data)
        else:
            img.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS).save(path)


def write_folder(entries: Iterator[tuple[str, str]], images: dict[str, bytes], out: Path,
                 size: int) -> tuple[int, list[str]]:
    """Write the images and metadata.jsonl into OUT.tmp, then rename it to OUT; (images written, names skipped)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    lines, skipped = [], []
    for file_name, text in entries:
        try:
            write_png(images[Path(file_name).name], tmp / Path(file_name).name, size)
        except (KeyError, OSError):  # not in the package, or not a readable image
            skipped.append(file_name)
            continue
        lines.append(json.dumps({"file_name": Path(file_name).name, "text": text}, ensure_ascii=False))
    (tmp / METADATA_NAME).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.rename(out)
    return len(lines), skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tgz", type=Path, help="the file `npm pack emoji-datasource-twitter` writes")
    parser.add_argument("out", type=Path, help="the image folder to write (must not exist)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s, as packaged)")
    parser.add_argument("--skin-tones", action=argparse.BooleanOptionalAction, default=False,
                        help="also the skin-tone variations, captioned with their tones (default: without)")
    args = parser.parse_args(argv)
    try:
        if args.size < 8:
            raise InputError(f"--size: {args.size} is too small (at least 8)")
        if args.out.exists():
            raise InputError(f"{args.out} already exists; remove it or choose another folder")
        records, images = read_package(args.tgz)
        count, skipped = write_folder(captioned_images(records, args.skin_tones), images, args.out, args.size)
    except InputError as err:
        print(f"make_emoji_dataset: error: {err}", file=sys.stderr)
        return 2
    missing = f" ({len(skipped)} listed but missing or unreadable: {', '.join(skipped[:5])})" if skipped else ""
    print(f"wrote {count} images with captions to {args.out}{missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
