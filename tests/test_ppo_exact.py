"""Exact on-policy PPO: the update's forward is the rollout's, its log-probs are those of the
distribution that was sampled, its gradient does not depend on the micro-batch size.
Real tiny models on CPU; each test fails without the fix it names."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.algo import ppo_math as M
from lowmem_rlhf.algo.experience import (
    Experience,
    adjust_scores,
    entropy_of,
    generate,
    generate_in_chunks,
    logprobs_at_sampling,
    logprobs_of,
    response_hidden,
    stop_ids,
)
from lowmem_rlhf.algo.ppo import accumulate, actor_loss, critic_loss
from lowmem_rlhf.algo.roles import attach_roles
from lowmem_rlhf.config import PPOConfig, load_profile
from lowmem_rlhf.data import bundled_path
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.adapters import SharedBase, disable_dropout
from lowmem_rlhf.model.loading import load_model, logit_transform
from lowmem_rlhf.model.random_models import save_random, tiny_llama_config
from lowmem_rlhf.stages.ppo import run_ppo

ASSETS = Path(__file__).parent / "assets"
REWARDS = ASSETS / "rewards.py"
PROMPTS = str(bundled_path("demo-prompts.jsonl"))


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """Tiny Llama over the byte vocabulary, with large logits (initializer_range 0.2)."""
    cfg = tiny_llama_config()
    cfg.vocab_size, cfg.initializer_range = 260, 0.2
    return save_random(cfg, tmp_path_factory.mktemp("byte-llama-exact"))


def _fp32_profile():
    return replace(load_profile("lora-bf16-shared"), dtype="fp32", lora_r=8, micro_batch=4)


@pytest.mark.slow
def test_first_minibatch_ratio_is_one_with_the_shipped_profile(byte_llama, tmp_path):
    """Shipped qlora-shared (LoRA dropout 0.05 in the YAML, checkpointing on), KL on, sampling at
    temperature 0.7: in every iteration the first minibatch, before any step of that iteration,
    has ratio 1 (the rollout's scoring and the update run the same forward, on the distribution
    that was sampled) and nothing clipped. Iterations 2+ matter: the actor's LoRA B is 0 in
    iteration 1, where dropout on its input changes nothing."""
    temperature = 0.7
    prof = load_profile("qlora-shared")
    assert prof.lora_dropout == 0.05 and prof.grad_ckpt
    run_ppo(PPOConfig(model=str(byte_llama), prompts=PROMPTS, out=tmp_path, profile=replace(prof, micro_batch=4),
                      iterations=3, rollout_batch=8, prompt_len=48, response_len=6, ppo_epochs=2, lr=1e-2,
                      reward=f"{REWARDS}:ascii_share", temperature=temperature, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["first_max_abs_log_ratio"] < 1e-5, r
        assert r["first_clip_frac"] == 0.0 and r["first_vf_clip_frac"] == 0.0, r
    assert rows[-1]["approx_kl"] > 0  # the policy did move within iterations
    saved = json.loads((tmp_path / "ppo" / "config.json").read_text())
    assert saved["profile"]["lora_dropout"] == 0.0  # the resolved config says what ran


def test_disable_dropout_turns_off_every_dropout(tiny_gpt2):
    """GPT-2 has residual/embedding dropout (0.1) besides LoRA's: all become identities."""
    prof = replace(load_profile("lora-bf16-shared"), dtype="fp32")
    eng = SharedBase(load_model(str(tiny_gpt2), prof), prof)
    eng.add_adapter("actor")
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in eng.model.modules())
    assert disable_dropout(eng.model) > 0
    assert all(m.p == 0 for m in eng.model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.randint(3, 200, (2, 12))
    eng.model.train()
    a, b = eng.hidden_states(ids, None), eng.hidden_states(ids, None)
    assert torch.equal(a, b)


def test_logprobs_follow_the_sampling_temperature(byte_llama):
    """logprobs_of at T equals log_softmax(model logits / T): the distribution generate samples."""
    prof = _fp32_profile()
    eng = SharedBase(load_model(str(byte_llama), prof, training=False), prof)
    ids = torch.randint(3, 259, (2, 10))
    with torch.no_grad():
        logits = eng.loaded.model(input_ids=ids).logits[:, 4:-1].double()
        h = response_hidden(eng, ids, torch.ones_like(ids), 5)
        for t in (1.0, 0.7):
            ours = logprobs_of(eng, h, ids[:, 5:], t)
            ref = torch.log_softmax(logits / t, -1).gather(-1, ids[:, 5:, None]).squeeze(-1)
            assert (ours.double() - ref).abs().max() < 1e-4, t
        assert (logprobs_of(eng, h, ids[:, 5:], 0.7) - logprobs_of(eng, h, ids[:, 5:], 1.0)).abs().max() > 1e-2


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_log_probs_kept_at_sampling_equal_the_scoring_forward(byte_llama, temperature, top_p):
    """Issue 17: on an fp32 model the rollout's old log-probs and entropies come from the sampler
    instead of a second actor forward. They equal the scoring forward's (`logprobs_of`,
    `entropy_of`) on every response token within 1e-5, at any temperature and top-p, also when
    the rollout is sampled in chunks; the tokens are the ones sampled without recording.
    Within 1e-4, not bit for bit: the sampler's logits come through the KV cache, whose float
    rounding differs from one forward over the whole sequence (measured here: 3.4e-5 nats at
    most, logits up to 12.6; the scoring forward itself matches `log_softmax(model(...).logits)`
    within 3.3e-6, and any batch split of the scoring forward exactly).
    `--no-sampler-logprobs` keeps the scoring forward (ratio 1 within 1e-5: the test above).""" 
    prof = replace(_fp32_profile(), lora_dropout=0.0)
    eng = SharedBase(load_model(str(byte_llama), prof), prof)
    eng.add_adapter("actor")
    with torch.no_grad():  # a non-zero LoRA: the actor differs from the base
        for n, p in eng.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    assert logprobs_at_sampling(eng)
    tok = eng.loaded.tokenizer
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 7, 12)]
    seeds = [11, 12, 13, 14]
    plain = generate(eng, prompts, tok, 8, temperature, top_p, seeds=seeds)
    kept = generate_in_chunks(eng, prompts, tok, 8, temperature, top_p, 2, seeds=seeds, record=True)
    assert plain.logprobs is None and torch.equal(kept.response, plain.response)
    P, m = kept.seqs.shape[1] - 8, kept.response_mask.bool()
    eng.model.eval()
    with torch.no_grad():
        h = response_hidden(eng, kept.seqs, kept.mask, P)
        lp, ent = logprobs_of(eng, h, kept.response, temperature), entropy_of(eng, h, temperature)
    assert m.sum() > 8
    assert (kept.logprobs - lp)[m].abs().max() < 1e-4
    assert (kept.entropy - ent)[m].abs().max() < 1e-4
    assert kept.logprobs[m].max() < 0 and kept.entropy[m].min() > 0


