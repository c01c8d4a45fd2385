"""Diagnostic (not a test): where a checkpoint's agent is wrong, measured on held-out episodes.

    python tests/diagnose.py runs/RUN/NAME.cleanrl_model --episodes 100

Plays --episodes new episodes (seeds the training never saw) with the sampled policy, filters each with the world
model as the agent does when it acts, and prints, over every step s_t of those episodes:
- reward head: its prediction against the training target tanh(r_t), per kind of real reward (zero, negative,
  positive), as mean prediction and root-mean-square error, read from the posterior (the real frame seen);
- the same after one imagined step: the prior's prediction of s_{t+1} from s_t and the action taken, which is all
  the actor's imagination has;
- continue head: the mean predicted continue probability on terminal steps (target 0) and on the others (target
  gamma);
- critic: v(s_t) against the real return G_t = tanh(r_t) + c_t G_{t+1} with c_t = gamma (0 at a terminal), the
  return the critic's targets estimate (DreamerV2's value of a state includes the reward that arrived with it);
- the share of each action the sampled policy took;
- imagination: the lambda-return R_t the actor trains on (horizon H from s_t, bootstrapped by the slow critic),
  against the same G_t. Mean R_t above mean G_t: the agent believes in returns the world does not pay.
The comparisons are means over the same steps; the policy's own randomness makes single steps noisy.
"""

import argparse
import dataclasses
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402


