"""DreamerV3 pieces (--preset v3): symlog, two-hot heads, free bits per step, unimix, return normalization, the slow
critic's moving average, and a tiny end-to-end run with each world-model objective."""

import math

import pytest
import torch

import dreamer_atari as da


def test_symexp_inverts_symlog_and_symlog_compresses():
    x = torch.tensor([-1e4, -3.5, -1.0, 0.0, 0.2, math.e - 1, 7.0, 1e4], dtype=torch.float64)
    assert torch.allclose(da.symexp(da.symlog(x)), x, rtol=1e-12, atol=0)
    assert da.symlog(x)[5].item() == pytest.approx(1.0)
    assert da.symlog(x)[0].item() == pytest.approx(-math.log(1e4 + 1))


def test_twohot_puts_the_weight_on_the_two_neighbouring_bins_and_decodes_back():
    bins = da.twohot_bins("cpu")
    assert len(bins) == 255 and bins[0] == -20 and bins[-1] == 20 and bins[127] == 0
    x = torch.tensor([-513.0, -1.0, 0.0, 0.37, 1.0, 29.5, 1e5])
    target = da.twohot(da.symlog(x), bins)
    assert torch.allclose(target.sum(-1), torch.ones(len(x)))
    for row in target:
        nonzero = row.nonzero().flatten()
        assert len(nonzero) <= 2 and (len(nonzero) < 2 or nonzero[1] - nonzero[0] == 1)
    assert torch.allclose((target * bins).sum(-1), da.symlog(x), atol=1e-5)  # the encoding's mean is the value
    logits = target.clamp(min=1e-30).log()  # a head whose softmax is exactly this encoding
    assert torch.allclose(da.twohot_mean(logits), x, rtol=1e-4)
    beyond = da.twohot(torch.tensor([25.0, -25.0]), bins)  # past the ends: all on the end bin
    assert beyond[0, -1] == 1 and beyond[1, 0] == 1


def test_twohot_nll_gradient_is_softmax_minus_the_target():
    logits = torch.randn(6, 255, requires_grad=True)
    x = torch.tensor([-3.0, 0.0, 0.5, 2.0, 100.0, -0.01])
    da.twohot_nll(logits, x).sum().backward()
    expected = logits.detach().softmax(-1) - da.twohot(da.symlog(x), da.twohot_bins("cpu"))
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def v3_agent(tiny_args, **overrides):
    return da.Dreamer(da.validate(tiny_args(preset="v3", **overrides)), (1, 64, 64), 3, torch.device("cpu"))


def test_return_scale_tracks_the_5th_and_95th_percentiles_and_never_scales_up(tiny_args):
    ac = v3_agent(tiny_args).ac
    returns = torch.arange(101.0).reshape(101, 1) * 100  # percentiles 5: 500, 95: 9,500
    assert ac.return_scale(returns).item() == pytest.approx(0.01 * 9000)  # EMA from 0, rate 0.01, no debiasing
    assert torch.allclose(ac.return_range, torch.tensor([5.0, 95.0]))
    for _ in range(2000):
        scale = ac.return_scale(returns)
    assert scale.item() == pytest.approx(9000, rel=1e-3)
    small = v3_agent(tiny_args).ac
    for _ in range(2000):
        scale = small.return_scale(torch.linspace(-0.2, 0.3, 50)[:, None])
    assert scale.item() == 1.0  # a range under 1 is not scaled up


def test_free_bits_per_step_clip_each_step_and_stop_its_gradient():
    rssm = da.RSSM(action_dim=2, embed_dim=8, deter=8, hidden=8, stoch=4, classes=4, discrete=True)
    post = torch.randn(6, 16) * 3
    prior = torch.cat([post[:3] + 0.01 * torch.randn(3, 16), torch.randn(3, 16) * 3]).requires_grad_(True)
    kl = rssm.kl(post, prior).detach()
    assert (kl[:3] < 1).all() and (kl[3:] > 1).all()
    loss, value = da.kl_loss(rssm, post, prior, alpha=0.8, free_nats=1.0, per_step=True)
    assert loss.item() == pytest.approx(kl.clamp(min=1).mean().item(), rel=1e-5)
    assert value.item() == pytest.approx(kl.mean().item(), rel=1e-5)
    loss.backward()
    assert (prior.grad[:3] == 0).all() and (prior.grad[3:].abs().sum(-1) > 0).all()
    batch, _ = da.kl_loss(rssm, post, prior, alpha=0.8, free_nats=1.0)  # v2's free nats: after averaging
    assert batch.item() == pytest.approx(max(kl.mean().item(), 1.0), rel=1e-5)


