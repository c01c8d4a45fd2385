"""Benchmark (not a test): how long writing and reading the replay beside a checkpoint takes, and its size on disk.

    python tests/bench_replay.py --buffer-size 1000000 [--folder /tmp]

Fills a replay buffer of 64x64 gray frames to capacity (random pixels: the file is uncompressed, so content does not
change its size), then times `save_replay` and `load_replay`, the functions a --save-model run and --resume use.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffer-size", type=int, default=1_000_000)
    parser.add_argument("--folder", default=".")
    opts = parser.parse_args()
    buffer = da.ReplayBuffer(1, opts.buffer_size, (1, 64, 64), 16, 50)
    rng = np.random.default_rng(0)
    for start in range(0, opts.buffer_size, 10_000):  # in chunks, so filling needs no second copy in memory
        buffer.obs[0, start:start + 10_000] = rng.integers(0, 256, (min(10_000, opts.buffer_size - start), 1, 64, 64),
                                                           dtype=np.uint8)
    buffer.steps = opts.buffer_size
    state = (torch.zeros(16, 600), torch.zeros(16, 1024))
    path = os.path.join(opts.folder, "bench.replay.npz")
    start = time.time()
    size = da.save_replay(path, buffer, state)
    written = time.time() - start
    last = buffer.obs[0, -1].copy()
    del buffer  # a resuming process holds only the buffer it restores into
    start = time.time()
    restored = da.ReplayBuffer(1, opts.buffer_size, (1, 64, 64), 16, 50)
    result = da.load_replay(path, restored, torch.device("cpu"))
    read = time.time() - start
    assert not isinstance(result, str), result
    assert np.array_equal(restored.obs[0, -1], last)
    os.remove(path)
    print(f"replay of {opts.buffer_size:,} steps: {size / 2**30:.2f} GiB on disk, written in {written:.1f} s, "
          f"read back in {read:.1f} s")


if __name__ == "__main__":
    main()
