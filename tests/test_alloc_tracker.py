"""The allocation tracker on real CPU tensors: exact parameter/gradient/optimizer bytes, the bytes
autograd saves, and the CPU allocator's own peak (profiler allocation events)."""

from __future__ import annotations

import torch

from lowmem_rlhf.measure import counting
from lowmem_rlhf.measure.alloc_tracker import AllocTracker, cpu_allocator_peak
from lowmem_rlhf.model.random_models import tiny_llama_config


def _tiny(dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def test_weights_gradients_optimizer_exact():
    model = _tiny()
    ids = torch.randint(0, 1000, (2, 32))
    with AllocTracker() as tr:
        expected = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
        assert tr.register_module(model, "weights") == expected
        with tr.tag("forward"):
            loss = model(input_ids=ids, labels=ids).loss
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: tr.retag(q.grad, "gradients"))
        with tr.tag("backward"):
            loss.backward()
        with tr.tag("optimizer"):
            opt = torch.optim.AdamW(model.parameters(), foreach=False)
            opt.step()
    assert tr.by_tag["gradients"] == counting.grad_bytes(model)
    # exp_avg + exp_avg_sq exactly; AdamW's scalar `step` tensors are built from Python data (no
    # op runs, so no dispatch sees them) and on CUDA they stay on the host anyway
    n = len(list(model.parameters()))
    assert tr.by_tag["optimizer"] == counting.optimizer_state_bytes(opt) - 4 * n
    assert tr.by_tag["optimizer"] == 2 * sum(p.numel() * 4 for p in model.parameters())
    del loss
    model.zero_grad(set_to_none=True)
    assert tr.by_tag["gradients"] == 0  # freed when the storage died


def test_saved_for_backward_bytes():
    model = _tiny()
    ids = torch.randint(0, 1000, (2, 32))
    with AllocTracker() as tr:
        tr.register_module(model, "weights")
        tr.register(ids, "inputs")  # the embedding saves its index tensor
        with counting.SavedTensorCounter(model) as saved, tr.tag("forward"):
            out = model(input_ids=ids, labels=ids)
        kept = tr.by_tag["forward"] - tr.bytes_of([out.logits, out.loss]) + tr.bytes_of([ids])
    assert saved.bytes > 0
    assert kept == saved.bytes, (kept, saved.bytes)


def test_peak_equals_cpu_allocator_peak():
    model = _tiny()
    ids = torch.randint(0, 1000, (2, 64))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    step()  # warm-up: lazily built buffers
    model.zero_grad(set_to_none=True)

    def tracked():
        with AllocTracker() as tr:
            step()
        return tr

    real_peak, tr = cpu_allocator_peak(tracked)
    assert tr.peak > 1_000_000
    assert abs(tr.peak - real_peak) <= 0.01 * real_peak, (tr.peak, real_peak)


def test_phases_and_paused_peak():
    with AllocTracker() as tr:
        with tr.phase("a"):
            x = torch.empty(1000)  # 4000 B
            y = torch.empty(500)
            del y
        with tr.phase("b"), tr.paused_peak():
            z = torch.empty(10_000)
            del z
        with tr.phase("b"):
            w = torch.empty(100)
    assert tr.phases["a"].peak == 6000 and tr.phases["a"].end == 4000
    assert tr.phases["b"].peak == 4400  # the paused 40 kB spike does not count
    assert tr.live == 4400
    del x, w
    assert tr.live == 0