def test_unimix_bounds_every_class_of_the_latents_and_the_policy(tiny_args):
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(da.mix_uniform(probs, 0.01), torch.tensor([[0.9925, 0.0025, 0.0025, 0.0025]]))
    assert da.mix_uniform(probs, 0.0) is probs
    agent = v3_agent(tiny_args)
    rssm, classes = agent.wm.rssm, agent.args.classes
    extreme = torch.zeros(2, rssm.stoch_dim)
    extreme[:, 0] = 1e4
    logp = rssm.log_probs(extreme)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, rssm.stoch))
    assert logp.exp().min().item() == pytest.approx(0.01 / classes, rel=1e-4)
    assert rssm.entropy(extreme).min() > 0
    policy = agent.ac.policy(torch.tensor([[1e4, 0.0, 0.0]]))
    assert policy.min().item() == pytest.approx(0.01 / 3, rel=1e-4)


def test_v3_heads_start_at_zero_and_the_slow_critic_is_a_moving_average(tiny_args):
    agent = v3_agent(tiny_args)
    feat = torch.randn(5, agent.wm.rssm.feat_dim)
    assert agent.wm.predict_reward(feat).abs().max() < 1e-5 and agent.ac.value(agent.ac.critic, feat).abs().max() < 1e-5
    assert any(isinstance(m, torch.nn.LayerNorm) for m in agent.modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in agent.modules())
    decoder = set(agent.wm.decoder.modules())  # DreamerV2's decoder, with ELU (--decoder-norm)
    assert not any(isinstance(m, torch.nn.ELU) for m in agent.modules() if m not in decoder)
    with torch.no_grad():
        for p in agent.ac.critic.parameters():
            p.add_(1.0)
    before = [p.clone() for p in agent.ac.slow_critic.parameters()]
    agent.ac.update_slow_critic()
    for slow, old, fast in zip(agent.ac.slow_critic.parameters(), before, agent.ac.critic.parameters()):
        assert torch.allclose(slow, 0.98 * old + 0.02 * fast)


def test_v3_takes_dreamerv2s_decoder_and_keeps_the_other_norms_unless_decoder_norm(tiny_args):
    plain = v3_agent(tiny_args)
    norms = (torch.nn.LayerNorm, da.ChannelNorm, torch.nn.SiLU)
    assert not any(isinstance(m, norms) for m in plain.wm.decoder.modules())
    assert any(isinstance(m, torch.nn.ELU) for m in plain.wm.decoder.modules())
    assert any(isinstance(m, da.ChannelNorm) for m in plain.wm.encoder.modules())
    assert any(isinstance(m, torch.nn.LayerNorm) for m in plain.wm.rssm.modules())
    assert any(isinstance(m, da.ChannelNorm) for m in v3_agent(tiny_args, decoder_norm=True).wm.decoder.modules())
    v2 = da.Dreamer(da.validate(tiny_args(decoder_norm=True)), (1, 64, 64), 3, torch.device("cpu"))
    assert any(isinstance(m, da.ChannelNorm) for m in v2.wm.decoder.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in v2.wm.encoder.modules())


@pytest.mark.parametrize("objective", ["decoder", "barlow"])
def test_v3_trains_end_to_end_and_its_return_range_is_checkpointed(tiny_args, objective):
    run_name = da.main(tiny_args(preset="v3", wm_objective=objective, total_steps=240, max_episode_frames=400,
                                 save_model=True))
    state = torch.load(f"runs/{run_name}/dreamer_atari.cleanrl_model", weights_only=True)
    assert state["args"]["preset"] == "v3" and state["args"]["free_nats_per_step"]
    assert state["agent"]["ac.return_range"].abs().sum() > 0  # the percentile EMAs moved and were saved


