"""Runs that survive and continue: periodic evaluation, the replay saved beside the checkpoint, resuming in the same
run folder, kept checkpoints, and the flags around them."""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_atari as da
from tests.conftest import SCRIPT, signal_a_training_run

REPO = os.path.dirname(SCRIPT)
SHORT = dict(total_steps=240, max_episode_frames=400)


def tb(run_name):
    acc = EventAccumulator(os.path.join("runs", run_name))
    acc.Reload()
    return acc


def test_eval_every_logs_a_curve_and_leaves_training_unchanged(tiny_args):
    weights = []
    for eval_every in [0, 60]:
        run_name = da.main(tiny_args(save_model=True, eval_every=eval_every, eval_episodes=1, exp_name=f"e{eval_every}",
                                     **SHORT))
        weights.append(torch.load(f"runs/{run_name}/e{eval_every}.cleanrl_model", weights_only=True)["agent"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # bit for bit
    acc = tb(run_name)
    assert [e.step for e in acc.Scalars("eval/mean_return")] == [60, 120, 180, 240]  # 240: the final evaluation
    for tag in ["eval/min_return", "eval/max_return", "eval/std_return", "eval/random_mean_return"]:
        assert len(acc.Scalars(tag)) == 4, tag
    assert len({e.value for e in acc.Scalars("eval/random_mean_return")}) == 1  # one baseline for the run


def fill(buffer, steps, seed=0):
    rng = np.random.default_rng(seed)
    for t in range(steps):
        buffer.add(rng.integers(0, 256, (buffer.num_envs, 1, 64, 64), dtype=np.uint8),
                   rng.integers(6, size=buffer.num_envs), rng.random(buffer.num_envs).astype(np.float32),
                   np.full(buffer.num_envs, t % 37 == 36), np.full(buffer.num_envs, t % 37 == 0))


@pytest.mark.parametrize("steps", [300, 2600], ids=["partly-filled", "wrapped-around"])
def test_a_resumed_agent_samples_the_same_next_batch_and_makes_the_same_next_update(tiny_args, steps):
    args = da.validate(tiny_args(save_model=True, buffer_size=2000, num_envs=2))
    cpu = torch.device("cpu")
    envs, _ = da.make_envs(args, args.seed)
    agent = da.Dreamer(args, (1, 64, 64), 6, cpu)
    buffer = da.ReplayBuffer(2, 2000, (1, 64, 64), args.batch_size, args.seq_len, seed=3)
    fill(buffer, steps)
    for _ in range(5):  # rows mid-stream, carrying states
        agent.train_step(buffer.sample())
    os.makedirs("run")
    counters = dict(global_step=steps * 2, updates=agent.ac.updates, trained_steps=0, train_credit=0)
    da.save_run("run/a.cleanrl_model", agent, args, counters, buffer, envs, None, None)
    np.random.rand(), envs.action_space.sample()  # draws the saved states must undo
    batch = buffer.sample()  # the uninterrupted run goes on
    metrics = agent.train_step(batch)

    torch.manual_seed(99)  # a fresh process: other weights, other random states, an empty buffer
    fresh_agent, fresh = da.Dreamer(args, (1, 64, 64), 6, cpu), da.ReplayBuffer(2, 2000, (1, 64, 64), 4, 8, seed=7)
    state = torch.load("run/a.cleanrl_model", weights_only=True)
    resumed_counters = dict(global_step=0, updates=0, trained_steps=0, train_credit=0)
    restored = da.resume_from(dataclasses_replace(args, resume="run/a.cleanrl_model"), state, fresh_agent, fresh,
                              envs, resumed_counters)
    assert restored and resumed_counters == counters and fresh_agent.ac.updates == counters["updates"]
    stored = min(steps, 1000)
    for name in ["obs", "action", "reward", "terminated", "is_first"]:
        assert np.array_equal(getattr(fresh, name)[:, :stored], getattr(buffer, name)[:, :stored]), name
    resumed_batch = fresh.sample()
    for key in batch:
        assert np.array_equal(resumed_batch[key], batch[key]), key
    assert fresh_agent.train_step(resumed_batch) == metrics  # every loss and norm, exactly
    for key, value in agent.state_dict().items():
        assert torch.equal(fresh_agent.state_dict()[key], value), key
    assert np.array_equal(fresh.row_pos, buffer.row_pos) and fresh.rng.random() == buffer.rng.random()
    envs.close()


def dataclasses_replace(args, **changes):
    import dataclasses

    return dataclasses.replace(args, **changes)


KILLED_WRITER = """
import sys
import numpy as np, torch
sys.path.insert(0, {repo!r})
import dreamer_atari as da
args = da.validate(da.Args(size="tiny", save_model=True, buffer_size=8000, prefill=100, total_steps=1000,
                           keep_checkpoints=2))
agent = da.Dreamer(args, (1, 64, 64), 6, torch.device("cpu"))
buffer = da.ReplayBuffer(1, 8000, (1, 64, 64), 4, 8)
buffer.steps = 8000
envs, _ = da.make_envs(args, 0)
previous = None
for step in range({start}, 10**6):
    buffer.obs[:] = step % 256  # every frame says which save wrote it
    da.save_run("run/a.cleanrl_model", agent, args, dict(global_step=step, updates=0, trained_steps=0,
                train_credit=0), buffer, envs, None, previous)
    previous = step
    print("saved", step, flush=True)
"""


def test_kill_9_during_a_checkpoint_and_replay_write_leaves_the_previous_pair_loadable():
    os.makedirs("run")
    rng, start = np.random.default_rng(0), 1
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(repo=REPO, start=start)],
                                   stdout=subprocess.PIPE, text=True)
        while not (line := process.stdout.readline()).startswith("saved"):  # one whole pair written
            assert line, "the writer died"
        time.sleep(rng.uniform(0.0, 0.5))
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
        state = torch.load("run/a.cleanrl_model", weights_only=True)
        step = state["counters"]["global_step"]
        buffer = da.ReplayBuffer(1, 8000, (1, 64, 64), 4, 8)
        carried = da.load_replay(os.path.join("run", state["replay"]), buffer, torch.device("cpu"))
        assert not isinstance(carried, str), carried
        assert buffer.steps == 8000 and np.all(buffer.obs == step % 256)  # the replay written with it
        # A kept older checkpoint is whole too and holds the step its name says. A kill between the link and the
        # replace leaves it a copy of the current checkpoint, so its step may equal the current one.
        for older in glob.glob("run/a.step*.cleanrl_model"):
            kept = torch.load(older, weights_only=True)["counters"]["global_step"]
            assert kept == int(re.findall(r"\.step(\d+)", older)[-1]) <= step
        start = step + 1


