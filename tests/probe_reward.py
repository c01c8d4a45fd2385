"""Diagnostic (not a test): how well a world model, trained offline on random play, predicts rewards it has not seen.

    python tests/probe_reward.py --env Boxing --preset decoder-free [--updates 3000] [--steps 20000] [flags]

An RL run mixes the world model's question (does imagination carry the reward?) with the actor's; this asks the
first alone, in a third of the time. It plays --steps random steps (seed 1) into a replay buffer, trains a
`WorldModel` for --updates updates on it with `tests/bench_learning.py`'s CPU sizes (flags given here win, as
there), then filters 3,000 held-out random steps (seed 2) and reads the reward head:
- from the posterior (the frame seen), and
- after k = 1, 5, 15 imagined steps from the posterior k steps earlier, with the actions that were taken: what the
  actor's imagination has.
For each it prints R^2 against what the head predicts, tanh(r) (v1, v2, decoder-free) or r itself (v3's two-hot
head) (0: no better than the held-out mean; negative: worse), and the mean prediction on steps with a positive, a
negative and no reward; for the posterior also the held-out reward loss against `losses/reward_constant`, the loss
of the best constant prediction on the same steps (a head at that level knows how often rewards come, not when).
"""

import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402
from bench_learning import cpu_argv  # noqa: E402
from bench_speed import pop_option  # noqa: E402


def play(args: da.Args, seed: int, steps: int) -> tuple[dict[str, np.ndarray], int]:
    """Random play as the replay buffer stores it: entry t holds obs_t, the action that led to it, its reward and
    terminal flag, and whether it starts an episode (NEXT_STEP autoreset: the step after a last obs is a reset)."""
    envs, actions = da.make_envs(args, seed)
    obs, _ = envs.reset(seed=seed)
    rng = np.random.default_rng(seed)
    keys = ["obs", "action", "reward", "terminated", "is_first"]
    out = {k: [] for k in keys}
    action, reward, terminated, done, first = 0, 0.0, False, False, True
    for _ in range(steps):
        for k, v in zip(keys, (da.to_chw(obs)[0], 0 if first else action, reward, terminated, first)):
            out[k].append(v)
        action = int(rng.integers(actions))
        obs, r, term, trunc, _ = envs.step(np.array([action]))
        first, done = done, bool(term[0] | trunc[0])
        reward, terminated = (0.0, False) if first else (float(r[0]), bool(term[0]))
    envs.close()
    return {k: np.array(v) for k, v in out.items()}, actions


def report(name: str, pred: np.ndarray, reward: np.ndarray, v3: bool):
    target = reward if v3 else np.tanh(reward)
    r2 = 1 - np.mean((pred - target) ** 2) / np.var(target)
    print(f"{name:16s} R^2 {r2:+.3f} | mean prediction: reward > 0 {pred[reward > 0].mean():+.3f} "
          f"({(reward > 0).sum()} steps), < 0 {pred[reward < 0].mean():+.3f} ({(reward < 0).sum()}), "
          f"0 {pred[reward == 0].mean():+.4f}")


@torch.no_grad()
def evaluate(wm: da.WorldModel, data: dict[str, np.ndarray], horizons=(1, 5, 15)):
    obs = da.preprocess(torch.as_tensor(data["obs"])[None])
    embed = wm.encoder(obs.flatten(0, 1)).unflatten(0, obs.shape[:2])
    action = F.one_hot(torch.as_tensor(data["action"]), wm.action_dim).float()
    first = torch.as_tensor(data["is_first"])
    h, z, *_ = wm.rssm.observe(embed, action[None], first[None], wm.rssm.initial(1, obs.device))
    h, z, reward = h[0], z[0], data["reward"]
    feat = wm.rssm.feat(h, z)
    report("posterior", wm.predict_reward(feat).numpy(), reward, wm.v3)
    targets = {k: torch.as_tensor(data[k])[None] for k in ["reward", "terminated"]}
    print(f"{'':16s} reward loss {wm.head_losses(feat[None], targets)[0].item():.4f}, the best constant's "
          f"{wm.constant_reward_loss(targets['reward']).item():.4f}")
    n = len(reward)
    for k in horizons:  # from the posterior at t - k, k prior steps with the actions taken, to t
        hk, zk, crossed = h[: n - k], z[: n - k], torch.zeros(n - k, dtype=torch.bool)
        for j in range(1, k + 1):
            hk, zk, _ = wm.rssm.img_step(hk, zk, action[j: n - k + j])
            crossed |= first[j: n - k + j]  # an episode began on the way: the rollout cannot know that
        keep = ~crossed.numpy()
        report(f"prior, {k} step{'s' if k > 1 else ''}", wm.predict_reward(wm.rssm.feat(hk, zk)).numpy()[keep],
               reward[k:][keep], wm.v3)


def main(argv: list[str]):
    updates, argv = pop_option(argv, "--updates", "3000")
    steps, argv = pop_option(argv, "--steps", "20000")
    argv = cpu_argv(argv)
    args = da.validate(da.parse_args(argv))
    da.set_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    train, actions = play(args, 1, int(steps))
    held_out, _ = play(args, 2, 3000)
    print(f"played in {time.time() - start:.0f} s; steps with a reward: {np.mean(train['reward'] != 0):.1%}")
    buffer = da.ReplayBuffer(1, int(steps), train["obs"].shape[1:], args.batch_size, args.seq_len, seed=args.seed)
    for t in range(int(steps)):
        buffer.add(*(train[k][t: t + 1] for k in ["obs", "action", "reward", "terminated", "is_first"]))
    wm = da.WorldModel(args, train["obs"].shape[1:], actions)
    state, window = wm.rssm.initial(args.batch_size, "cpu"), []
    for update in range(1, int(updates) + 1):
        batch = {k: torch.as_tensor(v) for k, v in buffer.sample().items()}
        _, _, state, metrics = wm.train_step(batch, state, amp=False)
        window.append({k: v.item() for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1})
        if update % 500 == 0 or update == int(updates):
            shown = [k for k in ["losses/reward", "losses/kl", "losses/image", "losses/barlow_invariance"]
                     if k in window[0]]
            print(f"update {update:,} ({time.time() - start:.0f} s): "
                  + ", ".join(f"{k.split('/')[1]} {np.mean([m[k] for m in window]):.4f}" for k in shown))
            window = []
    print(f"held-out random play (seed 2, 3,000 steps), reward head against {'reward' if wm.v3 else 'tanh(reward)'}:")
    evaluate(wm, held_out)
    print(f"command: python tests/probe_reward.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main(sys.argv[1:])
