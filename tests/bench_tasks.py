"""Benchmark (not a test): learning on the small pixel tasks (Catch, Reach on 8x8 and 5x5 boards, Cue), decoder
and decoder-free world models on v2 and v3, several seeds, as a table.

    python tests/bench_tasks.py --task reach --seeds 1 2 3 --variants decoder decoder-free --total-steps 24000

Each run is the CI learning tests' configuration (`CATCH_ARGS` in tests/test_learning.py: `--size small`) on the
task, with the variant's world-model objective (--total-steps changes the budget, --bt-scale 0 cuts the Barlow
term, --set FLAG=VALUE changes any other flag); it ends with 100 evaluation episodes of the greedy and of the
sampled policy next to a random policy on the same seeds, and saves a checkpoint for `tests/diagnose.py` and
`tests/probe_catch.py`. Each task module states its random policy's expected return and its optimum.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402
from tests import catch, cue, reach  # noqa: E402
from tests.test_learning import CATCH_ARGS  # noqa: E402

VARIANTS = {
    "decoder": dict(preset="v2"),
    "decoder-free": dict(preset="decoder-free"),
    "v3": dict(preset="v3"),
    "v3-barlow": dict(preset="v3", wm_objective="barlow"),
}
TASKS = {  # name -> (--env, random return, optimum)
    "catch": ("tests.catch:Catch-v0", catch.random_return(), 1.0),
    "reach": ("tests.reach:Reach-v0", reach.random_return(), reach.optimum()),
    "reach5x5": ("tests.reach:Reach5x5-v0", reach.random_return(5), reach.optimum(5)),
    "cue": ("tests.cue:Cue-v0", cue.random_return(), 1.0),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="catch", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--total-steps", type=int, default=CATCH_ARGS["total_steps"])
    parser.add_argument("--bt-scale", type=float, help="weight of the Barlow Twins loss (0 cuts it: a control)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="FLAG=VALUE",
                        help="any other Args field, e.g. lr_actor=3e-4 (JSON values)")
    opts = parser.parse_args()
    env, random_return, optimum = TASKS[opts.task]
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in opts.set)}
    if opts.bt_scale is not None:
        extra["bt_scale"] = opts.bt_scale
    print(f"{opts.task}: random policy {random_return:.3f}, optimum {optimum:.3f}; changed flags {extra or 'none'}")
    rows = []
    for variant in opts.variants:
        results = []
        for seed in opts.seeds:
            start = time.time()
            exp_name = f"{opts.task}-{variant}"
            args = da.Args(**{**CATCH_ARGS, **VARIANTS[variant], "env": env, "seed": seed, "exp_name": exp_name,
                              "total_steps": opts.total_steps, "save_model": True, **extra})
            run_name = da.main(args)
            with open(f"runs/{run_name}/{exp_name}.cleanrl_model.eval.json") as f:
                stats = json.load(f)
            results.append([stats[k]["mean"] for k in ["greedy", "sampled", "random"]])
            print(f"{variant} seed {seed}: greedy {results[-1][0]:.2f}, sampled {results[-1][1]:.2f}, random "
                  f"{results[-1][2]:.2f}, {time.time() - start:.0f} s, checkpoint runs/{run_name}/{exp_name}"
                  ".cleanrl_model", flush=True)
        cell = lambda i: " / ".join(f"{r[i]:.2f}" for r in results)
        rows.append(f"| {opts.task} | {variant} | {opts.total_steps:,} | {' '.join(map(str, opts.seeds))} | "
                    f"{cell(0)} | {cell(1)} | {cell(2)} | {optimum:.2f} |")
    print("| task | variant | policy steps | seeds | greedy | sampled | random | optimum |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
