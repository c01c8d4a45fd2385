import glob
import math
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_atari as da
from tests.conftest import SCRIPT

LOSSES = ["losses/world_model", "losses/image", "losses/reward", "losses/continue", "losses/kl", "losses/actor",
          "losses/critic"]
CHARTS = ["charts/SPS", "charts/FPS", "charts/UPS", "charts/PRGS", "charts/train_ratio", "charts/episodic_return",
          "charts/episodic_length"]


def scalars(run_name):
    acc = EventAccumulator(os.path.join("runs", run_name))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("overrides", [
    dict(),  # v2: discrete latents, KL balancing, truncated BPTT
    dict(preset="v1", num_envs=3, train_every=16, buffer_mode="uniform", actor_grad="dynamics"),
], ids=["v2", "v1-3envs-uniform-dynamics"])
def test_main_trains_on_ale_and_logs_everything(tiny_args, overrides):
    # a 400-frame cap truncates episodes after 100 policy steps, so episodes end inside the run
    args = tiny_args(env="SpaceInvaders", total_steps=360, max_episode_frames=400, save_model=True, **overrides)
    run_name = da.main(args)
    values = scalars(run_name)
    for tag in LOSSES + CHARTS + ["world/kl", "actor/entropy", "critic/value", "critic/lambda_return"]:
        assert tag in values, tag
        assert all(math.isfinite(v) for v in values[tag]), tag
    assert values["charts/PRGS"][-1] == pytest.approx(1.0)
    for tag in ["charts/SPS", "charts/UPS"]:  # windowed: a short window may hold no update, none is negative
        assert min(values[tag]) >= 0 and max(values[tag]) > 0, tag
    fps_per_sps = [f / s for f, s in zip(values["charts/FPS"], values["charts/SPS"])]
    assert fps_per_sps == pytest.approx([4.0] * len(fps_per_sps))  # action repeat 4
    # train ratio = batch x seq / train_every, exactly, even when num_envs does not divide train_every
    trained = 360 - -(-100 // args.num_envs) * args.num_envs  # policy steps after the prefill (whole env steps)
    updates = trained // da.apply_preset(args).train_every  # tiny: 8 unless the case sets it
    assert values["charts/train_ratio"][-1] == pytest.approx(updates * 4 * 8 / trained)
    assert all(length == 100 for length in values["charts/episodic_length"])  # truncation at the frame cap
    assert os.path.exists(os.path.join("runs", run_name, "dreamer_atari.cleanrl_model"))
    assert len(values["eval/episodic_return"]) == 2  # the final greedy evaluation, next to a random policy
    for tag in ["eval/mean_return", "eval/sampled_mean_return", "eval/random_mean_return"]:
        assert math.isfinite(values[tag][0])
    assert len(values["eval/sampled_episodic_return"]) == 2


def test_seeded_cpu_runs_repeat(tiny_args):
    import torch

    runs = []
    for i in range(2):  # log windows are timed, so compare what training produced, not the logged averages
        run_name = da.main(tiny_args(total_steps=250, max_episode_frames=200, exp_name=f"r{i}", save_model=True))
        weights = torch.load(f"runs/{run_name}/r{i}.cleanrl_model", weights_only=True)["agent"]
        runs.append((scalars(run_name)["charts/episodic_return"], weights))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys()
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize("overrides, flag", [
    (dict(env="SpaceInvader"), "--env"),
    (dict(env="NoSuchGame-v0"), "--env"),
    (dict(seq_len=3000), "--seq-len"),
    (dict(batch_size=300, seq_len=8), "--batch-size"),
    (dict(total_steps=50), "--total-steps"),
    (dict(deter_size=-5), "--deter-size"),
    (dict(batch_size=0), "--batch-size"),
    (dict(preset="v4"), "--preset"),
    (dict(kl_balance=1.5), "--kl-balance"),
    (dict(prefill=4), "--prefill"),
    (dict(threads=-1), "--threads"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_args, capsys, overrides, flag):
    with pytest.raises(SystemExit) as exit_info:
        da.main(tiny_args(**overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag}:"), err
    assert not os.path.exists("runs")


def test_unknown_game_suggests_the_right_name(tiny_args, capsys):
    with pytest.raises(SystemExit):
        da.main(tiny_args(env="SpaceInvader"))
    assert "SpaceInvaders" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "v4"], "v1"),
    (["--env", "Foo"], "--env"),
    (["--batch-size", "-1"], "--batch-size"),
])
def test_command_line_bad_input(argv, expected):
    result = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists("runs")


def test_help_explains_units_and_presets():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "policy step" in out and "frames" in out
    assert "--no-discrete-latents" in out and "(default: 600)" in out
    v1 = subprocess.run([sys.executable, SCRIPT, "--preset", "v1", "--help"], capture_output=True, text=True,
                        timeout=120).stdout
    assert "(default: 200)" in v1  # --help shows the chosen preset's sizes


def test_preset_fills_only_what_is_not_given():
    args = da.apply_preset(da.Args(preset="v1", deter_size=64))
    assert args.deter_size == 64 and args.hidden_size == 200 and not args.discrete_latents
    assert args.kl_balance == 0.0 and args.free_nats == 3.0
    cli = da.cli_defaults(["--env", "Pong", "--preset=v1"])
    assert cli.stoch_size == 30 and cli.gamma == 0.99


def test_size_sets_shapes_and_explicit_flags_still_win():
    small = da.apply_preset(da.Args(size="small", horizon=12, preset="v1"))
    assert (small.deter_size, small.cnn_depth, small.seq_len, small.lr_actor) == (64, 8, 16, 1e-3)
    assert small.horizon == 12 and not small.discrete_latents and small.free_nats == 3.0  # the preset's math stays
    assert da.apply_preset(da.Args()).deter_size == 600 and da.apply_preset(da.Args(size="tiny")).deter_size == 32
    assert da.cli_defaults(["--size", "small", "--preset", "v1"]).mlp_units == 64
    assert da.cli_defaults(["--size=tiny"]).batch_size == 4
    with pytest.raises(SystemExit):
        da.apply_preset(da.Args(size="huge"))


def test_import_has_no_side_effects():
    code = f"import sys; sys.path.insert(0, {os.path.dirname(SCRIPT)!r}); import dreamer_atari"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == ""
    assert os.listdir(".") == []


def test_track_logs_to_wandb_offline(tiny_args, monkeypatch, tmp_path):
    for var, folder in [("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb-cache"),
                        ("WANDB_CONFIG_DIR", "wandb-config"), ("XDG_CACHE_HOME", "cache")]:
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(var, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    da.main(tiny_args(track=True, total_steps=160, eval_episodes=0))
    (run,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*"))
    assert glob.glob(os.path.join(run, "*.wandb"))  # the run's own log, ready for `wandb sync`
    import wandb

    assert wandb.patched["tensorboard"] == []  # a later main() in this process logs to its own folder again


def test_runs_started_in_the_same_second_get_their_own_folders(tiny_args, monkeypatch):
    calls = iter(range(10**6))
    monkeypatch.setattr(da.time, "time", lambda: 1_800_000_000.0 + next(calls) * 1e-4)  # both runs in one second
    names = [da.main(tiny_args(total_steps=120, eval_episodes=0)) for _ in range(2)]
    assert names[0] != names[1]
    assert all(len(glob.glob(f"runs/{name}/events.*")) == 1 for name in names)
