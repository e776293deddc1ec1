"""WebDataset tar shards: `latentdiff pack`, source resolution, bad samples, the split, streaming across
processes and workers, and exact resume."""
import io
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from webdataset import TarWriter

from latentdiff.cli import main
from latentdiff.data import ImageFolderDataset, ShardDataset, build_dataset, in_order, iter_in_order
from latentdiff.data.imagefolder import HELDOUT_FRACTION, heldout_score
from latentdiff.data.pack import pack_folder
from latentdiff.data.shards import is_shard_source, resolve_shards
from latentdiff.data.sources import DataConfig
from latentdiff.errors import DataError


def noise_png(seed: int, width: int = 24, height: int = 20, mode: str = "RGB") -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, "PNG")
    return buffer.getvalue()


def write_folder(root, count: int):
    """`count` captioned noise images ("image N"), a third of them in a sub-folder, some with alpha."""
    for i in range(count):
        folder = root / "sub" if i % 3 == 0 else root
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(noise_png(i, 24 + i % 5, 20, "RGBA" if i % 7 == 0 else "RGB"))
        (folder / f"img{i}.txt").write_text(f"image {i}\n")
    return root


def train_keys(prefix: str, count: int) -> list[str]:
    """The first `count` keys PREFIX0, PREFIX1, ... that fall in the "train" split."""
    return [k for k in (f"{prefix}{i}" for i in range(100)) if heldout_score(k) >= HELDOUT_FRACTION][:count]


def write_shard(path, samples: list[dict]) -> None:
    with open(path, "wb") as stream, TarWriter(stream, encoder=False) as writer:
        for sample in samples:
            writer.write({k: v if isinstance(v, bytes) or k == "__key__" else v.encode() for k, v in sample.items()})


@pytest.fixture
def packed(tmp_path):
    """(image folder of 40, shard folder: 40 images packed into 7 shards of up to 6)."""
    folder = write_folder(tmp_path / "images", 40)
    shards, count = pack_folder(folder, tmp_path / "shards", shard_size=6)
    assert count == 40 and [p.name for p in shards] == [f"0000{i}.tar" for i in range(7)]
    return folder, tmp_path / "shards"


def captions_of(dataset) -> list[str]:
    return [sample["caption"] for sample in iter_in_order(dataset)]