def test_sigterm_then_resume_from_the_command_line_continues_the_run():
    code, out, err = signal_a_training_run(signal.SIGTERM, "--save-model", "--max-episode-frames=400", settle=3.0)
    assert code == 0, err
    (path,) = glob.glob("runs/*/dreamer_atari.cleanrl_model")
    state = torch.load(path, weights_only=True)
    step = state["counters"]["global_step"]
    assert f"interrupted at step {step:,}" in out and os.path.exists(os.path.join(os.path.dirname(path), state["replay"]))

    # only --resume and the new budget: sizes and every other flag come from the checkpoint
    resumed = subprocess.run([sys.executable, SCRIPT, "--resume", path, "--total-steps", str(step + 40),
                              "--eval-episodes", "0"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {step:,}" in resumed.stdout and "prefill" not in resumed.stdout
    assert glob.glob("runs/*") == [os.path.dirname(path)]  # the same run folder
    assert torch.load(path, weights_only=True)["counters"]["global_step"] == step + 40


def test_keep_checkpoints_keeps_the_latest_pair_and_older_weights(tiny_args):
    run_name = da.main(tiny_args(save_model=True, checkpoint_every=30, keep_checkpoints=3, eval_episodes=0, **SHORT))
    folder = f"runs/{run_name}"
    kept = sorted(os.path.basename(p) for p in glob.glob(f"{folder}/*.cleanrl_model"))
    assert kept == ["dreamer_atari.cleanrl_model", "dreamer_atari.step180.cleanrl_model",
                    "dreamer_atari.step210.cleanrl_model"]
    assert [os.path.basename(p) for p in glob.glob(f"{folder}/*.npz")] == ["dreamer_atari.cleanrl_model.replay-240.npz"]
    assert torch.load(f"{folder}/dreamer_atari.step210.cleanrl_model", weights_only=True)["counters"]["global_step"] == 210
    no_replay = da.main(tiny_args(save_model=True, save_replay=False, eval_episodes=0, **SHORT))
    assert not glob.glob(f"runs/{no_replay}/*.npz")
    assert torch.load(f"runs/{no_replay}/dreamer_atari.cleanrl_model", weights_only=True)["replay"] is None


def test_optimizer_flags_given_with_resume_apply_and_are_announced(tiny_args, capsys):
    run_name = da.main(tiny_args(save_model=True, eval_episodes=0, **SHORT))
    path = f"runs/{run_name}/dreamer_atari.cleanrl_model"
    capsys.readouterr()
    da.main(tiny_args(resume=path, save_model=True, lr_actor=1e-3, weight_decay=0.0, model_eps=1e-8,
                      eval_episodes=0, **{**SHORT, "total_steps": 260}))
    assert "the optimizers take this command's values: --lr-actor 4e-05 -> 0.001, --weight-decay 1e-06 -> 0.0, " \
        "--model-eps 1e-05 -> 1e-08" in capsys.readouterr().out
    groups = torch.load(path, weights_only=True)["optimizers"]["actor"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-3] and [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert [g["eps"] for g in groups] == [1e-5, 1e-5]
    model = torch.load(path, weights_only=True)["optimizers"]["world_model"]["param_groups"]
    assert [g["eps"] for g in model] == [1e-8, 1e-8]


def test_train_ratio_sets_the_cadence_and_excludes_train_every(tiny_args, capsys):
    run_name = da.main(tiny_args(train_ratio=48.0, total_steps=160, eval_episodes=0))  # 4 x 8 / 48: 1.5 per step
    ratios = tb(run_name).Scalars("charts/train_ratio")
    assert ratios[-1].value == pytest.approx(48.0, abs=32 / 60)  # 60 trained steps, 90 updates: exact but for one
    with pytest.raises(SystemExit):
        da.main(tiny_args(train_ratio=48.0, train_every=4))
    err = capsys.readouterr().err.strip()
    assert err == "error: --train-ratio: give --train-every or --train-ratio, not both (they set the same thing)"


def test_atari100k_protocol_sets_its_values_and_explicit_flags_win():
    args = da.validate(da.Args(protocol="atari100k"))
    assert (args.sticky_actions, args.total_steps, args.train_ratio, args.train_every, args.eval_episodes) == \
        (0.0, 100_000, 256.0, None, 100)
    mine = da.validate(da.Args(protocol="atari100k", train_every=8, eval_episodes=20))
    assert (mine.train_every, mine.train_ratio, mine.eval_episodes) == (8, None, 20)
    assert da.cli_defaults(["--protocol", "atari100k", "--train-every", "4"]).train_ratio is None
    assert da.validate(da.Args()).sticky_actions == 0.25 and da.validate(da.Args()).train_every == 16


@pytest.mark.parametrize("overrides, message", [
    (dict(checkpoint_every=1000), "error: --checkpoint-every: needs --save-model"),
    (dict(eval_every=100, eval_episodes=0), "error: --eval-every: needs --eval-episodes 1 or more"),
    (dict(resume_without_replay=True), "error: --resume-without-replay: needs --resume"),
    (dict(keep_checkpoints=0), "error: --keep-checkpoints: must be positive"),
])
def test_flags_that_would_be_ignored_are_refused(tiny_args, capsys, overrides, message):
    with pytest.raises(SystemExit):
        da.main(tiny_args(**overrides))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message)


def test_image_grids_put_real_frames_on_the_top_row(tiny_args):
    real, recon = torch.rand(50, 1, 64, 64), torch.rand(50, 1, 64, 64)
    grid = da.image_rows(real, recon)
    assert grid.shape == (1, 128, 50 * 64)
    assert torch.equal(grid[:, :64, 64 * 7:64 * 8], real[7]) and torch.equal(grid[:, 64:, 64 * 49:], recon[49])
    run_name = da.main(tiny_args(eval_episodes=0, **SHORT))
    (image,) = tb(run_name).Images("images/reconstruction")[-1:]
    assert (image.height, image.width) == (128, 8 * 64)  # tiny: sequences of 8, real above reconstructed


def test_help_keeps_each_flag_description_in_one_paragraph():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "400"}).stdout
    for sentence in ["as GIFs of the frames the agent sees to `runs/{run_name}/videos`",
                     "with the replay buffer beside it (Ctrl-C and SIGTERM always checkpoint)",
                     "or a gymnasium id with 64x64 image observations and discrete actions"]:
        assert sentence in out, sentence
