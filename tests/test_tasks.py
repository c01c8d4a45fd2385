"""The two pixel tasks beside Catch: frames, rewards, and the random and optimal returns their docstrings state."""

import numpy as np
import pytest

import dreamer_atari as da
from tests import cue, reach

CUE = "tests.cue:Cue-v0"


def cells(obs, value):
    """(row, col) of the 8x8 cells whose top-left pixel has `value`, per env: obs is (N, 1, 64, 64)."""
    return [np.argwhere(o[0, ::8, ::8] == value) for o in obs]


def walk(obs, is_first):
    """Reach's optimal policy: step along the row first, then along the column, towards the target."""
    actions = []
    for agent, target in zip(cells(obs, 128), cells(obs, 255)):
        if len(target) == 0:  # the terminal frame: the agent covers the target, and the action is ignored
            actions.append(0)
            continue
        (ar, ac), (tr, tc) = agent[0], target[0]
        actions.append(4 if tc > ac else 3 if tc < ac else 2 if tr > ar else 1)
    return np.array(actions)


@pytest.mark.parametrize("size", [8, 5])
def test_reach_frames_rewards_and_time_limit(size):
    env = reach.Reach(size)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (64, 64) and obs.dtype == np.uint8 and set(np.unique(obs)) == {0, 128, 255}
    first = (8 - size) // 2 * 8  # the board is centred; outside it the frame stays empty
    inside = np.zeros_like(obs, bool)
    inside[first:first + 8 * size, first:first + 8 * size] = True
    for _ in range(200):
        obs, *_ = env.step(env.np_random.integers(5))
        assert (obs[~inside] == 0).all() and (obs[inside] == 128).sum() == 64
    env.reset(seed=4)
    for t in range(reach.LIMIT):  # staying never reaches a target in another cell: truncated, never terminated
        obs, reward, terminated, truncated, _ = env.step(0)
        assert reward == -reach.STEP_COST and not terminated and truncated == (t == reach.LIMIT - 1)


@pytest.mark.parametrize("env, size, best, random", [("Reach-v0", 8, 0.7833, -0.7927),
                                                     ("Reach5x5-v0", 5, 0.8833, -0.5285)])
def test_reach_optimum_and_random_return(env, size, best, random):
    assert reach.optimum(size) == pytest.approx(best, abs=1e-4)
    assert reach.random_return(size) == pytest.approx(random, abs=1e-4)
    args = da.Args(env=f"tests.reach:{env}", num_envs=4)
    optimal = da.evaluate(args, walk, 1000, seed=0)
    assert np.mean(optimal) == pytest.approx(reach.optimum(size), abs=0.02) and max(optimal) == 1.0
    rng = np.random.default_rng(0)
    returns = da.evaluate(args, lambda o, f: rng.integers(5, size=len(o)), 2000, seed=0)
    assert np.mean(returns) == pytest.approx(reach.random_return(size), abs=0.03)


def test_cue_shows_the_cue_only_first_and_last_and_pays_the_match():
    env = cue.Cue()
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        place = np.flatnonzero((obs[16:32] == 255).any(0))
        assert (place[0] - 8) // 20 == env.cue  # the block is drawn at the cue's place
        for t in range(cue.DELAY):
            obs, reward, terminated, _, _ = env.step(env.cue)
            assert reward == 0 and not terminated and (obs == 255).sum() == 0  # the cue is gone, actions do nothing
        answer = (env.cue + 1) % cue.PLACES if seed % 2 else env.cue
        obs, reward, terminated, truncated, _ = env.step(answer)
        assert terminated and not truncated and reward == (1.0 if answer == env.cue else -1.0)
        assert (obs == 255).sum() == 16 * 16  # the answer is shown on the terminal frame


def test_cue_random_return():
    rng = np.random.default_rng(0)
    returns = da.evaluate(da.Args(env=CUE, num_envs=4), lambda o, f: rng.integers(3, size=len(o)), 4000, seed=0)
    assert cue.random_return() == pytest.approx(-1 / 3)
    assert np.mean(returns) == pytest.approx(-1 / 3, abs=0.05)