def test_log_probs_are_not_kept_where_sampling_rounds_differently(byte_llama, tmp_path):
    """16-bit and 4-bit bases compute the sampler's logits in 16 bits (up to 0.04 nats off): the
    scoring forward stays. So does a generation config that changes the logits first."""
    bf16 = replace(load_profile("lora-bf16-shared"), lora_r=8)
    eng = SharedBase(load_model(str(byte_llama), bf16), bf16)
    eng.add_adapter("actor")
    assert not logprobs_at_sampling(eng)
    prof = _fp32_profile()
    eng = SharedBase(load_model(str(byte_llama), prof), prof)
    eng.add_adapter("actor")
    assert logprobs_at_sampling(eng)
    eng.loaded.model.generation_config.repetition_penalty = 1.3
    assert not logprobs_at_sampling(eng)


@pytest.mark.slow
def test_fp32_ppo_skips_the_actor_scoring_forward_and_stays_on_policy(byte_llama, tmp_path):
    """An fp32 PPO run takes old log-probs from the sampler: the actor runs once for generation
    and once per update minibatch, never in scoring; the first minibatch's ratio is 1 within the
    KV cache's rounding (1e-4, the test above) with nothing clipped, in every iteration (KL on,
    temperature 0.7). With --no-sampler-logprobs the actor's scoring forward is back (one more
    activation per iteration) and the ratio is 1 within 1e-5."""
    for kept in (True, False):
        out = tmp_path / str(kept)
        run_ppo(PPOConfig(model=str(byte_llama), prompts=PROMPTS, out=out, profile=_fp32_profile(),
                          iterations=3, rollout_batch=8, prompt_len=48, response_len=6, ppo_epochs=2, lr=1e-2,
                          reward=f"{REWARDS}:ascii_share", temperature=0.7, progress=False, sampler_logprobs=kept))
        rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
        for r in rows:  # generation + (scoring: 2 micro-batches of 4) + 2 epochs x 1 minibatch
            assert r["forwards_actor"] == 1 + (0 if kept else 2) + 2, r
            assert r["first_max_abs_log_ratio"] < (1e-4 if kept else 1e-5), r
            assert r["first_clip_frac"] == 0.0, r
        assert rows[-1]["approx_kl"] > 0


