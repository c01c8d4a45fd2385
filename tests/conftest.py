import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dreamer_atari as da  # noqa: E402

# Tiny sizes: a few hundred policy steps of real ALE SpaceInvaders run in seconds on 2 CPU cores.
TINY = dict(size="tiny", prefill=100, buffer_size=2000, log_seconds=0.5, eval_episodes=2)
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dreamer_atari.py")


def signal_a_training_run(sig, *flags: str, settle: float = 2.0) -> tuple[int, str, str]:
    """Start `dreamer_atari.py` at the tiny sizes with `flags` in a subprocess, wait until it logs and then
    `settle` seconds more (inside the training loop), send `sig`. Returns (exit code, stdout, stderr)."""
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    process = subprocess.Popen([sys.executable, SCRIPT, *tiny, "--total-steps=1000000", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob("runs/*/events.*") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(settle)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def random_batch(terminal_rate: float = 0.0) -> dict[str, torch.Tensor]:
    """A (4, 8) replay chunk of random 64x64 frames, actions of 4, rewards and terminals, as the buffer gives it."""
    rng = np.random.default_rng(0)
    batch = dict(obs=rng.integers(0, 255, (4, 8, 1, 64, 64), dtype=np.uint8), action=rng.integers(0, 4, (4, 8)),
                 reward=rng.normal(size=(4, 8)).astype(np.float32), terminated=rng.random((4, 8)) < terminal_rate,
                 is_first=np.zeros((4, 8), bool))
    return {k: torch.as_tensor(v) for k, v in batch.items()}


LEARNING_RUNS = pytest.StashKey()


def pytest_collection_modifyitems(items):
    """The learning tests go last: each waits for its run, and the unit tests run while the runs train."""
    items.sort(key=lambda item: item.path.name == "test_learning.py")


def start_learning_runs(session):
    names = [item.callspec.params["name"] for item in session.items if item.path.name == "test_learning.py"]
    if names and LEARNING_RUNS not in session.config.stash:
        from tests.test_learning import LearningRuns
        session.config.stash[LEARNING_RUNS] = LearningRuns(names)


def pytest_collection_finish(session):
    """Start the selected learning runs (tests/test_learning.py) as soon as they are collected rather than when
    their tests come up, so that they train while the unit tests run. Not in a pytest-xdist worker, which collects
    every test and runs a share: there the `learning_runs` fixture starts them if the worker gets a learning test."""
    if not session.config.option.collectonly and not hasattr(session.config, "workerinput"):
        start_learning_runs(session)


def pytest_sessionfinish(session, exitstatus):
    """Stop the learning runs; keep their folders (logs, TensorBoard runs) when a test failed."""
    if LEARNING_RUNS in session.config.stash:
        session.config.stash[LEARNING_RUNS].stop(keep=exitstatus != 0)


def pytest_terminal_summary(terminalreporter, config):
    if LEARNING_RUNS in config.stash:
        for line in config.stash[LEARNING_RUNS].summary():
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def learning_runs(request):
    start_learning_runs(request.session)
    return request.config.stash[LEARNING_RUNS]


@pytest.fixture
def tiny_args():
    def make(**overrides):
        return da.Args(**{**TINY, **overrides})

    return make


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder so that `runs/` never lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
