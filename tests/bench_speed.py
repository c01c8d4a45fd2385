"""Benchmark (not a test): how fast, how efficient and how large the update of each configuration is.

    python tests/bench_speed.py [--configs v2,v1,decoder-free,tiny] [--rounds 1] [--updates 3] [dreamer_atari.py flags]

Each configuration runs in a fresh process (so that its peak memory is its own), once per round, the
configurations interleaved so that machine noise hits all alike. A process fills the replay buffer with random play,
times `sample_action` over 200 policy steps, then `train_step` (world model + actor-critic): --updates updates after
one warm-up, and reports
- seconds per update (the median), and UPS;
- GFLOP per update, counted by `torch.utils.flop_counter.FlopCounterMode` on one more update, and the achieved
  GFLOP/s as a share of this machine's fp32 matmul peak, measured in the same run at the same thread count
  (`torch.mm` of 1024 x 1024 matrices, best of 20);
- op events per update, from `torch.profiler` on one more update (operators and autograd nodes: the per-op
  overhead that `--compile` removes and that becomes kernel-launch cost on a GPU);
- the first update's seconds (CUDA's kernel selection; with --compile, the compile time);
- peak memory: `torch.cuda.max_memory_allocated` on CUDA; on the CPU the growth of the process's peak RSS from
  before the agent is built, an estimate of what the same update needs on a GPU (float32, no autocast).
Configurations: v2, v1, v3, decoder-free (presets) and small, tiny (v2 at `--size small|tiny`); the other flags
apply to all of them, e.g. `--threads 1` or `--env tests.catch:Catch-v0`.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402

CONFIGS = {"v2": ["--preset", "v2"], "v1": ["--preset", "v1"], "v3": ["--preset", "v3"],
           "decoder-free": ["--preset", "decoder-free"], "small": ["--size", "small"], "tiny": ["--size", "tiny"]}


def pop_option(argv: list[str], name: str, default: str) -> tuple[str, list[str]]:
    if name not in argv:
        return default, argv
    i = argv.index(name)
    return argv[i + 1], argv[:i] + argv[i + 2:]


def matmul_peak() -> float:
    """GFLOP/s of a 1024 x 1024 fp32 matmul with the current thread count, best of 20."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(21):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e9


def measure(argv: list[str], updates: int) -> dict:
    """One configuration, in this process: the figures as a dict."""
    args = da.parse_args(argv)
    args = da.validate(da.dataclasses.replace(args, prefill=max(args.prefill, args.seq_len * args.num_envs)))
    threads = da.set_threads(args.threads)
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
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
    start = time.perf_counter()
    for _ in range(200 // args.num_envs):
        obs, *_ = envs.step(agent.sample_action(da.to_chw(obs), not_first))
    act_seconds = (time.perf_counter() - start) / (200 // args.num_envs * args.num_envs)

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed_update() -> float:
        batch = buffer.sample()
        sync()
        start = time.perf_counter()
        agent.train_step(batch)
        sync()
        return time.perf_counter() - start

    first_seconds = timed_update()  # warm-up: CUDA's kernel selection, --compile's tracing and code generation
    times = [timed_update() for _ in range(updates)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**30
    with FlopCounterMode(display=False) as flops:
        agent.train_step(buffer.sample())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        agent.train_step(buffer.sample())
    envs.close()
    return dict(device=str(device), threads=threads, preset=args.preset, batch=f"{args.batch_size}x{args.seq_len}",
                params=count(agent), wm_params=count(agent.wm), seconds=statistics.median(times),
                first_seconds=first_seconds, act_seconds=act_seconds, train_every=args.train_every,
                gflop=flops.get_total_flops() / 1e9,
                events=sum(e.count for e in prof.key_averages()), peak_gib=peak,
                matmul_peak=matmul_peak() if device.type == "cpu" else None)


def main(argv: list[str]):
    if argv[:1] == ["--one"]:
        updates, argv = pop_option(argv[1:], "--updates", "3")
        print("RESULT " + json.dumps(measure(argv, int(updates))), flush=True)
        return
    configs, argv = pop_option(argv, "--configs", "v2,v1,decoder-free,tiny")
    rounds, argv = pop_option(argv, "--rounds", "1")
    updates, argv = pop_option(argv, "--updates", "3")
    names = configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"error: --configs: unknown {', '.join(unknown)} (choose from {', '.join(CONFIGS)})")
    results = {name: [] for name in names}
    for r in range(int(rounds)):
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--updates", updates, *CONFIGS[name], *argv]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"error: {name} failed:\n{out.stderr[-2000:]}")
            results[name].append(json.loads(lines[-1][len("RESULT "):]))
            print(f"round {r + 1}: {name} {results[name][-1]['seconds']:.3f} s", file=sys.stderr, flush=True)
    first = results[names[0]][0]
    print(f"device {first['device']} | torch {torch.__version__} | threads {first['threads']} | {rounds} round(s) of "
          f"{updates} updates per configuration, the median of all | fp32 matmul peak "
          + (f"{statistics.median(r['matmul_peak'] for rs in results.values() for r in rs):.0f} GFLOP/s"
             if first["matmul_peak"] else "not measured on CUDA"))
    print("| config | batch | parameters (world model) | s / update | UPS | GFLOP / update | GFLOP/s | share of peak "
          "| op events / update | peak memory GiB | acting steps/s | training SPS | first update s |")
    print("|---" * 13 + "|")
    for name, rs in results.items():
        sec = statistics.median(r["seconds"] for r in rs)
        peak = statistics.median(r["matmul_peak"] for r in rs) if rs[0]["matmul_peak"] else None
        r = rs[0]
        rate = r["gflop"] / sec
        sps = r["train_every"] / (sec + r["train_every"] * r["act_seconds"])
        print(f"| {name} | {r['batch']} | {r['params']:.2f}M ({r['wm_params']:.2f}M) | {sec:.3f} | {1 / sec:.2f} | "
              f"{r['gflop']:.1f} | {rate:.1f} | " + (f"{rate / peak:.0%}" if peak else "-") + f" | {r['events']:,} | "
              f"{max(x['peak_gib'] for x in rs):.2f} | {1 / r['act_seconds']:.0f} | {sps:.1f} | "
              f"{statistics.median(x['first_seconds'] for x in rs):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
