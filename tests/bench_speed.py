"""Benchmark (not a test): parameters, update time, acting speed and peak memory of one Dreamer configuration.

    python tests/bench_speed.py --updates 5 [any dreamer_atari.py flag, e.g. --preset v1 --batch-size 8]

Fills the replay buffer with random SpaceInvaders play, then times `sample_action` over 200 policy steps and
`train_step` (world model + actor-critic) over --updates updates after one warm-up update. Peak memory is
`torch.cuda.max_memory_allocated` on CUDA; on the CPU it is the growth of the process's peak RSS from before the
agent is built, which estimates what the same update needs on a GPU (float32, no autocast).
"""

import os
import resource
import sys
import time

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402


def main(argv):
    updates = 5
    if "--updates" in argv:
        i = argv.index("--updates")
        updates, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    args = tyro.cli(da.Args, args=argv, default=da.cli_defaults(argv))
    args = da.validate(da.dataclasses.replace(args, prefill=max(args.prefill, args.seq_len * args.num_envs)))
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)
    envs, _ = da.make_envs(args, args.seed)
    obs, _ = envs.reset(seed=args.seed)
    buffer = da.ReplayBuffer(args.num_envs, args.buffer_size, da.to_chw(obs).shape[1:], args.batch_size,
                             args.seq_len, args.buffer_mode, args.recency, args.seed)
    zeros, not_first = np.zeros(args.num_envs, np.int64), np.zeros(args.num_envs, bool)
    for _ in range(args.prefill // args.num_envs):
        obs, reward, terminated, truncated, _ = envs.step(envs.action_space.sample())
        buffer.add(da.to_chw(obs), zeros, reward, terminated, not_first)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    agent = da.Dreamer(args, da.to_chw(obs).shape[1:], int(envs.single_action_space.n), device)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | preset {args.preset} | "
          f"batch {args.batch_size}x{args.seq_len} | horizon {args.horizon}")
    decoder = f"decoder {count(agent.wm.decoder) / 1e6:.2f}M" if agent.wm.decoder is not None else "no decoder"
    print(f"parameters: world model {count(agent.wm) / 1e6:.2f}M ({decoder}), "
          f"actor {count(agent.ac.actor) / 1e6:.2f}M, critic {count(agent.ac.critic) / 1e6:.2f}M, "
          f"total {count(agent) / 1e6:.2f}M")

    start = time.perf_counter()
    for _ in range(200 // args.num_envs):
        obs, *_ = envs.step(agent.sample_action(da.to_chw(obs), not_first))
    act_seconds = (time.perf_counter() - start) / (200 // args.num_envs * args.num_envs)

    agent.train_step(buffer.sample())  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(updates):
        agent.train_step(buffer.sample())
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
    else:
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
        peak = f"{growth / 2**30:.2f} GiB (CPU peak-RSS growth; an estimate of the GPU need)"
    update_seconds = (time.perf_counter() - start) / updates
    sps = args.train_every / (update_seconds + args.train_every * act_seconds)
    print(f"update {update_seconds:.3f} s ({1 / update_seconds:.2f} UPS) | acting {1 / act_seconds:.0f} policy steps/s"
          f" | training SPS at train_every {args.train_every}: {sps:.1f} | peak memory {peak}")
    envs.close()


if __name__ == "__main__":
    main(sys.argv[1:])
