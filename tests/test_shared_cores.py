"""Two stages side by side (train/shared_cores.py): threads lent while another stage trains come back once it is
done, and a stage that fails in its own process is reported with its log."""
import multiprocessing
import time

import pytest
import torch

from latentdiff.train.shared_cores import fewer_threads_until, finish, reclaim_threads, start_training, stop


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def failing_trainer(cfg, folder, resume=False):
    print(f"training {cfg} into {folder.name}")
    raise ValueError("no captions found")


def sleeping_trainer(cfg, folder, resume=False):
    time.sleep(cfg)


def thread_counting_trainer(cfg, folder, resume=False):
    """Writes its thread count, then, after calling reclaim_threads as the training loop does between steps
    until the count changes, the count again."""
    first = torch.get_num_threads()
    deadline = time.time() + cfg
    while torch.get_num_threads() == first and time.time() < deadline:
        time.sleep(0.05)
        reclaim_threads()
    (folder / "threads.txt").write_text(f"{first} {torch.get_num_threads()}")


def test_lent_threads_come_back_once_the_condition_holds(two_threads):
    done = False
    with fewer_threads_until(lambda: done, keep=1):
        reclaim_threads()
        assert torch.get_num_threads() == 1  # still lent
        done = True
        reclaim_threads()
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), fewer_threads_until(lambda: False, keep=1):
        raise KeyError("the stage failed")
    assert torch.get_num_threads() == 2  # and when the block ends first


def test_a_stage_in_its_own_process_takes_every_thread_once_told(tmp_path):
    (tmp_path / "stage").mkdir()
    event = multiprocessing.get_context("spawn").Event()
    process = start_training(thread_counting_trainer, 60.0, tmp_path / "stage", False, 1, more_threads=(event, 2))
    time.sleep(1.0)
    event.set()
    finish(process, "stage")
    assert (tmp_path / "stage" / "threads.txt").read_text() == "1 2"


def test_stop_ends_the_other_process(tmp_path):
    process = start_training(sleeping_trainer, 60.0, tmp_path / "stage", False, 1, tmp_path / "stage.log")
    started = time.time()
    stop(process)
    assert not process.is_alive() and time.time() - started < 30


def test_a_stage_that_fails_in_its_own_process_is_reported_with_its_log(tmp_path, capfd):
    log = tmp_path / "text_encoder" / "train.log"
    process = start_training(failing_trainer, "cfg", tmp_path / "text_encoder", False, 1, log)
    with pytest.raises(RuntimeError, match="text_encoder: training failed in its own process") as err:
        finish(process, "text_encoder", log)
    assert str(log) in str(err.value) and process.exitcode == 1
    written = log.read_text()
    assert "training cfg into text_encoder" in written  # the stage's own output went to the log
    assert "Traceback" in written and "ValueError: no captions found" in written
    assert "text_encoder: ValueError: no captions found" in capfd.readouterr().err