def test_pack_then_read_back_gives_the_folder_samples(packed, tmp_path, capsys):
    folder, out = packed
    folder_samples = {s["caption"]: s["image"] for split in ("train", "heldout")
                      for s in iter_in_order(ImageFolderDataset(folder, 16, split=split))}
    shard_samples = {s["caption"]: s["image"] for split in ("train", "heldout")
                     for s in iter_in_order(ShardDataset(str(out), 16, split=split), 100)}
    assert sorted(shard_samples) == sorted(folder_samples) == sorted(f"image {i}" for i in range(40))
    for caption, image in shard_samples.items():  # the same bytes, decoded and cropped the same way
        assert image.shape == (3, 16, 16) and torch.equal(image, folder_samples[caption]), caption

    assert main(["pack", str(folder), str(tmp_path / "again"), "--shard-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "packed 40 images into 3 shard(s)" in printed and "again/{00000..00002}.tar" in printed
    assert main(["pack", str(folder), str(tmp_path / "again")]) == 2  # never mixes new shards with old
    assert capsys.readouterr().err.count("\n") == 1
    (folder / "img5.txt").unlink()
    assert main(["pack", str(folder), str(tmp_path / "third")]) == 2
    assert "img5.png" in capsys.readouterr().err


def test_sources_resolve_to_the_same_shards(packed, tmp_path):
    folder, out = packed
    expected = [str(out / f"0000{i}.tar") for i in range(7)]
    (out / "list.txt").write_text("# shards\n" + "".join(f"0000{i}.tar\n" for i in range(7)))
    (tmp_path / "nested.txt").write_text(f"{out}/00000.tar\n")
    assert resolve_shards(f"{out}/{{00000..00006}}.tar") == expected
    assert resolve_shards(str(out / "list.txt")) == expected
    assert resolve_shards(str(out)) == expected
    assert resolve_shards(str(tmp_path / "nested.txt")) == expected[:1]
    assert resolve_shards(expected[3]) == expected[3:4]
    for source in (f"{out}/{{00000..00006}}.tar", str(out / "list.txt"), str(out), expected[0]):
        assert is_shard_source(source)
        assert isinstance(build_dataset(DataConfig(source=source, size=16)), ShardDataset)
    assert not is_shard_source(str(folder)) and isinstance(build_dataset(DataConfig(source=str(folder), size=16)),
                                                           ImageFolderDataset)

    with pytest.raises(DataError, match=r"no shard file matches \(looked for"):
        resolve_shards(f"{tmp_path}/nothing/{{00000..00009}}.tar")
    with pytest.raises(DataError, match="2 of 9 shards do not exist"):
        resolve_shards(f"{out}/{{00000..00008}}.tar")
    with pytest.raises(DataError, match="shard list not found"):
        resolve_shards(str(tmp_path / "missing.txt"))


def test_bad_sources_are_one_error_line_and_exit_2(tmp_path, capsys):
    write_shard(tmp_path / "bare.tar", [{"__key__": f"k{i}", "png": noise_png(i)} for i in range(5)])
    with pytest.raises(DataError, match=r"bare.tar: none of the 5 samples has an image and a caption"):
        ShardDataset(str(tmp_path / "bare.tar"), 16)
    for source, message in ((f"{tmp_path}/none/{{00000..00003}}.tar", "no shard file matches"),
                            (str(tmp_path / "bare.tar"), "has an image and a caption")):
        code = main(["train-autoencoder", "--data", source, "--out", str(tmp_path / "run"), "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    keys = train_keys("good", 6)
    good = [{"__key__": key, "png": noise_png(i), "txt": f"good {i}"} for i, key in enumerate(keys)]
    cut, mute, img2dataset = train_keys("bad", 3)
    write_shard(tmp_path / "00000.tar", good[:3] + [
        {"__key__": cut, "png": noise_png(9, 64, 64)[:300], "txt": "cut"},          # truncated image
        {"__key__": mute, "png": noise_png(10)},                                     # no caption
        {"__key__": img2dataset, "jpg": noise_png(11), "json": json.dumps({"caption": "from json"})},
    ])
    write_shard(tmp_path / "00001.tar", good[3:])
    whole = (tmp_path / "00001.tar").read_bytes()
    middle_of_5th = whole.index(f"{keys[4]}.png".encode()) + 512 + 100  # its header, then 100 bytes of it
    (tmp_path / "00002.tar").write_bytes(whole[:middle_of_5th])  # a tar cut off mid-sample
    dataset = ShardDataset(str(tmp_path), 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = captions_of(dataset)
    messages = "\n".join(str(w.message) for w in caught)
    first, cut_off = tmp_path / "00000.tar", tmp_path / "00002.tar"
    assert f"skipping {first}:{cut}: cannot read image (truncated) (1 skipped in this process)" in messages
    assert f"skipping {first}:{mute}: no caption" in messages
    assert f"skipping {cut_off}: unreadable tar" in messages
    assert set(dataset.skipped) == {f"{first}:{cut}", f"{first}:{mute}", str(cut_off)}
    # good 3 again from the cut-off copy; the undecodable image's place goes to the next good sample
    # ("from json"), as in the folder dataset
    assert Counter(captions) == Counter([f"good {i}" for i in range(6)] + ["good 3", "from json", "from json"])


def test_heldout_split_is_disjoint_stable_and_by_key(packed, tmp_path):
    folder, out = packed
    train, heldout = (captions_of(ShardDataset(str(out), 16, split=s)) for s in ("train", "heldout"))
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(f"image {i}" for i in range(40))
    keys = {f"image {i}": ("sub/" if i % 3 == 0 else "") + f"img{i}" for i in range(40)}
    assert heldout and all(heldout_score(keys[c]) < HELDOUT_FRACTION for c in heldout)
    pack_folder(folder, tmp_path / "bigger", shard_size=15)  # other shards, same keys: the same split
    assert sorted(captions_of(ShardDataset(str(tmp_path / "bigger"), 16, split="heldout"))) == sorted(heldout)
    # so few samples that no key scores under the fraction: the lowest-scoring one is held out
    keys = train_keys("k", 3)
    write_shard(tmp_path / "tiny.tar", [{"__key__": key, "png": noise_png(0), "txt": key} for key in keys])
    lowest = min(keys, key=heldout_score)
    heldout = ShardDataset(str(tmp_path / "tiny.tar"), 16, split="heldout")
    assert [s["caption"] for s in iter_in_order(heldout, 5)] == [lowest]
    assert len(list(iter_in_order(ShardDataset(str(tmp_path / "tiny.tar"), 16), 5))) == 3


def test_two_processes_with_two_workers_see_every_key_once_per_epoch(packed):
    _, out = packed
    expected = Counter(captions_of(ShardDataset(str(out), 16)))
    seen = []
    for rank in range(2):
        dataset = ShardDataset(str(out), 16, shuffle_buffer=4).configure(
            rank=rank, world_size=2, seed=3, batch_size=1, epochs=2)
        seen.append(Counter(c for batch in DataLoader(dataset, batch_size=1, num_workers=2) for c in batch["caption"]))
    assert seen[0] and seen[1]
    assert seen[0] + seen[1] == Counter({caption: 2 for caption in expected})  # two epochs: each key twice


def test_resume_reproduces_the_uninterrupted_batches(packed):
    _, out = packed
    dataset = ShardDataset(str(out), 16, crop="random", flip=True, shuffle_buffer=4)

    def batches(start: int, count: int):
        dataset.configure(rank=1, world_size=2, seed=7, start_batch=start, batch_size=3)
        loader = iter(DataLoader(dataset, batch_size=3, num_workers=2, drop_last=True))
        return [next(loader) for _ in range(count)]

    straight = batches(0, 14)  # past an epoch: the stream goes on, epoch after epoch
    for start in (5, 8):       # odd and even: a resumed worker takes over the other worker's batches
        resumed = batches(start, 14 - start)
        for a, b in zip(straight[start:], resumed):
            assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    assert len({c for batch in straight for c in batch["caption"]}) < 3 * 14  # samples repeat: it is endless


def test_in_order_views_are_finite_and_deterministic(packed):
    _, out = packed
    dataset = build_dataset(DataConfig(source=str(out), size=16), "heldout")
    dataset.configure(rank=1, world_size=2, seed=5, start_batch=3, batch_size=2)  # what the loop did
    first = [b["caption"] for b in DataLoader(in_order(dataset), batch_size=2)]
    assert first == [b["caption"] for b in DataLoader(in_order(dataset), batch_size=2)]
    assert sum(map(len, first)) == len(captions_of(dataset)) == len(list(iter_in_order(dataset, 100)))
    train = build_dataset(DataConfig(source=str(out), size=16))
    shares = [[s["caption"] for s in train.one_pass(rank, 2)] for rank in range(2)]  # e.g. a cache built by 2
    assert sorted(shares[0] + shares[1]) == sorted(captions_of(train)) and shares[0] and shares[1]


TINY_AUTOENCODER = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=4",
                    "model.resolution=16", "data.size=16", "data.num_workers=2", "train.batch_size=4",
                    "scale_batches=1", "eval_batches=1"]


def test_trains_the_autoencoder_on_packed_shards(tmp_path):
    write_folder(tmp_path / "images", 64)
    assert main(["pack", str(tmp_path / "images"), str(tmp_path / "shards"), "--shard-size", "16"]) == 0
    code = main(["train-autoencoder", "--data", f"{tmp_path}/shards/{{00000..00003}}.tar",
                 "--out", str(tmp_path / "run"), "--steps", "2", *TINY_AUTOENCODER])
    assert code == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_run_on_shards_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from resume_check import kill_then_resume

    from latentdiff.config import apply_overrides
    from latentdiff.models.autoencoder import AutoencoderKL
    from latentdiff.train.autoencoder import AutoencoderTrainingConfig, train_autoencoder

    pack_folder(write_folder(tmp_path / "images", 64), tmp_path / "shards", shard_size=16)
    cfg = apply_overrides(AutoencoderTrainingConfig(), TINY_AUTOENCODER + [
        f"data.source={tmp_path}/shards", "data.crop=random", "data.flip=true", "train.grad_accum=2",
        "train.steps=6", "train.checkpoint_every=2", "train.warmup_steps=1", "scale_batches=2"])
    train_autoencoder(cfg, tmp_path / "straight")
    kill_then_resume(train_autoencoder, cfg, tmp_path / "killed", monkeypatch)
    straight = AutoencoderKL.from_pretrained(tmp_path / "straight").state_dict()
    resumed = AutoencoderKL.from_pretrained(tmp_path / "killed").state_dict()
    assert all(torch.equal(resumed[key], value) for key, value in straight.items())


def test_a_thousand_packed_images_train_every_stage(tmp_path):
    """The issue's check: 1,000 generated images, `latentdiff pack` into 10 shards, each stage trained on
    `--data 'OUT/{00000..00009}.tar'` (a few steps each; the text encoder's retrieval and the diffusion
    latent cache read the shards too)."""
    write_folder(tmp_path / "images", 1000)
    assert main(["pack", str(tmp_path / "images"), str(tmp_path / "shards"), "--shard-size", "100"]) == 0
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 10
    data = ["--data", f"{tmp_path}/shards/{{00000..00009}}.tar", "--steps", "3"]
    assert main(["train-autoencoder", *data, "--out", str(tmp_path / "ae"), *TINY_AUTOENCODER]) == 0
    assert main(["train-text-encoder", *data, "--out", str(tmp_path / "te"), *TINY_TEXT_ENCODER]) == 0
    assert main(["train-diffusion", *data, "--out", str(tmp_path / "unet"), "--autoencoder", str(tmp_path / "ae"),
                 "--text-encoder", str(tmp_path / "te"), *TINY_DIFFUSION]) == 0
    assert (tmp_path / "unet" / "model.safetensors").is_file()


TINY_TEXT_ENCODER = ["model.width=32", "model.heads=2", "model.layers=2", "model.embed_dim=16",
                     "model.vision_width=32", "model.vision_head_width=16", "model.vision_layers=1",
                     "model.patch_size=8", "model.image_size=16", "data.size=16", "train.batch_size=8",
                     "eval_batch_size=8", "eval_batches=1"]
TINY_DIFFUSION = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
                  "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=8", "model.context_dim=32",
                  "data.size=16", "train.batch_size=4", "preview_images=0"]
