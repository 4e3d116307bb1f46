"""PPO's idle optimizer state in host RAM (issue 15): only the updating role's optimizer state is on
the device; moved off and back, the update is bit for bit the one with the state resident. The
estimator and the simulation charge the state to the phase that holds it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.algo.experience import Experience, logprobs_of, response_hidden
from lowmem_rlhf.algo.ppo import ppo_update
from lowmem_rlhf.algo.roles import Roles, attach_roles
from lowmem_rlhf.config import PPOConfig, Shape, load_profile
from lowmem_rlhf.model.adapters import SharedBase, disable_dropout
from lowmem_rlhf.model.loading import load_model
from lowmem_rlhf.plan.estimator import estimate, optimizer_bytes, trainable_tensors
from lowmem_rlhf.plan.model_spec import load_spec
from lowmem_rlhf.runtime.oom import MicroBatch
from lowmem_rlhf.runtime.optim import OptimizerParking, make_optimizer, parks


def _experience(eng: SharedBase, B=8, P=6, R=5) -> Experience:
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(3, 259, (B, P + R), generator=g)
    m = torch.ones(B, R)
    mask = torch.ones(B, P + R, dtype=torch.long)
    with torch.no_grad():
        eng.use("actor")
        old = logprobs_of(eng, response_hidden(eng, seqs, mask, P), seqs[:, P:])
        eng.use("critic")
        values = eng.scalar(response_hidden(eng, seqs, mask, P))
    return Experience(seqs, mask, seqs[:, P:], m, [], [], None, logprobs=old - 0.1, values=values,
                      advantages=torch.randn(B, R, generator=g), returns=values + torch.randn(B, R, generator=g))


def _run(model: Path, optimizer: str, park: bool, tmp: Path):
    """Two PPO updates (the second uses the state the first made) of actor and critic."""
    torch.manual_seed(0)  # the critic adapter's initialisation
    prof = replace(load_profile("lora-bf16-shared"), dtype="fp32", lora_r=8, micro_batch=4, optimizer=optimizer)
    eng = SharedBase(load_model(str(model), prof), prof, seed=0)
    attach_roles(eng, None)
    disable_dropout(eng.model)
    exp = _experience(eng)
    opts = {}
    for role in ("actor", "critic"):
        eng.use(role)
        opts[role] = make_optimizer(eng.parameters_of(role), optimizer, lr=1e-2)
    parking = OptimizerParking(opts, enabled=park)
    seen = []  # at each optimizer step: (role stepping, its state bytes parked, the other's)
    for role, other in (("actor", "critic"), ("critic", "actor")):
        opts[role].register_step_pre_hook(lambda *a, r=role, o=other: seen.append(
            (r, parking.parked_bytes(r), parking.parked_bytes(o))))
    roles = Roles({r: eng for r in ("actor", "critic", "reward", "reference")})
    cfg = PPOConfig(ppo_epochs=1, minibatches=2)
    mb = MicroBatch(4, "ppo", tmp, prof.name, knob="", elastic=False)
    for it in (1, 2):
        ppo_update(roles, exp, cfg, opts, {}, mb, it, torch.Generator().manual_seed(it), parking=parking)
    params = {n: p.detach().clone() for n, p in eng.model.named_parameters() if p.requires_grad}
    states = {r: {k: v.clone() if isinstance(v, torch.Tensor) else v for s in o.state.values()
                  for k, v in s.items()} for r, o in opts.items()}
    return params, states, seen, parking


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_parked_optimizer_state_gives_the_same_update(byte_llama, tmp_path, optimizer):
    p0, s0, _, _ = _run(byte_llama, optimizer, False, tmp_path)
    p1, s1, seen, parking = _run(byte_llama, optimizer, True, tmp_path)
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in p1.items() if "lora_B" in k)  # it trained
    for r in s0:
        assert s0[r].keys() == s1[r].keys()
        for k in s0[r]:
            a, b = s0[r][k], s1[r][k]
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), (r, k)
    # 2 updates x 2 minibatches x (actor, critic); from the second update on, the other role's
    # state was parked at every step and the stepping role's was home
    assert [r for r, _, _ in seen] == ["actor", "critic"] * 4
    assert all(mine == 0 for _, mine, _ in seen) and all(other > 0 for _, _, other in seen[1:])
    state = optimizer_bytes(*trainable_tensors(load_spec(str(byte_llama)), replace(
        load_profile("lora-bf16-shared"), lora_r=8)), optimizer)
    assert parking.parked_bytes("actor") >= state * 0.9  # everything but AdamW's step counters


def test_the_estimator_and_the_simulation_charge_parked_state_to_its_own_update(tiny_llama):
    """lora-bf16-shared (torch AdamW, not paged) on CUDA: no optimizer state in generation and
    scoring, the actor's in the actor update and the critic's in the critic update, the rest in
    host RAM; the paged 8-bit profile keeps it paged. The meta-device rehearsal agrees per phase."""
    from lowmem_rlhf.measure.simulate import simulate

    spec = load_spec(str(tiny_llama))
    shape = Shape(prompt_len=64, response_len=16, rollout_batch=4)
    prof = replace(load_profile("lora-bf16-shared"), micro_batch=2)
    assert parks(prof.optimizer, "cuda") and not parks("paged_adamw_8bit", "cuda") and not parks("adamw", "cpu")
    est = {p.name: p for p in estimate(spec, prof, "ppo", shape).phases}
    actor = optimizer_bytes(*trainable_tensors(spec, prof), "adamw")
    assert est["generation"].components["optimizer"] == est["scoring"].components["optimizer"] == 0
    assert est["actor_update"].components["optimizer"] == actor
    assert est["critic_update"].components["optimizer"] > actor  # + the value head's state
    assert est["generation"].host == actor + est["critic_update"].components["optimizer"]
    cpu = {p.name: p for p in estimate(spec, prof, "ppo", shape, target="cpu").phases}
    assert cpu["generation"].components["optimizer"] > 0  # on the CPU the host is the device
    sim = simulate(str(tiny_llama), prof, "ppo", shape)
    tags = {p.name: p.by_tag for p in sim.phases}
    assert tags["generation"].get("optimizer", 0) == tags["scoring"].get("optimizer", 0) == 0
    assert tags["actor_update"]["optimizer"] == pytest.approx(actor, rel=0.01)
    for ph in sim.phases:
        assert abs(ph.drift) <= 0.10, (ph.name, ph.drift)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the device <-> pinned host move")
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_parking_on_cuda_holds_the_state_in_pinned_host_memory(optimizer):
    """On a GPU: parked, the state is in pinned host memory and none of it on the device; three
    steps with the state parked between them equal three steps with it resident, bit for bit."""
    def steps(park: bool):
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(512, 64, device="cuda")) for _ in range(3)]
        opt = make_optimizer(ws, optimizer, lr=1e-2, device="cuda")
        parking = OptimizerParking({"a": opt}, enabled=park)
        for i in range(3):
            torch.manual_seed(i)
            with parking.active("a"):
                for w in ws:
                    w.grad = torch.randn_like(w)
                opt.step()
            if park:
                moved = [v for s in opt.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.numel() > 1]
                assert moved and all(v.device.type == "cpu" and v.is_pinned() for v in moved)
        return [w.detach().clone() for w in ws]

    assert all(torch.equal(a, b) for a, b in zip(steps(False), steps(True)))