@torch.no_grad()
def play(agent: da.Dreamer, args: da.Args, episodes: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Held-out episodes of the sampled policy: the reward that arrived with each step, its terminal flag and its
    posterior (h, z), the terminal step included (the agent filters it as in training; the env ignores its action)."""
    envs, _ = da.make_envs(dataclasses.replace(args, num_envs=1), seed)
    obs, _ = envs.reset(seed=seed)
    agent.act_state, is_first, done, reward, terminal = None, np.ones(1, bool), np.zeros(1, bool), 0.0, False
    played, steps = [], []
    while len(played) < episodes:
        action = agent.sample_action(da.to_chw(obs), is_first)
        steps.append((reward, terminal, agent.act_state[0][0], agent.act_state[1][0], int(action[0])))
        if done[0]:
            played.append(steps)
            steps = []
        obs, r, term, trunc, _ = envs.step(action)
        is_first, done = done, term | trunc
        reward, terminal = (0.0, False) if is_first[0] else (float(r[0]), bool(term[0]))
    envs.close()
    return [dict(reward=np.array([s[0] for s in ep], np.float32), terminal=np.array([s[1] for s in ep]),
                 h=torch.stack([s[2] for s in ep]), z=torch.stack([s[3] for s in ep]),
                 action=np.array([s[4] for s in ep])) for ep in played]


def real_returns(reward: np.ndarray, terminal: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = tanh(r_t) + c_t G_{t+1}, c_t = gamma * (1 - terminal_t): the lambda-return with lambda 1 and no
    bootstrap value, so a truncated episode ends with G = tanh(r)."""
    cont = torch.as_tensor(gamma * (1.0 - terminal.astype(np.float32)))
    return da.lambda_return(torch.tanh(torch.as_tensor(reward)), cont, torch.zeros(len(reward) + 1), 1.0).numpy()


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=20_000, help="first env seed (training used --seed)")
    opts = parser.parse_args()
    torch.manual_seed(opts.seed)
    args, agent, _ = da.agent_from_checkpoint(opts.checkpoint, "checkpoint", seed=opts.seed, cuda=False, num_envs=1)
    action_dim = agent.action_dim
    episodes = play(agent, args, opts.episodes, opts.seed)

    reward = np.concatenate([e["reward"] for e in episodes])
    terminal = np.concatenate([e["terminal"] for e in episodes])
    h, z = torch.cat([e["h"] for e in episodes]), torch.cat([e["z"] for e in episodes])
    feat = torch.cat([z, h], -1)
    real = np.concatenate([real_returns(e["reward"], e["terminal"], args.gamma) for e in episodes])
    predicted_reward = agent.wm.predict_reward(feat).numpy()
    cont = torch.sigmoid(agent.wm.cont_head(feat).squeeze(-1)).numpy()
    value = agent.ac.value(agent.ac.critic, feat).numpy()
    imagined = agent.ac.imagined_returns(agent.wm, h, z, torch.as_tensor(terminal))["returns"][0].numpy()

    returns = [e["reward"].sum() for e in episodes]
    print(f"{opts.checkpoint}: {len(episodes)} held-out episodes, {len(reward)} steps, sampled policy's return "
          f"{np.mean(returns):.3f} +- {np.std(returns):.3f}")
    actions = np.concatenate([e["action"][:-1] for e in episodes])  # the terminal step's action is never taken
    share = np.bincount(actions, minlength=action_dim) / len(actions)
    print(f"  actions taken: {' '.join(f'{p:.2f}' for p in share)} (share of each action)")
    target = np.tanh(reward)
    for name, mask in [("zero", reward == 0), ("negative", reward < 0), ("positive", reward > 0)]:
        if mask.any():
            print(f"  reward head, {name:8s} rewards ({mask.sum():5d} steps): target {target[mask].mean():+.3f}, "
                  f"predicted {predicted_reward[mask].mean():+.3f}, rmse {np.sqrt(((predicted_reward - target)[mask] ** 2).mean()):.3f}")
    for name, mask, goal in [("terminal", terminal, 0.0), ("other", ~terminal, args.gamma)]:
        if mask.any():
            print(f"  continue head, {name:8s} steps ({mask.sum():5d}): target {goal:.3f}, predicted {cont[mask].mean():.3f}")
    # One imagined step from each posterior state with the action the policy took: what the actor's imagination
    # sees at each real transition. A reward the posterior reads but the prior never predicts cannot be imagined.
    nxt = np.concatenate([np.arange(len(e["reward"])) > 0 for e in episodes])  # steps that have a predecessor
    prev = np.flatnonzero(np.concatenate([np.arange(len(e["reward"])) < len(e["reward"]) - 1 for e in episodes]))
    taken = torch.nn.functional.one_hot(torch.as_tensor(np.concatenate([e["action"] for e in episodes])[prev]),
                                        action_dim).float()
    h1, z1, _ = agent.wm.rssm.img_step(h[prev], z[prev], taken)
    imagined_reward = agent.wm.reward_head(torch.cat([z1, h1], -1)).squeeze(-1).numpy()
    imagined_cont = torch.sigmoid(agent.wm.cont_head(torch.cat([z1, h1], -1)).squeeze(-1)).numpy()
    for name, mask in [("zero", reward[nxt] == 0), ("negative", reward[nxt] < 0), ("positive", reward[nxt] > 0)]:
        if mask.any():
            print(f"  one imagined step, {name:8s} rewards: target {target[nxt][mask].mean():+.3f}, predicted "
                  f"{imagined_reward[mask].mean():+.3f}")
    if terminal[nxt].any():
        print(f"  one imagined step into a terminal: predicted continue {imagined_cont[terminal[nxt]].mean():.3f} "
              f"(target 0; other steps {imagined_cont[~terminal[nxt]].mean():.3f})")
    print(f"  critic v(s_t)          mean {value.mean():+.3f} against real G_t {real.mean():+.3f}, "
          f"rmse {np.sqrt(((value - real) ** 2).mean()):.3f}")
    print(f"  imagined R_t (H={args.horizon:2d})   mean {imagined.mean():+.3f} against real G_t {real.mean():+.3f}, "
          f"rmse {np.sqrt(((imagined - real) ** 2).mean()):.3f}")
    first = np.concatenate([np.arange(len(e["reward"])) == 0 for e in episodes])
    print(f"  at the first state: critic {value[first].mean():+.3f}, imagined {imagined[first].mean():+.3f}, "
          f"real {real[first].mean():+.3f}")


if __name__ == "__main__":
    main()
