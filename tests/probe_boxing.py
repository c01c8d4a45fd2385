"""Diagnostic (not a test): what the decoder-free model's Barlow target shows of Boxing's rewards.

    python tests/probe_boxing.py

Plays 6,000 random steps of Boxing (seed 1) and averages each frame over the 8x8-pixel cells of the Barlow target.
Prints how many of the 64 cells never change (they count fully towards the invariance term whatever the latent
knows), then fits logistic probes for "this step earned a reward" on the first 4,500 steps and scores them on the
rest: from the cells alone, and from the cells and their change since the previous frame (a hit shows as the score
ticking up). The base rate's cross-entropy is the bar.
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402


def probe(x: torch.Tensor, y: torch.Tensor, train: slice, test: slice) -> float:
    """Test cross-entropy of a logistic regression on standardized inputs, fitted with Adam."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], 1e-2)
    for _ in range(2000):
        loss = F.binary_cross_entropy_with_logits(x[train] @ w + b, y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(x[test] @ w + b, y[test]).item()


def main(steps: int = 6000):
    envs, actions = da.make_envs(da.validate(da.Args(env="Boxing", size="tiny")), 1)
    obs, _ = envs.reset(seed=1)
    rng, frames, rewards = np.random.default_rng(0), [obs[0]], []
    for _ in range(steps):
        obs, reward, *_ = envs.step(rng.integers(0, actions, size=1))
        frames.append(obs[0])
        rewards.append(reward[0])
    envs.close()
    frames = torch.tensor(np.array(frames)).float() / 255 - 0.5
    cells = F.avg_pool2d(frames, da.CELL).flatten(1)
    constant = int((cells.std(0) < 1e-5).sum())
    print(f"cells that never change over {steps:,} random steps: {constant} of {cells.shape[1]}")
    y = torch.tensor(np.array(rewards) != 0).float()
    train, test = slice(0, steps * 3 // 4), slice(steps * 3 // 4, steps)
    p = y[train].mean()
    base = F.binary_cross_entropy(p.expand(len(y[test])), y[test]).item()
    print(f"steps with a reward: {y.mean():.1%}; test cross-entropy of the base rate {base:.3f}")
    print(f"probe on the cells: {probe(cells[1:], y, train, test):.3f}")
    change = torch.cat([cells[1:], cells[1:] - cells[:-1]], 1)
    print(f"probe on the cells and their change: {probe(change, y, train, test):.3f}")


if __name__ == "__main__":
    main()
