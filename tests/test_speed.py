"""Speed options change how the update runs, not what it computes: --compile, --threads, --amp."""

import functools
import os
import symtable
import types

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreamer_atari as da


def replay_batch(rng, B=4, T=8) -> dict[str, np.ndarray]:
    """A (B, T) replay chunk of random frames, 6 actions, rewards, terminals and episode starts."""
    return dict(obs=rng.integers(0, 255, (B, T, 1, 64, 64), dtype=np.uint8), action=rng.integers(0, 6, (B, T)),
                reward=rng.normal(size=(B, T)).astype(np.float32), terminated=rng.random((B, T)) < 0.1,
                is_first=rng.random((B, T)) < 0.1)


def record_encoder_dtype(agent, dtypes: set):
    """Add the dtype of every output of the encoder's second convolution (the first runs functionally) to `dtypes`."""
    conv = [m for m in agent.wm.encoder.modules() if isinstance(m, torch.nn.Conv2d)][1]
    conv.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_default_threads_are_half_the_usable_cores(monkeypatch, keep_threads):
    monkeypatch.setattr(da.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert da.set_threads(0) == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(da.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert da.set_threads(0) == 1 and torch.get_num_threads() == 1
    assert da.set_threads(3) == 3 and torch.get_num_threads() == 3


def test_console_first_line_names_the_threads(tiny_args, capsys, keep_threads):
    da.main(tiny_args(threads=1, total_steps=120, eval_episodes=0))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("run ") and "(1 CPU thread)" in first


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not os.environ.get("DREAMER_SLOW_TESTS"), reason=(
        "inductor compiles for 3-4 minutes on 2 CPU cores; run with DREAMER_SLOW_TESTS=1")))])
def test_compiled_update_matches_eager(tiny_args, monkeypatch, backend):
    """Three updates on the same batches from the same weights: the compiled world-model loss and imagination give
    the eager losses to float tolerance (the same random draws: inductor falls back to eager's generator).
    aot_eager traces what --compile traces (graph capture, the backward pass from AOTAutograd) in 15 s; inductor,
    what --compile runs, also generates and compiles the kernels."""
    monkeypatch.setattr(da.torch, "compile", functools.partial(torch.compile, backend=backend))
    rng = np.random.default_rng(0)
    batches = [replay_batch(rng) for _ in range(3)]
    agents = []
    for compile in (False, True):
        torch.manual_seed(0)
        agents.append(da.Dreamer(da.validate(tiny_args(compile=compile)), (1, 64, 64), 6, torch.device("cpu")))
    for i, batch in enumerate(batches):
        metrics = []
        for agent in agents:
            torch.manual_seed(i)
            metrics.append(agent.train_step(batch))
        eager, compiled = metrics
        for key in ["losses/world_model", "losses/image", "losses/reward", "losses/kl", "losses/actor",
                    "losses/critic", "critic/lambda_return", "actor/entropy"]:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), (i, key)


@pytest.mark.parametrize("preset", ["v2", "v3", "decoder-free"])
def test_bf16_autocast_update_matches_float32(tiny_args, preset):
    """--amp's path, which runs on CUDA GPUs only, taken here under the CPU's bf16 autocast instead: acting and one
    update run in bf16 (the encoder's convolutions return bf16) and give float32's losses to bf16 tolerance."""
    batch = replay_batch(np.random.default_rng(0))
    metrics, dtypes = [], {False: set(), True: set()}
    for amp in (False, True):
        torch.manual_seed(0)
        agent = da.Dreamer(da.validate(tiny_args(preset=preset)), (1, 64, 64), 6, torch.device("cpu"))
        agent.amp = amp
        record_encoder_dtype(agent, dtypes[amp])
        assert agent.sample_action(batch["obs"][:, 0], np.zeros(4, bool)).shape == (4,)
        torch.manual_seed(1)
        metrics.append(agent.train_step(batch))
    assert dtypes == {False: {torch.float32}, True: {torch.bfloat16}}
    fp32, bf16 = metrics
    for key in ["losses/world_model", "losses/reward", "losses/kl", "losses/actor", "losses/critic"]:
        assert np.isfinite(bf16[key]) and bf16[key] == pytest.approx(fp32[key], rel=0.02, abs=0.01), key


def test_training_run_under_bf16_autocast(tiny_args, monkeypatch):
    """A whole run (acting, updates, image logging, the open-loop dream, checkpoint, evaluation) with --amp's path
    forced on under the CPU's bf16 autocast: every logged loss finite, the images and the model written."""
    init, dtypes = da.Dreamer.__init__, set()

    def init_with_amp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.amp = True
        record_encoder_dtype(self, dtypes)

    monkeypatch.setattr(da.Dreamer, "__init__", init_with_amp)
    run_name = da.main(tiny_args(env="SpaceInvaders", total_steps=300, max_episode_frames=400, save_model=True))
    acc = EventAccumulator(os.path.join("runs", run_name))
    acc.Reload()
    losses = [tag for tag in acc.Tags()["scalars"] if tag.startswith("losses/")]
    assert {"losses/image", "losses/kl", "losses/actor", "losses/critic"} <= set(losses)
    assert all(np.isfinite(e.value) for tag in losses for e in acc.Scalars(tag))
    assert {"images/reconstruction", "images/open_loop_dream"} <= set(acc.Tags()["images"])
    assert len(acc.Scalars("eval/episodic_return")) == 2
    assert os.path.exists(os.path.join("runs", run_name, "dreamer_atari.cleanrl_model"))
    assert torch.bfloat16 in dtypes  # acting and updates; the logged open-loop dream runs in float32


def test_no_function_makes_a_module_level_name_local():
    """`import torch._inductor.config` inside a function binds `torch` locally in all of it, so a use of torch
    earlier in that function fails with UnboundLocalError. Dreamer.__init__ did this, and on CUDA (where
    `--amp` reads `torch.cuda` first) every run failed; the CPU never reached that read."""
    source = open(da.__file__).read()
    modules = {name for name, value in vars(da).items() if isinstance(value, types.ModuleType)}
    shadowed, tables = [], [symtable.symtable(source, da.__file__, "exec")]
    while tables:
        table = tables.pop()
        tables += table.get_children()
        if table.get_type() == "function":
            shadowed += [f"{table.get_name()}: {s.get_name()}" for s in table.get_symbols()
                         if s.get_name() in modules and s.is_local()]
    assert not shadowed
