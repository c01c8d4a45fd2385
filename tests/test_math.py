import math

import pytest
import torch

import dreamer_atari as da
from tests.conftest import random_batch


def make_rssm(discrete, **kw):
    sizes = dict(action_dim=3, embed_dim=8, deter=16, hidden=16, stoch=4, classes=5, discrete=discrete)
    return da.RSSM(**{**sizes, **kw})


def test_lambda_return_matches_hand_computation():
    reward, cont = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    value, lam = torch.tensor([10.0, 20.0, 30.0]), 0.5
    # R_2 = 30; R_1 = 2 + 1 * (0.5 * 30 + 0.5 * 30) = 32; R_0 = 1 + 0.5 * (0.5 * 20 + 0.5 * 32) = 14
    torch.testing.assert_close(da.lambda_return(reward, cont, value, lam), torch.tensor([14.0, 32.0]))


def test_lambda_return_limits():
    reward, cont, value = torch.rand(4, 3), torch.rand(4, 3), torch.rand(5, 3)
    one_step = reward + cont * value[1:]
    torch.testing.assert_close(da.lambda_return(reward, cont, value, 0.0), one_step)
    monte_carlo = value[-1]
    for t in reversed(range(4)):
        monte_carlo = reward[t] + cont[t] * monte_carlo
    torch.testing.assert_close(da.lambda_return(reward, cont, value, 1.0)[0], monte_carlo)


@pytest.mark.parametrize("discrete", [True, False])
def test_kl_balancing_value_and_gradients(discrete):
    rssm, alpha = make_rssm(discrete), 0.8
    stats = 20 if discrete else 8
    post, prior = torch.randn(6, stats), torch.randn(6, stats)

    def grads(loss_fn):
        q, p = post.clone().requires_grad_(), prior.clone().requires_grad_()
        loss, value = loss_fn(q, p)
        loss.backward()
        return loss.detach(), value.detach(), q.grad, p.grad

    plain = grads(lambda q, p: da.kl_loss(rssm, q, p, 0.0, 0.0))
    balanced = grads(lambda q, p: da.kl_loss(rssm, q, p, alpha, 0.0))
    torch.testing.assert_close(balanced[0], plain[0])  # same value as plain KL
    torch.testing.assert_close(balanced[1], plain[1])
    torch.testing.assert_close(balanced[3], alpha * plain[3])  # the prior gets alpha of the gradient
    torch.testing.assert_close(balanced[2], (1 - alpha) * plain[2])  # the posterior the rest
    assert plain[3].abs().sum() > 0


def test_free_nats_stop_the_gradient_below_the_threshold():
    rssm = make_rssm(True)
    post, prior = torch.randn(6, 20), torch.randn(6, 20, requires_grad=True)
    loss, value = da.kl_loss(rssm, post, prior, 0.8, free_nats=1e3)
    loss.backward()
    assert loss.item() == pytest.approx(1e3) and value.item() < 1e3
    assert prior.grad.abs().sum() == 0


def test_gaussian_kl_matches_torch():
    rssm = make_rssm(False)
    q, p = torch.randn(5, 8), torch.randn(5, 8)
    normal = lambda s: torch.distributions.Normal(s[:, :4], torch.nn.functional.softplus(s[:, 4:]) + 0.1)
    expected = torch.distributions.kl_divergence(normal(q), normal(p)).sum(-1)
    torch.testing.assert_close(rssm.kl(q, p), expected)


