"""Multi-process training on accelerate (2 CPU processes, gloo, launched with torchrun): 2 processes × batch b
reach the weights of 1 process × batch 2b, only the main process writes, and a SIGKILLed launch resumes to the
uninterrupted result. Each launch starts fresh Python processes, so these take a while (see the marks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from multiprocess import ENV, assert_same_weights, free_port, run, start
from tiny_stages import TINY_TRAINING, save_autoencoder, save_text_encoder

# ||Δw|| / ||w|| per tensor after 20 steps. The gap is float noise (the gradient averaged over two processes
# sums in another order than one batch of twice the size), grown by 20 steps of Adam. Measured on an AMD EPYC
# (AVX-512): autoencoder 6.8e-6, text encoder 9.2e-6, diffusion 1.7e-5 (two LayerNorm biases of norm 0.004 that
# start at 0; every other UNet tensor <= 1e-5): the 1e-5 holds for the first two, not for the UNet.
TOLERANCE = {"autoencoder": 1e-5, "text-encoder": 1e-5, "diffusion": 2e-5}
STEPS = ["train.steps=20", "train.checkpoint_every=10", "train.log_every=1", "train.warmup_steps=1"]
AUTOENCODER = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.norm_groups=4",
               "model.resolution=16", "data.size=16", "data.length=256", "train.sample_every=100",
               "scale_batches=2", "eval_batches=1", "train.ema_decay=0.9", "train.grad_clip=1.0", *STEPS]
# the default ResNet image tower (its BatchNorms must normalise over both processes' batches)
TEXT_ENCODER = ["model.width=32", "model.heads=2", "model.layers=2", "model.embed_dim=16", "model.vision_width=8",
                "model.vision_head_width=16", "model.image_size=32", "data.size=32", "data.length=256",
                "train.sample_every=100", "eval_batch_size=8", "eval_batches=1", "train.ema_decay=0.9", *STEPS]
DIFFUSION = [o for o in TINY_TRAINING if not o.startswith(("train.", "preview_images", "data.length"))] + [
    "preview_images=0", "data.length=256", "train.ema_decay=0.9", *STEPS]
# Parts whose exact gradient is zero (softmax does not change when every score of a row moves alike), so Adam
# moves them by float noise alone: attention key biases, {key suffix: (i, n)} = the i-th of n chunks.
NOISE_DRIVEN = {"autoencoder": {"attn_1.k.bias": (0, 1)},
                "text-encoder": {"attn.in_proj_bias": (1, 3), "attnpool.k_proj.bias": (0, 1)},
                "diffusion": {}}


def stage_args(stage: str, tmp_path) -> list[str]:
    if stage == "autoencoder":
        return AUTOENCODER
    if stage == "text-encoder":
        return TEXT_ENCODER
    ae, te = save_autoencoder(tmp_path / "ae"), save_text_encoder(tmp_path / "te")
    return ["--autoencoder", str(ae), "--text-encoder", str(te), *DIFFUSION]


def launch(processes: int, stage: str, out, args: list[str], batch: int, *extra: str):
    cache = [f"cache_dir={out}-cache"] if stage == "diffusion" else []
    done = run(processes, f"train-{stage}", "--out", str(out), *args, f"train.batch_size={batch}", *cache, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["autoencoder", "text-encoder", "diffusion"])
def test_two_processes_reach_the_weights_of_one_with_the_doubled_batch(stage, tmp_path):
    args = stage_args(stage, tmp_path)
    launch(1, stage, tmp_path / "one", args, 8)
    two = launch(2, stage, tmp_path / "two", args, 4)
    worst = assert_same_weights(tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors",
                                TOLERANCE[stage], NOISE_DRIVEN[stage])
    print(f"{stage}: largest relative difference {worst:.1e}")
    # only the main process writes: one metrics row per step, one final line
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(s) for s in range(1, 21)]
    assert two.stdout.count("saved to") == 1


@pytest.mark.slow
def test_a_killed_two_process_launch_resumes_to_the_uninterrupted_result(tmp_path):
    args = [a for a in AUTOENCODER if not a.startswith(("train.steps", "train.checkpoint_every"))]
    args += ["train.steps=120", "train.checkpoint_every=20"]
    launch(2, "autoencoder", tmp_path / "straight", args, 4)

    launch_ = start(2, "train-autoencoder", "--out", str(tmp_path / "killed"), *args, "train.batch_size=4")
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step-0000040" / "state.json").exists():
        assert launch_.poll() is None and time.time() < deadline, "the launch ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(launch_.pid, signal.SIGKILL)  # the launcher and both workers, mid-step
    launch_.wait()
    launch(2, "autoencoder", tmp_path / "killed", args, 4, "--resume")
    assert_same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "killed" / "model.safetensors", 0.0)


@pytest.mark.slow
def test_processes_started_with_different_configs_are_refused(tmp_path):
    script = tmp_path / "disagree.py"  # each process adds its own rank as the seed
    script.write_text("import os, sys\nfrom latentdiff.cli import main\n"
                      "sys.exit(main(sys.argv[1:] + [f\"train.seed={os.environ['RANK']}\"]))\n")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script), "train-autoencoder", "--out", str(tmp_path / "run"),
         *AUTOENCODER], env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("latentdiff train-autoencoder: error")]
    assert done.returncode != 0 and errors and "different configs" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
