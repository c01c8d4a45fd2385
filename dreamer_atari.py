"""Dreamer (V1 / V2 / V3) on Atari in one file: world model, actor-critic in imagination, and the training loop.

    python dreamer_atari.py --env SpaceInvaders             # DreamerV2 (discrete latents, KL balancing)
    python dreamer_atari.py --env Pong --preset v1          # DreamerV1 (Gaussian latents, free nats)
    python dreamer_atari.py --env Pong --preset v3          # DreamerV3 (symlog two-hot heads, return normalization)

Units: a *policy step* is one agent decision in one env; with action repeat 4 it spans 4 emulator *frames*.
`global_step` counts policy steps summed over all envs. Sections follow the data flow: args, environment,
replay buffer, networks, world model, actor-critic, agent, main loop.
Papers: DreamerV1 arXiv 1912.01603, DreamerV2 arXiv 2010.02193 (equation numbers below refer to them), DreamerV3
arXiv 2301.04104 (its sections are named; where paper and released code differ, the code of early 2023 is followed).
"""

import copy
import ctypes
import dataclasses
import datetime
import difflib
import glob
import importlib
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """Train a Dreamer agent. Units: a policy step is one agent decision in one env; on Atari it spans 4 emulator
    frames (action repeat). Step counts below are policy steps summed over envs unless they say frames."""

    # Fields whose default is None take their value from --size (see SIZES), else from --preset (see PRESETS); an
    # explicit value always wins.
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python and the environments)"""
    torch_deterministic: bool = True
    """if toggled, sets `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, use CUDA when it is available (otherwise the CPU)"""
    threads: int = 0
    """CPU threads for torch's operators; 0: half the cores this process may run on, at least 1 (with another
    process busy on the CPU, more threads than free cores slowed small runs 2-3x, see README)"""
    track: bool = False
    """if toggled, log to Weights and Biases (mirrors TensorBoard; works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "dreamer_atari"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """record env 0's episodes 0, 1, 8, 27, ... (cubic schedule, then every 1000th) as GIFs of the frames the agent
    sees to `runs/{run_name}/videos`"""
    save_model: bool = False
    """checkpoint to `runs/{run_name}/{exp_name}.cleanrl_model` at the end and every --checkpoint-every steps, with
    the replay buffer beside it (Ctrl-C and SIGTERM always checkpoint)"""
    checkpoint_every: int | None = None
    """with --save-model, also checkpoint every this many policy steps (default 100,000; 0: only at the end)"""
    keep_checkpoints: int = 2
    """checkpoints kept in the run folder: the latest as `{exp_name}.cleanrl_model`, older ones as
    `{exp_name}.step{N}.cleanrl_model` (the replay is kept for the latest only)"""
    save_replay: bool = True
    """write the replay buffer (uint8 frames, about 4 KiB per stored step) next to each checkpoint, so that --resume
    trains on at once; --no-save-replay saves the disk space, and a resume then refills --prefill steps"""
    resume: str | None = None
    """continue a run from its checkpoint: same run folder (TensorBoard curves and the W&B run go on), weights,
    optimizers, counters, random states and the replay buffer saved beside it; flags you give still apply
    (optimizer flags too), sizes must match"""
    resume_without_replay: bool = False
    """with --resume, accept a missing or mismatched replay file and refill the buffer with --prefill steps of the
    restored policy instead"""
    eval_checkpoint: str | None = None
    """only evaluate this checkpoint (--eval-episodes greedy episodes next to a random policy); writes
    `<checkpoint>.eval.json` beside it"""
    eval_gif: str | None = None
    """write a GIF of the first evaluation episode (the 64x64 frames the agent sees, enlarged 4x) to this path"""

    env: str = "SpaceInvaders"
    """Atari game (`SpaceInvaders`, `Breakout`, `ALE/Pong-v5`, `ms_pacman`), a MinAtar game (`MinAtar/Breakout`,
    Asterix, Freeway, Seaquest, SpaceInvaders; needs `pip install minatar`) or a gymnasium id with 64x64 image
    observations and discrete actions, registered or as `module:EnvId` (e.g. `tests.catch:Catch-v0`)"""
    pomdp: bool = False
    """MinAtar only: remove the channels that show motion, so that only memory recovers it: Breakout, Asterix and
    Seaquest their trail channel, Freeway its five car-speed trails (speed and direction), SpaceInvaders its
    alien_left and alien_right (the aliens' direction)"""
    protocol: Literal["dreamerv2", "atari100k"] = "dreamerv2"
    """dreamerv2: sticky actions 0.25, 1M policy steps, 10 final evaluation episodes; atari100k: the data-efficient
    benchmark of recent papers (sticky actions 0, 100,000 policy steps = 400,000 frames, train ratio 256 as in
    DreamerV3's released Atari-100k config, 100 final evaluation episodes); explicit flags win"""
    total_steps: int = None  # type: ignore[assignment]
    """total policy steps, summed over envs (frames = 4 x policy steps on Atari)"""
    num_envs: int = 1
    """number of parallel environments"""
    sticky_actions: float = None  # type: ignore[assignment]
    """probability that the emulator repeats the previous action (0.25: DreamerV2/Machado protocol; 0: Atari-100k;
    MinAtar games default to MinAtar's 0.1)"""
    noop_max: int = 30
    """maximum number of no-op actions at the start of each episode (Atari)"""
    max_episode_frames: int = 108_000
    """episode cap in emulator frames (27,000 policy steps); reaching it is a truncation, not a terminal (Atari;
    MinAtar and other gymnasium envs keep their own episode ends)"""

    preset: Literal["v1", "v2", "v3", "decoder-free"] = "v2"
    """v2: DreamerV2 (32x32 categorical latents, KL balancing); v1: DreamerV1 (Gaussian latents, free nats); v3:
    DreamerV3 (LayerNorm + SiLU, symlog two-hot reward and critic, free bits per step, 1% unimix, percentile return
    normalization; its `small` model size); decoder-free: v2 latents with a Barlow Twins objective instead of the image
    decoder, at these sizes trained twice as often, with the reward loss weighed 10x and the heads on the prior too
    (SIZE_RATES; `--preset v3 --wm-objective barlow` puts it on V3)"""
    size: Literal["preset", "small", "tiny"] = "preset"
    """network sizes with the batch, sequence and horizon shapes that belong with them (SIZES): preset (the paper's);
    small (a 2-core CPU size for small pixel tasks: 0.4M parameters; with v1, v2 and decoder-free it also raises
    the learning rates and the entropy bonus, refreshes the slow critic more often, lowers gamma to 0.95 and, with
    the decoder, sets --heads-on-prior, which it needs to learn within tens of thousands of steps, see
    SIZE_RATES); tiny (the test sizes: it runs, it does not learn)"""
    wm_objective: Literal["decoder", "barlow"] = None  # type: ignore[assignment]
    """world-model representation loss: reconstruct pixels, or Barlow Twins between the projected latent feature and
    the frame averaged over 8x8-pixel cells (no decoder)"""
    bt_lambda: float = 5e-4
    """weight of the Barlow Twins redundancy (off-diagonal) term"""
    bt_scale: float = 0.05
    """weight of the Barlow Twins loss in the world-model loss"""
    decoder_norm: bool = None  # type: ignore[assignment]
    """LayerNorm + SiLU after each of the decoder's hidden conv layers (DreamerV3's decoder); off: DreamerV2's
    decoder (ELU, no norm), the default of every preset. Only the decoder: the encoder and MLPs follow the preset.
    With the norm v3 left its posterior almost uniform and did not learn Boxing (seeds 1-3, tests/bench_learning.py's
    sizes); without it it learned Catch and its sampled policy beat random on Boxing (README "Does it learn?")"""
    probe_decoder: bool = False
    """train a separate decoder on detached latent features (it never trains the world model) and log its images"""
    discrete_latents: bool = None  # type: ignore[assignment]
    """categorical (straight-through) stochastic state instead of a Gaussian one"""
    kl_balance: float = None  # type: ignore[assignment]
    """KL balancing alpha: the prior's share of the KL gradient; 0 disables balancing (plain KL[q||p])"""
    kl_scale: float = None  # type: ignore[assignment]
    """weight of the KL term in the world-model loss"""
    free_nats: float = None  # type: ignore[assignment]
    """free nats: each KL term is clipped from below at this value after averaging over the batch"""
    free_nats_per_step: bool = None  # type: ignore[assignment]
    """clip each KL term at --free-nats per time step before averaging (DreamerV3's free bits) instead of after"""
    unimix: float = None  # type: ignore[assignment]
    """share of a uniform distribution mixed into the latent and policy categoricals (DreamerV3: 0.01)"""
    deter_size: int = None  # type: ignore[assignment]
    """size of the deterministic (GRU) state"""
    hidden_size: int = None  # type: ignore[assignment]
    """size of the hidden layers inside the RSSM"""
    stoch_size: int = None  # type: ignore[assignment]
    """number of stochastic variables (categoricals, or Gaussian dimensions)"""
    classes: int = None  # type: ignore[assignment]
    """classes per categorical variable (discrete latents only)"""
    cnn_depth: int = None  # type: ignore[assignment]
    """channels of the first conv layer; they double in each of the 4 layers"""
    mlp_units: int = None  # type: ignore[assignment]
    """units per hidden layer of the reward, continue, actor and critic MLPs"""
    mlp_layers: int = None  # type: ignore[assignment]
    """hidden layers of those MLPs"""
    lr_model: float = None  # type: ignore[assignment]
    """world-model learning rate"""
    lr_actor: float = None  # type: ignore[assignment]
    """actor learning rate"""
    lr_critic: float = None  # type: ignore[assignment]
    """critic learning rate"""
    gamma: float = None  # type: ignore[assignment]
    """discount factor"""
    cont_scale: float = None  # type: ignore[assignment]
    """weight of the continue loss in the world-model loss"""
    reward_scale: float = None  # type: ignore[assignment]
    """weight of the reward loss in the world-model loss (the Dreamers: 1; the decoder-free model at the preset's
    sizes: 10, see SIZE_RATES): without a decoder it is the one term that asks the posterior for what predicts
    rewards"""
    heads_on_prior: bool = None  # type: ignore[assignment]
    """also train the reward and continue heads on the prior's features [z ~ p(z | h_t), h_t], the ones imagination
    gives them (PlaNet's overshooting, Hafner et al. 2019 Sec. 4, at distance 1; the Dreamers train them on the
    posterior only): a rare event the frame shows (Reach's target) must then be predicted before it is seen"""
    repval_scale: float = 0.0
    """weight of the replay-value loss (DreamerV3's code, `repval`, 0.3 there): the critic regresses lambda-returns
    of the replayed sequence from the posterior features, and that gradient trains the world model, which then has
    to encode what predicts returns; 0 turns it off"""
    return_lambda: float = 0.95
    """lambda of the lambda-return"""
    entropy: float = None  # type: ignore[assignment]
    """actor entropy bonus scale (eta)"""
    actor_grad: Literal["reinforce", "dynamics"] = "reinforce"
    """actor gradient: REINFORCE with a critic as baseline, or backpropagation through the learned dynamics"""
    actor_input: Literal["feat", "stoch"] = "feat"
    """what the actor reads: feat, the full latent [z, h] (the papers); stoch, z alone, the deterministic state cut
    off (an ablation: under --pomdp, memory then reaches the actor only through what z keeps)"""
    slow_critic_every: int = None  # type: ignore[assignment]
    """move the slow critic towards the critic every this many updates"""
    slow_critic_fraction: float = None  # type: ignore[assignment]
    """how far it moves: 1 copies the critic (DreamerV2), 0.02 is an exponential moving average (DreamerV3)"""
    grad_clip: float = 100.0
    """global gradient-norm clip for the actor and critic optimizers"""
    model_grad_clip: float = None  # type: ignore[assignment]
    """global gradient-norm clip for the world-model optimizer"""
    model_eps: float = None  # type: ignore[assignment]
    """Adam epsilon of the world-model optimizer (the actor's and critic's is 1e-5)"""
    weight_decay: float = None  # type: ignore[assignment]
    """decoupled weight decay per update on weight matrices (DreamerV2 shrinks them by (1 - wd) each step)"""

    batch_size: int = None  # type: ignore[assignment]
    """sequences per training batch"""
    seq_len: int = None  # type: ignore[assignment]
    """policy steps per sequence (one truncated-BPTT chunk)"""
    horizon: int = None  # type: ignore[assignment]
    """imagination horizon in policy steps"""
    prefill: int = 5_000
    """random-action policy steps (summed over envs) before training starts (DreamerV2 used 50,000)"""
    train_every: int | None = None
    """one update per this many policy steps (summed over envs); train ratio = batch x seq / train_every"""
    train_ratio: float | None = None
    """replayed steps per policy step instead of --train-every (batch x seq / train ratio policy steps per update,
    fractions carried over); give one of the two"""
    buffer_size: int = 1_000_000
    """replay capacity in policy steps over all envs (64x64 uint8 frames: 1M steps take 3.8 GiB of RAM)"""
    buffer_mode: Literal["tbptt", "uniform"] = "tbptt"
    """tbptt: each batch row continues its stream and carries its state; uniform: random windows, zero state"""
    recency: float = 0.0
    """where a TBPTT row restarts: 0 uniform over stored data; r > 0 gives density (1 + r) x^r in data age x"""
    amp: bool = True
    """bf16 autocast on CUDA GPUs that support it (losses stay float32); ignored on the CPU"""
    compile: bool = False
    """torch.compile the world-model loss over the sequence and the imagination rollout with its returns (the first
    updates pay the compile time, see README); the random draws stay those of eager mode"""
    log_seconds: float = 5.0
    """seconds between console lines and TensorBoard rate/loss points"""
    eval_episodes: int = None  # type: ignore[assignment]
    """episodes played with the greedy policy at the end of training or with --eval-checkpoint (papers use 50),
    next to a random policy on the same seeds (0: none)"""
    eval_every: int = 0
    """also play --eval-episodes greedy episodes in separate envs every this many policy steps and log
    `eval/mean_return` (with min, max, std) on the way; training is unchanged by it (0: only at the end)"""


SHARED = dict(classes=32, mlp_units=400, mlp_layers=4, batch_size=16, seq_len=50, horizon=15, train_every=16,
              entropy=1e-3, slow_critic_every=100, slow_critic_fraction=1.0, free_nats_per_step=False, unimix=0.0,
              cont_scale=5.0, model_grad_clip=100.0, model_eps=1e-5, weight_decay=1e-6,
              reward_scale=1.0, heads_on_prior=False, decoder_norm=False)  # DreamerV2's Atari settings
PRESETS = {
    "v2": dict(SHARED, wm_objective="decoder", discrete_latents=True, kl_balance=0.8, kl_scale=0.1, free_nats=0.0,
               deter_size=600, hidden_size=600, stoch_size=32, cnn_depth=48, lr_model=2e-4, lr_actor=4e-5,
               lr_critic=1e-4, gamma=0.999),
    "v1": dict(SHARED, wm_objective="decoder", discrete_latents=False, kl_balance=0.0, kl_scale=1.0, free_nats=3.0,
               deter_size=200, hidden_size=200, stoch_size=30, cnn_depth=32, lr_model=6e-4, lr_actor=8e-5,
               lr_critic=8e-5, gamma=0.99),
}
PRESETS["decoder-free"] = dict(PRESETS["v2"], wm_objective="barlow")
# DreamerV3 as in its released configs of early 2023 (size `small`: deter 512, units 512, depth 32, 2 layers), but
# for the decoder: DreamerV2's, without V3's norm (--decoder-norm says why). Its KL, 0.5 KL[sg(q) || p] + 0.1
# KL[q || sg(p)], is scale 0.6 with balance 5/6 here.
PRESETS["v3"] = dict(wm_objective="decoder", discrete_latents=True, kl_balance=5 / 6, kl_scale=0.6, free_nats=1.0,
                     free_nats_per_step=True, unimix=0.01, deter_size=512, hidden_size=512, stoch_size=32, classes=32,
                     cnn_depth=32, mlp_units=512, mlp_layers=2, batch_size=16, seq_len=64, horizon=15, train_every=16,
                     lr_model=1e-4, lr_actor=3e-5, lr_critic=3e-5, model_eps=1e-8, model_grad_clip=1000.0,
                     weight_decay=0.0, gamma=1 - 1 / 333, entropy=3e-4, slow_critic_every=1,
                     slow_critic_fraction=0.02, cont_scale=1.0, reward_scale=1.0, heads_on_prior=False,
                     decoder_norm=False)
PROTOCOLS = {
    "dreamerv2": dict(sticky_actions=0.25, total_steps=1_000_000, eval_episodes=10),
    "atari100k": dict(sticky_actions=0.0, total_steps=100_000, train_ratio=256.0, eval_episodes=100),
}
SIZES = {
    "preset": {},
    "small": dict(cnn_depth=8, deter_size=64, hidden_size=64, stoch_size=8, classes=8, mlp_units=64, mlp_layers=2,
                  batch_size=16, seq_len=16, horizon=8, train_every=4),
    "tiny": dict(cnn_depth=4, deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_units=32, mlp_layers=1,
                 batch_size=4, seq_len=8, horizon=5, train_every=8),
}
# What the small size also needs to learn within tens of thousands of steps (measured on Catch, Cue and Reach 5x5,
# see README "Does it learn?"): faster learning rates; a slow critic refreshed more often; a discount whose horizon
# (1 / (1 - gamma) = 20 steps) matches episodes of tens of steps, where 0.999 let imagination (which never hits a
# time limit) add up step costs into values of -3 to -6 against real returns near -0.5, and once diverge to +10;
# the reward and continue heads trained on the prior as well (--heads-on-prior), with the decoder only (Reach 5x5
# seed 1 at 30,000 steps: 0.73 with it, 0.05 without; decoder-free: 0.69 with it, 0.79 without, and with it the
# decoder-free model did not learn Cue); 5x the entropy bonus, which kept Reach's actor exploring until it found
# the target. v3 on Catch: with its own rates, 1e-4 / 3e-5 / 3e-5 and entropy 3e-4, it stayed at random for 8,000
# steps; it keeps its slow critic, a moving average updated every step. The decoder-free model trains twice as
# often as the decoder (one update per 2 policy steps, not 4): each of its small updates costs about half a decoder
# update, so a run costs about what the decoder's does, and at 8,000 steps it scored 0.90 / 0.90 / 0.86 on Catch
# (seeds 1-3; -0.44 / -0.40 / -0.52 at 4) and 2.56 / 4.11 / 3.56 on MinAtar Breakout at 6,000 (2.37 / 2.33 / 2.16).
# At the preset's sizes the decoder-free model also trains twice as often as the decoder (one update per 8 policy
# steps, not 16), weighs the reward loss 10x and trains the reward and continue heads on the prior as well: without
# a decoder the reward loss is what asks the posterior for what predicts rewards, and imagination reads the heads
# from the prior. Measured with `tests/bench_learning.py` (its CPU sizes, half the preset's policy steps per
# update) at 40,000 steps, greedy on seeds 1-3: Boxing -10.2 / 39.6 / 29.2 (random 4.7 / -0.1 / 0.1; without the
# three -8.4 / -1.4 / -0.8; the decoder 19.9 / -7.6 / 16.8), Krull 6029 / 3073 / 4229 (random 1877 / 1943 / 1745;
# the decoder 0 / 0 / 0). The small size keeps weight 1 and the heads on the posterior (above: with the heads on
# the prior it did not learn Cue).
# Keys: (size, "v3" for --preset v3, else "barlow" or "v2" by the world-model objective); size "preset" is the
# paper's.
SIZE_RATES = {("small", "v2"): dict(lr_model=1e-3, lr_actor=1e-3, lr_critic=3e-4, entropy=5e-2, slow_critic_every=20,
                                    gamma=0.95, heads_on_prior=True),
              ("small", "v3"): dict(lr_model=1e-3, lr_actor=1e-3, lr_critic=3e-4, entropy=1e-2),
              ("preset", "barlow"): dict(train_every=8, reward_scale=10.0, heads_on_prior=True)}
SIZE_RATES[("small", "barlow")] = dict(SIZE_RATES[("small", "v2")], heads_on_prior=False, train_every=2)


def apply_preset(args: Args) -> Args:
    """Fill every field left at None from the size, then the preset, then the protocol; explicit values are kept.
    --train-every and --train-ratio are two ways to set one thing: whichever is given (or the protocol's ratio)
    leaves the other unset."""
    choices = {"--preset": (PRESETS, args.preset), "--size": (SIZES, args.size), "--protocol": (PROTOCOLS, args.protocol)}
    for flag, (table, name) in choices.items():
        if name not in table:
            fail(flag, f"'{name}' is not a {flag[2:]}; choose one of {', '.join(table)}")
    objective = args.wm_objective or PRESETS[args.preset]["wm_objective"]
    family = "v3" if args.preset == "v3" else "barlow" if objective == "barlow" else "v2"
    rates = SIZE_RATES.get((args.size, family), {})
    protocol = PROTOCOLS[args.protocol] | (dict(sticky_actions=MINATAR_STICKY) if is_minatar(args.env) else {})
    fill = protocol | PRESETS[args.preset] | SIZES[args.size] | rates
    fill = {k: v for k, v in fill.items() if getattr(args, k) is None}
    if args.train_every is not None or args.train_ratio is not None or "train_ratio" in fill:
        fill.pop("train_every", None)
    if args.train_every is not None:
        fill.pop("train_ratio", None)
    return dataclasses.replace(args, **fill)


def known_fields(saved: dict) -> dict:
    """A checkpoint's saved args less the fields this version no longer has. Fields added since stay unset (they
    take their preset's value), but for two whose old value is not their preset's now: --decoder-norm (before it
    existed v3's decoder had the norm, which v3 has no longer by default) and --reward-scale (1 before it existed;
    the decoder-free preset's is 10 now)."""
    fields = {k: v for k, v in saved.items() if k in Args.__dataclass_fields__}
    if saved and "decoder_norm" not in saved:
        fields["decoder_norm"] = saved.get("preset") == "v3"
    if saved and "reward_scale" not in saved:
        fields["reward_scale"] = 1.0
    return fields


def cli_defaults(argv: list[str]) -> Args:
    """Defaults for tyro, resolved from the --env, --preset, --size and --protocol found in argv (a MinAtar --env has
    its own sticky actions), so that --help shows the real values; a --train-every or --train-ratio found there keeps
    the other one unset. With --resume the checkpoint's own args are the defaults: `--resume PATH` alone continues
    the run as it was."""
    chosen = {}
    for i, arg in enumerate(argv):
        for field, parse in [("env", str), ("preset", str), ("size", str), ("protocol", str), ("wm_objective", str),
                             ("train_every", int), ("train_ratio", float), ("resume", str)]:
            flag = "--" + field.replace("_", "-")
            value = arg.split("=", 1)[1] if arg.startswith(flag + "=") else None
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            try:
                if value is not None:
                    chosen[field] = parse(value)
            except ValueError:
                pass  # tyro reports a malformed value
    docs = help_from_docstrings()
    for field in dataclasses.fields(Args):
        field.metadata = {"help": docs[field.name]}
    saved = load_checkpoint(chosen["resume"], "--resume")["args"] if chosen.get("resume") else {}
    own = ["resume", "resume_without_replay", "eval_checkpoint", "eval_gif"]
    own += ["train_every", "train_ratio"] if {"train_every", "train_ratio"} & set(chosen) else []
    saved = {k: v for k, v in known_fields(saved).items() if k not in own}
    return apply_preset(Args(**{**saved, **chosen}))


def parse_args(argv: list[str]) -> Args:
    """The command line's Args: tyro with the defaults `cli_defaults` resolves from the same argv."""
    return tyro.cli(Args, args=argv, default=cli_defaults(argv))


def help_from_docstrings() -> dict[str, str]:
    """Each Args field's docstring as one paragraph. tyro 1.0 joins a docstring's lines before removing the class
    body's indentation, so --help broke sentences at every indented line break; field metadata "help" takes
    precedence over the docstring."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(Args)).body[0].body
    return {node.target.id: " ".join(doc.value.value.split()) for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}


def fail(flag: str, message: str):
    """Bad input: one line on stderr naming the flag, exit code 2."""
    print(f"error: {flag}: {message}", file=sys.stderr)
    raise SystemExit(2)


def validate(args: Args) -> Args:
    """Resolve the preset, size and protocol and reject bad input before anything is written."""
    if args.train_every is not None and args.train_ratio is not None:
        fail("--train-ratio", "give --train-every or --train-ratio, not both (they set the same thing)")
    args = apply_preset(args)
    if args.pomdp and not is_minatar(args.env):
        fail("--pomdp", f"only MinAtar games have motion channels to remove ('{args.env}' is not one)")
    positive = ["total_steps", "num_envs", "deter_size", "hidden_size", "stoch_size", "classes", "cnn_depth",
                "mlp_units", "mlp_layers", "batch_size", "seq_len", "horizon", "buffer_size", "slow_critic_every",
                "lr_model", "lr_actor", "lr_critic", "log_seconds", "max_episode_frames", "keep_checkpoints",
                "model_grad_clip", "model_eps", "grad_clip"]
    positive += ["train_every" if args.train_every is not None else "train_ratio"]
    for name in positive:
        if getattr(args, name) <= 0:
            fail("--" + name.replace("_", "-"), f"must be positive (got {getattr(args, name)})")
    for name in ["prefill", "eval_episodes", "eval_every", "bt_lambda", "bt_scale", "noop_max", "free_nats",
                 "entropy", "recency", "weight_decay", "kl_scale", "cont_scale", "reward_scale", "threads",
                 "repval_scale"]:
        if getattr(args, name) < 0:
            fail("--" + name.replace("_", "-"), f"must be >= 0 (got {getattr(args, name)})")
    for name in ["kl_balance", "sticky_actions", "gamma", "return_lambda", "unimix", "slow_critic_fraction"]:
        if not 0 <= getattr(args, name) <= 1:
            fail("--" + name.replace("_", "-"), f"must be in [0, 1] (got {getattr(args, name)})")
    for flag, value in [("--eval-gif", args.eval_gif), ("--eval-every", args.eval_every)]:
        if value and args.eval_episodes < 1:
            fail(flag, "needs --eval-episodes 1 or more (there would be no evaluation episode)")
    args = dataclasses.replace(args, env=resolve_env(args.env, announce=True)[2])
    if args.eval_checkpoint:  # evaluation only: the checkpoint brings its own sizes; no training flag applies
        if args.eval_episodes < 1:
            fail("--eval-episodes", "must be at least 1 with --eval-checkpoint")
        return args
    if args.checkpoint_every is not None and not args.save_model:
        fail("--checkpoint-every", "needs --save-model (without it only Ctrl-C and SIGTERM write a checkpoint)")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        fail("--checkpoint-every", f"must be >= 0 (got {args.checkpoint_every})")
    if args.resume_without_replay and not args.resume:
        fail("--resume-without-replay", "needs --resume")
    per_env = args.buffer_size // args.num_envs
    if args.seq_len > per_env:
        fail("--seq-len", f"{args.seq_len} is longer than the {per_env} steps each env's stream can hold "
                          f"(--buffer-size {args.buffer_size} / --num-envs {args.num_envs})")
    if args.batch_size * args.seq_len > args.buffer_size:
        fail("--batch-size", f"{args.batch_size} x --seq-len {args.seq_len} exceeds --buffer-size {args.buffer_size}")
    if args.prefill < args.seq_len * args.num_envs:
        fail("--prefill", f"must be at least --seq-len x --num-envs = {args.seq_len * args.num_envs} "
                          f"so that one full sequence exists when training starts (got {args.prefill})")
    if args.total_steps <= args.prefill:
        fail("--total-steps", f"must exceed --prefill {args.prefill} (got {args.total_steps})")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------
# MinAtar (Young and Tian 2019): 10x10 frames of binary channels, no frame skip, sticky actions 0.1 by default.
# --pomdp removes the channels that show motion (the issue's MDP/POMDP split).
MINATAR_MOTION = {"Breakout": ["trail"], "Asterix": ["trail"], "Seaquest": ["trail"],
                  "Freeway": ["speed1", "speed2", "speed3", "speed4", "speed5"],
                  "SpaceInvaders": ["alien_left", "alien_right"]}
MINATAR_STICKY = 0.1


def is_minatar(name: str) -> bool:
    return name.lower().startswith("minatar/")


def snake_case(name: str) -> str:
    """CamelCase -> snake_case, as ALE names its ROMs and MinAtar its game modules (SpaceInvaders -> space_invaders)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def minatar_channels(game: str) -> list[str]:
    """The game's channel names in MinAtar's order."""
    module = importlib.import_module("minatar.environments." + snake_case(game))
    channels = module.Env().channels
    return sorted(channels, key=channels.get)


class MinAtarFrames(gym.ObservationWrapper):
    """MinAtar's (10, 10, C) bool state -> (10, 10, C') uint8 in {0, 255}, only the `keep` channels."""

    def __init__(self, env: gym.Env, keep: list[int]):
        super().__init__(env)
        self.keep = keep
        self.observation_space = gym.spaces.Box(0, 255, (10, 10, len(keep)), np.uint8)

    def observation(self, obs):
        return obs[:, :, self.keep].astype(np.uint8) * 255


def resolve_env(name: str, announce: bool = False) -> tuple[str, str, str]:
    """Map --env to (kind, id, name): ("atari", ROM id, the name to use), ("minatar", its gymnasium id,
    `MinAtar/<Game>`) or ("gym", gymnasium id, name). gymnasium's
    own Atari ids (`BreakoutNoFrameskip-v4`, `Breakout-v4`, `ALE/Breakout-v5`) map onto the game under this
    script's protocol, with one line saying so when `announce`; an unknown name is a one-line error."""
    import ale_py

    if is_minatar(name):
        game = re.sub(r"-v\d+$", "", name.split("/", 1)[1])
        game = {g.lower(): g for g in MINATAR_MOTION}.get(game.lower().replace("_", ""))
        if game is None:
            fail("--env", f"unknown MinAtar game '{name}'; choose one of "
                          f"{', '.join('MinAtar/' + g for g in MINATAR_MOTION)}")
        try:
            from minatar.gym import register_envs
        except ImportError:
            fail("--env", f"{name} needs the minatar package: pip install minatar")
        if f"MinAtar/{game}-v1" not in gym.registry:
            register_envs()
        return "minatar", f"MinAtar/{game}-v1", f"MinAtar/{game}"
    if ":" in name:  # gymnasium's `module:EnvId`: importing the module registers the env
        module, env_id = name.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as e:
            fail("--env", f"cannot import '{module}' for '{name}' ({e})")
        if env_id not in gym.registry:
            fail("--env", f"importing '{module}' registered no '{env_id}'")
        return "gym", name, name

    roms = set(ale_py.roms.get_all_rom_ids())
    short = re.sub(r"^ALE/|(NoFrameskip|Deterministic)?-v\d+$", "", name)
    rom = short if short in roms else snake_case(short)
    if rom in roms:
        game = rom.title().replace("_", "") if short != name else name  # ms_pacman -> MsPacman
        if short != name and announce:
            print(f"--env {name}: gymnasium's Atari id brings its own frame skip and sticky actions; running {game} "
                  f"under this script's protocol instead (action repeat 4 with max-pooling, 64x64 gray, --sticky-"
                  f"actions, up to --noop-max no-ops)", flush=True)
        return "atari", rom, game
    if gym.registry.get(name) is not None:
        return "gym", name, name
    camel = [r.title().replace("_", "") for r in roms]
    close = difflib.get_close_matches(short, camel, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    fail("--env", f"unknown game '{name}'; {hint}choose one of the {len(roms)} Atari games in CamelCase "
                  f"(e.g. SpaceInvaders, Breakout, Pong), gymnasium's ids for them (BreakoutNoFrameskip-v4, "
                  f"ALE/Breakout-v5) or a registered gymnasium id")


def make_envs(args: Args, seed: int) -> tuple[gym.vector.VectorEnv, int]:
    """Vector env of uint8 image observations, 64x64 (MinAtar: 10x10 with one channel per object kind), with its
    frames per policy step.

    Atari follows DreamerV2 (Machado et al. 2018): action repeat 4 with a max over the last two frames, grayscale,
    up to 30 no-ops, sticky actions, no life-loss terminal, no FIRE on reset, raw rewards, a frame cap that
    truncates. ale-py's native AtariVectorEnv runs this faster than gymnasium's vector envs; every option that
    differs from its defaults is set here. All envs auto-reset on the step after an episode ends (NEXT_STEP).
    """
    kind, env_id, name = resolve_env(args.env)
    if kind == "atari":
        from ale_py.vector_env import AtariVectorEnv

        envs = AtariVectorEnv(
            env_id, args.num_envs, img_height=64, img_width=64, grayscale=True, stack_num=1, frameskip=4,
            maxpool=True, noop_max=args.noop_max, repeat_action_probability=args.sticky_actions,
            max_num_frames_per_episode=args.max_episode_frames, episodic_life=False, reward_clipping=False,
            use_fire_reset=False, full_action_space=False, autoreset_mode="NextStep")
        frames_per_step = 4
    elif kind == "minatar":  # a frame is a policy step; MinAtar's own episode ends, its minimal action set
        game = name[len("MinAtar/"):]
        keep = [i for i, c in enumerate(minatar_channels(game)) if not (args.pomdp and c in MINATAR_MOTION[game])]
        envs = gym.make_vec(env_id, num_envs=args.num_envs, vectorization_mode="sync",
                            wrappers=[lambda env: MinAtarFrames(env, keep)], sticky_action_prob=args.sticky_actions)
        frames_per_step = 1
    else:
        envs = gym.make_vec(env_id, num_envs=args.num_envs, vectorization_mode="sync")
        frames_per_step = 1
    shape = envs.single_observation_space.shape
    if kind != "minatar" and (not isinstance(envs.single_action_space, gym.spaces.Discrete)
                              or len(shape) not in (2, 3) or 64 not in shape):
        envs.close()
        fail("--env", f"'{args.env}' must have discrete actions and 64x64 image observations (got {shape})")
    envs.action_space.seed(seed)
    return envs, frames_per_step


def to_chw(obs: np.ndarray) -> np.ndarray:
    """(N, 64, 64), (N, 64, 64, C) or (N, C, 64, 64) uint8 observations -> (N, C, 64, 64)."""
    if obs.ndim == 3:
        return obs[:, None]
    return obs if obs.shape[1] <= 4 else obs.transpose(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Replay buffer with truncated-BPTT sampling
# ----------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Per-env ring buffers of uint8 frames, sampled as B rows that each stream through stored experience.

    Entry t of a stream holds obs_t, the action a_{t-1} that led to it, the reward r_t received on arrival,
    `terminated_t` (game over at obs_t) and `is_first_t` (obs_t starts an episode). In "tbptt" mode consecutive
    `sample()` calls continue each row where its previous chunk ended, so the trainer can carry the row's state;
    a row whose next chunk is not stored yet, or was evicted, restarts at a fresh position with is_first set on
    its first step (zero state). In "uniform" mode every row restarts on every call (DreamerV2's sampling).
    """

    def __init__(self, num_envs, capacity, obs_shape, batch_size, seq_len, mode="tbptt", recency=0.0, seed=0):
        self.capacity = capacity // num_envs  # per env stream
        self.num_envs, self.batch_size, self.seq_len = num_envs, batch_size, seq_len
        self.mode, self.recency = mode, recency
        self.rng = np.random.default_rng(seed)
        self.obs = np.zeros((num_envs, self.capacity, *obs_shape), np.uint8)
        self.action = np.zeros((num_envs, self.capacity), np.int64)
        self.reward = np.zeros((num_envs, self.capacity), np.float32)
        self.terminated = np.zeros((num_envs, self.capacity), bool)
        self.is_first = np.zeros((num_envs, self.capacity), bool)
        self.steps = 0  # entries written to each stream (all streams advance together)
        self.row_env = np.zeros(batch_size, np.int64)
        self.row_pos = np.full(batch_size, -1, np.int64)  # absolute index of each row's next chunk; -1: restart

    @property
    def stored(self) -> int:
        """Entries each env's stream holds now."""
        return min(self.steps, self.capacity)

    @property
    def layout(self) -> list[int]:
        """What a saved replay must match to be restored into this buffer: envs, capacity per env, batch, seq,
        frame shape."""
        return [self.num_envs, self.capacity, self.batch_size, self.seq_len, *self.obs.shape[2:]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.obs, self.action, self.reward, self.terminated, self.is_first))

    def add(self, obs, action, reward, terminated, is_first):
        """Append one entry to every env's stream (arrays of shape (num_envs, ...))."""
        slot = self.steps % self.capacity
        self.obs[:, slot], self.action[:, slot], self.reward[:, slot] = obs, action, reward
        self.terminated[:, slot], self.is_first[:, slot] = terminated, is_first
        self.steps += 1

    def _restart(self, row):
        """A fresh start for one row: uniform over stored windows, or skewed to new data by --recency."""
        oldest, newest = max(0, self.steps - self.capacity), self.steps - self.seq_len
        age = self.rng.random() ** (1.0 / (1.0 + self.recency))  # density (1 + r) x^r on [0, 1]
        self.row_env[row] = self.rng.integers(self.num_envs)
        self.row_pos[row] = oldest + min(int(age * (newest - oldest + 1)), newest - oldest)

    def sample(self) -> dict[str, np.ndarray]:
        """One (B, T) chunk per row: obs (B, T, C, H, W) uint8, action, reward, terminated, is_first."""
        assert self.steps >= self.seq_len, "sample() needs one full sequence in the buffer"
        restarted = np.zeros(self.batch_size, bool)
        for row in range(self.batch_size):
            pos = self.row_pos[row]
            evicted, unwritten = pos < self.steps - self.capacity, pos + self.seq_len > self.steps
            if self.mode == "uniform" or pos < 0 or evicted or unwritten:
                self._restart(row)
                restarted[row] = True
        idx = (self.row_pos[:, None] + np.arange(self.seq_len)) % self.capacity
        env = self.row_env[:, None]
        batch = dict(obs=self.obs[env, idx], action=self.action[env, idx], reward=self.reward[env, idx],
                     terminated=self.terminated[env, idx], is_first=self.is_first[env, idx])
        batch["is_first"][restarted, 0] = True
        self.row_pos += self.seq_len
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
def block(norm: bool, size: int, channels: bool = False) -> list[nn.Module]:
    """What follows each hidden layer: ELU (DreamerV2), or LayerNorm then SiLU (DreamerV3, Sec. 'Architecture'),
    the norm over the channels of each pixel in conv stacks. The ELU runs in place (every layer before it is a
    linear map or conv, whose backward does not read its output), so its backward reads the result instead of
    recomputing exp."""
    return [ChannelNorm(size) if channels else nn.LayerNorm(size), nn.SiLU()] if norm else [nn.ELU(inplace=True)]


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an (N, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def mlp(inp: int, out: int, units: int, layers: int, norm: bool = False, zero_out: bool = False) -> nn.Sequential:
    """`layers` hidden layers of `units`, each followed by `block`, then a linear output (DreamerV2's heads);
    zero_out starts the output layer at zero (DreamerV3's reward and critic: they predict 0 before training)."""
    mods, size = [], inp
    for _ in range(layers):
        mods += [nn.Linear(size, units), *block(norm, units)]
        size = units
    out = nn.Linear(size, out)
    if zero_out:
        nn.init.zeros_(out.weight), nn.init.zeros_(out.bias)
    return nn.Sequential(*mods, out)


class ConvEncoder(nn.Module):
    """4 convs, kernel 4, stride 2, depth d-2d-4d-8d, each followed by `block`: 64x64 -> 8d x 2 x 2 embedding
    (DreamerV2's geometry, also under v3; DreamerV3 pads to stop at 4 x 4)."""

    def __init__(self, channels: int, depth: int, norm: bool = False):
        super().__init__()
        mods, size = [], channels
        for i in range(4):
            mods += [nn.Conv2d(size, depth * 2**i, 4, 2), *block(norm, depth * 2**i, channels=True)]
            size = depth * 2**i
        self.net = nn.Sequential(*mods, nn.Flatten())
        self.last = max(i for i, m in enumerate(self.net) if isinstance(m, nn.Conv2d))
        self.out_dim = depth * 8 * 2 * 2

    def forward(self, obs):
        """Two convs run in a cheaper form with the same weights and result (checked in tests/test_math.py).
        The first (kernel 4, stride 2) runs as space-to-depth, then a 2x2 conv over 4x the channels; on the CPU, at
        the Catch test's sizes, its backward pass took 3-4 ms instead of oneDNN's 37-41 ms on one input channel.
        The last (6x6 -> 2x2) runs as `patch_conv`. Activations are channels-last, oneDNN's own layout; in NCHW each
        backward pass copied them into it."""
        first = self.net[0]
        out, inp = first.weight.shape[:2]  # kernel index 2a + p: a moves on the 2x coarser grid, p is the phase
        weight = first.weight.unflatten(2, (2, 2)).unflatten(4, (2, 2)).permute(0, 1, 3, 5, 2, 4)
        obs = F.pixel_unshuffle(obs, 2).contiguous(memory_format=torch.channels_last)  # oneDNN's layout: no copies
        x = self.net[1:self.last](F.conv2d(obs, weight.reshape(out, 4 * inp, 2, 2), first.bias))
        return self.net[self.last + 1:](patch_conv(x, self.net[self.last]))


def patch_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """An unpadded conv as one matmul over the input's patches (im2col): each output pixel's k x k x C patch is a
    row, gathered from channels-last memory with the channels innermost. Where the output is a few pixels, oneDNN's
    conv is slow on the CPU: the v2 encoder's last conv (192 -> 384 channels, 6x6 -> 2x2, 800 frames) took 0.50-0.55
    s forward and backward, this 0.21 s (one thread; also faster at the small and tiny sizes)."""
    k, s, n, c, size = conv.kernel_size[0], conv.stride[0], *x.shape[:2], x.shape[-1]
    o = (size - k) // s + 1
    x = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): free when x is channels-last
    sn, sh, sw, sc = x.stride()
    patches = x.as_strided((n, o, o, k, k, c), (sn, s * sh, s * sw, sh, sw, sc)).reshape(n * o * o, k * k * c)
    y = F.linear(patches, conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), conv.bias)
    return y.view(n, o, o, -1).permute(0, 3, 1, 2)  # (N, C_out, o, o), channels-last memory


class ConvDecoder(nn.Module):
    """Mirror of the encoder: linear to 32d x 1 x 1, transposed convs with kernels 5, 5, 6, 6 (each but the last
    followed by `block`) -> 64x64 mean image."""

    def __init__(self, feat_dim: int, channels: int, depth: int, norm: bool = False):
        super().__init__()
        self.linear = nn.Linear(feat_dim, 32 * depth)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, 5, 2), *block(norm, 4 * depth, channels=True),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, 2), *block(norm, 2 * depth, channels=True),
            nn.ConvTranspose2d(2 * depth, depth, 6, 2), *block(norm, depth, channels=True),
            nn.ConvTranspose2d(depth, channels, 6, 2))

    def forward(self, feat):
        """Two layers run in a cheaper form with the same weights and result (checked in tests/test_math.py). The
        first transposed conv sees a 1x1 input, so it is a matmul. The last (kernel 6, stride 2) is sub-pixel: each
        of the 4 output phases is a 3x3 conv with every other tap of the flipped kernel, then pixel_shuffle
        interleaves them; oneDNN ran it 2-3x slower on the CPU as a transposed conv with 1-3 output channels."""
        first, last = self.net[0], self.net[-1]
        k = first.kernel_size[0]
        x = self.linear(feat) @ first.weight.flatten(1) + first.bias.repeat_interleave(k * k)
        x = self.net[1:-1](x.unflatten(-1, (first.out_channels, k, k)).contiguous(memory_format=torch.channels_last))
        # kernel index 2m + p: m taps the input at i - m, p is the output phase
        inp, out, taps = *last.weight.shape[:2], last.kernel_size[0] // 2
        weight = last.weight.unflatten(2, (taps, 2)).unflatten(4, (taps, 2)).flip(2, 4).permute(1, 3, 5, 0, 2, 4)
        x = F.conv2d(x, weight.reshape(4 * out, inp, taps, taps), last.bias.repeat_interleave(4), padding=taps - 1)
        return F.pixel_shuffle(x, 2)


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One class index per row of `probs` (..., K) by inverting its CDF with one uniform draw per row: the index is
    how many cumulative probabilities lie at or below u. The same distribution as torch.multinomial, which draws
    K exponentials per row; at v2 sizes, imagination's 25,600 latent rows per step took 5 ms instead of 44 ms."""
    probs = probs.detach()
    u = torch.rand(probs.shape[:-1] + (1,), device=probs.device, dtype=probs.dtype) * probs.sum(-1, keepdim=True)
    return (probs.cumsum(-1) <= u).sum(-1).clamp(max=probs.shape[-1] - 1)


def mix_uniform(probs: torch.Tensor, share: float) -> torch.Tensor:
    """(1 - share) * probs + share / K (DreamerV3 Sec. 'World model learning', unimix): no class is ever
    impossible, so KL terms and log-probabilities stay bounded. share = 0 returns probs unchanged."""
    return (1 - share) * probs + share / probs.shape[-1] if share else probs


class LayerNormGRUCell(nn.Module):
    """GRU cell with LayerNorm on the gates and update bias -1, as in DreamerV2's RSSM (and DreamerV3's code)."""

    def __init__(self, inp: int, size: int):
        super().__init__()
        self.linear = nn.Linear(inp + size, 3 * size, bias=False)
        self.norm = nn.LayerNorm(3 * size)

    def forward(self, x, h):
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset, update = torch.sigmoid(reset), torch.sigmoid(update - 1)
        return update * torch.tanh(reset * cand) + (1 - update) * h


# ----------------------------------------------------------------------------------------------------------------
# World model
# ----------------------------------------------------------------------------------------------------------------
class RSSM(nn.Module):
    """Recurrent state-space model (DreamerV2 Eq. 1): h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), prior p(z_t | h_t),
    posterior q(z_t | h_t, x_t). Distributions are passed around as their raw network outputs ("stats")."""

    def __init__(self, action_dim, embed_dim, deter, hidden, stoch, classes, discrete, norm=False, unimix=0.0):
        super().__init__()
        self.discrete, self.stoch, self.classes, self.deter, self.unimix = discrete, stoch, classes, deter, unimix
        self.stoch_dim = stoch * classes if discrete else stoch
        stats_dim = stoch * classes if discrete else 2 * stoch
        self.img_in = nn.Sequential(nn.Linear(self.stoch_dim + action_dim, hidden), *block(norm, hidden))
        self.gru = LayerNormGRUCell(hidden, deter)
        self.prior_net = nn.Sequential(nn.Linear(deter, hidden), *block(norm, hidden), nn.Linear(hidden, stats_dim))
        self.post_net = nn.Sequential(nn.Linear(deter + embed_dim, hidden), *block(norm, hidden),
                                      nn.Linear(hidden, stats_dim))

    @property
    def feat_dim(self) -> int:
        return self.stoch_dim + self.deter

    @staticmethod
    def feat(h, z):
        """The latent feature [z, h] every head reads (DreamerV2's `get_feat`)."""
        return torch.cat([z, h], -1)

    def initial(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(batch, self.deter, device=device), torch.zeros(batch, self.stoch_dim, device=device)

    def sample(self, stats):
        """Reparameterized sample: straight-through one-hots `sample + probs - sg(probs)` (DreamerV2 Alg. 1) or
        a Gaussian with std = softplus(x) + 0.1 (DreamerV1)."""
        stats = stats.float()
        if self.discrete:
            probs = mix_uniform(stats.unflatten(-1, (self.stoch, self.classes)).softmax(-1), self.unimix)
            onehot = F.one_hot(sample_categorical(probs), self.classes).to(probs.dtype)
            return (onehot + probs - probs.detach()).flatten(-2)
        mean, std = stats.chunk(2, -1)
        return mean + (F.softplus(std) + 0.1) * torch.randn_like(mean)

    def log_probs(self, stats):
        """Log-probabilities (..., stoch, classes) of the categorical latents, with the uniform mix."""
        logp = stats.unflatten(-1, (self.stoch, self.classes)).log_softmax(-1)
        return mix_uniform(logp.exp(), self.unimix).log() if self.unimix else logp

    def kl(self, q, p):
        """KL[q || p] summed over the latent variables, one value per batch element."""
        q, p = q.float(), p.float()
        if self.discrete:
            lq = self.log_probs(q)
            lp = self.log_probs(p)
            return (lq.exp() * (lq - lp)).sum((-2, -1))
        (mq, sq), (mp, sp) = q.chunk(2, -1), p.chunk(2, -1)
        sq, sp = F.softplus(sq) + 0.1, F.softplus(sp) + 0.1
        return (torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5).sum(-1)

    def entropy(self, stats):
        stats = stats.float()
        if self.discrete:
            logp = self.log_probs(stats)
            return -(logp.exp() * logp).sum((-2, -1))
        std = F.softplus(stats.chunk(2, -1)[1]) + 0.1
        return (0.5 * np.log(2 * np.pi * np.e) + torch.log(std)).sum(-1)

    def advance(self, h, z, action):
        """Deterministic step h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])."""
        return self.gru(self.img_in(torch.cat([z, action], -1)), h)

    def img_step(self, h, z, action):
        """Prior step: advance h, then z_t ~ p(z_t | h_t)."""
        h = self.advance(h, z, action)
        prior = self.prior_net(h)
        return h, self.sample(prior), prior

    def obs_step(self, h, z, action, embed, is_first):
        """Posterior step; state and previous action are zeroed where an episode starts."""
        keep = (~is_first).to(h.dtype)[:, None]
        h = self.advance(h * keep, z * keep, action * keep)
        prior = self.prior_net(h)
        post = self.post_net(torch.cat([h, embed], -1))
        return h, self.sample(post), prior, post

    def observe(self, embed, action, is_first, state):
        """Filter a (B, T) sequence from `state`; returns stacked h, z, prior, post (B, T, ...) and the last state.
        The same math as T calls of `obs_step`, but what does not feed the recurrence runs once over all B*T rows:
        the posterior's first layer on the embedding (its weight split into h and embedding columns) and the prior.
        At v2 sizes the loop's matmuls have only B = 16 rows; the filter's forward and backward took 2.0 s instead of
        2.3 s (one thread, the other core busy)."""
        first = self.post_net[0]
        w_h, w_e = first.weight.split([self.deter, embed.shape[-1]], 1)
        embed_in = F.linear(embed, w_e, first.bias)  # (B, T, hidden)
        h, z = state
        hs, zs, posts = [], [], []
        for t in range(embed.shape[1]):
            keep = (~is_first[:, t]).to(h.dtype)[:, None]
            h = self.advance(h * keep, z * keep, action[:, t] * keep)
            post = self.post_net[1:](embed_in[:, t] + F.linear(h, w_h))
            z = self.sample(post)
            hs.append(h), zs.append(z), posts.append(post)
        hs = torch.stack(hs, 1)
        return hs, torch.stack(zs, 1), self.prior_net(hs), torch.stack(posts, 1), (h, z)


def kl_loss(rssm: RSSM, post, prior, alpha: float, free_nats: float, per_step: bool = False):
    """KL balancing (DreamerV2 Eq. 2 / Alg. 2): alpha * KL[sg(q) || p] + (1 - alpha) * KL[q || sg(p)], free nats on
    each term after averaging; alpha = 0 gives plain KL[q || p]. per_step clips each step's KL before averaging
    (DreamerV3's free bits: max(1, KL) on its dynamics and representation losses). Returns (loss, mean KL value)."""
    def free(kl):
        return kl.clamp(min=free_nats).mean() if per_step else kl.mean().clamp(min=free_nats)

    value = rssm.kl(post, prior)
    if alpha == 0:
        return free(value), value.mean()
    prior_term = free(rssm.kl(post.detach(), prior))  # trains the prior (V3: dynamics loss)
    post_term = free(rssm.kl(post, prior.detach()))  # regularizes the posterior (V3: representation loss)
    return alpha * prior_term + (1 - alpha) * post_term, value.mean()


def barlow_twins(a: torch.Tensor, b: torch.Tensor, lam: float, eps: float = 1e-5):
    """Barlow Twins (Zbontar et al. 2021, Eq. 1) on (N, D) rows: standardize each dimension over the N rows (biased
    variance, eps inside the sqrt), C = a^T b / N, L = sum_i (1 - C_ii)^2 + lam * sum_{i != j} C_ij^2. Always in
    float32, also under autocast; a dimension with zero variance standardizes to 0 instead of dividing by zero.
    Returns (loss, invariance term, redundancy term)."""
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + eps)
        b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + eps)
        c = a.T @ b / a.shape[0]
        diagonal = torch.diagonal(c)
        invariance = (1 - diagonal).pow(2).sum()
        redundancy = c.pow(2).sum() - diagonal.pow(2).sum()
        return invariance + lam * redundancy, invariance, redundancy


def image_nll(recon: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """Unit-variance Gaussian negative log-likelihood of the frames, summed over pixels (constant dropped)."""
    return 0.5 * (recon.float() - obs).pow(2).sum((-3, -2, -1)).mean()


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|) (DreamerV3 Sec. 'Robust predictions'): compresses large values, keeps small ones."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """sign(x) (exp(|x|) - 1), the inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


TWOHOT_BINS = 255  # DreamerV3: 255 bins, equally spaced in symlog space over [-20, 20]


def twohot_bins(device) -> torch.Tensor:
    """The bins, mirrored around an exact 0 (a plain linspace puts its middle bin at 7e-8 in float32)."""
    half = torch.linspace(0.0, 20.0, TWOHOT_BINS // 2 + 1, device=device)
    return torch.cat([-half.flip(0)[:-1], half])


def twohot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Two-hot encoding (DreamerV3 Sec. 'Robust predictions'): the weight of x (...,) goes to its two neighbouring
    bins in proportion to closeness, so the encoding's mean is x; values beyond the ends go to the end bin."""
    below = (torch.bucketize(x, bins, right=True) - 1).clamp(0, len(bins) - 1)
    above = (below + 1).clamp(max=len(bins) - 1)
    span = bins[above] - bins[below]
    w_above = torch.where(span > 0, (x - bins[below]) / span.clamp(min=1e-8), 0.0).clamp(0, 1)
    target = torch.zeros(*x.shape, len(bins), device=x.device, dtype=x.dtype)
    target.scatter_(-1, below[..., None], (1 - w_above)[..., None])
    return target.scatter_add_(-1, above[..., None], w_above[..., None])


def twohot_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) of a two-hot head: cross-entropy between its softmax and twohot(symlog(x)), per element."""
    bins = twohot_bins(logits.device)
    return -(twohot(symlog(x.float()), bins) * logits.float().log_softmax(-1)).sum(-1)


def twohot_mean(logits: torch.Tensor) -> torch.Tensor:
    """A two-hot head's prediction: symexp of the expected bin (DreamerV3 code of 2023)."""
    return symexp((logits.float().softmax(-1) * twohot_bins(logits.device)).sum(-1))


def make_optimizer(params, lr: float, weight_decay: float, eps: float = 1e-5) -> torch.optim.Optimizer:
    """Adam with DreamerV2's decoupled decay `w <- (1 - wd) w` on weight matrices only. Fused: one kernel per
    tensor instead of about ten ops, the same update to float round-off; a --size tiny update 1.07x-1.16x as fast on
    one CPU thread (`tests/bench_commits.py`, README "Hardware and measured speed")."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay), dict(params=rest)], fused=True)
    set_optimizer_values(opt, lr, weight_decay, eps)
    return opt


def set_optimizer_values(opt: torch.optim.Optimizer, lr: float, weight_decay: float, eps: float = 1e-5):
    """Learning rate, decay and Adam epsilon of an optimizer from `make_optimizer` (also after its state was
    restored). AdamW multiplies its decay by the learning rate, so the decay group gets wd / lr: `w <- (1 - wd) w`
    per step."""
    decay, rest = opt.param_groups
    decay.update(lr=lr, weight_decay=weight_decay / lr, eps=eps)  # wd 0 (v3): plain Adam
    rest.update(lr=lr, weight_decay=0.0, eps=eps)


def optimize(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> float:
    """One optimizer step with global gradient-norm clipping; returns the norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return norm.item()


def check_finite(name: str, loss: torch.Tensor):
    """Stop before an optimizer step would write NaN or inf into the weights."""
    if not torch.isfinite(loss).item():
        raise FloatingPointError(f"non-finite {name} loss ({loss.item()})")


def preprocess(obs: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-0.5, 0.5] (DreamerV2). Smaller frames (MinAtar's 10x10) are enlarged to FRAME x
    FRAME for the encoder: each cell becomes a block of FRAME // size pixels, centred by a border of 0 (-0.5)."""
    x = obs.float() / 255.0 - 0.5
    size = x.shape[-1]
    if size != FRAME:
        scale, border = FRAME // size, FRAME % size // 2
        x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        x = F.pad(x, (border, FRAME - size * scale - border) * 2, value=-0.5)
    return x


FRAME = 64  # the encoder's input size and the decoder's output size
PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]]) / 255.0


def to_rgb(frames: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) frames in [0, 1] -> something a person can read: 1 or 3 channels stay; other C (MinAtar's
    binary channels) become RGB, channel i in colour i of PALETTE, overlapping channels averaged."""
    channels = frames.shape[-3]
    if channels in (1, 3):
        return frames
    weight = frames.clamp(0, 1)
    rgb = torch.einsum("...chw,cd->...dhw", weight, PALETTE[:channels].to(frames.device))
    return rgb / weight.sum(-3, keepdim=True).clamp(min=1)


CELL = 8  # the Barlow Twins target: the frame's mean over CELL x CELL pixel cells


class WorldModel(nn.Module):
    """Encoder, RSSM, image decoder (or a Barlow Twins projection), reward and continue heads; owns its loss
    (DreamerV2 Eq. 2) and optimizer."""

    def __init__(self, args: Args, obs_shape, action_dim: int):
        super().__init__()
        self.args, self.action_dim, self.v3 = args, action_dim, args.preset == "v3"
        self.encoder = ConvEncoder(obs_shape[0], args.cnn_depth, norm=self.v3)
        self.rssm = RSSM(action_dim, self.encoder.out_dim, args.deter_size, args.hidden_size, args.stoch_size,
                         args.classes, args.discrete_latents, norm=self.v3, unimix=args.unimix)
        feat = self.rssm.feat_dim
        if args.wm_objective == "decoder":
            self.decoder, self.bt_proj = ConvDecoder(feat, obs_shape[0], args.cnn_depth, norm=args.decoder_norm), None
        else:  # no decoder parameters, no decoder compute: a linear projection of latent features instead
            cells = obs_shape[0] * (FRAME // CELL) ** 2
            self.decoder, self.bt_proj = None, nn.Linear(feat, cells)
        self.reward_head = mlp(feat, TWOHOT_BINS if self.v3 else 1, args.mlp_units, args.mlp_layers, self.v3, self.v3)
        self.cont_head = mlp(feat, 1, args.mlp_units, args.mlp_layers, self.v3)
        self.opt = make_optimizer(self.parameters(), args.lr_model, args.weight_decay, args.model_eps)

    def predict_reward(self, feat):
        """The reward head's prediction: v2 regresses tanh(reward), v3 decodes its two-hot over symlog bins."""
        return twohot_mean(self.reward_head(feat)) if self.v3 else self.reward_head(feat).squeeze(-1).float()

    def head_losses(self, feat, batch: dict[str, torch.Tensor]):
        """Reward negative log-likelihood and continue Bernoulli loss of features (B, T, F).
        v1/v2: unit-Gaussian reward on tanh(reward), continue target gamma * (1 - terminated).
        v3 (DreamerV3 Sec. 'World model learning'): two-hot reward on the raw reward, continue target 1 - terminated
        (the discount is applied in imagination)."""
        if self.v3:
            reward = twohot_nll(self.reward_head(feat), batch["reward"]).mean()
            cont_target = 1.0 - batch["terminated"].float()
        else:
            reward = 0.5 * (self.predict_reward(feat) - torch.tanh(batch["reward"])).pow(2).mean()
            cont_target = self.args.gamma * (1.0 - batch["terminated"].float())
        return reward, F.binary_cross_entropy_with_logits(self.cont_head(feat).squeeze(-1).float(), cont_target)

    def constant_reward_loss(self, reward: torch.Tensor) -> torch.Tensor:
        """The reward loss of the best constant prediction for this batch (v1/v2: half the variance of tanh(reward);
        v3: the entropy of the batch's mean two-hot target). A reward loss at this level means the head has learned
        how often rewards come, nothing about when: imagination then carries no reward for the actor to follow."""
        if self.v3:
            mean = twohot(symlog(reward.float()), twohot_bins(reward.device)).flatten(0, -2).mean(0)
            return -torch.special.xlogy(mean, mean).sum()
        return 0.5 * torch.tanh(reward.float()).var(unbiased=False)

    def loss(self, batch: dict[str, torch.Tensor], state):
        """Image log-likelihood (or the scaled Barlow Twins loss), reward and continue losses (`head_losses`; with
        --heads-on-prior once more on the prior's features) scaled by --reward-scale and --cont-scale, and the
        balanced KL (DreamerV2 Eq. 2). Returns (loss, h, z, last, metrics)."""
        args = self.args
        obs = preprocess(batch["obs"])
        embed = self.encoder(obs.flatten(0, 1)).unflatten(0, obs.shape[:2])
        action = F.one_hot(batch["action"], self.action_dim).float()
        h, z, prior, post, last = self.rssm.observe(embed, action, batch["is_first"], state)
        feat = self.rssm.feat(h, z)
        representation, metrics = self.representation_loss(obs, feat)
        reward, cont = self.head_losses(feat, batch)
        if args.heads_on_prior:
            reward_prior, cont_prior = self.head_losses(self.rssm.feat(h, self.rssm.sample(prior)), batch)
            reward, cont = reward + reward_prior, cont + cont_prior
            metrics.update({"losses/reward_prior": reward_prior, "losses/continue_prior": cont_prior})
        kl, kl_value = kl_loss(self.rssm, post, prior, args.kl_balance, args.free_nats, args.free_nats_per_step)
        loss = representation + args.reward_scale * reward + args.cont_scale * cont + args.kl_scale * kl
        constant = self.constant_reward_loss(batch["reward"]) * (2 if args.heads_on_prior else 1)  # as `reward`
        metrics.update({"losses/world_model": loss, "losses/reward": reward, "losses/reward_constant": constant,
                        "losses/continue": cont, "losses/kl": kl, "world/kl": kl_value,
                        "world/prior_entropy": self.rssm.entropy(prior).mean(),
                        "world/post_entropy": self.rssm.entropy(post).mean()})
        return loss, h, z, last, metrics

    def train_step(self, batch: dict[str, torch.Tensor], state, amp: bool, replay_value=None):
        """One world-model update on a (B, T) chunk from each row's carried state, plus --repval-scale times
        `replay_value(features, batch)` if given. Returns the posterior states h, z (B, T, ...) for the actor-critic,
        each row's last state (detached, to carry on) and the metrics."""
        with torch.autocast(batch["obs"].device.type, torch.bfloat16, enabled=amp):
            loss, h, z, last, metrics = self.loss(batch, state)
            if replay_value is not None:
                metrics["losses/replay_value"] = repval = replay_value(self.rssm.feat(h, z), batch)
                loss = loss + self.args.repval_scale * repval
        check_finite("world-model", loss)
        metrics["world/grad_norm"] = optimize(self.opt, loss, self.args.model_grad_clip)
        return h, z, (last[0].detach().float(), last[1].detach().float()), metrics

    @torch.no_grad()
    def dream(self, batch: dict[str, torch.Tensor], context: int = 5):
        """Open-loop prediction of the batch's first sequence: filter `context` real frames, then roll the prior with
        the real actions and decode (the picture of DreamerV2 Fig. 5). Returns (real, predicted) frames in [0, 1]."""
        obs = preprocess(batch["obs"][:1])
        action = F.one_hot(batch["action"][:1], self.action_dim).float()
        with torch.random.fork_rng(devices=[obs.device] if obs.device.type == "cuda" else []):  # logging draws no
            embed = self.encoder(obs[:, :context].flatten(0, 1)).unflatten(0, (1, context))  # training randomness
            h, z, _, _, (h_t, z_t) = self.rssm.observe(embed, action[:, :context], batch["is_first"][:1, :context],
                                                       self.rssm.initial(1, obs.device))
            feats = [self.rssm.feat(h, z)[0]]
            for t in range(context, obs.shape[1]):
                h_t, z_t, _ = self.rssm.img_step(h_t, z_t, action[:, t])
                feats.append(self.rssm.feat(h_t, z_t))
        predicted = self.decoder(torch.cat(feats)).float()
        return (obs[0] + 0.5).clamp(0, 1), (predicted + 0.5).clamp(0, 1)

    def representation_loss(self, obs, feat):
        """What ties the latents to the frames: pixel reconstruction (DreamerV2 Eq. 2), or Barlow Twins between the
        projected posterior feature [z, h] and the same frame averaged over 8x8-pixel cells. The target is ours:
        every region of the frame gets its own standardized dimension, so a small object such as Catch's paddle
        weighs as much as a large one. R2-Dreamer's target, the detached encoder embedding, let Catch's paddle
        carry under 5% of the target's variance, and it did not learn (README)."""
        if self.decoder is not None:
            recon = self.decoder(feat.flatten(0, 1)).unflatten(0, obs.shape[:2])
            image = image_nll(recon, obs) * (2.0 if self.v3 else 1.0)  # V3's code: squared error, no 1/2
            return image, {"losses/image": image, "images/reconstruction": (obs[0], recon[0].detach().float())}
        a, b = self.bt_proj(feat.flatten(0, 1)), F.avg_pool2d(obs.flatten(0, 1), CELL).flatten(1)
        barlow, invariance, redundancy = barlow_twins(a, b, self.args.bt_lambda)
        return self.args.bt_scale * barlow, {
            "losses/barlow": barlow, "losses/barlow_invariance": invariance, "losses/barlow_redundancy": redundancy,
            "world/proj_std": a.float().std(0).mean()}  # falls towards 0 if the projected features collapse


# ----------------------------------------------------------------------------------------------------------------
# Actor-critic in imagination
# ----------------------------------------------------------------------------------------------------------------
def lambda_return(reward, cont, value, lam: float):
    """TD(lambda) targets over a (H, ...) imagined trajectory (DreamerV1 Eq. 6):
    R_H = v(z_H), R_t = r_t + c_t * ((1 - lambda) * v(z_{t+1}) + lambda * R_{t+1}); `value` has H + 1 entries."""
    returns, last = [], value[-1]
    for t in reversed(range(reward.shape[0])):
        last = reward[t] + cont[t] * ((1 - lam) * value[t + 1] + lam * last)
        returns.append(last)
    return torch.stack(returns[::-1])


class ActorCritic(nn.Module):
    """Categorical actor and critic trained on imagined rollouts of the world model (DreamerV2 Eq. 5-8; v3:
    DreamerV3 Sec. 'Actor critic learning', a two-hot critic and percentile return normalization)."""

    def __init__(self, args: Args, feat_dim: int, action_dim: int):
        super().__init__()
        self.args, self.v3 = args, args.preset == "v3"
        self.actor_in = feat_dim - args.deter_size if args.actor_input == "stoch" else feat_dim  # z leads [z, h]
        self.actor = mlp(self.actor_in, action_dim, args.mlp_units, args.mlp_layers, self.v3)
        self.critic = mlp(feat_dim, TWOHOT_BINS if self.v3 else 1, args.mlp_units, args.mlp_layers, self.v3, self.v3)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        if self.v3:  # the EMAs of the returns' 5th and 95th percentiles, saved with the weights
            self.register_buffer("return_range", torch.zeros(2))
        self.actor_opt = make_optimizer(self.actor.parameters(), args.lr_actor, args.weight_decay)
        self.critic_opt = make_optimizer(self.critic.parameters(), args.lr_critic, args.weight_decay)
        self.updates = 0

    def policy(self, logits):
        """Action probabilities from the actor's logits, with the uniform mix (v3: 1%)."""
        return mix_uniform(logits.float().softmax(-1), self.args.unimix)

    def act(self, feats):
        """The actor's logits on the features it reads (--actor-input)."""
        return self.actor(feats[..., :self.actor_in]).float()

    def value(self, critic: nn.Module, feats):
        """A critic's value of the features (v3 decodes its two-hot)."""
        return twohot_mean(critic(feats)) if self.v3 else critic(feats).squeeze(-1).float()

    def imagine(self, wm: WorldModel, h, z):
        """Roll the prior H steps from each start with actions from the actor on sg(features). Returns features
        (H + 1, N, F), one-hot actions (H, N, A) and the actor's logits (H, N, A); actions[t] is taken at z_t. The
        logits keep their graph to the actor (also where the rollout itself has none), so its loss needs no second
        forward pass."""
        feats, actions, logits = [wm.rssm.feat(h, z)], [], []
        for _ in range(self.args.horizon):
            with torch.enable_grad():
                logits.append(self.act(feats[-1].detach()))
            probs = self.policy(logits[-1].detach())
            action = F.one_hot(sample_categorical(probs), probs.shape[-1]).to(probs.dtype)
            if self.args.actor_grad == "dynamics":
                action = action + probs - probs.detach()
            h, z, _ = wm.rssm.img_step(h, z, action)
            feats.append(wm.rssm.feat(h, z))
            actions.append(action)
        with torch.enable_grad():
            logits = torch.stack(logits)
        return torch.stack(feats), torch.stack(actions), logits

    def imagined_returns(self, wm: WorldModel, h, z, terminated) -> dict[str, torch.Tensor]:
        """Imagine from the states (h, z), predict rewards and continues, and form the lambda-returns. Returns feats
        (H + 1, N, F), actions and logits (H, N, A), reward, cont, value (the critic that bootstraps) and weight
        (H + 1, N), and returns R_0 .. R_{H-1} (H, N). The first continue is the true one from replay.
        v1/v2 (DreamerV2 Eq. 4-5): r_t = r(z_t), c_t = gamma * P(continue | z_t), the slow critic bootstraps,
        w_t = prod_{k<t} c_k.
        v3 (DreamerV3's code): the step from z_t earns r(z_{t+1}) and is discounted by gamma times the continue
        head's mode at z_{t+1}; the critic itself bootstraps (its slow copy only regularizes it);
        w_t = prod_{k<=t} gamma c_k / gamma."""
        feats, actions, logits = self.imagine(wm, h, z)
        reward = wm.predict_reward(feats)
        first = (1.0 - terminated.float())[None]
        if self.v3:
            cont = torch.cat([first, (wm.cont_head(feats[1:]).squeeze(-1) > 0).float()])
            value = self.value(self.critic, feats)
            discount = self.args.gamma * cont
            returns = lambda_return(reward[1:], discount[1:], value, self.args.return_lambda)
            weight = torch.cumprod(discount, 0) / self.args.gamma
        else:
            cont = torch.sigmoid(wm.cont_head(feats).squeeze(-1).float())
            cont = torch.cat([self.args.gamma * first, cont[1:]])
            value = self.value(self.slow_critic, feats)
            returns = lambda_return(reward[:-1], cont[:-1], value, self.args.return_lambda)
            weight = torch.cumprod(torch.cat([torch.ones_like(cont[:1]), cont[:-1]]), 0)
        return dict(feats=feats, actions=actions, logits=logits, reward=reward, cont=cont, value=value,
                    weight=weight.detach(), returns=returns)

    def replay_value_loss(self, feats, batch: dict[str, torch.Tensor]):
        """DreamerV3 code's replay value loss (`repval`): the critic's loss on lambda-returns of the replayed
        sequence, from its posterior features (B, T, F), with the same reward, discount and bootstrap conventions as
        `imagined_returns` (v1/v2: R_t = tanh(r_t) + gamma c_t ((1 - lambda) v_slow(z_{t+1}) + lambda R_{t+1});
        v3: R_t = r_{t+1} + gamma c_{t+1} (...) with the critic itself). An episode that starts inside the sequence
        cuts the return, as a terminal would (a time limit then drops the bootstrap); in v3 an episode's last state
        has no step of its own and gets no target (weight 0, as imagination gives a terminal start). Ours differs
        from the code in two ways: the critic's own weights learn from imagination only, this gradient reaches the
        world model alone; and the bootstrap is the critic, not the imagined return."""
        feats = feats.transpose(0, 1)  # (T, B, F)
        terminated, is_first = batch["terminated"].T.float(), batch["is_first"].T.float()
        last = torch.cat([is_first[1:], torch.zeros_like(is_first[:1])])  # z_t ends its episode inside the chunk
        cont = self.args.gamma * (1.0 - terminated) * (1.0 - last)
        with torch.no_grad():
            if self.v3:
                value = self.value(self.critic, feats)
                returns = lambda_return(batch["reward"].T[1:], cont[1:], value, self.args.return_lambda)
            else:
                value = self.value(self.slow_critic, feats)
                returns = lambda_return(torch.tanh(batch["reward"].T[:-1]), cont[:-1], value, self.args.return_lambda)
        self.critic.requires_grad_(False)
        out = self.critic(feats[:-1])  # (T-1, B, ...): z_0 .. z_{T-2}
        self.critic.requires_grad_(True)
        if self.v3:
            return ((1.0 - last[:-1]) * twohot_nll(out, returns)).mean()
        return (0.5 * (out.squeeze(-1).float() - returns).pow(2)).mean()

    def return_scale(self, returns):
        """max(1, EMA(P95) - EMA(P5)) of the lambda-returns, EMA rate 0.01 (DreamerV3 Sec. 'Actor learning'):
        large returns are scaled down, small ones never up. The EMAs start at 0 with no debiasing, as in its code."""
        q = torch.tensor([0.05, 0.95], device=returns.device)
        self.return_range.lerp_(torch.quantile(returns.detach().float().flatten(), q), 0.01)
        return (self.return_range[1] - self.return_range[0]).clamp(min=1.0)

    def train_step(self, wm: WorldModel, h, z, terminated) -> dict[str, torch.Tensor]:
        """One actor and one critic update from every posterior state (h, z) of the batch (B*T starts)."""
        args = self.args
        wm.requires_grad_(False)
        with torch.set_grad_enabled(args.actor_grad == "dynamics"):
            im = self.imagined_returns(wm, h.detach(), z.detach(), terminated)
        wm.requires_grad_(True)
        feats, actions, logits = im["feats"], im["actions"], im["logits"]
        returns, value, weight = im["returns"], im["value"], im["weight"]
        metrics = {}
        if self.v3:
            # Shapes: feats (H+1, N, F), actions (H, N, A), returns (H, N) = R_0 .. R_{H-1}, value and weight
            # (H+1, N). Actor: log pi(a_t | z_t) with the advantage (R_t - v(z_t)) / max(1, S), t = 0 .. H-1.
            logp = self.policy(logits).log()  # (H, N, A)
            entropy = -(logp.exp() * logp).sum(-1)  # (H, N)
            scale = self.return_scale(returns)
            advantage = (returns - value[:-1]) / scale  # (H, N)
            if args.actor_grad == "reinforce":
                objective = (logp * actions.detach()).sum(-1) * advantage.detach()
            else:
                objective = advantage
            actor_loss = -(weight[:-1] * (objective + args.entropy * entropy)).mean()
            # Critic (DreamerV3 Sec. 'Critic learning'): two-hot -log p(sg(R_t)) plus -log p(sg(v_slow(z_t))),
            # the slow critic as a regularizer.
            out = self.critic(feats[:-1].detach())  # (H, N, bins)
            slow = self.value(self.slow_critic, feats[:-1].detach())
            critic_loss = (weight[:-1] * (twohot_nll(out, returns.detach()) + twohot_nll(out, slow))).mean()
            predicted = twohot_mean(out.detach())
            metrics["critic/return_scale"] = scale
        else:
            # Shapes: feats (H+1, N, F), actions (H, N, A), returns (H, N) = R_0 .. R_{H-1}, value (the slow
            # critic) and weight (H+1, N). Actor (DreamerV2 Eq. 6): log pi(a_{t+1} | z_t), where a_{t+1} is the
            # action taken at z_t (actions[t]), for t = 0 .. H-2, the starts whose action has a return R_{t+1}.
            logp = logits[:-1].log_softmax(-1)  # (H-1, N, A): z_0 .. z_{H-2}
            entropy = -(logp.exp() * logp).sum(-1)  # (H-1, N)
            if args.actor_grad == "reinforce":  # advantage R_{t+1} - v_slow(z_t), (H-1, N)
                objective = (logp * actions[:-1].detach()).sum(-1) * (returns[1:] - value[:-2]).detach()
            else:
                objective = returns[1:]  # (H-1, N)
            actor_loss = -(weight[:-2] * (objective + args.entropy * entropy)).mean()
            # Critic (DreamerV2 Eq. 8): regress v(z_t) on sg(R_t) for t = 0 .. H-1.
            predicted = self.critic(feats[:-1].detach()).squeeze(-1).float()  # (H, N)
            critic_loss = (weight[:-1] * 0.5 * (predicted - returns.detach()).pow(2)).mean()

        check_finite("actor", actor_loss)
        check_finite("critic", critic_loss)
        actor_norm = optimize(self.actor_opt, actor_loss, args.grad_clip)
        critic_norm = optimize(self.critic_opt, critic_loss, args.grad_clip)
        self.updates += 1
        if self.updates % args.slow_critic_every == 0:
            self.update_slow_critic()
        return metrics | {
            "losses/actor": actor_loss, "losses/critic": critic_loss, "actor/entropy": entropy.mean(),
            "actor/grad_norm": actor_norm, "critic/grad_norm": critic_norm, "critic/value": predicted.mean(),
            "critic/lambda_return": returns.mean(), "critic/imagined_reward": im["reward"].mean()}

    @torch.no_grad()
    def update_slow_critic(self):
        """Copy the critic (--slow-critic-fraction 1, DreamerV2) or move towards it by that fraction (DreamerV3)."""
        if self.args.slow_critic_fraction == 1:
            self.slow_critic.load_state_dict(self.critic.state_dict())
        else:
            for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
                slow.lerp_(fast, self.args.slow_critic_fraction)


# ----------------------------------------------------------------------------------------------------------------
# Agent
# ----------------------------------------------------------------------------------------------------------------
def keep_freed_memory():
    """CPU runs on glibc: freed memory stays in the heap for the next update (mallopt: no mmap, trim above 2 GiB),
    as CUDA's caching allocator does on a GPU. Otherwise each update's large activations go back to the OS and
    return as zeroed pages: `tests/bench_objectives.py --rounds 3` at v2 sizes took 6.7M minor page faults and 46 s
    of kernel time, 0.75M and 9 s with this (the two runs side by side). Elsewhere (no glibc) nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def set_threads(threads: int) -> int:
    """Set torch's intra-op thread count (0: half the usable cores, at least 1) and return it."""
    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // 2)
    torch.set_num_threads(threads)
    return threads


class Dreamer(nn.Module):
    """World model + actor-critic. Keeps each env's posterior state for acting and each batch row's state for
    truncated BPTT."""

    def __init__(self, args: Args, obs_shape, action_dim: int, device: torch.device):
        super().__init__()
        if device.type == "cpu":
            keep_freed_memory()
        self.args, self.device, self.action_dim = args, device, action_dim
        self.wm = WorldModel(args, obs_shape, action_dim)
        self.ac = ActorCritic(args, self.wm.rssm.feat_dim, action_dim)
        self.probe = ConvDecoder(self.wm.rssm.feat_dim, obs_shape[0], args.cnn_depth, norm=args.decoder_norm) \
            if args.probe_decoder else None
        self.to(device)
        if self.probe is not None:
            self.probe_opt = make_optimizer(self.probe.parameters(), args.lr_model, args.weight_decay)
        self.amp = args.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
        if args.compile:  # the same functions, traced once: fused kernels, no per-op overhead
            from torch._inductor import config as inductor  # not `import torch._...`: that makes `torch` local here
            inductor.fallback_random = True  # eager's random stream, so runs match without it
            self.wm.loss = torch.compile(self.wm.loss)
            self.ac.imagined_returns = torch.compile(self.ac.imagined_returns)
        self.act_state = None  # (h, z, previous action) per env
        self.train_state = self.wm.rssm.initial(args.batch_size, device)  # last posterior of each batch row
        self.images = {}  # tag -> (real, reconstructed) frames of the last batch's first row
        self.last_batch = None  # the last training batch, for the open-loop dream

    @torch.no_grad()
    def sample_action(self, obs: np.ndarray, is_first: np.ndarray, greedy: bool = False) -> np.ndarray:
        """Update each env's posterior with its new observation, then sample (or take the mode of) the policy."""
        obs_t = torch.as_tensor(obs, device=self.device)
        first = torch.as_tensor(is_first, device=self.device)
        if self.act_state is None:
            h, z = self.wm.rssm.initial(len(obs), self.device)
            self.act_state = (h, z, torch.zeros(len(obs), self.action_dim, device=self.device))
        h, z, prev_action = self.act_state
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            embed = self.wm.encoder(preprocess(obs_t))
            h, z, _, _ = self.wm.rssm.obs_step(h, z, prev_action, embed, first)
            logits = self.ac.act(self.wm.rssm.feat(h, z))
        action = logits.argmax(-1) if greedy else sample_categorical(self.ac.policy(logits))
        self.act_state = (h.float(), z.float(), F.one_hot(action, self.action_dim).float())
        return action.cpu().numpy()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"world_model": self.wm.opt, "actor": self.ac.actor_opt, "critic": self.ac.critic_opt}
        return opts | ({"probe": self.probe_opt} if self.probe is not None else {})

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """World-model update on a (B, T) chunk, then actor-critic from its posterior states."""
        batch = self.last_batch = {k: torch.as_tensor(v, device=self.device) for k, v in batch.items()}
        replay_value = self.ac.replay_value_loss if self.args.repval_scale > 0 else None
        h, z, self.train_state, metrics = self.wm.train_step(batch, self.train_state, self.amp, replay_value)
        if self.probe is not None:  # reads detached features: its gradient cannot reach the world model
            obs = preprocess(batch["obs"])
            recon = self.probe(self.wm.rssm.feat(h, z).detach().flatten(0, 1)).unflatten(0, obs.shape[:2])
            metrics["losses/probe_image"] = image_nll(recon, obs)
            optimize(self.probe_opt, metrics["losses/probe_image"], self.args.grad_clip)
            metrics["images/probe_reconstruction"] = (obs[0], recon[0].detach().float())
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            metrics.update(self.ac.train_step(self.wm, h.flatten(0, 1), z.flatten(0, 1),
                                              batch["terminated"].flatten()))
        self.images = {k: metrics.pop(k) for k in list(metrics) if k.startswith("images/")}
        return {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------------------------
def log_progress(args, writer, step, updates, trained_steps, frames_per_step, window, metrics, recent_returns,
                 train_from):
    """Averaged training metrics, windowed rates (prefill excluded) and one console line; returns the new window.
    The train ratio is replayed steps per policy step since the prefill ended; training starts at `train_from`."""
    for key in metrics[0] if metrics else []:
        writer.add_scalar(key, np.mean([m[key] for m in metrics]), step)
    writer.add_scalar("charts/PRGS", step / args.total_steps, step)
    mean_return = f"{np.mean(recent_returns):.1f}" if recent_returns else "n/a"
    if window is None:
        done = min(step - (train_from - args.prefill), args.prefill)  # a resumed run refills from its saved step
        print(f"prefill {done:,}/{args.prefill:,} policy steps | last mean return {mean_return}", flush=True)
        return window
    if step == window[1]:  # training began at this very step: no rate to show yet
        return window
    seconds, steps, window_updates = max(time.time() - window[0], 1e-6), step - window[1], updates - window[2]
    sps, ups = steps / seconds, window_updates / seconds
    writer.add_scalar("charts/SPS", sps, step)
    writer.add_scalar("charts/FPS", sps * frames_per_step, step)
    writer.add_scalar("charts/UPS", ups, step)
    writer.add_scalar("charts/train_ratio", updates * args.batch_size * args.seq_len / trained_steps, step)
    eta = datetime.timedelta(seconds=int((args.total_steps - step) / sps))
    print(f"step {step:,} | frames {step * frames_per_step:,} | SPS {sps:.0f} | FPS {sps * frames_per_step:.0f} | "
          f"UPS {ups:.2f} | ETA {eta} | {100 * step / args.total_steps:.1f}% | last mean return {mean_return}",
          flush=True)
    return time.time(), step, updates


CHECKPOINT_FORMAT = "dreamer_atari/1"
ARCHITECTURE = ["env", "preset", "wm_objective", "discrete_latents", "deter_size", "hidden_size", "stoch_size",
                "classes", "cnn_depth", "mlp_units", "mlp_layers", "probe_decoder", "decoder_norm"]


def save_checkpoint(path: str, agent: Dreamer, args: Args, counters: dict, extra: dict | None = None):
    """Weights (world model, actor, critic, slow critic), optimizers, counters, args and `extra` (random states, the
    replay file's name, the W&B run id), written atomically: to a temporary file first, then renamed over the old
    checkpoint, so a crash mid-write leaves the old one intact."""
    state = {"format": CHECKPOINT_FORMAT, "args": dataclasses.asdict(args), "counters": counters,
             "agent": agent.state_dict(), "optimizers": {k: o.state_dict() for k, o in agent.optimizers().items()},
             **(extra or {})}
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def save_replay(path: str, buffer: ReplayBuffer, train_state) -> int:
    """The stored part of the replay buffer (uint8 frames), its sampler's random state, each TBPTT row's next
    position and the RSSM state it carries, written atomically like the checkpoint. Returns the file's size."""
    n = buffer.stored
    arrays = dict(layout=np.array(buffer.layout), obs=buffer.obs[:, :n], action=buffer.action[:, :n],
                  reward=buffer.reward[:, :n], terminated=buffer.terminated[:, :n], is_first=buffer.is_first[:, :n],
                  steps=np.array(buffer.steps), row_env=buffer.row_env, row_pos=buffer.row_pos,
                  rng=np.array(json.dumps(buffer.rng.bit_generator.state)),
                  h=train_state[0].float().cpu().numpy(), z=train_state[1].float().cpu().numpy())
    with open(f"{path}.tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(f"{path}.tmp", path)
    return os.path.getsize(path)


def read_frames(path: str, frames: np.ndarray, chunk: int = 2**26):
    """Stream the replay file's frames straight into the buffer's own memory, so that a resume never holds a second
    copy of them (np.load would: 3.8 GiB more at --buffer-size 1000000)."""
    with zipfile.ZipFile(path) as archive, archive.open("obs.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if shape != frames.shape or dtype != frames.dtype:
            raise ValueError(f"frames of shape {shape}, expected {frames.shape}")
        for env_frames in frames:  # each env's stored frames are contiguous in the buffer and in the file
            view = memoryview(env_frames).cast("B")
            for start in range(0, len(view), chunk):
                if f.readinto(view[start:start + chunk]) != len(view[start:start + chunk]):
                    raise EOFError("the frames end early")


def load_replay(path: str, buffer: ReplayBuffer, device) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Restore a replay file written by `save_replay` into `buffer`. Returns the rows' carried RSSM state (h, z), or
    why the file cannot be used."""
    try:
        with np.load(path) as data:
            if data["layout"].tolist() != buffer.layout:
                return (f"'{path}' holds (envs, capacity per env, batch, seq, frame) {data['layout'].tolist()}, "
                        f"this run has {buffer.layout}")
            n = data["action"].shape[1]
            for name in ["action", "reward", "terminated", "is_first"]:
                getattr(buffer, name)[:, :n] = data[name]
            read_frames(path, buffer.obs[:, :n])
            buffer.steps, buffer.row_env[:], buffer.row_pos[:] = int(data["steps"]), data["row_env"], data["row_pos"]
            buffer.rng.bit_generator.state = json.loads(str(data["rng"]))
            return torch.as_tensor(data["h"], device=device), torch.as_tensor(data["z"], device=device)
    except FileNotFoundError:
        return f"'{path}' is missing"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"'{path}' cannot be read ({first_line(e)})"


def random_states(envs: gym.vector.VectorEnv) -> dict:
    """Every random stream training draws from: torch's (CPU and CUDA), numpy's and Python's global generators and
    the vector env's action sampler (prefill), as tensors and JSON text, so that a weights-only load reads them."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": json.dumps(np.random.get_state(legacy=False), default=lambda a: a.tolist()),
            "python": json.dumps(random.getstate()), "actions": json.dumps(envs.action_space.np_random.bit_generator.state)}


def set_random_states(states: dict, envs: gym.vector.VectorEnv):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = json.loads(states["numpy"])
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = json.loads(states["python"])
    random.setstate((version, tuple(internal), gauss))
    envs.action_space.np_random.bit_generator.state = json.loads(states["actions"])


def save_run(path: str, agent: Dreamer, args: Args, counters: dict, buffer: ReplayBuffer,
             envs: gym.vector.VectorEnv, wandb_id: str | None, previous_step: int | None):
    """A checkpoint and its replay as one pair. The replay goes first, under a name with its step; then the
    checkpoint that names it replaces the old one; then files no checkpoint names are deleted. Killed at any point,
    even with kill -9, `path` is a whole checkpoint whose replay file exists. With --keep-checkpoints K the K - 1
    previous checkpoints stay as `{name}.step{N}{ext}` (weights only; their replay is not kept)."""
    step, folder = counters["global_step"], os.path.dirname(path)
    replay = f"{os.path.basename(path)}.replay-{step}.npz" if args.save_replay else None
    if replay:
        start = time.time()
        size = save_replay(os.path.join(folder, replay), buffer, agent.train_state)
        print(f"replay of {buffer.stored * buffer.num_envs:,} steps written: "
              f"{size / 2**20:,.1f} MiB in {time.time() - start:.1f} s", flush=True)
    root, ext = os.path.splitext(path)
    if args.keep_checkpoints > 1 and previous_step not in (None, step) and os.path.exists(path):
        older = f"{root}.step{previous_step}{ext}"
        if os.path.exists(older):
            os.remove(older)
        try:
            os.link(path, older)  # the old file stays whole under its new name when the new one replaces it
        except OSError:
            shutil.copyfile(path, older)
    save_checkpoint(path, agent, args, counters,
                    {"random_states": random_states(envs), "replay": replay, "wandb_id": wandb_id})
    older = sorted(glob.glob(f"{glob.escape(root)}.step*{glob.escape(ext)}"),
                   key=lambda p: int(re.findall(r"\.step(\d+)", p)[-1]))
    for stale in older[: max(0, len(older) - (args.keep_checkpoints - 1))]:
        os.remove(stale)
    for stale in glob.glob(f"{glob.escape(path)}.replay-*.npz"):
        if os.path.basename(stale) != replay:
            os.remove(stale)


def first_line(error: Exception) -> str:
    """An exception as one short line for `fail`, even when its message is empty or spans many lines."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"


def load_checkpoint(path: str, flag: str) -> dict:
    """torch.load with weights_only=True (tensors and plain containers only): a checkpoint can never run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, tampered with, or not a checkpoint at all
        fail(flag, f"cannot read '{path}' as a checkpoint ({first_line(e)})")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fail(flag, f"'{path}' is not a dreamer_atari checkpoint")
    return state


def restore(agent: Dreamer, state: dict, flag: str):
    try:
        agent.load_state_dict(state["agent"])
        for name, opt in agent.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
    except (RuntimeError, KeyError, ValueError) as e:
        fail(flag, f"the checkpoint's tensors do not fit this model ({first_line(e)})")


def load_resume(args: Args) -> dict:
    """--resume: the checkpoint, after checking that it fits this command's sizes and step budget."""
    state = load_checkpoint(args.resume, "--resume")
    # a field added since the checkpoint was written reads as its preset's value, as cli_defaults gave this run
    saved = apply_preset(Args(**known_fields(state["args"])))
    for key in ARCHITECTURE:
        if getattr(saved, key) != getattr(args, key):
            fail("--resume", f"the checkpoint was trained with --{key.replace('_', '-')} {getattr(saved, key)}, "
                             f"this run has {getattr(args, key)}")
    if state["counters"]["global_step"] >= args.total_steps:
        fail("--total-steps", f"must exceed the checkpoint's step {state['counters']['global_step']:,}")
    return state


def resume_from(args: Args, state: dict, agent: Dreamer, buffer: ReplayBuffer, envs, counters: dict) -> bool:
    """Weights, optimizers, counters, random states and the replay saved beside the checkpoint. This command's
    optimizer flags replace the restored ones (the optimizer state would silently keep the old values). Returns
    whether the replay was restored; without it the run refills --prefill steps first (--resume-without-replay)."""
    restore(agent, state, "--resume")
    counters.update(state["counters"])
    agent.ac.updates = counters["updates"]
    lrs = {"world_model": args.lr_model, "actor": args.lr_actor, "critic": args.lr_critic, "probe": args.lr_model}
    for name, opt in agent.optimizers().items():
        set_optimizer_values(opt, lrs[name], args.weight_decay, args.model_eps if name == "world_model" else 1e-5)
    saved = lambda k: state["args"].get(k, getattr(args, k))  # noqa: E731 (checkpoints before a flag existed)
    changed = [f"--{k.replace('_', '-')} {saved(k)} -> {getattr(args, k)}"
               for k in ["lr_model", "lr_actor", "lr_critic", "weight_decay", "model_eps"]
               if saved(k) != getattr(args, k)]
    if changed:
        print(f"--resume: the optimizers take this command's values: {', '.join(changed)}", flush=True)
    if "random_states" in state:
        set_random_states(state["random_states"], envs)
    replay = state.get("replay")
    result = "the checkpoint was saved without one" if replay is None else load_replay(
        os.path.join(os.path.dirname(args.resume), replay), buffer, agent.device)
    if not isinstance(result, str):
        agent.train_state = result
        return True
    if not args.resume_without_replay:
        fail("--resume", f"no replay buffer to continue with: {result}; add --resume-without-replay to refill "
                         f"--prefill steps with the restored policy instead")
    print(f"--resume: no replay buffer ({result}); refilling {args.prefill:,} policy steps first", flush=True)
    return False


def open_run(args: Args, state: dict | None) -> tuple[str, str, SummaryWriter, str | None]:
    """The run folder, checkpoint path, TensorBoard writer and W&B run id. A resumed run goes on in its checkpoint's
    folder: TensorBoard drops the points logged after the checkpoint (purge_step) and W&B resumes the run id stored
    in it. A new run claims a fresh folder with an atomic mkdir, so runs started in the same second, even in two
    processes, never share one (an exists() check let two processes take the same folder)."""
    if state is not None:
        path, wandb_id, step = args.resume, state.get("wandb_id"), state["counters"]["global_step"]
        folder = os.path.dirname(path) or "."
        run_name = os.path.basename(os.path.abspath(folder))
    else:
        env_name = re.sub(r"[^\w.-]", "_", args.env)  # `module:EnvId` makes no folder name on every system
        base = f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
        os.makedirs("runs", exist_ok=True)
        for run_name in [base] + [f"{base}-{suffix}" for suffix in range(2, 1000)]:
            try:
                os.mkdir(f"runs/{run_name}")
                break
            except FileExistsError:
                pass
        folder, wandb_id, step = f"runs/{run_name}", None, None
        path = f"{folder}/{args.exp_name}.cleanrl_model"
    if args.track:
        import wandb

        wandb_id = wandb_id or os.urandom(6).hex()
        wandb.tensorboard.patch(root_logdir=folder)
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True, id=wandb_id, resume="allow")
    writer = SummaryWriter(folder, purge_step=None if step is None else step + 1)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}", step)
    return run_name, path, writer, wandb_id


def write_gif(frames: list[np.ndarray], path: str, scale: int = 4):
    """(C, H, W) uint8 frames -> an animated GIF of what the encoder sees (to_rgb), enlarged `scale` times with
    nearest-neighbour pixels."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames = [(to_rgb(preprocess(torch.as_tensor(f)) + 0.5) * 255).round().byte().numpy() for f in frames]
    images = [Image.fromarray(f[0] if f.shape[0] == 1 else f.transpose(1, 2, 0)) for f in frames]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)


def evaluate(args: Args, policy, episodes: int, seed: int, frames: list | None = None) -> list[float]:
    """Play `episodes` whole episodes in fresh envs; `policy(obs, is_first)` picks the actions. Each env plays a
    fixed share of the episodes, so short episodes are not over-counted. `frames` collects env 0's first episode."""
    envs, _ = make_envs(dataclasses.replace(args, num_envs=min(args.num_envs, episodes)), seed)
    n = envs.num_envs
    quota = np.full(n, episodes // n) + (np.arange(n) < episodes % n)
    obs, _ = envs.reset(seed=seed)
    is_first, done, ep_return, returns = np.ones(n, bool), np.zeros(n, bool), np.zeros(n), []
    recording = frames is not None
    while len(returns) < episodes:
        if recording:
            frames.append(to_chw(obs)[0])
        obs, reward, terminated, truncated, _ = envs.step(policy(to_chw(obs), is_first))
        is_first, done = done, terminated | truncated
        if recording and done[0]:  # the terminal frame closes the recording
            frames.append(to_chw(obs)[0])
            recording = False
        ep_return = np.where(is_first, 0, ep_return + reward)
        for i in np.flatnonzero(done & (quota > 0)):
            returns.append(float(ep_return[i]))
            quota[i] -= 1
    envs.close()
    return returns


EVAL_SEED_OFFSET = 10_000  # evaluation envs are seeded apart from the training envs


def random_returns(args: Args, action_dim: int) -> list[float]:
    """The uniform random policy on the evaluation seeds: the baseline every evaluation is read against."""
    rng = np.random.default_rng(args.seed + EVAL_SEED_OFFSET)
    return evaluate(args, lambda o, f: rng.integers(action_dim, size=len(o)), args.eval_episodes,
                    args.seed + EVAL_SEED_OFFSET)


def report_evaluation(args: Args, agent: Dreamer, writer: SummaryWriter, step: int, json_path: str | None,
                      baseline: list[float] | None = None) -> dict:
    """The greedy policy (the mode of each action distribution), the sampled policy and a random policy (`baseline`
    if it was computed already), on the same seeds: print mean, std, min and max of the return, log them, optionally
    write them as JSON and a GIF of the greedy policy's first episode. A greedy score far below the sampled one
    shows a half-trained argmax stuck."""
    seed, frames = args.seed + EVAL_SEED_OFFSET, [] if args.eval_gif else None
    policies = {"greedy": lambda o, f: agent.sample_action(o, f, greedy=True),
                "sampled": lambda o, f: agent.sample_action(o, f), "random": None}
    stats = {"env": args.env, "global_step": step, "episodes": args.eval_episodes, "seed": seed}
    for name, policy in policies.items():
        agent.act_state = None
        if policy is None:
            returns = baseline or random_returns(args, agent.action_dim)
        else:
            returns = evaluate(args, policy, args.eval_episodes, seed, frames if name == "greedy" else None)
        stats[name] = dict(mean=float(np.mean(returns)), std=float(np.std(returns)), min=float(np.min(returns)),
                           max=float(np.max(returns)), returns=returns)
        print(f"eval {name:7s} over {args.eval_episodes} episodes: mean {np.mean(returns):.2f} +- "
              f"{np.std(returns):.2f} (min {np.min(returns):.2f}, max {np.max(returns):.2f})", flush=True)
    agent.act_state = None
    for i, (greedy, sampled) in enumerate(zip(stats["greedy"]["returns"], stats["sampled"]["returns"])):
        writer.add_scalar("eval/episodic_return", greedy, i)
        writer.add_scalar("eval/sampled_episodic_return", sampled, i)
    log_returns(writer, "eval", stats["greedy"]["returns"], step)
    writer.add_scalar("eval/sampled_mean_return", stats["sampled"]["mean"], step)
    writer.add_scalar("eval/random_mean_return", stats["random"]["mean"], step)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(stats, f, indent=2)
        print(f"evaluation written to {json_path}", flush=True)
    if frames:
        write_gif(frames, args.eval_gif)
        print(f"GIF of the first evaluation episode written to {args.eval_gif}", flush=True)
    return stats


def log_returns(writer: SummaryWriter, prefix: str, returns: list[float], step: int):
    for name, stat in [("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)]:
        writer.add_scalar(f"{prefix}/{name}_return", stat(returns), step)


def periodic_evaluation(args: Args, agent: Dreamer, writer: SummaryWriter, step: int, baseline: list[float] | None):
    """--eval-every: greedy episodes in separate envs, logged against the step. Training is unchanged by it: the
    acting state is put back and torch's random stream is forked, so training draws the same numbers as without
    it. The random policy's returns (the same seeds every time) are computed once; returns them."""
    acting, device = agent.act_state, agent.device
    agent.act_state = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        returns = evaluate(args, lambda o, f: agent.sample_action(o, f, greedy=True), args.eval_episodes,
                           args.seed + EVAL_SEED_OFFSET)
    agent.act_state = acting
    baseline = baseline or random_returns(args, agent.action_dim)
    log_returns(writer, "eval", returns, step)
    writer.add_scalar("eval/random_mean_return", np.mean(baseline), step)
    print(f"eval at step {step:,}: greedy mean {np.mean(returns):.2f} (min {np.min(returns):.2f}, max "
          f"{np.max(returns):.2f}) over {len(returns)} episodes | random {np.mean(baseline):.2f}", flush=True)
    return baseline


def agent_from_checkpoint(path: str, flag: str, **keep) -> tuple[Args, Dreamer, dict]:
    """Rebuild the agent a checkpoint holds, with the checkpoint's own args (game, preset, sizes) except `keep`.
    Returns (args, agent, checkpoint)."""
    state = load_checkpoint(path, flag)
    args = validate(dataclasses.replace(Args(**known_fields(state["args"])), **keep, resume=None, track=False,
                                        capture_video=False))
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs, _ = make_envs(args, args.seed)
    obs_shape, action_dim = to_chw(envs.reset(seed=args.seed)[0]).shape[1:], int(envs.single_action_space.n)
    envs.close()
    agent = Dreamer(args, obs_shape, action_dim, device)
    restore(agent, state, flag)
    return args, agent, state


def evaluate_checkpoint(args: Args) -> dict:
    """--eval-checkpoint: rebuild the agent from the checkpoint's own args and evaluate it."""
    path = args.eval_checkpoint
    keep = {k: getattr(args, k) for k in ["eval_checkpoint", "eval_episodes", "eval_gif", "seed", "cuda", "num_envs"]}
    args, agent, state = agent_from_checkpoint(path, "--eval-checkpoint", **keep)
    print(f"evaluating {path}: env {args.env}, preset {args.preset}, trained for "
          f"{state['counters']['global_step']:,} policy steps (game and sizes come from the checkpoint)", flush=True)
    writer = SummaryWriter(os.path.dirname(path) or ".")
    try:
        return report_evaluation(args, agent, writer, state["counters"]["global_step"], f"{path}.eval.json")
    finally:
        writer.close()


def capture(video: list | None, episode: int, frame: np.ndarray, is_first: bool, done: bool, run_name: str):
    """--capture-video: env 0's episodes 0, 1, 8, 27, ... (then every 1000th) as GIFs in runs/{run_name}/videos."""
    if is_first and (episode < 1000 and round(episode ** (1 / 3)) ** 3 == episode or episode % 1000 == 0):
        video = []
    if video is not None:
        video.append(frame)
        if done:
            write_gif(video, f"runs/{run_name}/videos/episode-{episode}.gif")
            return None
    return video


def image_rows(*rows: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) frame sequences -> one (C, rows x H, T x W) image, each sequence on its own row."""
    return torch.cat([torch.cat(list(row), -1) for row in rows], -2)


def log_images(writer: SummaryWriter, agent: Dreamer, step: int):
    """Real frames on the top row, the decoder's (or the probe's) reconstruction or the open-loop dream below."""
    for tag, (real, recon) in agent.images.items():
        writer.add_image(tag, to_rgb(image_rows(real + 0.5, recon + 0.5).clamp(0, 1)).cpu(), step)
    agent.images = {}
    if agent.wm.decoder is not None and agent.last_batch is not None:
        writer.add_image("images/open_loop_dream", to_rgb(image_rows(*agent.wm.dream(agent.last_batch))).cpu(), step)


def main(args: Args):
    """Train (or, with --eval-checkpoint, only evaluate). Returns the run name (or the evaluation statistics)."""
    args = validate(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    state = load_resume(args) if args.resume else None
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    threads = set_threads(args.threads)

    envs, frames_per_step = make_envs(args, args.seed)
    obs = to_chw(envs.reset(seed=args.seed)[0])
    action_dim = int(envs.single_action_space.n)
    agent = Dreamer(args, obs.shape[1:], action_dim, device)
    buffer = ReplayBuffer(args.num_envs, args.buffer_size, obs.shape[1:], args.batch_size, args.seq_len,
                          args.buffer_mode, args.recency, args.seed)
    counters = dict(global_step=0, updates=0, trained_steps=0, train_credit=0)
    refill = state is not None and not resume_from(args, state, agent, buffer, envs, counters)
    run_name, path, writer, wandb_id = open_run(args, state)
    params = sum(p.numel() for p in agent.parameters() if p.requires_grad)
    print(f"run {run_name} on {device} ({threads} CPU thread{'s' * (threads > 1)}): env {args.env} x{args.num_envs}, "
          f"{action_dim} actions, preset {args.preset}, {params / 1e6:.2f}M parameters, "
          f"replay {buffer.nbytes / 2**30:.2f} GiB for {args.buffer_size:,} steps"
          + (f", resumed at step {counters['global_step']:,}" if state else ""), flush=True)

    n, global_step = args.num_envs, counters["global_step"]  # updates are counted by agent.ac.updates alone
    steps_per_update = args.train_every or args.batch_size * args.seq_len / args.train_ratio
    # What arrived with the current obs: the action that led to it, its reward, and whether it ends the episode.
    prev_action, reward = np.zeros(n, np.int64), np.zeros(n, np.float32)
    terminated, done, is_first = np.zeros(n, bool), np.zeros(n, bool), np.ones(n, bool)
    ep_return, ep_length, recent_returns = np.zeros(n), np.zeros(n, np.int64), deque(maxlen=10)
    train_from = global_step + args.prefill if refill else max(global_step, args.prefill)
    checkpoint_every = 100_000 if args.checkpoint_every is None else args.checkpoint_every
    next_checkpoint = global_step + checkpoint_every if args.save_model and checkpoint_every else None
    next_eval = global_step + args.eval_every if args.eval_every else None
    saved_step, baseline = (global_step if state else None), None
    video, video_episode = ([obs[0]] if args.capture_video else None), 0
    metrics, window, last_log = [], None, time.time()  # window: (time, step, updates) where the rate window began
    counters_now = lambda: dict(counters, global_step=global_step, updates=agent.ac.updates)

    stop = []  # the signal that asked to stop: the loop ends at its next step, with a checkpoint

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
        print(f"{stop[0]}: stopping after this step with a checkpoint (send it again to stop at once, without one)",
              flush=True)

    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while global_step < args.total_steps and not stop:
            buffer.add(obs, np.where(is_first, 0, prev_action), reward, terminated, is_first)  # the one entry point
            acting, learning = global_step >= args.prefill, global_step >= train_from  # decided before the step
            action = agent.sample_action(obs, is_first) if acting else envs.action_space.sample()
            next_obs, reward, terminated, truncated, _ = envs.step(action)
            global_step += n
            # NEXT_STEP autoreset: an env whose obs was terminal ignored `action` and returned its reset obs.
            obs, prev_action, is_first, done = to_chw(next_obs), action, done, terminated | truncated
            reward = reward.astype(np.float32)
            ep_return = np.where(is_first, 0, ep_return + reward)
            ep_length = np.where(is_first, 0, ep_length + 1)
            for i in np.flatnonzero(done):
                recent_returns.append(ep_return[i])
                writer.add_scalar("charts/episodic_return", ep_return[i], global_step)
                writer.add_scalar("charts/episodic_length", ep_length[i], global_step)
            if args.capture_video:
                video = capture(video, video_episode, obs[0], is_first[0], done[0], run_name)
                video_episode += int(done[0])
            if learning:
                window = window or (time.time(), global_step, agent.ac.updates)
                counters["train_credit"] += n
                counters["trained_steps"] += n
                while counters["train_credit"] >= steps_per_update:  # exact cadence for any num_envs
                    metrics.append(agent.train_step(buffer.sample()))
                    counters["train_credit"] -= steps_per_update
            if next_checkpoint is not None and global_step >= next_checkpoint:
                save_run(path, agent, args, counters_now(), buffer, envs, wandb_id, saved_step)
                saved_step, next_checkpoint = global_step, next_checkpoint + checkpoint_every
            if next_eval is not None and global_step >= next_eval and global_step < args.total_steps:
                baseline = periodic_evaluation(args, agent, writer, global_step, baseline)
                next_eval += args.eval_every
            if time.time() - last_log >= args.log_seconds or global_step >= args.total_steps:
                window = log_progress(args, writer, global_step, agent.ac.updates, counters["trained_steps"],
                                      frames_per_step, window, metrics, recent_returns, train_from)
                log_images(writer, agent, global_step)
                metrics, last_log = [], time.time()
        for sig, handler in handlers.items():  # from here on a signal stops at once; the checkpoint is atomic
            signal.signal(sig, handler)
        if stop or args.save_model:
            save_run(path, agent, args, counters_now(), buffer, envs, wandb_id, saved_step)
            print(f"checkpoint saved to {path}", flush=True)
        if stop:
            print(f"interrupted at step {global_step:,} (continue with --resume {path})", flush=True)
        elif args.eval_episodes:
            report_evaluation(args, agent, writer, global_step, f"{path}.eval.json" if args.save_model else None,
                              baseline)
    except (FloatingPointError, KeyboardInterrupt) as e:
        kept = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written"
        why = f"error: {e}, stopped before it reached the weights" if isinstance(e, FloatingPointError) else \
            "stopped at once, without saving"
        print(f"{why}, at step {global_step:,}; {kept}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, FloatingPointError) else 130)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        writer.close()
        envs.close()
        if args.track:
            import wandb

            wandb.finish()
            wandb.tensorboard.unpatch()  # a later run in this process must not write into this run's folder
    return run_name


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
