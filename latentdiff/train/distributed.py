"""What multi-process training needs beyond accelerate's defaults, all of it small.

- accelerate only treats a `torchrun` / `accelerate launch` of several CPU processes as distributed when asked
  for the CPU (its MULTI_CPU mode, gloo); on a machine without a GPU we ask.
- BatchNorm normalises with the statistics of its own process's batch, so N processes × batch b would not
  compute what 1 process × batch N·b does. torch's SyncBatchNorm fixes that on GPUs only; `GlobalBatchNorm`
  does the same on the CPU with two autograd-aware all-reduces (open_clip's ResNet image tower has BatchNorm).
- Every process must run the same config; `check_same_config` refuses a launch whose processes disagree.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from accelerate import Accelerator, PartialState
from torch import nn

from ..config import to_dict
from ..errors import ConfigError


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) started; 1 without one."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def process_state() -> PartialState:
    """accelerate's process state; several processes on a machine without a GPU run on the CPU with gloo."""
    cpu_only = not torch.cuda.is_available()
    return PartialState(cpu=cpu_only and launched_processes() > 1)


def make_accelerator(mixed_precision: str, log_with: str | None = None, project_dir: str | None = None) -> Accelerator:
    """`log_with` names accelerate trackers (e.g. "tensorboard"), which write under `project_dir`."""
    state = process_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=state.device.type == "cpu" and state.num_processes > 1,
                       log_with=log_with, project_dir=project_dir)


def check_same_config(accelerator: Accelerator, config) -> None:
    """ConfigError on every process unless all processes were started with the same config."""
    if accelerator.num_processes == 1:
        return
    digest = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).digest()
    mine = torch.tensor(list(digest[:8]), dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine[None]).view(accelerator.num_processes, -1)  # (N, 8)
    if not bool((every == every[0]).all()):
        differing = [rank for rank in range(accelerator.num_processes) if not torch.equal(every[rank], every[0])]
        raise ConfigError(f"the processes of this launch were started with different configs (processes "
                          f"{differing} differ from process 0): give every process the same command and files")


class GlobalBatchNorm(nn.Module):
    """BatchNorm over the union of every process's batch (CPU or GPU), with BatchNorm's own parameters and
    buffers (a checkpoint is interchangeable with the module it replaces). In eval mode it is plain BatchNorm."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        dims = [0] + list(range(2, x.ndim))  # all but channels
        shape = [1, -1] + [1] * (x.ndim - 2)
        count = dist_fn.all_reduce(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = dist_fn.all_reduce(x.sum(dims)) / count  # (C,) over every process's batch
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce(centred.pow(2).sum(dims)) / count  # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), momentum)  # unbiased, as BatchNorm keeps
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm computing over all processes' batches (call only under several processes)."""
    if not dist.is_initialized():
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, GlobalBatchNorm(child))
        else:
            sync_batchnorm(child)
    return module
