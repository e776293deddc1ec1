"""Two stages trained at once on one machine's cores, each in a process of its own.

On 2 cores the small stages use the second thread poorly (the autoencoder steps 1.7x faster on 2 threads
than on 1, the text encoder 1.6x), so two 1-thread runs side by side do more work per second than the same
runs one after the other on 2 threads. The quickstart trains the text encoder and the autoencoder in two
spawned processes, on half the threads each; once either is done the other's training loop takes every
thread (`reclaim_threads`, called between steps).

Both run outside the calling process because a process whose torch went down to 1 thread and back runs
about 6% slower afterwards (measured on the UNet's train step, AVX2): the stage trained next, in the
calling process, keeps its full speed.
"""
from __future__ import annotations

import multiprocessing
import sys
import traceback
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

_lent: tuple[Callable[[], bool], int] | None = None  # (whether to take the threads back, how many in all)


@contextmanager
def fewer_threads_until(done: Callable[[], bool], keep: int) -> Iterator[None]:
    """Run torch on `keep` threads until `done()` (checked by `reclaim_threads`), then on as many as before."""
    global _lent
    every = torch.get_num_threads()
    torch.set_num_threads(keep)
    _lent = (done, every)
    try:
        yield
    finally:
        _lent = None
        torch.set_num_threads(every)


def reclaim_threads() -> None:
    """Take back the lent threads once their condition holds. Called by the training loop between steps, on
    the thread that runs the step (torch's thread count under OpenMP belongs to the calling thread)."""
    global _lent
    if _lent is not None and _lent[0]():
        torch.set_num_threads(_lent[1])
        _lent = None


@contextmanager
def _output_to(log: Path | None) -> Iterator[None]:
    if log is None:
        yield
        return
    with open(log, "a") as out, redirect_stdout(out), redirect_stderr(out):
        yield


def _train(train: Callable, cfg: Any, folder: Path, resume: bool, threads: int, log: Path | None,
           more_threads: tuple[Any, int] | None) -> None:
    if more_threads is None:
        torch.set_num_threads(threads)
        lending = nullcontext()
    else:
        event, every = more_threads
        torch.set_num_threads(every)
        lending = fewer_threads_until(event.is_set, threads)
    with _output_to(log):
        try:
            with lending:
                train(cfg, folder, resume=resume)
        except KeyboardInterrupt:  # Ctrl-C reaches every process; the parent says "interrupted"
            sys.exit(130)
        except Exception as err:
            traceback.print_exc()  # the whole traceback into the log, its last line on the terminal
            if log is not None:
                print(f"{folder.name}: {type(err).__name__}: {err}", file=sys.__stderr__)
            sys.exit(1)


def start_training(train: Callable, cfg: Any, folder: Path, resume: bool, threads: int, log: Path | None = None,
                   more_threads: tuple[Any, int] | None = None) -> multiprocessing.process.BaseProcess:
    """`train(cfg, folder, resume=resume)` in a new process on `threads` threads; its output appended to `log`
    (None: this process's terminal). `more_threads` = (an Event of the spawn context, n): n threads once the
    event is set.

    The process is spawned (a fork would copy this process's OpenMP thread pool), so it starts a fresh Python."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    process = multiprocessing.get_context("spawn").Process(
        target=_train, args=(train, cfg, folder, resume, threads, log, more_threads), name=f"train {folder.name}")
    process.start()
    return process


def finish(process: multiprocessing.process.BaseProcess, what: str, log: Path | None = None) -> None:
    """Wait for `process`; a failed run raises, naming its log."""
    process.join()
    if process.exitcode != 0:
        where = f"; its output is in {log}" if log is not None else ""
        raise RuntimeError(f"{what}: training failed in its own process (exit code {process.exitcode}){where}")


def stop(process: multiprocessing.process.BaseProcess) -> None:
    """End `process` when the run it belongs to fails or is interrupted (its last checkpoint stays, for a resume)."""
    if process.is_alive():
        process.terminate()
    process.join()
