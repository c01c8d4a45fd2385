"""Speed options change how the update runs, not what it computes: --compile, --threads."""

import functools
import os

import numpy as np
import pytest
import torch

import dreamer_atari as da


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_default_threads_are_half_the_usable_cores(monkeypatch, keep_threads):
    monkeypatch.setattr(da.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert da.set_threads(0) == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(da.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert da.set_threads(0) == 1 and torch.get_num_threads() == 1
    assert da.set_threads(3) == 3 and torch.get_num_threads() == 3


def test_console_first_line_names_the_threads(tiny_args, capsys, keep_threads):
    da.main(tiny_args(threads=1, total_steps=120, eval_episodes=0))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("run ") and "(1 CPU thread)" in first


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not os.environ.get("DREAMER_SLOW_TESTS"), reason=(
        "inductor compiles for 3-4 minutes on 2 CPU cores; run with DREAMER_SLOW_TESTS=1")))])
def test_compiled_update_matches_eager(tiny_args, monkeypatch, backend):
    """Three updates on the same batches from the same weights: the compiled world-model loss and imagination give
    the eager losses to float tolerance (the same random draws: inductor falls back to eager's generator).
    aot_eager traces what --compile traces (graph capture, the backward pass from AOTAutograd) in 15 s; inductor,
    what --compile runs, also generates and compiles the kernels."""
    monkeypatch.setattr(da.torch, "compile", functools.partial(torch.compile, backend=backend))
    rng = np.random.default_rng(0)
    B, T = 4, 8
    batches = [dict(obs=rng.integers(0, 255, (B, T, 1, 64, 64), dtype=np.uint8), action=rng.integers(0, 6, (B, T)),
                    reward=rng.normal(size=(B, T)).astype(np.float32), terminated=rng.random((B, T)) < 0.1,
                    is_first=rng.random((B, T)) < 0.1) for _ in range(3)]
    agents = []
    for compile in (False, True):
        torch.manual_seed(0)
        agents.append(da.Dreamer(da.validate(tiny_args(compile=compile)), (1, 64, 64), 6, torch.device("cpu")))
    for i, batch in enumerate(batches):
        metrics = []
        for agent in agents:
            torch.manual_seed(i)
            metrics.append(agent.train_step(batch))
        eager, compiled = metrics
        for key in ["losses/world_model", "losses/image", "losses/reward", "losses/kl", "losses/actor",
                    "losses/critic", "critic/lambda_return", "actor/entropy"]:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), (i, key)
