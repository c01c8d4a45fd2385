import numpy as np
import pytest

import dreamer_atari as da
from tests import catch

CATCH = "tests.catch:Catch-v0"


def chase(obs, is_first):
    """The optimal policy: move the paddle (128) towards the ball's (255) column."""
    ball = (obs[:, 0] == 255).any(1).argmax(-1)
    paddle = (obs[:, 0, -1] == 128).argmax(-1)
    return np.sign(ball - paddle) + 1


def test_catch_frames_and_rewards():
    env = catch.Catch()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64) and obs.dtype == np.uint8
    assert set(np.unique(obs)) == {0, 128, 255}
    for t in range(7):
        obs, reward, terminated, truncated, _ = env.step(1)
        assert terminated == (t == 6) and not truncated
    assert reward in (-1.0, 1.0)


@pytest.mark.parametrize("num_envs", [1, 3])
def test_evaluate_plays_exactly_n_episodes(tiny_args, num_envs):
    args = tiny_args(env=CATCH, num_envs=num_envs)
    assert da.evaluate(args, chase, 7, seed=0) == [1.0] * 7  # the optimum is +1 in every episode


def test_random_return_is_what_the_docstring_says():
    rng = np.random.default_rng(0)
    returns = da.evaluate(da.Args(env=CATCH, num_envs=4), lambda o, f: rng.integers(3, size=len(o)), 4000, seed=0)
    assert catch.random_return() == -0.75
    assert np.mean(returns) == pytest.approx(-0.75, abs=0.05)


def test_env_flag_accepts_module_ids(capsys):
    assert da.resolve_env(CATCH) == ("gym", CATCH, CATCH)
    with pytest.raises(SystemExit):
        da.resolve_env("no_such_module:Catch-v0")
    assert capsys.readouterr().err.startswith("error: --env: cannot import")


@pytest.mark.parametrize("name", ["MsPacmanNoFrameskip-v4", "MsPacman-v4", "ALE/MsPacman-v5", "MsPacmanDeterministic-v4"])
def test_gymnasium_atari_ids_run_the_game_under_our_protocol_with_one_line(name, capsys):
    assert da.resolve_env(name, announce=True) == ("atari", "ms_pacman", "MsPacman")
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and out.startswith(f"--env {name}: ") and "running MsPacman" in out
    assert da.validate(da.Args(env=name, size="tiny")).env == "MsPacman"  # the run folder and JSON name the game
    for plain in ["MsPacman", "ms_pacman"]:
        assert da.resolve_env(plain, announce=True)[:2] == ("atari", "ms_pacman")
    assert capsys.readouterr().out.count("--env") == 1  # the plain names print nothing


def test_an_unknown_env_names_the_forms_that_work(capsys):
    with pytest.raises(SystemExit):
        da.resolve_env("MsPacmn-v5")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean MsPacman" in err and "BreakoutNoFrameskip-v4" in err
