"""The sharded latent + text cache: several files, read back as computed, built by several processes, resumed."""
import pickle

import pytest
import torch
from tiny_stages import TINY_AE, TINY_TEXT

from latentdiff.cli import main
from latentdiff.data import DataConfig, ShapesDataset, build_dataset, iter_in_order, tensor_to_pil
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder
from latentdiff.train.latent_cache import (
    KEY_FILE,
    LatentCache,
    compute_shards,
    load_or_build_cache,
    write_index,
)

KEY = {"test": 1}
SAMPLES, SHARD = 10, 4  # shards of 4, 4 and 2 samples


@pytest.fixture(scope="module")
def stages():
    torch.manual_seed(0)
    return AutoencoderKL(TINY_AE).eval(), OpenCLIPTextEncoder(TINY_TEXT).eval()


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset(size=16, length=SAMPLES)


def build(root, dataset, stages, **kwargs):
    return load_or_build_cache(root, dataset, KEY, *stages, shard_size=SHARD, batch_size=3, progress=False,
                               log=lambda _: None, **kwargs)


def items(cache):
    return [cache[i] for i in range(len(cache))]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(items(a), items(b)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_cache_is_sharded_and_reads_back_what_was_computed(stages, dataset, tmp_path):
    autoencoder, text_encoder = stages
    cache = build(tmp_path, dataset, stages)
    assert sorted(p.name for p in cache.folder.iterdir()) == [
        KEY_FILE, "part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"]
    samples = [dataset[i] for i in range(SAMPLES)]
    with torch.no_grad():
        posterior = autoencoder.encode(torch.stack([s["image"] for s in samples]))
        encoding = text_encoder.encode([s["caption"] for s in samples])
    batch = torch.utils.data.default_collate(items(cache))
    torch.testing.assert_close(batch["mean"], posterior.mean)
    torch.testing.assert_close(batch["std"], posterior.std)
    length = cache.tokens  # the longest caption's tokens, over all shards
    assert length == int(encoding.mask.sum(1).max()) and batch["states"].shape == (SAMPLES, length, 32)
    assert torch.equal(batch["mask"], encoding.mask[:, :length].bool())
    mask = batch["mask"]
    torch.testing.assert_close(batch["states"][mask], encoding.states[:, :length][mask], atol=2e-3, rtol=1e-3)
    assert not batch["states"][~mask].any()  # zeros past each caption
    uncond = cache.unconditional()
    assert uncond["context"].shape == (1, length, 32) and uncond["context_mask"].sum() == 2
    assert_same(pickle.loads(pickle.dumps(cache)), cache)  # as DataLoader workers get it
    with pytest.raises(IndexError):
        cache[SAMPLES]


def test_two_processes_build_the_same_cache(stages, dataset, tmp_path):
    single = build(tmp_path / "one", dataset, stages)
    folder = tmp_path / "two"
    written = [compute_shards(folder, dataset, *stages, rank=rank, world_size=2, shard_size=SHARD, batch_size=3,
                              progress=False) for rank in (0, 1)]
    assert written == [[0, 2], [1]]
    assert not (folder / KEY_FILE).exists()  # written last, by the main process, after the barrier
    write_index(folder, KEY, dataset, SHARD)
    assert_same(LatentCache(folder), single)


def count_encodes(monkeypatch) -> list[int]:
    calls, real = [], AutoencoderKL.encode

    def counting(self, x):
        calls.append(len(x))
        return real(self, x)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


@pytest.mark.parametrize("damage", ["no index", "shard removed", "shard truncated"])
def test_an_interrupted_build_is_completed(stages, dataset, tmp_path, monkeypatch, damage):
    whole = build(tmp_path / "whole", dataset, stages)
    cache = build(tmp_path / "broken", dataset, stages)
    shard = cache.folder / "part-00001.safetensors"
    if damage == "no index":
        (cache.folder / KEY_FILE).unlink()
    elif damage == "shard removed":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-10])
    (cache.folder / ".part-00002.safetensors.tmp-1").write_bytes(b"left by a crash")
    calls = count_encodes(monkeypatch)
    rebuilt = build(tmp_path / "broken", dataset, stages)
    assert calls == ([] if damage == "no index" else [3, 1])  # only shard 1 (samples 4..7) is encoded again
    assert_same(rebuilt, whole)
    assert not list(cache.folder.glob(".*"))
    calls.clear()
    build(tmp_path / "broken", dataset, stages)
    assert calls == []  # finished: reused


def test_tar_shards_cache_one_part_per_input_shard(stages, tmp_path):
    """A streamed ShardDataset is cached one input shard per cache shard, each by the process it falls to."""
    shapes = ShapesDataset(size=16, length=12)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(len(shapes)):  # a folder of 12 captioned images, packed into 3 tar shards of 4
        tensor_to_pil(shapes[i]["image"]).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(shapes[i]["caption"])
    assert main(["pack", str(folder), str(tmp_path / "shards"), "--shard-size", "4"]) == 0
    data = build_dataset(DataConfig(source=str(tmp_path / "shards"), size=16), "train")
    cache = build(tmp_path / "cache", data, stages, rank=0, world_size=1)
    expected = list(iter_in_order(data))
    assert len(cache) == len(expected) and len(cache.files) == 3
    autoencoder, _ = stages
    with torch.no_grad():
        means = autoencoder.encode(torch.stack([s["image"] for s in expected])).mean
    assert torch.allclose(torch.stack([item["mean"] for item in items(cache)]), means, atol=1e-6)