def _tiny_gemma2(folder: Path, softcap: float) -> Path:
    from transformers import Gemma2Config

    cfg = Gemma2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       final_logit_softcapping=softcap, attn_logit_softcapping=50.0, sliding_window=64,
                       initializer_range=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return save_random(cfg, folder)


def test_logprobs_go_through_the_models_softcapping(tmp_path):
    """Gemma-2 softcaps its final logits (cap * tanh(z / cap)): our chunked log-probs equal
    log_softmax(model(...).logits), the model's own output, within 1e-4."""
    folder = _tiny_gemma2(tmp_path / "gemma2", softcap=3.0)
    prof = replace(_fp32_profile(), attn_impl="eager")  # Gemma-2's attention softcapping has no SDPA path
    eng = SharedBase(load_model(str(folder), prof, training=False), prof)
    assert logit_transform(eng.loaded.model.config) == (1.0, 3.0)
    ids = torch.randint(3, 259, (2, 12))
    with torch.no_grad():
        logits = eng.loaded.model(input_ids=ids).logits[:, 5:-1].double()
        assert logits.abs().max() <= 3.0  # the cap is in the model's own output
        ours = logprobs_of(eng, response_hidden(eng, ids, torch.ones_like(ids), 6), ids[:, 6:])
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 6:, None]).squeeze(-1)
    assert (ours.double() - ref).abs().max() < 1e-4


