"""How `latentdiff bench` measures: twins timed call by call in turn, FLOPs counted once, and the GEMM peak.

FLOPs are torch.utils.flop_counter's: matrix products, convolutions and attention (forward and backward),
not element-wise work, the usual convention for "achieved FLOP/s" and MFU. Counting runs the call once
more, untimed (it is the warm-up call).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

GEMM_SIZE = 2048      # the peak's square matrices
GEMM_TRIES = 5        # the peak is the best of at least this many measurements
MIN_GEMM_SECONDS = 0.05  # each peak measurement repeats the product to last at least this long (a GPU's is µs)
# a product slower than this (bf16 emulated on an AVX2 CPU: ~1 min at 2048²) is timed once: more tries would
# only confirm that the dtype is not multiplied natively, at minutes each
SLOW_GEMM_SECONDS = 1.0


def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# F.scaled_dot_product_attention on the CPU runs these kernels, which the counter does not know: it would
# count attention as free there (it knows the CUDA ones).
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward}


def count_flops(call: Callable[[], Any]) -> tuple[int, Any]:
    """(FLOPs of one `call()`, what it returned)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        result = call()
    return counter.get_total_flops(), result


def seconds(call: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Measurement:
    """Per implementation ("latentdiff", "diffusers"): median seconds per call, FLOPs per call, and the
    output of the first (warm-up) call."""
    seconds: dict[str, float]
    flops: dict[str, int]
    outputs: dict[str, Any]


def time_in_turn(calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> Measurement:
    """Each call once to warm up (counting its FLOPs and keeping its output), then `repeats` timed rounds
    that alternate between the calls, so that a busy machine slows them alike."""
    flops, outputs = {}, {}
    for name, call in calls.items():
        flops[name], outputs[name] = count_flops(call)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(seconds(call, device))
    return Measurement({name: statistics.median(t) for name, t in times.items()}, flops, outputs)


def gemm_peak(dtype: torch.dtype, device: torch.device, repeats: int, size: int = GEMM_SIZE) -> tuple[float, int]:
    """(best seconds per `torch.mm` of two size x size matrices in `dtype` over max(repeats, GEMM_TRIES), its
    FLOPs): the machine's attainable matrix-product rate, against which the rows are read. A first product
    slower than SLOW_GEMM_SECONDS is the answer alone."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    first = seconds(lambda: torch.mm(a, b, out=out), device)  # the warm-up, timed
    if first > SLOW_GEMM_SECONDS:
        return first, 2 * size ** 3
    once = seconds(lambda: torch.mm(a, b, out=out), device)
    count = max(1, int(MIN_GEMM_SECONDS / max(once, 1e-9)))

    def products() -> None:
        for _ in range(count):
            torch.mm(a, b, out=out)
    best = min(seconds(products, device) for _ in range(max(repeats, GEMM_TRIES))) / count
    return best, 2 * size ** 3