def test_v3_preset_values_and_the_small_size_rates():
    v3 = da.apply_preset(da.Args(preset="v3"))
    assert (v3.deter_size, v3.mlp_units, v3.mlp_layers, v3.cnn_depth, v3.seq_len) == (512, 512, 2, 32, 64)
    assert v3.kl_scale * v3.kl_balance == pytest.approx(0.5) and v3.kl_scale * (1 - v3.kl_balance) == pytest.approx(0.1)
    assert (v3.free_nats, v3.free_nats_per_step, v3.unimix, v3.entropy) == (1.0, True, 0.01, 3e-4)
    assert v3.gamma == pytest.approx(1 - 1 / 333) and (v3.slow_critic_every, v3.slow_critic_fraction) == (1, 0.02)
    assert (v3.lr_model, v3.lr_actor, v3.lr_critic, v3.model_eps, v3.model_grad_clip) == (1e-4, 3e-5, 3e-5, 1e-8, 1e3)
    small = da.apply_preset(da.Args(preset="v3", size="small", lr_actor=5e-4))
    assert (small.deter_size, small.lr_model, small.lr_actor, small.entropy) == (64, 1e-3, 5e-4, 1e-2)
    assert small.slow_critic_every == 1 and small.slow_critic_fraction == 0.02  # not v2's copy every 20
    v2 = da.apply_preset(da.Args(preset="v2", size="small"))
    assert (v2.slow_critic_every, v2.slow_critic_fraction, v2.unimix, v2.cont_scale) == (20, 1.0, 0.0, 5.0)
    assert (v2.gamma, v2.entropy, v2.heads_on_prior) == (0.95, 5e-2, True) and not small.heads_on_prior
    for free in [da.Args(preset="decoder-free", size="small"), da.Args(size="small", wm_objective="barlow")]:
        free = da.apply_preset(free)  # v2's small rates, but not the heads on the prior, and twice the updates
        assert (free.gamma, free.entropy, free.lr_actor, free.heads_on_prior) == (0.95, 5e-2, 1e-3, False)
        assert (free.train_every, v2.train_every, small.train_every) == (2, 4, 4)
    assert da.apply_preset(da.Args(preset="decoder-free", size="small", train_every=4)).train_every == 4
    ratio = da.apply_preset(da.Args(preset="decoder-free", size="small", protocol="atari100k"))
    assert (ratio.train_every, ratio.train_ratio) == (None, 256.0)  # a protocol's train ratio replaces it
    assert da.cli_defaults(["--size", "small", "--wm-objective=barlow"]).heads_on_prior is False
    paper = da.apply_preset(da.Args(preset="v2"))
    assert (paper.gamma, paper.entropy, paper.heads_on_prior) == (0.999, 1e-3, False)
    explicit = da.apply_preset(da.Args(size="small", heads_on_prior=False, gamma=0.99))
    assert explicit.heads_on_prior is False and explicit.gamma == 0.99  # explicit flags win over the size
    assert da.cli_defaults(["--preset", "v3"]).unimix == 0.01


def test_decoder_free_at_the_preset_sizes_trains_twice_as_often_with_the_reward_heads_on_the_prior():
    for free in [da.Args(preset="decoder-free"), da.Args(wm_objective="barlow")]:
        free = da.apply_preset(free)
        assert (free.train_every, free.reward_scale, free.heads_on_prior, free.deter_size) == (8, 10.0, True, 600)
    for preset, objective in [("v2", None), ("v3", None), ("v3", "barlow")]:
        other = da.apply_preset(da.Args(preset=preset, wm_objective=objective))
        assert (other.train_every, other.reward_scale, other.heads_on_prior) == (16, 1.0, False)
    for size, every in [("small", 2), ("tiny", 8)]:  # the small size's own rates; tiny is only run by tests
        free = da.apply_preset(da.Args(preset="decoder-free", size=size))
        assert (free.train_every, free.reward_scale, free.heads_on_prior) == (every, 1.0, False)
    mine = da.apply_preset(da.Args(preset="decoder-free", train_every=16, reward_scale=1.0, heads_on_prior=False))
    assert (mine.train_every, mine.reward_scale, mine.heads_on_prior) == (16, 1.0, False)  # explicit flags win
    assert da.cli_defaults(["--preset", "decoder-free"]).reward_scale == 10.0  # what --help shows


def test_bench_learning_trains_at_half_the_presets_update_interval():
    from bench_learning import cpu_argv

    def resolved(*flags):
        return da.apply_preset(da.parse_args(cpu_argv(["--env", "Boxing", *flags])))

    free = resolved("--preset", "decoder-free")  # the flags the decoder-free Boxing and Krull rows measured
    assert (free.train_every, free.reward_scale, free.heads_on_prior, free.deter_size) == (4, 10.0, True, 128)
    assert resolved("--preset", "v2").train_every == resolved("--preset", "v3").train_every == 8
    assert resolved("--preset", "decoder-free", "--train-every", "2").train_every == 2
    ratio = resolved("--train-ratio", "64")
    assert (ratio.train_every, ratio.train_ratio) == (None, 64.0)

