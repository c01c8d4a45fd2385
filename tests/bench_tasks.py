"""Benchmark (not a test): learning on Catch, decoder and decoder-free world models, several seeds, as a table.

    python tests/bench_catch.py --seeds 1 2 3 --variants decoder decoder-free

Each run is the CI learning test's configuration (tests/test_learning.py: CATCH_ARGS, 8,000 policy steps) with the
variant's world-model objective (--total-steps changes the budget, --bt-scale 0 cuts the Barlow term); it ends with
100 greedy evaluation episodes and saves a checkpoint that `tests/probe_catch.py` can inspect. A random policy
scores -0.75 on average, the optimum is +1.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402
from tests.test_learning import CATCH_ARGS, eval_returns  # noqa: E402

VARIANTS = {
    "decoder": dict(preset="v2"),
    "decoder-free": dict(preset="decoder-free"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--total-steps", type=int, default=CATCH_ARGS["total_steps"])
    parser.add_argument("--bt-scale", type=float, help="weight of the Barlow Twins loss (0 cuts it: a control)")
    opts = parser.parse_args()
    rows = []
    for variant in opts.variants:
        scores = []
        for seed in opts.seeds:
            start = time.time()
            args = da.Args(**{**CATCH_ARGS, **VARIANTS[variant], "seed": seed, "exp_name": f"catch-{variant}",
                              "total_steps": opts.total_steps, "save_model": True}
                           | ({"bt_scale": opts.bt_scale} if opts.bt_scale is not None else {}))
            run_name = da.main(args)
            returns, random_mean = eval_returns(run_name)
            scores.append(np.mean(returns))
            print(f"{variant} seed {seed}: greedy {scores[-1]:.2f}, random {random_mean:.2f}, "
                  f"{time.time() - start:.0f} s, checkpoint runs/{run_name}/{args.exp_name}.cleanrl_model", flush=True)
        rows.append(f"| {variant} | {' | '.join(f'{s:.2f}' for s in scores)} | {np.mean(scores):.2f} |")
    print(f"| variant | {' | '.join(f'seed {s}' for s in opts.seeds)} | mean |")
    print("|---|" + "---|" * (len(opts.seeds) + 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