@pytest.mark.parametrize("discrete", [True, False])
def test_rssm_shapes_and_gradient_flow(discrete):
    torch.manual_seed(0)
    rssm = make_rssm(discrete)
    B, T = 3, 7
    embed = torch.randn(B, T, 8)
    action = torch.nn.functional.one_hot(torch.randint(0, 3, (B, T)), 3).float()
    is_first = torch.zeros(B, T, dtype=torch.bool)
    h, z, prior, post, last = rssm.observe(embed, action, is_first, rssm.initial(B, "cpu"))
    stoch_dim = 20 if discrete else 4
    assert h.shape == (B, T, 16) and z.shape == (B, T, stoch_dim)
    assert prior.shape == post.shape == (B, T, 20 if discrete else 8)
    assert last[0].shape == (B, 16) and last[1].shape == (B, stoch_dim)
    if discrete:
        onehot = z.detach().round()  # straight-through: forward values are one-hot samples (up to round-off)
        torch.testing.assert_close(z.detach(), onehot)
        assert set(onehot.unique().tolist()) <= {0.0, 1.0} and (onehot.sum(-1) == 4).all()
    # gradients reach the posterior network through the sample (straight-through / reparameterized)
    (z * torch.randn_like(z)).sum().backward()
    grad = rssm.post_net[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert rssm.gru.linear.weight.grad.abs().sum() > 0  # ... and through time into the GRU


@pytest.mark.parametrize("discrete", [True, False])
def test_observe_computes_what_obs_step_computes(discrete):
    """observe batches the prior and the posterior's embedding input over the sequence: the same h, z, prior and
    post as filtering with obs_step one step at a time (the acting path), and the same gradients."""
    rssm = make_rssm(discrete)
    B, T = 3, 6
    embed = torch.randn(B, T, 8, requires_grad=True)
    action = torch.nn.functional.one_hot(torch.randint(0, 3, (B, T)), 3).float()
    is_first = torch.rand(B, T) < 0.3
    state = (torch.randn(B, 16), rssm.sample(torch.randn(B, 20 if discrete else 8)))
    torch.manual_seed(2)
    batched = rssm.observe(embed, action, is_first, state)[:4]
    grad = torch.autograd.grad(sum((x * torch.linspace(-1, 1, x.shape[-1])).sum() for x in batched), embed)[0]
    torch.manual_seed(2)
    (h, z), steps = state, []
    for t in range(T):
        h, z, prior, post = rssm.obs_step(h, z, action[:, t], embed[:, t], is_first[:, t])
        steps.append((h, z, prior, post))
    stepwise = [torch.stack(xs, 1) for xs in zip(*steps)]
    for got, expected in zip(batched, stepwise):
        torch.testing.assert_close(got, expected)
    expected_grad = torch.autograd.grad(sum((x * torch.linspace(-1, 1, x.shape[-1])).sum() for x in stepwise), embed)[0]
    torch.testing.assert_close(grad, expected_grad)


def test_sample_categorical_draws_each_class_with_its_probability():
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    draws = da.sample_categorical(probs.repeat(40000, 1, 1))  # (40000, 3)
    assert draws.shape == (40000, 3) and draws.dtype == torch.int64
    freq = torch.nn.functional.one_hot(draws, 4).float().mean(0)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)  # 0.01 is over 4 standard errors at 40,000 draws
    assert not (draws[:, 0] == 1).any() and (draws[:, 1] == 3).all()  # a zero-probability class is never drawn


def test_is_first_resets_the_state():
    torch.manual_seed(0)
    rssm = make_rssm(True)
    embed, action = torch.randn(2, 3, 8), torch.randn(2, 3, 3)
    is_first = torch.zeros(2, 3, dtype=torch.bool)
    is_first[:, 0] = True
    state = (torch.randn(2, 16), torch.randn(2, 20))
    torch.manual_seed(1)
    h_from_state = rssm.observe(embed, action, is_first, state)[0]
    torch.manual_seed(1)
    h_from_zero = rssm.observe(embed, action, is_first, rssm.initial(2, "cpu"))[0]
    torch.testing.assert_close(h_from_state, h_from_zero)


def test_actor_critic_update_touches_only_its_own_networks(tiny_args):
    args = da.validate(tiny_args())
    torch.manual_seed(0)
    agent = da.Dreamer(args, (1, 64, 64), 4, torch.device("cpu"))
    wm_before = [p.clone() for p in agent.wm.parameters()]
    actor_before = [p.clone() for p in agent.ac.actor.parameters()]
    h, z = torch.randn(10, 32), agent.wm.rssm.sample(torch.randn(10, 16))
    metrics = agent.ac.train_step(agent.wm, h, z, torch.zeros(10, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(wm_before, agent.wm.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, agent.ac.actor.parameters()))
    assert all(p.grad is None for p in agent.wm.parameters())
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())


def grads_of(module, output):
    module.zero_grad()
    output.square().sum().backward()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("channels,norm", [(1, False), (3, False), (1, True)])
def test_encoder_and_decoder_compute_what_their_plain_layers_compute(channels, norm):
    """The encoder's space-to-depth first conv and patch-matmul last conv, the decoder's 1x1 transposed conv as a
    matmul and its sub-pixel last layer: same weights, same outputs and same gradients as running the modules' own
    layers in sequence (the encoder also with v3's channel norm)."""
    torch.manual_seed(0)
    encoder, decoder = da.ConvEncoder(channels, 4, norm), da.ConvDecoder(24, channels, 4)
    obs, feat = torch.randn(3, channels, 64, 64), torch.randn(3, 24)
    plain_decoder = lambda: decoder.net(decoder.linear(feat)[..., None, None])
    for module, fast, plain in [(encoder, lambda: encoder(obs), lambda: encoder.net(obs)),
                                (decoder, lambda: decoder(feat), plain_decoder)]:
        out, ref = fast(), plain()
        assert out.shape == ref.shape and out.std() > 0.01
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        got, want = grads_of(module, fast()), grads_of(module, plain())
        assert got.keys() == want.keys()
        for name in want:  # with the norm the gradients reach ~40 and round-off ~4e-5 (the code before, too)
            atol = 1e-5 * (max(1.0, want[name].abs().max().item()) if norm else 1.0)
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=name)


