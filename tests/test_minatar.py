"""MinAtar: observations, the --pomdp channel lists, the 64x64 encoding and a tiny run of each game."""

import numpy as np
import pytest
import torch

import dreamer_atari as da

GAMES = list(da.MINATAR_MOTION)


def reset_frames(game: str, pomdp: bool = False, seed: int = 3) -> np.ndarray:
    args = da.validate(da.Args(env=f"MinAtar/{game}", pomdp=pomdp, size="tiny", num_envs=2))
    envs, frames_per_step = da.make_envs(args, seed)
    assert frames_per_step == 1
    obs, _ = envs.reset(seed=seed)
    for _ in range(5):
        obs, *_ = envs.step(envs.action_space.sample())
    envs.close()
    return obs


@pytest.mark.parametrize("game", GAMES)
def test_observation_shape_and_values(game):
    channels = da.minatar_channels(game)
    obs = reset_frames(game)
    assert obs.shape == (2, 10, 10, len(channels)) and obs.dtype == np.uint8
    assert set(np.unique(obs)) <= {0, 255} and obs.max() == 255
    x = da.preprocess(torch.as_tensor(da.to_chw(obs)))
    assert x.shape == (2, len(channels), 64, 64) and x.min() >= -0.5 and x.max() <= 0.5
    # each cell is a 6x6 block inside a 2-pixel border of zeros (-0.5)
    cells = torch.as_tensor(da.to_chw(obs)).float() / 255 - 0.5
    torch.testing.assert_close(x[..., 2:62, 2:62][..., ::6, ::6], cells)
    torch.testing.assert_close(x[..., 2:62, 2:62], cells.repeat_interleave(6, -1).repeat_interleave(6, -2))
    assert (x[..., :2, :] == -0.5).all() and (x[..., 62:, :] == -0.5).all() and (x[..., :, :2] == -0.5).all()


@pytest.mark.parametrize("game", GAMES)
def test_pomdp_removes_exactly_the_motion_channels(game):
    channels = da.minatar_channels(game)
    motion = da.MINATAR_MOTION[game]
    assert set(motion) < set(channels), "a listed channel is not one of the game's"
    full, partial = reset_frames(game), reset_frames(game, pomdp=True)
    kept = [i for i, c in enumerate(channels) if c not in motion]
    assert partial.shape[-1] == len(channels) - len(motion)
    np.testing.assert_array_equal(partial, full[..., kept])  # same seed, same play: only the channels differ


def test_expected_channel_lists():
    assert da.MINATAR_MOTION == {"Breakout": ["trail"], "Asterix": ["trail"], "Seaquest": ["trail"],
                                 "Freeway": [f"speed{i}" for i in range(1, 6)],
                                 "SpaceInvaders": ["alien_left", "alien_right"]}


def test_protocol_and_bad_input(tiny_args, capsys):
    assert da.validate(da.Args(env="MinAtar/Breakout")).sticky_actions == da.MINATAR_STICKY == 0.1
    assert da.validate(da.Args(env="MinAtar/Breakout", sticky_actions=0.0)).sticky_actions == 0.0
    for argv, sticky in [(["--env", "MinAtar/Breakout"], 0.1), (["--env=minatar/breakout", "--size", "small"], 0.1),
                         (["--env", "MinAtar/Breakout", "--sticky-actions", "0.25"], 0.25), (["--env", "Pong"], 0.25)]:
        assert da.validate(da.parse_args(argv)).sticky_actions == sticky
    assert da.validate(da.Args(env="minatar/space_invaders")).env == "MinAtar/SpaceInvaders"
    for overrides, flag in [(dict(env="MinAtar/Pong"), "--env"), (dict(env="SpaceInvaders", pomdp=True), "--pomdp")]:
        with pytest.raises(SystemExit) as exit_info:
            da.main(tiny_args(**overrides))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith(f"error: {flag}") and "\n" not in err


def test_channels_render_in_distinct_colours():
    frames = torch.zeros(4, 10, 10)
    for c in range(4):
        frames[c, c, :] = 1.0  # channel c lights row c
    rgb = da.to_rgb(frames)
    assert rgb.shape == (3, 10, 10)
    colours = {tuple(rgb[:, c, 0].tolist()) for c in range(4)}
    assert len(colours) == 4 and (0.0, 0.0, 0.0) not in colours
    assert (rgb[:, 5] == 0).all()  # no channel: black
    assert da.to_rgb(frames[:1]) is not None and da.to_rgb(frames[:1]).shape == (1, 10, 10)


@pytest.mark.parametrize("game, pomdp", [(g, False) for g in GAMES] + [("Breakout", True)])
def test_tiny_run(tiny_args, game, pomdp):
    run_name = da.main(tiny_args(env=f"MinAtar/{game}", pomdp=pomdp, total_steps=130, eval_episodes=0))
    assert run_name.startswith(f"MinAtar_{game}")


@pytest.mark.parametrize("actor_input", ["feat", "stoch"])
def test_actor_input(actor_input):
    """--actor-input stoch cuts the deterministic state off from the actor: its logits ignore h and follow z."""
    args = da.validate(da.Args(env="MinAtar/Breakout", pomdp=True, size="tiny", actor_input=actor_input))
    ac = da.ActorCritic(args, args.stoch_size * args.classes + args.deter_size, 3)
    torch.manual_seed(0)
    z, h = torch.randn(2, 5, args.stoch_size * args.classes), torch.randn(2, 5, args.deter_size)
    logits = lambda z, h: ac.act(da.RSSM.feat(h, z))
    assert torch.allclose(logits(z[0], h[0]), logits(z[0], h[1])) == (actor_input == "stoch")
    assert not torch.allclose(logits(z[0], h[0]), logits(z[1], h[0]))
    assert ac.actor[0].in_features == args.stoch_size * args.classes + (args.deter_size if actor_input == "feat" else 0)