def test_logit_scales_are_read_and_unknown_maps_refused():
    from transformers import CohereConfig, GraniteConfig, LlamaConfig

    assert logit_transform(CohereConfig(logit_scale=0.0625)) == (0.0625, None)
    assert logit_transform(GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    assert logit_transform(LlamaConfig()) == (1.0, None)
    odd = LlamaConfig()
    odd.lm_head_multiplier = 0.5
    with pytest.raises(UserError, match="lm_head_multiplier=0.5"):
        logit_transform(odd)


def _experience(eng: SharedBase, B=8, P=6, R=5, seed=0, kl_loss_coef=0.0) -> Experience:
    """A rollout of random tokens with ragged response lengths, scored by the actor itself; with
    kl_loss_coef, reference log-probs and the actor loss's k3 term (--kl-penalty loss)."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(3, 259, (B, P + R), generator=g)
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    m = (torch.arange(R)[None] < lengths[:, None]).float()
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), m.long()], 1)
    with torch.no_grad():
        eng.use("actor")
        old = logprobs_of(eng, response_hidden(eng, seqs, mask, P), seqs[:, P:])
        eng.use("critic")
        values = eng.scalar(response_hidden(eng, seqs, mask, P))
    adv = torch.randn(B, R, generator=g) * m
    return Experience(seqs, mask, seqs[:, P:], m, [], [], None, logprobs=old - 0.3 * torch.rand(B, R, generator=g),
                      values=values, advantages=adv, returns=values + torch.randn(B, R, generator=g),
                      ref_logprobs=old - torch.rand(B, R, generator=g), kl_loss_coef=kl_loss_coef)


@pytest.mark.parametrize("loss_of,role,kl", [(actor_loss, "actor", 0.0), (critic_loss, "critic", 0.0),
                                             (actor_loss, "actor", 0.5)], ids=["actor", "critic", "actor-kl-loss"])
def test_gradient_does_not_depend_on_the_micro_batch(byte_llama, loss_of, role, kl):
    """Ragged responses, fp32: the accumulated gradient at micro-batch 1 equals the one at
    micro-batch 4 (and at 8, one pass) within 1e-5: the loss is a token mean over the whole
    minibatch. (Weighting micro-batch token means by rows, as before, differs by ~1e-2.) The same
    with the KL in the actor's loss (--kl-penalty loss), whose term moves the gradient, at
    micro-batches 2 and 4 (see below for 1)."""
    prof = _fp32_profile()
    eng = SharedBase(load_model(str(byte_llama), prof), prof, seed=0)
    attach_roles(eng, None)
    disable_dropout(eng.model)
    with torch.no_grad():  # a nonzero actor, so the gradient reaches both LoRA factors
        for n, p in eng.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    exp = _experience(eng, kl_loss_coef=kl)
    cfg = PPOConfig(clip=0.2, vf_clip=0.2)
    chunk = list(range(8))
    grads = {}
    for size in (1, 2, 4, 8):
        eng.use(role)
        for p in eng.parameters_of(role):
            p.grad = None
        accumulate(eng, exp, chunk, size, 1, loss_of, cfg)
        grads[size] = torch.cat([p.grad.flatten() for p in eng.parameters_of(role)])
    assert grads[8].abs().max() > 1e-4
    # With the KL term micro-batch 1 is left out: batch-1 kernels' fp32 rounding alone puts it 8e-6
    # to 1.7e-5 from micro-batch 8 (measured over 4 seeded draws; without the term 4e-6 to 1.4e-5,
    # so the plain cases' 1e-5 there holds for the draw this test gets in the suite's order, not
    # for every draw). Micro-batches 2 and 4: at most 1e-6 either way.
    for size in ((2, 4) if kl else (1, 4)):
        diff = float((grads[size] - grads[8]).abs().max())
        assert diff < 1e-5, (size, diff, float(grads[8].abs().max()))
    if kl:  # the term is in the gradient: without it the step differs
        eng.use(role)
        for p in eng.parameters_of(role):
            p.grad = None
        accumulate(eng, replace(exp, kl_loss_coef=0.0), chunk, 8, 1, loss_of, cfg)
        plain = torch.cat([p.grad.flatten() for p in eng.parameters_of(role)])
        assert (plain - grads[8]).abs().max() > 1e-4


def _values_at_update_run(model: Path, tmp: Path, later: bool, B=8, P=6, R=5) -> dict:
    """make_experience + two PPO epochs of one minibatch (micro-batches of 4, checkpointing on, KL
    in the reward, whitening on) on a fixed rollout with ragged responses, from seeded nonzero
    actor and critic adapters (a fresh critic's head is 0: its values would all be 0)."""
    from lowmem_rlhf.algo.experience import Rollout, make_experience
    from lowmem_rlhf.algo.ppo import ppo_update
    from lowmem_rlhf.algo.rewards import RewardSet
    from lowmem_rlhf.algo.roles import Roles
    from lowmem_rlhf.runtime.oom import MicroBatch
    from lowmem_rlhf.runtime.optim import make_optimizer

    torch.manual_seed(0)  # the critic adapter's initialisation
    prof = replace(_fp32_profile(), grad_ckpt=True)
    eng = SharedBase(load_model(str(model), prof), prof, seed=0)
    attach_roles(eng, None)
    disable_dropout(eng.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in eng.model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.05, generator=g)
    seqs = torch.randint(3, 259, (B, P + R), generator=g)
    m = (torch.arange(R)[None] < torch.randint(1, R + 1, (B,), generator=g)[:, None]).float()
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), m.long()], 1)
    ro = Rollout(seqs, mask, seqs[:, P:], m, ["p"] * B, ["t"] * B, torch.ones(B, dtype=torch.bool))
    scores = torch.randn(B, generator=g).tolist()
    rewards = RewardSet({"reward": lambda prompts, texts: scores}, False, {"reward": 1.0})
    roles = Roles({r: eng for r in ("actor", "critic", "reward", "reference")})
    cfg = PPOConfig(ppo_epochs=2, minibatches=1, values_at_update=later)
    mb = MicroBatch(4, "ppo", tmp, prof.name, knob="", elastic=False)
    exp = make_experience(roles, lambda size: ro, cfg, 0.05, rewards, mb, mb, 1)
    pending = exp.values_pending
    opts = {}
    for role in ("actor", "critic"):
        eng.use(role)
        opts[role] = make_optimizer(eng.parameters_of(role), "adamw", lr=1e-2)
    def adapters() -> dict[str, torch.Tensor]:  # every adapter's weights and heads
        return {n: p.detach().clone() for n, p in eng.model.named_parameters() if "lora_" in n or "modules_to_save" in n}

    before = adapters()
    stats = ppo_update(roles, exp, cfg, opts, {}, mb, 1, torch.Generator().manual_seed(1))
    return {"pending": pending, "values": exp.values, "advantages": exp.advantages, "returns": exp.returns,
            "before": before, "after": adapters(),
            "critic_entries": roles.entries["critic"], "stats": stats, "mask": m}


