#!/usr/bin/env python
"""Peak memory of the latent cache against the dataset's size (a benchmark that prints, not a test).

    python scripts/bench_cache.py [--sizes 10000 100000] [--root DIR]

For each size, a fresh subprocess builds the cache of that many shapes samples at 32 px with a tiny random
autoencoder and text encoder (weights do not change the memory), then reads one epoch through it as the
trainer does (ResumableSampler, DataLoader, batch 64). The parent prints each child's peak RSS (ru_maxrss,
from wait4) and the ratio of the largest to the smallest; it exits 1 if that exceeds 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

LIMIT = 1.2  # largest / smallest peak RSS


def child(samples: int, root: Path) -> dict:
    """Build and read the cache of `samples` samples; returns times and sizes."""
    import torch
    from torch.utils.data import DataLoader

    from latentdiff.data import DataConfig, build_dataset
    from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from latentdiff.models.text_encoder import TextEncoderConfig
    from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder
    from latentdiff.train.latent_cache import cache_key, load_or_build_cache
    from latentdiff.train.loop import ResumableSampler

    torch.manual_seed(0)
    # 32 px, f = 2: 16x16x4 latents; 32-wide token states (the test suite's tiny stages)
    autoencoder = AutoencoderKL(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                                                  resolution=32)).eval().requires_grad_(False)
    text_encoder = OpenCLIPTextEncoder(TextEncoderConfig(
        context_length=24, width=32, layers=2, heads=2, embed_dim=24, image_size=16, patch_size=8, vision_width=32,
        vision_layers=1, vision_head_width=16)).eval().requires_grad_(False)
    data = DataConfig(size=32, length=samples)
    dataset = build_dataset(data)
    key = cache_key(data, dataset, "random-autoencoder", "random-text-encoder", text_encoder)
    start = time.time()
    cache = load_or_build_cache(root, dataset, key, autoencoder, text_encoder, batch_size=256, progress=False,
                                log=lambda _: None)
    built = time.time()
    batches = DataLoader(cache, batch_size=64, sampler=ResumableSampler(len(cache), seed=0), drop_last=True)
    for batch in islice(batches, len(cache) // 64):  # one epoch
        assert batch["states"].shape[0] == 64
    files = list(cache.folder.iterdir())
    return {"build_s": round(built - start, 1), "read_s": round(time.time() - built, 1), "files": len(files),
            "cache_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1)}


def measure(samples: int, root: Path) -> dict:
    """Run `child` in a fresh interpreter; its peak RSS comes from wait4, the kernel's own count."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(samples), "--root", str(root)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"the {samples}-sample run failed (exit status {proc.returncode})")
    return {**json.loads(out.splitlines()[-1]), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--root", type=Path, help="cache root (default: a temporary folder, removed after)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root)))
        return 0
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_cache-"))
    try:
        results = {}
        for samples in args.sizes:
            results[samples] = measure(samples, root / str(samples))
            print(f"{samples:>9,} samples  " + "  ".join(f"{k} {v}" for k, v in results[samples].items()), flush=True)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    peaks = [r["peak_rss_mb"] for r in results.values()]
    ratio = max(peaks) / min(peaks)
    print(f"peak RSS largest / smallest: {ratio:.3f} (limit {LIMIT})")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
