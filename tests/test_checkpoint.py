import glob
import json
import os
import signal

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_atari as da
from tests.conftest import signal_a_training_run

SHORT = dict(total_steps=240, max_episode_frames=400, eval_episodes=0)


def trained_checkpoint(tiny_args, **overrides):
    run_name = da.main(tiny_args(save_model=True, **{**SHORT, **overrides}))
    return os.path.join("runs", run_name, "dreamer_atari.cleanrl_model"), run_name


def test_checkpoint_holds_everything_and_loads_weights_only(tiny_args):
    path, _ = trained_checkpoint(tiny_args)
    state = torch.load(path, weights_only=True)
    assert state["format"] == da.CHECKPOINT_FORMAT and state["counters"]["global_step"] == 240
    assert set(state["optimizers"]) == {"world_model", "actor", "critic"}
    assert any(k.startswith("ac.slow_critic.") for k in state["agent"])
    assert state["args"]["deter_size"] == 32


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tiny_args, monkeypatch):
    path, _ = trained_checkpoint(tiny_args)
    before = torch.load(path, weights_only=True)

    def crashing_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    agent = da.Dreamer(da.validate(tiny_args()), (1, 64, 64), 6, torch.device("cpu"))
    with pytest.raises(OSError):
        da.save_checkpoint(path, agent, da.validate(tiny_args()), {"global_step": 999})
    after = torch.load(path, weights_only=True)
    assert after["counters"] == before["counters"]
    assert all(torch.equal(after["agent"][k], before["agent"][k]) for k in before["agent"])


def test_resume_restores_weights_bit_for_bit_and_continues_the_run(tiny_args, capsys):
    path, run_name = trained_checkpoint(tiny_args)
    state = torch.load(path, weights_only=True)
    args = da.validate(tiny_args())
    agent = da.Dreamer(args, (1, 64, 64), 6, torch.device("cpu"))
    da.restore(agent, state, "--resume")
    assert all(torch.equal(v, state["agent"][k]) for k, v in agent.state_dict().items())
    adam_steps = [s["step"] for s in agent.wm.opt.state_dict()["state"].values()]
    assert adam_steps and all(float(s) == state["counters"]["updates"] for s in adam_steps)

    capsys.readouterr()
    resumed = da.main(tiny_args(resume=path, **{**SHORT, "total_steps": 320}))
    out = capsys.readouterr().out
    assert resumed == run_name and "resumed at step 240" in out  # the same run folder
    assert not [line for line in out.splitlines() if line.startswith("prefill ")]  # the replay came back: no refill
    acc = EventAccumulator(os.path.join("runs", run_name))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("charts/PRGS")]
    assert steps == sorted(steps) and steps[-1] == 320 and 240 in steps  # one curve that goes on from the save
    losses = [e.step for e in acc.Scalars("losses/world_model")]
    assert min(losses) <= 240 < max(losses)  # it trained in both sessions


