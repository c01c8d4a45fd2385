"""Reach: a small pixel task of directed movement with a step cost. Importing this module registers `Reach-v0` (an
8x8 board) and `Reach5x5-v0` (a 5x5 board), so `python dreamer_atari.py --env tests.reach:Reach-v0` trains on it.

A size x size board drawn in 8x8-pixel cells, centred in the 64x64 frame: an agent (128) and a target (255) start
in two different random cells. The agent stays, moves up, down, left or right (actions 0-4; a move into a wall
stays put). Each step costs STEP_COST; the step that reaches the target pays +1 instead and terminates the episode.
After LIMIT steps the episode is truncated. Reaching a target d cells away (Manhattan distance) takes d steps, so
the optimum is E[1 - STEP_COST (d - 1)] = `optimum(size)`: 0.783 on 8x8, 0.883 on 5x5; the uniform random
policy's expected return is `random_return(size)`: -0.793 on 8x8, -0.528 on 5x5 (both exact, over the uniform
start positions). A random policy reaches the target in 13% of its episodes on 8x8 (one step in 143), 29% on
5x5 (one in 58).
"""

import gymnasium as gym
import numpy as np

FRAME_CELLS, CELL, LIMIT, STEP_COST = 8, 8, 20, 0.05
MOVES = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]  # stay, up, down, left, right


class Reach(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, size: int = 8):
        self.size, self.offset = size, (FRAME_CELLS - size) // 2
        self.observation_space = gym.spaces.Box(0, 255, (FRAME_CELLS * CELL, FRAME_CELLS * CELL), np.uint8)
        self.action_space = gym.spaces.Discrete(len(MOVES))

    def _obs(self):
        board = np.zeros((FRAME_CELLS, FRAME_CELLS), np.uint8)
        board[self.target[0] + self.offset, self.target[1] + self.offset] = 255
        board[self.agent[0] + self.offset, self.agent[1] + self.offset] = 128
        return np.kron(board, np.ones((CELL, CELL), np.uint8))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        agent, target = self.np_random.choice(self.size**2, 2, replace=False)
        self.agent, self.target, self.t = divmod(int(agent), self.size), divmod(int(target), self.size), 0
        return self._obs(), {}

    def step(self, action):
        dr, dc = MOVES[int(action)]
        self.agent = tuple(int(np.clip(p + d, 0, self.size - 1)) for p, d in zip(self.agent, (dr, dc)))
        self.t += 1
        terminated = self.agent == self.target
        reward = 1.0 if terminated else -STEP_COST
        return self._obs(), reward, terminated, self.t >= LIMIT and not terminated, {}


def optimum(size: int = 8) -> float:
    """Expected return of the shortest path, over the uniform pairs of distinct start cells."""
    r, c = np.divmod(np.arange(size**2), size)
    d = np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])
    off = ~np.eye(size**2, dtype=bool)
    return float(np.mean(1 - STEP_COST * (d[off] - 1)))


def random_return(size: int = 8) -> float:
    """Expected return of uniform random actions, by dynamic programming over (agent cell, target cell, steps left)."""
    n = size**2
    r, c = np.divmod(np.arange(n), size)
    nxt = np.stack([np.clip(r + dr, 0, size - 1) * size + np.clip(c + dc, 0, size - 1) for dr, dc in MOVES], 1)
    value = np.zeros((n, n))  # value[agent, target] with 0 steps left
    for _ in range(LIMIT):
        reached = nxt[:, :, None] == np.arange(n)[None, None]  # (agent, move, target)
        after = np.where(reached, 1.0, -STEP_COST + value[nxt])  # value[nxt] is (agent, move, target)
        value = after.mean(1)
    off = ~np.eye(n, dtype=bool)
    return float(value[off].mean())


for name, size in [("Reach-v0", 8), ("Reach5x5-v0", 5)]:
    if name not in gym.registry:
        gym.register(name, entry_point=Reach, kwargs=dict(size=size))
