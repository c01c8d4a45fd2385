"""Catch: a small pixel game for fast learning checks, on the same path as Atari (64x64 uint8 frames, discrete
actions). Importing this module registers `Catch-v0`, so `python dreamer_atari.py --env tests.catch:Catch-v0`
trains on it.

An 8x8 board drawn in 8x8-pixel cells: a ball (255) starts in a random column of the top row and falls one row per
step; a paddle (128) in the bottom row starts in a random column and moves left, stays or moves right (actions 0, 1,
2). When the ball reaches the bottom row, after 7 steps, the episode terminates with +1 if the paddle is under the
ball and -1 otherwise. The optimum is +1 (the paddle can cross the board in 7 steps); the uniform random policy's
expected return is `random_return()` = -0.75.
"""

import gymnasium as gym
import numpy as np

SIZE, CELL = 8, 8


class Catch(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Box(0, 255, (SIZE * CELL, SIZE * CELL), np.uint8)
        self.action_space = gym.spaces.Discrete(3)

    def _obs(self):
        board = np.zeros((SIZE, SIZE), np.uint8)
        board[SIZE - 1, self.paddle] = 128
        board[self.ball_row, self.ball_col] = 255
        return np.kron(board, np.ones((CELL, CELL), np.uint8))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.ball_row, self.ball_col = 0, int(self.np_random.integers(SIZE))
        self.paddle = int(self.np_random.integers(SIZE))
        return self._obs(), {}

    def step(self, action):
        self.paddle = int(np.clip(self.paddle + int(action) - 1, 0, SIZE - 1))
        self.ball_row += 1
        terminated = self.ball_row == SIZE - 1
        reward = (1.0 if self.paddle == self.ball_col else -1.0) if terminated else 0.0
        return self._obs(), reward, terminated, False, {}


def random_return() -> float:
    """Expected return of any policy that ignores the ball, uniform random actions included: the ball's column is
    uniform and independent of the paddle, so it is caught with probability 1 / SIZE."""
    return 1 / SIZE - (1 - 1 / SIZE)


if "Catch-v0" not in gym.registry:
    gym.register("Catch-v0", entry_point=Catch)