def test_resume_without_its_replay_is_one_line_unless_accepted(tiny_args, capsys):
    path, run_name = trained_checkpoint(tiny_args)
    (replay,) = glob.glob(f"{path}.replay-*.npz")
    with open(replay, "r+b") as f:
        f.truncate(os.path.getsize(replay) // 2)
    for damage, why in [(lambda: None, "cannot be read"), (lambda: os.remove(replay), "is missing")]:
        damage()
        with pytest.raises(SystemExit) as exit_info:
            da.main(tiny_args(resume=path, **{**SHORT, "total_steps": 480}))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--resume-without-replay" in err
        assert why in err
    da.main(tiny_args(resume=path, resume_without_replay=True, **{**SHORT, "total_steps": 360, "log_seconds": 1e-3}))
    prefill_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prefill ")]
    assert prefill_lines and all(int(line.split()[1].split("/")[0].replace(",", "")) <= 100 for line in prefill_lines)


def test_resume_with_other_sizes_or_preset_is_one_clear_line(tiny_args, capsys):
    path, _ = trained_checkpoint(tiny_args)
    for overrides, flag in [(dict(deter_size=64), "--deter-size"), (dict(preset="v1"), "--preset"),
                            (dict(decoder_norm=True), "--decoder-norm")]:
        with pytest.raises(SystemExit) as exit_info:
            da.main(tiny_args(resume=path, **{**SHORT, "total_steps": 480, **overrides}))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1
        assert err.startswith("error: --resume:") and flag in err


def test_a_v3_checkpoint_from_before_decoder_norm_existed_resumes_with_the_norm_it_had(tiny_args):
    path, _ = trained_checkpoint(tiny_args, preset="v3", decoder_norm=True)  # v3's decoder then
    state = torch.load(path, weights_only=True)
    del state["args"]["decoder_norm"]  # written before --decoder-norm existed
    torch.save(state, path)
    assert da.cli_defaults(["--resume", path]).decoder_norm is True  # `--resume PATH` alone keeps the norm
    run_name = da.main(tiny_args(resume=path, preset="v3", decoder_norm=True, save_model=True,
                                 **{**SHORT, "total_steps": 300}))
    resumed = torch.load(os.path.join("runs", run_name, "dreamer_atari.cleanrl_model"), weights_only=True)
    assert resumed["counters"]["global_step"] == 300 and resumed["args"]["decoder_norm"] is True
    assert da.known_fields({"preset": "v2"})["decoder_norm"] is False
    old_free = {"preset": "decoder-free", "heads_on_prior": False, "train_every": 16}  # saved before --reward-scale
    assert da.apply_preset(da.Args(**da.known_fields(old_free))).reward_scale == 1.0  # not the preset's 10 now


def test_foreign_and_tampered_files_fail_safely(tiny_args, capsys, tmp_path):
    junk = tmp_path / "junk.cleanrl_model"
    junk.write_bytes(os.urandom(256))

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.cleanrl_model"
    torch.save({"format": da.CHECKPOINT_FORMAT, "x": Payload()}, evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path in [junk, evil, foreign, tmp_path / "missing.cleanrl_model"]:
        for flag in ["resume", "eval_checkpoint"]:
            with pytest.raises(SystemExit) as exit_info:
                da.main(tiny_args(**{flag: str(path)}))
            assert exit_info.value.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith("error: --" + flag.replace("_", "-"))
    assert not (tmp_path / "pwned").exists()  # weights_only: the payload never ran


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_args, monkeypatch, capsys):
    real_sample, calls = da.ReplayBuffer.sample, []

    def poisoned_sample(self):
        batch = real_sample(self)
        calls.append(1)
        if len(calls) > 10:  # after 10 good updates (and a checkpoint at step 160) the rewards turn to NaN
            batch["reward"][:] = float("nan")
        return batch

    monkeypatch.setattr(da.ReplayBuffer, "sample", poisoned_sample)
    with pytest.raises(SystemExit) as exit_info:
        da.main(tiny_args(save_model=True, checkpoint_every=60, **{**SHORT, "total_steps": 2000}))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite world-model loss" in err and "the last good checkpoint is" in err
    (path,) = glob.glob("runs/*/dreamer_atari.cleanrl_model")
    state = torch.load(path, weights_only=True)
    assert state["counters"]["global_step"] < 200
    assert all(torch.isfinite(v).all() for v in state["agent"].values() if v.is_floating_point())


def test_eval_checkpoint_prints_and_writes_json_and_a_gif(tiny_args, capsys, tmp_path):
    path, run_name = trained_checkpoint(tiny_args)
    gif = str(tmp_path / "episode.gif")
    stats = da.main(da.Args(eval_checkpoint=path, eval_episodes=3, eval_gif=gif, total_steps=10))  # training flags
    # do not apply to an evaluation
    out = capsys.readouterr().out
    assert "env SpaceInvaders, preset v2, trained for 240 policy steps" in out
    for name in ["greedy ", "sampled", "random "]:
        assert f"eval {name} over 3 episodes: mean" in out
    with open(f"{path}.eval.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(stats))
    for name in ["greedy", "sampled", "random"]:
        assert len(saved[name]["returns"]) == 3
        assert saved[name]["min"] <= saved[name]["mean"] <= saved[name]["max"]
    with Image.open(gif) as image:
        assert image.size == (256, 256) and image.n_frames > 10  # one whole episode, 64x64 enlarged 4x
        image.seek(image.n_frames - 1)
    acc = EventAccumulator(os.path.dirname(path))
    acc.Reload()
    assert len(acc.Scalars("eval/episodic_return")) == len(acc.Scalars("eval/sampled_episodic_return")) == 3


def test_capture_video_and_open_loop_dream(tiny_args):
    run_name = da.main(tiny_args(capture_video=True, **SHORT))
    videos = sorted(glob.glob(f"runs/{run_name}/videos/*.gif"))
    assert [os.path.basename(v) for v in videos] == ["episode-0.gif", "episode-1.gif"]  # cubic schedule: 0, 1, 8
    with Image.open(videos[0]) as image:  # Pillow merges identical neighbours, adding up their 40 ms durations
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            durations.append(image.info["duration"])
    assert sum(durations) == 101 * 40  # reset frame + 100 policy steps up to the 400-frame cap
    acc = EventAccumulator(os.path.join("runs", run_name))
    acc.Reload()
    assert {"images/open_loop_dream", "images/reconstruction"} <= set(acc.Tags()["images"])


def test_ctrl_c_saves_a_checkpoint_and_exits_0():  # SIGTERM: tests/test_resume.py
    code, out, err = signal_a_training_run(signal.SIGINT, "--eval-episodes=0")
    assert code == 0, err
    assert "checkpoint saved to" in out and "--resume" in out
    (path,) = glob.glob("runs/*/dreamer_atari.cleanrl_model")
    assert torch.load(path, weights_only=True)["counters"]["global_step"] > 0


def test_eval_gif_without_evaluation_episodes_is_refused(tiny_args, capsys):
    with pytest.raises(SystemExit):
        da.main(tiny_args(eval_gif="x.gif", eval_episodes=0))
    assert capsys.readouterr().err.startswith("error: --eval-gif: needs --eval-episodes 1")
