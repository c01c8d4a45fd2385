"""Reach: a small pixel task of directed movement with a step cost. Importing this module registers `Reach-v0`, so
`python dreamer_atari.py --env tests.reach:Reach-v0` trains on it.

An 8x8 board drawn in 8x8-pixel cells: an agent (128) and a target (255) start in two different random cells. The
agent stays, moves up, down, left or right (actions 0-4; a move into a wall stays put). Each step costs
STEP_COST; the step that reaches the target pays +1 instead and terminates the episode. After LIMIT steps the
episode is truncated. Reaching a target d cells away (Manhattan distance) takes d steps, so the optimum is
E[1 - STEP_COST (d - 1)] = `optimum()` = 0.783; the uniform random policy's expected return is `random_return()`
= -0.793 (both exact, over the uniform start positions).
"""

import gymnasium as gym
import numpy as np

SIZE, CELL, LIMIT, STEP_COST = 8, 8, 20, 0.05
MOVES = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]  # stay, up, down, left, right


class Reach(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Box(0, 255, (SIZE * CELL, SIZE * CELL), np.uint8)
        self.action_space = gym.spaces.Discrete(len(MOVES))

    def _obs(self):
        board = np.zeros((SIZE, SIZE), np.uint8)
        board[self.target] = 255
        board[self.agent] = 128
        return np.kron(board, np.ones((CELL, CELL), np.uint8))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        agent, target = self.np_random.choice(SIZE * SIZE, 2, replace=False)
        self.agent, self.target, self.t = divmod(int(agent), SIZE), divmod(int(target), SIZE), 0
        return self._obs(), {}

    def step(self, action):
        dr, dc = MOVES[int(action)]
        self.agent = (int(np.clip(self.agent[0] + dr, 0, SIZE - 1)), int(np.clip(self.agent[1] + dc, 0, SIZE - 1)))
        self.t += 1
        terminated = self.agent == self.target
        reward = 1.0 if terminated else -STEP_COST
        return self._obs(), reward, terminated, self.t >= LIMIT and not terminated, {}


def _cells():
    r, c = np.divmod(np.arange(SIZE * SIZE), SIZE)
    return r, c


def optimum() -> float:
    """Expected return of the shortest path, over the uniform pairs of distinct start cells."""
    r, c = _cells()
    d = np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])
    off = ~np.eye(SIZE * SIZE, dtype=bool)
    return float(np.mean(1 - STEP_COST * (d[off] - 1)))


def random_return() -> float:
    """Expected return of uniform random actions, by dynamic programming over (agent cell, target cell, steps left)."""
    r, c = _cells()
    n = SIZE * SIZE
    nxt = np.stack([np.clip(r + dr, 0, SIZE - 1) * SIZE + np.clip(c + dc, 0, SIZE - 1) for dr, dc in MOVES], 1)
    value = np.zeros((n, n))  # value[agent, target] with 0 steps left
    for _ in range(LIMIT):
        reached = nxt[:, :, None] == np.arange(n)[None, None]  # (agent, move, target)
        after = np.where(reached, 1.0, -STEP_COST + value[nxt])  # value[nxt] is (agent, move, target)
        value = after.mean(1)
    off = ~np.eye(n, dtype=bool)
    return float(value[off].mean())


if "Reach-v0" not in gym.registry:
    gym.register("Reach-v0", entry_point=Reach)
