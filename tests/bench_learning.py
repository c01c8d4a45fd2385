"""Benchmark (not a test): train on a real Atari game for a budget, then score the greedy policy against a random one.

    python tests/bench_learning.py --env Boxing --total-steps 100000 [any dreamer_atari.py flag]

Runs `dreamer_atari.main` with CPU-sized defaults (below; any flag you pass overrides them), which ends with
--eval-episodes greedy-policy episodes and as many random-policy episodes on the same seeds. Prints both means,
the TensorBoard run they came from and the command that reproduces them. A run stopped by Ctrl-C or SIGTERM before
its evaluation writes a checkpoint; the same command with `--resume runs/RUN/dreamer_atari.cleanrl_model` added
continues it (one Boxing run can take longer than a CPU session).
"""

import os
import shlex
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_atari as da  # noqa: E402

# Small enough for a 2-core CPU, with faster learning rates than DreamerV2's (which assume millions of steps);
# flags given on the command line come after these, so they win.
CPU_DEFAULTS = ["--cnn-depth", "16", "--deter-size", "128", "--hidden-size", "128", "--stoch-size", "16",
                "--classes", "16", "--mlp-units", "128", "--mlp-layers", "2", "--batch-size", "16", "--seq-len", "16",
                "--lr-model", "6e-4", "--lr-actor", "3e-4", "--lr-critic", "3e-4",
                "--entropy", "3e-3", "--prefill", "5000", "--buffer-size", "200000", "--eval-episodes", "10",
                "--log-seconds", "60"]


def cpu_argv(argv: list[str]) -> list[str]:
    """CPU_DEFAULTS, one update every half the preset's policy steps per update (v2 and v3: 8; the decoder-free
    model, which the presets train twice as often: 4), then argv. A train ratio, or a resumed run's own rate, is
    left alone."""
    preset = da.cli_defaults(argv)
    pace = [] if preset.resume or preset.train_every is None else ["--train-every", str(preset.train_every // 2)]
    return CPU_DEFAULTS + pace + argv


def main(argv):
    argv = cpu_argv(argv)
    args = da.parse_args(argv)
    run_name = da.main(args)
    acc = EventAccumulator(os.path.join("runs", run_name))
    acc.Reload()
    final = "eval/sampled_mean_return"  # written by the evaluation at the end of a run only, at its last step
    if final not in acc.Tags()["scalars"] or acc.Scalars(final)[-1].step < args.total_steps:  # Ctrl-C, SIGTERM
        sys.exit(f"no evaluation in runs/{run_name}: the run stopped before it; its last lines above say how to "
                 f"continue it (add the same flags to this script's command)")
    # the last evaluation in the folder: a run resumed after it had finished holds two
    returns = [e.value for e in acc.Scalars("eval/episodic_return")][-args.eval_episodes:]
    last = lambda tag: acc.Scalars(tag)[-1].value  # noqa: E731
    print(f"RESULT {args.env}: {args.total_steps:,} policy steps; greedy policy {np.mean(returns):.1f} "
          f"+- {np.std(returns):.1f} over {len(returns)} episodes; sampled policy "
          f"{last(final):.1f}; random policy {last('eval/random_mean_return'):.1f}")
    print(f"run: runs/{run_name}")
    print(f"command: python tests/bench_learning.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main(sys.argv[1:])