def test_critic_values_taken_at_its_update_give_the_same_ppo_step(byte_llama, tmp_path):
    """--values-at-update (the default with one minibatch per epoch): the critic does not run in
    scoring; its first update forward, at the rollout's parameters, gives the old values, and the
    critic steps before the actor. Against a scoring forward (--no-values-at-update), from the
    same adapters and rollout, fp32: the same values, advantages and returns, the same actor and
    critic parameters after two epochs (within 1e-5: an eval-mode no-grad forward against a
    train-mode checkpointed one), one critic activation fewer, nothing value-clipped in the first
    minibatch."""
    at_update = _values_at_update_run(byte_llama, tmp_path / "update", True)
    scoring = _values_at_update_run(byte_llama, tmp_path / "scoring", False)
    assert at_update["pending"] and not scoring["pending"]
    # 2 epochs of one step (+ scoring: 2 micro-batches of 4)
    assert at_update["critic_entries"] == 2 and scoring["critic_entries"] == 4
    m = scoring["mask"].bool()
    assert scoring["values"][m].std() > 1e-2 and scoring["advantages"][m].std() > 0.5  # not trivial
    for k in ("values", "advantages", "returns"):
        diff = float((at_update[k] - scoring[k]).abs().max())
        assert diff < 1e-5, (k, diff)
    for role in ("actor", "critic"):  # each stepped
        moved = max(float((scoring["after"][n] - scoring["before"][n]).abs().max()) for n in scoring["after"]
                    if f".{role}." in n)
        assert moved > 1e-3, role
    assert at_update["before"].keys() == scoring["before"].keys()
    for n in scoring["after"]:
        assert torch.equal(at_update["before"][n], scoring["before"][n]), n
        diff = float((at_update["after"][n] - scoring["after"][n]).abs().max())
        assert diff < 1e-5, (n, diff)
    assert float(at_update["stats"]["first_vf_clip_frac"]) == 0.0


