"""PPO math against values computed by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem_rlhf.algo.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_estimate,
    masked_mean,
    policy_loss,
    shaped_rewards,
    token_entropy,
    token_logprobs,
    token_mean,
    value_loss,
    whiten,
)


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_logprobs_equal_full_softmax_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 8, generator=g, requires_grad=True)
    w = torch.randn(37, 8, generator=g, requires_grad=True)
    b = torch.randn(37, generator=g)
    y = torch.tensor([0, 36, 5, 5, 20])
    full = torch.log_softmax(h @ w.t() + b, -1).gather(-1, y[:, None]).squeeze(-1)
    got = token_logprobs(h, w, y, bias=b, vocab_chunk=chunk)
    assert torch.allclose(got, full, atol=1e-5)
    gh, gw = torch.autograd.grad(full.sum(), (h, w))
    gh2, gw2 = torch.autograd.grad(got.sum(), (h, w))
    assert torch.allclose(gh, gh2, atol=1e-5) and torch.allclose(gw, gw2, atol=1e-5)
    p = torch.softmax(h @ w.t() + b, -1)
    assert torch.allclose(token_entropy(h.detach(), w.detach(), b, vocab_chunk=chunk), -(p * p.log()).sum(-1), atol=1e-5)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))  # log 0.5 - log 0.25
    # r = 0.25/0.5 = 0.5: (r - 1) - log r = -0.5 + 0.693147
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


def test_kl_controllers():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 256/10000)
    assert c.value == pytest.approx(0.100512)
    c.update(current_kl=3.0, n_steps=256)  # error -0.5 clipped to -0.2
    assert c.value == pytest.approx(0.100512 * (1 - 0.2 * 256 / 10000))
    f = FixedKLController(0.05)
    f.update(100.0, 1000)
    assert f.value == 0.05


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    r = shaped_rewards(scores, kl, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]]))


def test_gae_by_hand():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)  # Monte-Carlo: return 1 everywhere
    assert torch.allclose(ret, torch.ones(1, 3)) and torch.allclose(adv, torch.full((1, 3), 0.5))
    # gamma 0.9, lam 0.5: d2 = 1 - .5 = .5; d1 = .9*.5 - .5 = -.05, A1 = -.05 + .45*.5 = .175;
    # d0 = -.05, A0 = -.05 + .45*.175 = .02875
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.02875, 0.175, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.52875, 0.675, 1.0]]))
    # a padded row: the episode ends at the last real token; values past it are ignored
    adv, _ = gae(torch.tensor([[0.0, 1.0, 99.0]]), torch.tensor([[0.5, 0.5, 7.0]]), torch.tensor([[1.0, 1, 0]]),
                 gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.175, 0.5, 0.0]]))


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1, 1, 0]])
    w = whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5)  # unbiased std of 1,2,3 is 1
    assert w[0, 3] == 0


def test_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.ones(1, 2)
    out = policy_loss(logp, old, adv, torch.ones(1, 2), clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5
    assert out.loss.item() == pytest.approx(-0.85)
    assert out.clip_frac.item() == pytest.approx(0.5)
    # k3: (1.5 - 1 - ln 1.5 + 0.5 - 1 - ln 0.5) / 2
    assert out.approx_kl.item() == pytest.approx((0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 2)


def test_clipped_surrogate_flags_exactly_the_tokens_whose_gradient_the_clip_removes_and_grpo_shares_it():
    """The clip flag is what the gradient says (zero there, non-zero elsewhere), for both signs of
    the advantage; PPO's and GRPO's losses are the same surrogate (token mean, no KL)."""
    from lowmem_rlhf.algo.grpo_math import group_policy_loss
    from lowmem_rlhf.algo.ppo_math import clipped_surrogate

    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 6, generator=g, dtype=torch.float64)
    logp = (old + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)[:, None].expand(4, 6)
    per_token, ratio, _, clipped = clipped_surrogate(logp, old, adv, 0.2)
    per_token.sum().backward()
    assert clipped.any() and (~clipped).any()
    assert (logp.grad[clipped] == 0).all() and (logp.grad[~clipped] != 0).all()
    assert torch.equal(clipped, (ratio > 1.2) & (adv > 0) | (ratio < 0.8) & (adv < 0))
    mask = torch.ones(4, 6, dtype=torch.float64)
    ppo = policy_loss(logp, old, adv, mask, clip=0.2)
    grpo = group_policy_loss(logp, old, None, adv[:, 0], mask, 0.2, 0.0, "token", mask.sum())
    assert ppo.loss.item() == pytest.approx(grpo.loss.item(), abs=1e-12)
    assert ppo.clip_frac.item() == grpo.clip_frac.item() == clipped.double().mean().item()


def test_policy_loss_with_the_kl_in_it_adds_the_k3_term_by_hand():
    """--kl-penalty loss: each token adds kl_coef x k3, with k3 = r - 1 - ln r, r = p_ref / p. Its
    gradient pulls the log-prob toward the reference's: d/dlogp = 1 - r, 0 at the reference. A
    padded token with an extreme log-prob stays out (no inf x 0)."""
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.0, math.log(0.5), -200.0]], requires_grad=True)
    ref = torch.tensor([[0.0, math.log(0.25), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.zeros(1, 3)
    out = policy_loss(logp, old, adv, mask, clip=0.2, tokens=2.0, ref_logp=ref, kl_coef=0.5)
    # token 1 at the reference: k3 = 0; token 2: r = 0.5, k3 = 0.5 - 1 - ln 0.5 = 0.193147
    assert out.loss.item() == pytest.approx(0.5 * 0.193147 / 2, abs=1e-6)
    out.loss.backward()
    # d/dlogp of 0.5 x k3 / 2 tokens: 0.25 x (1 - r) = 0.125 on token 2; 0 at the reference and on the pad
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.125, 0.0], abs=1e-6)
    plain = policy_loss(logp.detach(), old, adv, mask, clip=0.2, tokens=2.0)
    assert plain.loss.item() == 0.0  # without it: the surrogate alone, 0 at zero advantages
    # kl_coef 0: the clipped surrogate alone, min(r, clip(r)) at advantage 1
    assert torch.allclose(policy_loss(logp.detach(), old, adv + 1, mask, 0.2, 2.0, ref, 0.0).loss,
                          token_mean(-torch.exp(logp.detach() - old).clamp(max=1.2), mask, 2.0))


def test_value_loss_by_hand():
    loss, frac = value_loss(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), clip=0.2)
    # clipped value 1.2: max((1.5-2)^2, (1.2-2)^2) = 0.64, times 0.5
    assert loss.item() == pytest.approx(0.32) and frac.item() == 1.0
