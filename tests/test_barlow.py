import math
import os

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_atari as da
from tests.conftest import random_batch


def test_invariance_is_zero_for_identical_standardized_sides():
    x = torch.randn(256, 6)
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    loss, invariance, redundancy = da.barlow_twins(x, x.clone(), lam=5e-3)
    assert invariance.item() == pytest.approx(0.0, abs=1e-7)  # C_ii = 1 / (1 + eps) up to round-off
    assert loss.item() == pytest.approx(5e-3 * redundancy.item(), abs=1e-6)


def test_redundancy_matches_a_hand_computed_3x3_example():
    # columns already standardized over N = 4 rows (mean 0, biased variance 1)
    a = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    # C = a^T b / 4 = [[1, 0, 0], [0, 1, 0], [0, 0, -1]] (with eps = 0): invariance (1 - (-1))^2 = 4, redundancy 0
    loss, invariance, redundancy = da.barlow_twins(a, b, lam=0.5, eps=0.0)
    assert invariance.item() == pytest.approx(4.0) and redundancy.item() == pytest.approx(0.0)
    b2 = torch.stack([a[:, 0], a[:, 0], a[:, 2]], 1)  # second column copies the first: C_01 = 1, C_11 = 0
    # C = [[1, 1, 0], [0, 0, 0], [0, 0, 1]]: invariance (1 - 0)^2 = 1, redundancy C_01^2 = 1
    loss, invariance, redundancy = da.barlow_twins(a, b2, lam=0.5, eps=0.0)
    assert invariance.item() == pytest.approx(1.0) and redundancy.item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(1.5)


def test_constant_column_stays_finite():
    a, b = torch.randn(64, 5, requires_grad=True), torch.randn(64, 5)
    with torch.no_grad():
        a[:, 2] = 3.0  # a dead dimension: zero variance
    loss, invariance, _ = da.barlow_twins(a, b, lam=5e-3)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(a.grad).all()
    assert invariance.item() >= 1.0  # the dead dimension contributes (1 - 0)^2


def test_float32_under_bf16_autocast():
    a, b = torch.randn(128, 16), torch.randn(128, 16)
    expected = da.barlow_twins(a, b, lam=5e-3)[0]
    lin = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = lin(a)
        assert projected.dtype == torch.bfloat16
        loss = da.barlow_twins(a, b, lam=5e-3)[0]
        loss_from_bf16 = da.barlow_twins(projected, b, lam=5e-3)[0]
    assert loss.dtype == torch.float32 and loss_from_bf16.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_barlow_mode_creates_no_decoder(tiny_args):
    decoder_free = da.Dreamer(da.validate(tiny_args(preset="decoder-free")), (1, 64, 64), 4, torch.device("cpu"))
    with_decoder = da.Dreamer(da.validate(tiny_args()), (1, 64, 64), 4, torch.device("cpu"))
    assert decoder_free.wm.decoder is None
    assert not any(isinstance(m, da.ConvDecoder) for m in decoder_free.modules())
    assert not any(n.startswith("decoder") for n, _ in decoder_free.wm.named_parameters())
    assert any(n.startswith("decoder") for n, _ in with_decoder.wm.named_parameters())


def test_probe_gradient_never_reaches_the_world_model(tiny_args):
    torch.manual_seed(0)
    agent = da.Dreamer(da.validate(tiny_args(preset="decoder-free", probe_decoder=True)), (1, 64, 64), 4,
                       torch.device("cpu"))
    batch = random_batch()
    loss, h, z, _, _ = agent.wm.loss(batch, agent.train_state)
    probe_loss = da.image_nll(agent.probe(torch.cat([z, h], -1).detach().flatten(0, 1)).unflatten(0, (4, 8)),
                              da.preprocess(batch["obs"]))
    probe_loss.backward()
    assert all(p.grad is None for p in agent.wm.parameters())  # the probe's loss touches no world-model weight
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.probe.parameters())
    # and a full training step moves the world model only through its own loss: the probe has its own optimizer
    assert not any(p is q for g in agent.wm.opt.param_groups for p in g["params"] for q in agent.probe.parameters())
    metrics = agent.train_step({k: v.numpy() for k, v in batch.items()})
    assert "losses/probe_image" in metrics and "images/probe_reconstruction" in agent.images


def test_decoder_free_trains_end_to_end_on_ale(tiny_args):
    run_name = da.main(tiny_args(preset="decoder-free", probe_decoder=True, total_steps=240, max_episode_frames=400))
    acc = EventAccumulator(os.path.join("runs", run_name))
    acc.Reload()
    tags = acc.Tags()
    for tag in ["losses/barlow", "losses/barlow_invariance", "losses/barlow_redundancy", "world/proj_std",
                "losses/kl", "losses/reward", "losses/continue", "losses/actor", "losses/critic",
                "losses/probe_image"]:
        assert tag in tags["scalars"], tag
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    assert "losses/image" not in tags["scalars"]
    assert "images/probe_reconstruction" in tags["images"]


def fit_projection(wm, obs, feat, lr, steps) -> float:
    """Train only the Barlow Twins projection to minimize the loss on fixed inputs; returns the final invariance."""
    opt = torch.optim.Adam(wm.bt_proj.parameters(), lr=lr)
    for _ in range(steps):
        _, metrics = wm.representation_loss(obs, feat)
        opt.zero_grad()
        metrics["losses/barlow"].backward()
        opt.step()
    return metrics["losses/barlow_invariance"].item()


def test_posterior_pixels_target_weighs_a_small_object_like_a_large_one(tiny_args):
    """Catch frames: a latent that knows the ball but not the paddle (one cell of 8x8 pixels, half as bright) leaves
    the paddle's cells unmatched, however the projection is trained; knowing both reaches the minimum."""
    from tests import catch

    env, rng = catch.Catch(), np.random.default_rng(0)
    frames, ball, paddle = [], [], []
    for episode in range(64):
        env.reset(seed=episode)
        for _ in range(7):
            frames.append(env._obs()), ball.append(env.ball_row * 8 + env.ball_col), paddle.append(env.paddle)
            env.step(int(rng.integers(3)))
    obs = da.preprocess(torch.as_tensor(np.array(frames))[:, None, None])  # (N, 1, C, H, W)
    ball, paddle = torch.eye(64)[ball][:, None], torch.eye(8)[paddle][:, None]
    invariance = {}
    for name, feat in [("ball only", ball), ("ball and paddle", torch.cat([ball, paddle], -1))]:
        torch.manual_seed(0)
        wm = da.WorldModel(da.validate(tiny_args(preset="decoder-free")), (1, 64, 64), 3)
        wm.bt_proj = torch.nn.Linear(feat.shape[-1], wm.bt_proj.out_features)
        invariance[name] = fit_projection(wm, obs, feat, lr=3e-2, steps=300)
    assert invariance["ball and paddle"] < 0.5
    assert invariance["ball only"] > 2.0  # the 8 bottom-row cells, where the paddle moves, stay unexplained
