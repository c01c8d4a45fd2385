"""Benchmark (not a test): the update time of this working tree's dreamer_atari.py against an earlier commit's,
side by side, as ratios.

    python tests/bench_commits.py --against 32688c7 [--configs v2,tiny] [--rounds 2] [--updates 3] [--compile]

For each round, configuration and version, a fresh process (one thread, on the cores this one may use) loads that
version's file, builds an agent from seed 0 and times `train_step` on random (B, T) batches: one warm-up update,
then the median of --updates. Versions alternate within a round, so that machine noise hits both alike.
--compile adds a third version, the working tree with --compile (its first update, the compile time, is printed).
--paired instead runs both versions in one process per round, their updates alternating, and reports the median of
the per-pair ratios: on a machine whose speed swings from one process to the next (seen here: the same update
0.44 s in one process, 0.70 s in another), fresh processes per version compare two different machines. A
process has one heap policy, and the working tree's agent sets it (`keep_freed_memory`) for both versions: --paired
measures the update's code alone, fresh processes also what that policy saves (at v2 sizes against 32688c7: 1.55x
paired on 2026-12-05, 1.68x-1.71x fresh on 2026-12-06).
Configurations use only flags that every version has: v2, v1 and decoder-free (the presets' sizes, as each version
defines the preset: since fab189a decoder-free also trains the heads on the prior, which older versions cannot),
small and tiny (the CPU learning runs' and the tests' sizes, spelled out). The versions must take
`Dreamer(args, obs_shape, action_dim, device)` and `train_step(batch)`.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from bench_speed import pop_option

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"v2": dict(preset="v2"), "v1": dict(preset="v1"), "decoder-free": dict(preset="decoder-free"),
           "small": dict(preset="v2", cnn_depth=8, deter_size=64, hidden_size=64, stoch_size=8, classes=8,
                         mlp_units=64, mlp_layers=2, batch_size=16, seq_len=16, horizon=8),
           "tiny": dict(preset="v2", cnn_depth=4, deter_size=32, hidden_size=32, stoch_size=4, classes=4,
                        mlp_units=32, mlp_layers=1, batch_size=4, seq_len=8, horizon=5)}


def load_agent(path: str, name: str, config: str, compile: bool):
    """Load the file at `path` as module `name`, build its agent from seed 0; returns it and two random batches."""
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    da = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(da)
    args = da.apply_preset(da.Args(**CONFIGS[config], **(dict(compile=True) if compile else {})))
    rng = np.random.default_rng(0)
    B, T = args.batch_size, args.seq_len
    batches = [dict(obs=rng.integers(0, 255, (B, T, 1, 64, 64), dtype=np.uint8), action=rng.integers(0, 6, (B, T)),
                    reward=rng.normal(size=(B, T)).astype(np.float32), terminated=np.zeros((B, T), bool),
                    is_first=np.zeros((B, T), bool)) for _ in range(2)]
    torch.manual_seed(0)
    return da.Dreamer(args, (1, 64, 64), 6, torch.device("cpu")), batches


def seconds(agent, batch) -> float:
    start = time.perf_counter()
    agent.train_step(batch)
    return time.perf_counter() - start


def time_version(path: str, config: str, updates: int, compile: bool) -> dict:
    """In this process: load the file at `path`, time its update. Returns seconds per update and the first's."""
    torch.set_num_threads(1)
    agent, batches = load_agent(path, "version", config, compile)
    first = seconds(agent, batches[0])
    times = [seconds(agent, batches[i % 2]) for i in range(updates)]
    return dict(seconds=statistics.median(times), first=first)


def time_pair(paths: list[str], config: str, updates: int) -> dict:
    """--paired, in this process: both versions' agents, their updates alternating (A B, then B A), so that a machine
    whose speed swings slows both alike. Returns each version's median seconds and the median of the per-pair ratios
    old / new."""
    torch.set_num_threads(1)
    agents = [load_agent(path, f"version{i}", config, False) for i, path in enumerate(paths)]
    for agent, batches in agents:
        seconds(agent, batches[0])  # warm-up
    times = [[], []]
    for i in range(updates):
        for v in ((0, 1) if i % 2 == 0 else (1, 0)):
            agent, batches = agents[v]
            times[v].append(seconds(agent, batches[i % 2]))
    return dict(seconds=[statistics.median(t) for t in times],
                ratio=statistics.median(a / b for a, b in zip(*times)))


