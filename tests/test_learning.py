"""The agent must learn, not just run: the decoder-free world model on Catch, and DreamerV2 with the decoder on Cue,
both with `--size small`.

Catch (tests/catch.py): a random policy scores -0.75 on average, the optimum is +1; the test passes if the greedy
policy averages at least -0.25 over 100 evaluation episodes, that is, catches 3 times as many balls as a random
policy (37.5% against 12.5%), 8 standard errors above the random mean. Cue (tests/cue.py, a memory task): a random
policy scores -1/3, the optimum is +1; the test passes at +1/3 (2 of 3 answers right against 1 of 3), 7 standard
errors above the random mean. The runs train side by side, each on its own core with one thread, in a pool
started by the `learning_runs` fixture; each test waits for its own run.

Measured on the development machine (2 CPU cores; seed 1 runs here), with `--size small` as it is now (gamma
0.95, entropy 5e-2; the heads on the prior with the decoder only; see README "Does it learn?" for the runs before
it):
- decoder-free on Catch, 16,000 policy steps (3,875 updates, each about half a decoder update): 0.82, 0.92, 0.34
  for seeds 1-3 (random -0.80, -0.74, -0.78; `python tests/bench_tasks.py --task catch --variants decoder-free
  --total-steps 16000`). Flipping the sign of the actor's objective (the entropy bonus kept) gives -1.00, cutting
  the Barlow Twins term (--bt-scale 0) -0.76: both fail. With the heads on the prior as well (until fe2f7eb): 0.92,
  0.92, 0.96.
- v2 with the decoder on Cue, 8,000 policy steps (1,875 updates): greedy 0.40, 1.00, 1.00 for seeds 1-3 (random
  -0.36, -0.32, -0.40; `python tests/bench_tasks.py --task cue --variants decoder`). Seed 1, the one this test
  runs, passes by a thin margin (0.40 is 70 answers right in 100; the bar is 2 in 3): it learned later than with
  the old small settings (reward loss down between 5,700 and 6,900 steps; learned after about 4,500 before) and is
  not stable after: at 10,000 steps the same seed scored -0.40, its reward loss back up from 0.0004 to 0.017. With
  the old small settings 1.00, 1.00, 0.22. A flipped actor loss gives -0.40 (random -0.36) with both settings: it
  fails. Without the heads on the prior this seed scores 1.00, but the decoder needs them on Reach 5x5 (README).
- v2 with the decoder on Catch, 8,000 steps, was the CI test until Cue joined (small as now 0.80, 0.32, -0.02; old small
  0.58, 0.70, 0.22). Each of the three runs takes 8-11 minutes on one core, so a third run would push the suite
  past 15 minutes on 2 cores; it is a benchmark: `python tests/bench_tasks.py --task catch --variants decoder`.
"""

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_atari as da
from tests import catch, cue


# --size small: small networks, faster learning than the Atari defaults (actor lr 1e-3, entropy 5e-2, gamma 0.95,
# with the decoder the heads trained on the prior too: SIZE_RATES), so that learning shows within the CPU budget;
# everything else (the v2 preset, the buffer, the loop) is what Atari runs use.
CATCH_ARGS = dict(env="tests.catch:Catch-v0", size="small", seed=1, total_steps=8000, prefill=500,
                  buffer_size=10_000, eval_episodes=100, log_seconds=30.0)
# run name -> (overrides of CATCH_ARGS, (task module, threshold on the greedy mean)), longest run first
RUNS = {
    "catch-decoder-free": (dict(preset="decoder-free", total_steps=16_000), (catch, -0.25)),
    "cue-v2": (dict(preset="v2", env="tests.cue:Cue-v0"), (cue, 1 / 3)),
}


def eval_returns(run_name):
    acc = EventAccumulator(f"runs/{run_name}")
    acc.Reload()
    return [e.value for e in acc.Scalars("eval/episodic_return")], acc.Scalars("eval/random_mean_return")[0].value


def pin_worker(cores):
    """Pool worker start: take a core of its own and one thread (runs that share 2 cores with 2 threads each slow
    down 3-30x)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores.get()})
    torch.set_num_threads(1)


def train(overrides: dict, folder: str):
    os.chdir(folder)
    return eval_returns(da.main(da.Args(**{**CATCH_ARGS, **overrides})))


@pytest.fixture(scope="module")
def learning_runs(tmp_path_factory):
    """One pool worker per core; every run is queued at once, longest first, so a worker that finishes a short run
    takes the next. Yields run name -> future of (greedy returns, random mean)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for core in cores:
        queue.put(core)
    with ProcessPoolExecutor(len(cores), mp_context=context, initializer=pin_worker, initargs=(queue,)) as pool:
        yield {name: pool.submit(train, overrides, str(tmp_path_factory.mktemp(name)))  # own folders
               for name, (overrides, _) in RUNS.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_learns(learning_runs, name):
    returns, random_mean = learning_runs[name].result()
    module, threshold = RUNS[name][1]
    assert len(returns) == 100 and all(math.isfinite(r) for r in returns)
    assert abs(random_mean - module.random_return()) < 0.25  # the baseline played on the same seeds
    assert np.mean(returns) >= threshold, f"{name}: greedy return {np.mean(returns):.2f} (random {random_mean:.2f})"