def test_optimizer_step_is_adam_with_decoupled_decay_on_matrices_only():
    """The first step of `make_optimizer`'s (fused) Adam, by hand: the bias-corrected moments are g and g^2, so each
    weight moves by -lr * g / (|g| + eps); weight matrices are first multiplied by 1 - wd (DreamerV2), vectors not."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    opt = da.make_optimizer(layer.parameters(), lr=0.01, weight_decay=0.1, eps=1e-5)
    layer(torch.randn(7, 5)).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    opt.step()
    step = {name: 0.01 * g / (g.abs() + 1e-5) for name, g in grads.items()}
    torch.testing.assert_close(layer.weight.detach(), before["weight"] * 0.9 - step["weight"])
    torch.testing.assert_close(layer.bias.detach(), before["bias"] - step["bias"])


@pytest.mark.parametrize("preset", ["v2", "v3"])
def test_heads_on_prior_trains_the_reward_head_through_the_prior(tiny_args, preset):
    """--heads-on-prior adds reward and continue terms on [z ~ prior, h]: their gradient reaches the prior network,
    which the posterior's heads never touch (the prior learns only through the KL there)."""
    batch = random_batch(terminal_rate=0.2)
    grads = {}
    for on in [False, True]:
        torch.manual_seed(0)
        agent = da.Dreamer(da.validate(tiny_args(preset=preset, heads_on_prior=on)), (1, 64, 64), 4,
                           torch.device("cpu"))
        _, _, _, _, metrics = agent.wm.loss(batch, agent.train_state)
        (metrics["losses/reward"] + metrics["losses/continue"]).backward()
        grads[on] = sum(p.grad.abs().sum() for p in agent.wm.rssm.prior_net.parameters() if p.grad is not None)
        assert ("losses/reward_prior" in metrics) == on and ("losses/continue_prior" in metrics) == on
    assert grads[False] == 0 and grads[True] > 0


@pytest.mark.parametrize("preset", ["v2", "v3"])
def test_replay_value_loss_is_the_critic_loss_on_hand_computed_replay_returns(tiny_args, preset):
    """--repval-scale: with a critic that outputs the same everywhere, the loss is its loss on lambda-returns of the
    replayed rewards, computed here by hand with each preset's conventions; a terminal and an episode start inside
    the sequence both cut the return, and v3 sets no target on an episode's last state. Its gradient reaches the
    features that have a target (not the last, which only bootstraps) and never the critic's own weights."""
    torch.manual_seed(0)
    args = da.validate(tiny_args(preset=preset, repval_scale=0.3))
    ac = da.Dreamer(args, (1, 64, 64), 4, torch.device("cpu")).ac
    batch = random_batch()
    batch["terminated"][0, 2] = batch["is_first"][0, 3] = True  # a terminal, then the next episode, as stored
    batch["is_first"][1, 5] = True  # a time limit: a new episode with no terminal before it
    out = ac.critic[-1]
    with torch.no_grad():  # v3 zero-initializes it, which would leave no gradient to check
        out.weight.normal_(0, 0.1)
    feats = torch.randn(4, 8, ac.critic[0].in_features, requires_grad=True)
    ac.replay_value_loss(feats, batch).backward()
    targeted = torch.ones(4, 7, dtype=torch.bool)
    if preset == "v3":  # no target on an episode's last state: z_2 of row 0 (terminal) and z_4 of row 1
        targeted[0, 2] = targeted[1, 4] = False
    assert torch.equal(feats.grad[:, :-1].norm(dim=-1).gt(0), targeted) and feats.grad[:, -1].eq(0).all()
    assert all(p.grad is None for p in ac.critic.parameters())

    with torch.no_grad():
        out.weight.zero_()
        out.bias.copy_(torch.randn_like(out.bias))
    ac.slow_critic.load_state_dict(ac.critic.state_dict())
    c = ac.value(ac.critic, feats[:1, :1].detach()).item()
    gamma, lam = args.gamma, args.return_lambda
    reward, term, first = batch["reward"].tolist(), batch["terminated"].tolist(), batch["is_first"].tolist()
    expected = []
    for b in range(4):
        keep = [(1 - term[b][t]) * (1 - (first[b][t + 1] if t < 7 else 0)) for t in range(8)]
        returns = [c]  # R_7 = v(z_7)
        for t in reversed(range(7)):
            if preset == "v2":  # the step into z_t earns tanh(r_t); z_t's own flags decide whether it goes on
                returns.append(math.tanh(reward[b][t]) + gamma * keep[t] * ((1 - lam) * c + lam * returns[-1]))
            else:  # the step from z_t earns r_{t+1}; z_{t+1}'s flags decide
                returns.append(reward[b][t + 1] + gamma * keep[t + 1] * ((1 - lam) * c + lam * returns[-1]))
        expected.append(returns[:0:-1])  # R_0 .. R_6
    target = torch.tensor(expected).T.contiguous()  # (T-1, B)
    if preset == "v2":
        want = (0.5 * (c - target) ** 2).mean()
    else:
        ends = torch.tensor([[first[b][t + 1] for b in range(4)] for t in range(7)], dtype=torch.float32)
        want = ((1 - ends) * da.twohot_nll(out.bias.detach().expand(7, 4, -1), target)).mean()
    torch.testing.assert_close(ac.replay_value_loss(feats.detach(), batch), want)


