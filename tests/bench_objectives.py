"""Benchmark (not a test): update time of the decoder vs the decoder-free (Barlow Twins) objective, same sizes,
same process, as ratios.

    python tests/bench_objectives.py --rounds 3 [any dreamer_atari.py size flag, e.g. --batch-size 8]

Builds one agent per objective on the same random batches and times `train_step` (world model + actor-critic)
in interleaved rounds, so that machine noise hits every objective alike; reports the median per objective and its
ratio to the decoder. For peak memory run `tests/bench_speed.py --configs v2,decoder-free` (a fresh process each).
"""

import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402

# each objective with what its preset's sizes set for it (the decoder-free model: the reward and continue heads on
# the prior too, SIZE_RATES)
OBJECTIVES = {"decoder": ["--wm-objective", "decoder"], "barlow (decoder-free)": ["--wm-objective", "barlow"]}


def main(argv):
    rounds = 3
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    base = da.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and base.cuda else "cpu")
    torch.manual_seed(base.seed)
    rng = np.random.default_rng(base.seed)
    B, T = base.batch_size, base.seq_len
    batches = [dict(obs=rng.integers(0, 255, (B, T, 1, 64, 64), dtype=np.uint8), action=rng.integers(0, 6, (B, T)),
                    reward=rng.normal(size=(B, T)).astype(np.float32), terminated=np.zeros((B, T), bool),
                    is_first=np.zeros((B, T), bool)) for _ in range(2)]
    agents = {name: da.Dreamer(da.validate(da.parse_args(argv + flags)), (1, 64, 64), 6, device)
              for name, flags in OBJECTIVES.items()}
    times = {name: [] for name in agents}
    for agent in agents.values():
        agent.train_step(batches[0])  # warm-up
    for r in range(rounds):
        for name, agent in agents.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            agent.train_step(batches[r % 2])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    print(f"device {device} | threads {torch.get_num_threads()} | preset sizes {base.preset} | batch {B}x{T} | "
          f"{rounds} rounds")
    reference = statistics.median(times["decoder"])
    for name, ts in times.items():
        params = sum(p.numel() for p in agents[name].wm.parameters()) / 1e6
        print(f"{name:24s} world model {params:6.2f}M params | update {statistics.median(ts):.3f} s | "
              f"ratio to decoder {statistics.median(ts) / reference:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
