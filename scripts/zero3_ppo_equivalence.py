"""Can PPO's two trained adapters (actor, critic) share one DeepSpeed ZeRO-3 engine?

docs/pitfalls.md #4: adapter switching on one DeepSpeed engine gave updates diverging from plain
torch. This script measures it. Same base, seed and data; each PPO-like iteration does, as
lowmem_rlhf/stages/ppo.py does: actor active -> `accum` micro-batch backward passes -> clip(actor, 1.0)
-> actor AdamW step; critic active -> `accum` backward passes -> clip(critic, 1.0) -> critic step.
(Losses: next-token cross-entropy for the actor, MSE of the scalar head for the critic; the PPO
math does not matter here, the optimizer/engine mechanics do.)

Variants, each compared with the plain-torch run (two torch AdamW, one per adapter):
  a1  one engine, both adapters in its optimizer, built while the actor is active (peft's
      set_adapter has frozen the critic: requires_grad False at deepspeed.initialize)
  a2  one engine, both adapters in its optimizer, requires_grad forced True on both at
      initialize (so ZeRO-3 registers gradient hooks for both), set_adapter between roles
  b   one engine per trained adapter, both on the same shared model (two deepspeed.initialize)
  c   one engine per trained adapter, each on its own copy of the base (the actor's base carries
      the reference = adapters off; the critic's base its own copy: 2x the base in CPU RAM)

Prints, per variant and adapter: max |w - w_torch| after N iterations, the same relative to the
torch update, and how far each adapter moved. Usage:
  .venv/bin/python scripts/zero3_ppo_equivalence.py [--model PATH] [--iters 4] [--accum 2]
(default model: a 4-layer random Llama built in a temp folder; --model smollm2-135m for the real one)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zero3_common import build, zero3_profile  # noqa: E402

from lowmem_rlhf.runtime.zero3 import _Call, ds_config, single_process_env  # noqa: E402

ROLES = ("actor", "critic")


def make_shared(model, prof, seed):
    shared = build(model, prof, "actor", with_head=False, seed=seed)
    shared.add_adapter("critic", with_head=True)
    shared.use("actor")
    return shared


def make_data(vocab: int, iters: int, accum: int, mb: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(iters):
        micro = []
        for _ in range(accum):
            ids = torch.randint(3, min(vocab, 250), (mb, seq), generator=g)
            target = torch.randn(mb, generator=g)
            micro.append((ids, target))
        out.append(micro)
    return out


def role_loss(shared, role, ids, target):
    am = torch.ones_like(ids)
    h = shared.hidden_states(ids, am)
    if role == "actor":
        logits = shared.logits(h[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return F.mse_loss(shared.scalar(h[:, -1]), target)


def adapter_state(shared, role, gather=False):
    params = [(n, p) for n, p in shared.model.named_parameters() if _belongs(n, role)]
    if gather:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def _belongs(n, role):
    from lowmem_rlhf.model.adapters import _belongs as b

    return b(n, role)


def run_torch(model, prof, data, lr, seed):
    shared = make_shared(model, prof, seed)
    init = {r: adapter_state(shared, r) for r in ROLES}
    opts = {}
    for r in ROLES:
        shared.use(r)
        opts[r] = torch.optim.AdamW(shared.parameters_of(r), lr=lr, weight_decay=0.0)
    torch.manual_seed(seed + 1)
    for micro in data:
        for r in ROLES:
            shared.use(r)
            for ids, target in micro:
                shared.backward(role_loss(shared, r, ids, target) / len(micro))
            torch.nn.utils.clip_grad_norm_(shared.parameters_of(r), 1.0)
            opts[r].step()
            opts[r].zero_grad(set_to_none=True)
    return init, {r: adapter_state(shared, r) for r in ROLES}


def run_one_engine(model, prof, data, lr, seed, force_grad: bool):
    import deepspeed

    single_process_env()
    shared = make_shared(model, prof, seed)
    init = {r: adapter_state(shared, r) for r in ROLES}
    params = []
    for r in ROLES:
        params += [p for n, p in shared.model.named_parameters() if _belongs(n, r)]
    if force_grad:
        for p in params:
            p.requires_grad_(True)
    accum = len(data[0])
    module = _Call(shared.model)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params,
                                      config=ds_config(len(data[0][0][0]), accum, lr))
    torch.manual_seed(seed + 1)
    for micro in data:
        for r in ROLES:
            shared.use(r)
            for ids, target in micro:
                loss = engine(role_loss, shared, r, ids, target)
                engine.backward(loss / len(micro), scale_wrt_gas=False)
                shared._pending = None
                engine.step()  # boundary after `accum` micro-steps: one update of the whole optimizer
    return init, {r: adapter_state(shared, r, gather=True) for r in ROLES}


def run_two_engines(model, prof, data, lr, seed):
    import deepspeed

    single_process_env()
    shared = make_shared(model, prof, seed)
    init = {r: adapter_state(shared, r) for r in ROLES}
    accum = len(data[0])
    engines = {}
    for r in ROLES:
        shared.use(r)  # only this adapter requires grad while its engine is built
        params = [p for n, p in shared.model.named_parameters() if _belongs(n, r)]
        engines[r], *_ = deepspeed.initialize(model=_Call(shared.model), model_parameters=params,
                                              config=ds_config(len(data[0][0][0]), accum, lr))
    torch.manual_seed(seed + 1)
    for micro in data:
        for r in ROLES:
            shared.use(r)
            eng = engines[r]
            for ids, target in micro:
                loss = eng(role_loss, shared, r, ids, target)
                eng.backward(loss / len(micro), scale_wrt_gas=False)
                shared._pending = None
                eng.step()
    return init, {r: adapter_state(shared, r, gather=True) for r in ROLES}


def run_two_bases(model, prof, data, lr, seed):
    import deepspeed

    single_process_env()
    bases = {r: make_shared(model, prof, seed) for r in ROLES}  # identical inits of both adapters
    init = {r: adapter_state(bases[r], r) for r in ROLES}
    accum = len(data[0])
    engines = {}
    for r in ROLES:
        bases[r].use(r)
        params = bases[r].parameters_of(r)
        engines[r], *_ = deepspeed.initialize(model=_Call(bases[r].model), model_parameters=params,
                                              config=ds_config(len(data[0][0][0]), accum, lr))
    torch.manual_seed(seed + 1)
    for micro in data:
        for r in ROLES:
            shared, eng = bases[r], engines[r]
            for ids, target in micro:
                loss = eng(role_loss, shared, r, ids, target)
                eng.backward(loss / len(micro), scale_wrt_gas=False)
                shared._pending = None
                eng.step()
    return init, {r: adapter_state(bases[r], r, gather=True) for r in ROLES}


def compare(name, ref, init, got):
    for r in ROLES:
        diff = max(float((got[r][k] - ref[r][k]).abs().max()) for k in ref[r])
        moved_ref = max(float((ref[r][k] - init[r][k]).abs().max()) for k in ref[r])
        moved = max(float((got[r][k] - init[r][k]).abs().max()) for k in ref[r])
        num = sum(float((got[r][k] - ref[r][k]).pow(2).sum()) for k in ref[r])
        den = sum(float((ref[r][k] - init[r][k]).pow(2).sum()) for k in ref[r])
        print(f"{name:<4} {r:<7} max|w - w_torch| {diff:.3e}   update mismatch {((num / den) ** 0.5):.3e}   "
              f"moved {moved:.3e} (torch moved {moved_ref:.3e})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default="a1,a2,b,c")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = args.model
    if model is None:
        from lowmem_rlhf.model.random_models import save_random, tiny_llama_config

        model = str(save_random(tiny_llama_config(), tempfile.mkdtemp(prefix="tiny-llama-")))
    elif model == "smollm2-135m":
        model = None
    prof = zero3_profile("fp32")
    data = make_data(49152 if args.model == "smollm2-135m" else 1000, args.iters, args.accum,
                     args.micro_batch, args.seq, seed=0)
    init, ref = run_torch(model, prof, data, args.lr, seed=0)
    print(f"model {args.model or 'tiny-llama (random)'}  iters {args.iters}  accum {args.accum}  lr {args.lr}  fp32")
    runs = {"a1": lambda: run_one_engine(model, prof, data, args.lr, 0, force_grad=False),
            "a2": lambda: run_one_engine(model, prof, data, args.lr, 0, force_grad=True),
            "b": lambda: run_two_engines(model, prof, data, args.lr, 0),
            "c": lambda: run_two_bases(model, prof, data, args.lr, 0)}
    for v in args.variants.split(","):
        try:
            i2, got = runs[v]()
            assert all(torch.equal(i2[r][k], init[r][k]) for r in ROLES for k in init[r]), "different init"
            compare(v, ref, init, got)
        except Exception as e:  # report and go on with the next variant
            print(f"{v:<4} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            traceback.print_exc(limit=3)


if __name__ == "__main__":
    main()