def test_logsoftmax_is_fp32_on_a_bf16_model(byte_llama):
    """bf16 weights, logits of magnitude ~10-30: the log-probs are within 1e-3 nats of an fp64
    reference from the same hidden states (16-bit logits would be off by up to ~0.1)."""
    prof = replace(load_profile("lora-bf16-shared"), lora_r=8)
    eng = SharedBase(load_model(str(byte_llama), prof, training=False), prof)
    ids = torch.randint(3, 259, (4, 16))
    with torch.no_grad():
        h = response_hidden(eng, ids, torch.ones_like(ids), 6)
        assert h.dtype == torch.bfloat16
        ours = logprobs_of(eng, h, ids[:, 6:])
        w = eng.loaded.model.get_output_embeddings().weight
        logits = h.double() @ w.double().t()
        assert logits.abs().max() > 8
        ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 6:, None]).squeeze(-1)
        bf16 = torch.log_softmax((h @ w.t()).float(), -1).gather(-1, ids[:, 6:, None]).squeeze(-1)
    assert (ours.double() - ref).abs().max() < 1e-3
    assert (bf16.double() - ref).abs().max() > 1e-3  # what the fp32 product avoids


def test_generation_stops_at_every_eos_id_of_the_generation_config(byte_llama):
    """A second EOS id in generation_config (Llama-3's <|eot_id|>) ends the response there."""
    prof = _fp32_profile()
    loaded = load_model(str(byte_llama), prof, training=False)
    eng, tok = SharedBase(loaded, prof), loaded.tokenizer
    prompt = [tok("hello there")["input_ids"]]
    free = generate(eng, prompt, tok, 8, 1.0, 1.0, greedy=True)
    eot = int(free.response[0, 2])
    assert eot not in free.response[0, :2].tolist() and eot != tok.eos_token_id
    eng.loaded.model.generation_config.eos_token_id = [tok.eos_token_id, eot]
    assert stop_ids(eng.loaded.model, tok) == [tok.eos_token_id, eot]
    ro = generate(eng, prompt, tok, 8, 1.0, 1.0, greedy=True)
    assert ro.response_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert bool(ro.ended[0]) and not bool(free.ended[0]) or tok.eos_token_id in free.response[0].tolist()


def test_missing_eos_penalty_and_reward_norm():
    cfg = PPOConfig(missing_eos_penalty=0.5)
    got = adjust_scores(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, False, False]), cfg, None)
    assert got.tolist() == [1.0, 0.5, -0.5]
    assert adjust_scores(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), PPOConfig(), None).tolist() == [1, 1]
    rm = M.RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 12.0])
    first = rm.normalize(a)
    assert abs(float(first.mean())) < 1e-6 and abs(float(first.std(unbiased=False)) - 1) < 1e-5
    rm.normalize(b)
    both = torch.cat([a, b]).double()
    assert abs(rm.mean - float(both.mean())) < 1e-9 and abs(rm.var - float(both.var(unbiased=False))) < 1e-9
    assert M.RunningMoments(**rm.state_dict()).state_dict() == rm.state_dict()


def test_reward_scale_divides_by_the_running_std_and_keeps_zero_at_zero():
    """--reward-scale: scores / running std, the mean kept. A rollout whose scores are all 0 (no
    answer right) stays at 0, where --reward-norm would make every response of it negative
    (measured on the demo: -0.4 to -0.8 per response, and the policy collapsed to echoing the
    question, held-out answers containing the answer 39 -> 2)."""
    cfg = PPOConfig(reward_scale=True)
    scale = M.RunningMoments()
    first = adjust_scores(torch.tensor([0.0, 1.0, 0.0, 1.0]), None, cfg, scale)
    assert first.tolist() == pytest.approx([0.0, 2.0, 0.0, 2.0])  # std 0.5 (biased), mean kept
    zeros = adjust_scores(torch.zeros(4), None, cfg, scale)
    assert zeros.tolist() == [0.0] * 4
    norm = M.RunningMoments()
    adjust_scores(torch.tensor([0.0, 1.0, 0.0, 1.0]), None, PPOConfig(reward_norm=True), norm)
    assert (adjust_scores(torch.zeros(4), None, PPOConfig(reward_norm=True), norm) < 0).all()


def test_the_estimator_charges_the_log_prob_block_the_code_uses():
    from lowmem_rlhf.plan.estimator import LOGPROB_VOCAB_CHUNK

    assert LOGPROB_VOCAB_CHUNK == M.VOCAB_CHUNK