def test_replay_value_loss_joins_the_world_model_update_only_when_asked(tiny_args):
    for scale in [0.0, 0.3]:
        torch.manual_seed(0)
        agent = da.Dreamer(da.validate(tiny_args(repval_scale=scale)), (1, 64, 64), 4, torch.device("cpu"))
        metrics = agent.train_step(random_batch(terminal_rate=0.2))
        assert ("losses/replay_value" in metrics) == (scale > 0)
        assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("preset", ["v2", "v3"])
def test_constant_reward_loss_is_the_reward_loss_of_the_best_constant_prediction(tiny_args, preset):
    """losses/reward_constant: a reward head that outputs one constant scores no lower reward loss (`head_losses`)
    than it, and the best constant scores it exactly (v2: the mean of tanh(r); v3: the mean two-hot target)."""
    torch.manual_seed(0)
    wm = da.WorldModel(da.validate(tiny_args(preset=preset)), (1, 64, 64), 3)
    batch = dict(reward=torch.tensor([[0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 2.0, 0.0]]), terminated=torch.zeros(2, 4))
    feat = torch.randn(2, 4, wm.rssm.feat_dim)
    out = wm.reward_head[-1]

    def loss(c):  # the reward loss of a head whose output is the constant c (its last layer's bias alone)
        with torch.no_grad():
            out.weight.zero_(), out.bias.copy_(c)
        return wm.head_losses(feat, batch)[0].detach()

    constant = wm.constant_reward_loss(batch["reward"])
    if preset == "v2":
        best = torch.tanh(batch["reward"]).mean()
    else:
        best = da.twohot(da.symlog(batch["reward"]), da.twohot_bins("cpu")).flatten(0, 1).mean(0).clamp(min=1e-30).log()
    torch.testing.assert_close(loss(best), constant)
    for shift in [0.1, -0.3]:
        worse = best + shift * torch.randn(best.shape) if preset == "v3" else best + shift
        assert loss(worse) > constant
    assert constant > 0 and wm.constant_reward_loss(torch.zeros(2, 4)) == 0


@pytest.mark.parametrize("preset", ["v2", "decoder-free"])
def test_reward_scale_weighs_the_reward_term_and_nothing_else(tiny_args, preset):
    """--reward-scale s: the world-model loss is the default one plus (s - 1) x the reward loss, on the same
    weights, batch and random draws, and the reward head's gradient is s times the default one."""
    def run(scale):
        torch.manual_seed(0)
        agent = da.Dreamer(da.validate(tiny_args(preset=preset, reward_scale=scale)), (1, 64, 64), 4,
                           torch.device("cpu"))
        torch.manual_seed(1)
        loss, _, _, _, metrics = agent.wm.loss(random_batch(), agent.train_state)
        loss.backward()
        return loss.detach(), metrics["losses/reward"].detach(), agent.wm.reward_head[-1].bias.grad.clone()

    base, reward, grad = run(1.0)
    scaled, reward_again, grad_scaled = run(10.0)
    torch.testing.assert_close(reward_again, reward)
    assert reward > 0.1
    torch.testing.assert_close(scaled, base + 9.0 * reward)
    torch.testing.assert_close(grad_scaled, 10.0 * grad)
    assert grad.abs().sum() > 0
