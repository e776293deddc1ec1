"""Launch `latentdiff` commands in 1 or N CPU processes and compare what they saved (not a test file)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# One thread per process: two processes on two cores, and torch's OpenMP threads would otherwise spin-wait.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FLOAT64 = str(Path(__file__).with_name("float64_latentdiff.py"))


def command(processes: int, *args: str, float64: bool = False) -> list[str]:
    """`python -m latentdiff ARGS` (float64: tests/float64_latentdiff.py ARGS), under torchrun with `processes`
    CPU processes when more than one."""
    program = [FLOAT64] if float64 else ["-m", "latentdiff"]
    if processes == 1:
        return [sys.executable, *program, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *program, *args]


def run(processes: int, *args: str, timeout: float = 300, float64: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(command(processes, *args, float64=float64), env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def start(processes: int, *args: str) -> subprocess.Popen:
    """The launch in its own process group, so that a test can SIGKILL all of it at once."""
    return subprocess.Popen(command(processes, *args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def assert_same_weights(a: Path, b: Path, tolerance: float, noise_driven: dict[str, tuple[int, int]] = {}) -> float:
    """Every floating tensor of two model.safetensors files within `tolerance` (||a - b|| / ||b||); returns the
    largest difference. `noise_driven` names parts whose exact gradient is zero, {key suffix: (i, n)} = the
    i-th of n equal chunks (an attention key bias inside a packed q/k/v bias): Adam moves them by float
    noise alone, so they are only held within `tolerance` of the whole model's scale."""
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    scale = torch.sqrt(sum(v.double().pow(2).sum() for v in right.values() if v.is_floating_point()))
    worst, worst_key = 0.0, None
    for key in (k for k in right if right[k].is_floating_point()):
        x, y = left[key].flatten(), right[key].flatten()
        noise = next((part for suffix, part in noise_driven.items() if key.endswith(suffix)), None)
        if noise is not None:
            i, n = noise
            chunk = slice(i * len(y) // n, (i + 1) * len(y) // n)
            assert (x[chunk].double() - y[chunk].double()).norm() <= tolerance * scale, key
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[chunk] = False
            x, y = x[keep], y[keep]
        if len(y):
            diff = relative_difference(x, y)
            if diff > worst:
                worst, worst_key = diff, key
    assert worst <= tolerance, f"{worst_key}: relative difference {worst:.2e} > {tolerance}"
    return worst
