"""Diagnostic (not a test): what a Catch checkpoint's latent knows about the ball and the paddle.

    python tests/probe_catch.py runs/RUN/NAME.cleanrl_model

Plays 300 Catch episodes with random actions, filters them with the checkpoint's world model, and fits linear
probes (least squares on two thirds of the steps, accuracy on the rest) that read the ball's column and the
paddle's column from: the encoder embedding, the posterior feature [z, h], the prior feature [z ~ prior, h], and
h alone. Chance is 1/8. The actor sees the posterior feature and imagines with the prior: a paddle the prior does
not track cannot be steered under the ball. Also prints the share of the standardized embedding's variance that
the ball's and the paddle's positions explain (R^2), which is what the R2-Dreamer target weighs.
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402
from tests import catch  # noqa: E402


def probe_accuracy(x: np.ndarray, label: np.ndarray, classes: int) -> float:
    x, split = np.c_[x, np.ones(len(x))], len(x) * 2 // 3
    w = np.linalg.lstsq(x[:split], np.eye(classes)[label[:split]], rcond=None)[0]
    return float((np.argmax(x[split:] @ w, 1) == label[split:]).mean())


def explained(x: np.ndarray, target: np.ndarray) -> float:
    x = np.c_[x, np.ones(len(x))]
    w = np.linalg.lstsq(x, target, rcond=None)[0]
    return float(1 - ((target - x @ w) ** 2).sum() / (target**2).sum())


@torch.no_grad()
def main(path: str):
    state = da.load_checkpoint(path, "checkpoint")
    args = da.validate(da.Args(**da.known_fields(state["args"])))
    agent = da.Dreamer(args, (1, 64, 64), 3, torch.device("cpu"))
    da.restore(agent, state, "checkpoint")
    env, rng, rssm = catch.Catch(), np.random.default_rng(0), agent.wm.rssm
    feats = {"embedding": [], "posterior [z, h]": [], "prior [z, h]": [], "h alone": []}
    ball, paddle, cell = [], [], []
    for episode in range(300):
        obs, _ = env.reset(seed=episode)
        h, z = rssm.initial(1, "cpu")
        action = torch.zeros(1, 3)
        for t in range(catch.SIZE):
            embed = agent.wm.encoder(da.preprocess(torch.as_tensor(obs)[None, None]))
            h, z, prior, _ = rssm.obs_step(h, z, action, embed, torch.tensor([t == 0]))
            for name, x in zip(feats, [embed, torch.cat([z, h], -1), torch.cat([rssm.sample(prior), h], -1), h]):
                feats[name].append(x[0].numpy())
            ball.append(env.ball_col), paddle.append(env.paddle), cell.append(env.ball_row * catch.SIZE + env.ball_col)
            if t < catch.SIZE - 1:
                a = int(rng.integers(3))
                obs, *_ = env.step(a)
                action = F.one_hot(torch.tensor([a]), 3).float()
    ball, paddle = np.array(ball), np.array(paddle)
    print(f"{path}: linear-probe accuracy (chance 0.125)")
    for name, x in feats.items():
        x = np.array(x)
        print(f"  {name:18s} ball column {probe_accuracy(x, ball, 8):.2f} | paddle column "
              f"{probe_accuracy(x, paddle, 8):.2f}")
    e = np.array(feats["embedding"])
    e = (e - e.mean(0)) / np.sqrt(e.var(0) + 1e-5)
    print(f"  standardized embedding variance explained: ball position {explained(np.eye(64)[cell], e):.3f} | "
          f"paddle position {explained(np.eye(8)[paddle], e):.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