def child(argv: list[str], what: str) -> dict:
    """Run this script with `argv` in a fresh one-thread process; returns the dict it prints after RESULT."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"error: {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str]):
    if argv[:1] == ["--one"]:
        path, config, updates, compile = argv[1:5]
        print("RESULT " + json.dumps(time_version(path, config, int(updates), compile == "1")), flush=True)
        return
    if argv[:1] == ["--pair"]:
        *paths, config, updates = argv[1:5]
        print("RESULT " + json.dumps(time_pair(paths, config, int(updates))), flush=True)
        return
    against, argv = pop_option(argv, "--against", "")
    configs, argv = pop_option(argv, "--configs", "v2,tiny")
    rounds, argv = pop_option(argv, "--rounds", "2")
    updates, argv = pop_option(argv, "--updates", "3")
    compile, paired = "--compile" in argv, "--paired" in argv
    if not against or [a for a in argv if a not in ("--compile", "--paired")] or compile and paired:
        sys.exit("usage: python tests/bench_commits.py --against REV [--configs v2,tiny] [--rounds 2] [--updates 3] "
                 "[--compile | --paired]")
    old = subprocess.run(["git", "-C", HERE, "show", f"{against}:dreamer_atari.py"], capture_output=True, text=True)
    if old.returncode:
        sys.exit(f"error: --against: {old.stderr.strip()}")
    folder = tempfile.mkdtemp()
    os.symlink(os.path.join(HERE, "tests"), os.path.join(folder, "tests"))
    with open(os.path.join(folder, "dreamer_atari.py"), "w") as f:
        f.write(old.stdout)
    versions = {against: (os.path.join(folder, "dreamer_atari.py"), "0"),
                "working tree": (os.path.join(HERE, "dreamer_atari.py"), "0")}
    if compile:
        versions["working tree --compile"] = (os.path.join(HERE, "dreamer_atari.py"), "1")
    if paired:
        return report_pairs(against, [path for path, _ in versions.values()], configs.split(","), int(rounds),
                            updates)
    results = {(c, v): [] for c in configs.split(",") for v in versions}
    for r in range(int(rounds)):
        for config in configs.split(","):
            for name, (path, comp) in versions.items():
                result = child(["--one", path, config, updates, comp], f"{config} / {name}")
                results[config, name].append(result)
                print(f"round {r + 1}: {config} / {name}: {result['seconds']:.4f} s per update, first update "
                      f"{result['first']:.1f} s", flush=True)
    print(f"one thread | {rounds} round(s) of {updates} updates | medians over rounds")
    for config in configs.split(","):
        base = statistics.median(x["seconds"] for x in results[config, against])
        for name in versions:
            sec = statistics.median(x["seconds"] for x in results[config, name])
            print(f"{config:5s} {name:24s} {sec:9.4f} s per update | {base / sec:.2f}x the speed of {against}")


def report_pairs(against: str, paths: list[str], configs: list[str], rounds: int, updates: str):
    """--paired: one process per round and configuration that alternates the two versions' updates."""
    ratios = {config: [] for config in configs}
    for r in range(rounds):
        for config in configs:
            result = child(["--pair", *paths, config, updates], config)
            ratios[config].append(result["ratio"])
            print(f"round {r + 1}: {config}: {against} {result['seconds'][0]:.4f} s, working tree "
                  f"{result['seconds'][1]:.4f} s per update; median ratio of the pairs {result['ratio']:.2f}",
                  flush=True)
    print(f"one thread | {rounds} round(s) of {updates} alternating pairs of updates")
    for config, rs in ratios.items():
        print(f"{config:5s} working tree: {statistics.median(rs):.2f}x the speed of {against} (median over rounds; "
              f"rounds {min(rs):.2f}x to {max(rs):.2f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
