"""Cue: a small pixel task that needs memory. Importing this module registers `Cue-v0`, so
`python dreamer_atari.py --env tests.cue:Cue-v0` trains on it.

The first frame shows a cue: a 16x16 block (255) in one of 3 places (left, middle, right) of the top half. Then
the cue is gone: DELAY frames show only a timer bar (128) in the bottom rows that grows a step at a time, and the
last of them is the "go" frame, where the bar is full. Actions (0, 1, 2: left, middle, right) do nothing until
the go frame; the action taken on the go frame ends the episode with +1 if it names the cue's place and -1
otherwise, and the terminal frame shows the cue again (the answer). Only memory of the first frame can tell the
places apart at the go frame, so a policy without it scores the random policy's expected return,
`random_return()` = 1/3 - 2/3 = -1/3; the optimum is +1. Episodes last DELAY + 1 steps.

Why the answer is shown: a world model learns to remember the cue when remembering it predicts something. If
only the reward depended on it, the reward would depend on the match between cue and action alone, with no
signal in either one by itself (each place wins 1/3 of the time whatever the action): v2 with the decoder stayed
at the random level for 16,000 steps that way (greedy -0.20, random -0.36; and no better at DELAY 3). With the
answer shown, the prior can only predict the terminal frame from memory.
"""

import gymnasium as gym
import numpy as np

PLACES, DELAY, SIZE = 3, 6, 64


class Cue(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Box(0, 255, (SIZE, SIZE), np.uint8)
        self.action_space = gym.spaces.Discrete(PLACES)

    def _obs(self):
        frame = np.zeros((SIZE, SIZE), np.uint8)
        if self.t == 0 or self.t > DELAY:  # the cue, and at the end the answer
            left = 8 + self.cue * 20
            frame[16:32, left:left + 16] = 255
        frame[56:, : self.t * SIZE // DELAY] = 128
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(PLACES)), 0
        return self._obs(), {}

    def step(self, action):
        go = self.t == DELAY
        self.t += 1
        reward = (1.0 if int(action) == self.cue else -1.0) if go else 0.0
        return self._obs(), reward, go, False, {}


def random_return() -> float:
    """Expected return of any policy that does not remember the cue: the cue is uniform over the places."""
    return 1 / PLACES - (1 - 1 / PLACES)


if "Cue-v0" not in gym.registry:
    gym.register("Cue-v0", entry_point=Cue)
