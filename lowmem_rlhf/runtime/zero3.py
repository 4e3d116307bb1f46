"""Train ONE adapter of a `SharedBase` under DeepSpeed ZeRO-3 with parameter + optimizer offload.

One process, no launcher: `single_process_env()` fills in RANK/WORLD_SIZE/... (else DeepSpeed
falls back to MPI discovery) and starts a gloo (CPU) or nccl (CUDA) process group of size 1.
Under `torchrun --nproc_per_node N` it joins the launched world (`runtime.distributed`): the
partitions are then spread over the N ranks, and DeepSpeed averages the adapter's gradients
(tests/test_distributed.py: 2 CPU processes equal one with twice the batch).

What is partitioned: every parameter of the model (the frozen 16-bit base, all adapters, heads)
becomes a ZeRO-3 parameter after `deepspeed.initialize` (post-hoc `zero.Init` of a built model);
with `offload_param` its storage (`param.ds_tensor`) lives in CPU RAM and is gathered onto the
device module by module during forward and backward (hooks on every submodule;
`stage3_param_persistence_threshold` 0: nothing stays resident, LoRA and norms included). The
optimizer (DeepSpeedCPUAdam, AdamW mode) only holds the trained adapter's LoRA A/B (+ its head
copy). Host RAM measured (scripts/zero3_cpu_vs_estimate.py): the base's partitions at its dtype
(exactly 2 B/param in bf16) plus 24 B per trained parameter: its own fp32 partition, a gradient
partition in the parameter dtype, the fp32 master, the fp32 gradient, exp_avg and exp_avg_sq.

Load the base on the CPU (not `device_map=cuda`) when the point is that it does not fit the GPU:
DeepSpeed moves each parameter to the device, partitions it and sends the partition back to the
host one parameter at a time; batches go to `trainer.device`.

Precision: DeepSpeed's bf16/fp16 mode is left OFF on purpose. It would cast every parameter,
LoRA and head included, to 16 bits (the plain-torch path keeps adapters in fp32 and only the base
in 16 bits). Without it the module keeps the dtypes it was loaded with (bf16 base, fp32 adapters)
and the arithmetic is the plain-torch loop's: same forward, same AdamW (betas, eps, weight decay),
the same `warmup_cosine` schedule, global-norm clipping at 1.0.

Forward passes must go through `Zero3Trainer.forward(fn, *args)`: DeepSpeed starts its backward
bookkeeping (ZeRO-3 `backward_prologue`) from hooks it puts on the outputs of `engine(...)`; the
stage helpers (`completion_loss`, `pair_scores`) call submodules directly, so the trainer wraps the
model in a one-line module whose forward calls `fn` and hands that module to DeepSpeed.

Loop (see `Zero3Trainer`):

    trainer = Zero3Trainer(shared, "sft", lr=lr, total_steps=S, warmup_steps=W,
                           micro_batch=mb, grad_accum=accum)
    for step in range(S):
        for chunk in micro_batches:
            loss, _ = trainer.forward(completion_loss, shared, batch)
            trainer.backward(loss / n_tokens)          # no extra 1/accum scaling
        stats = trainer.step()                         # clip + AdamW + schedule; grad_norm, lr
    trainer.save_adapter(out / "adapter", extra_meta)  # gathers the partitioned adapter first

Batches go to `trainer.device`. Evaluation: `trainer.eval()`, `trainer.forward(...)` under
torch.no_grad(), `trainer.train()`.

PPO (two trained adapters) is deliberately not supported: see scripts/zero3_ppo_equivalence.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from lowmem_rlhf.runtime.optim import warmup_cosine

ADAMW_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, as make_optimizer uses them
ADAMW_EPS = 1e-8
CLIP_NORM = 1.0  # the stage loops' clip_grad_norm_(..., 1.0)
_ENV_DEFAULTS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type() -> str:
    """The device DeepSpeed's accelerator will run on: "cuda" or "cpu"."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return "cuda" if name == "cuda" else "cpu"


def single_process_env(backend: str | None = None) -> str:
    """Make this process a world of one and start its process group (idempotent); under a launcher
    (torchrun: WORLD_SIZE > 1) join the launched world instead: DeepSpeed then partitions the
    model over its ranks and averages the adapter's gradients across them.

    Sets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free port)
    where unset, then `deepspeed.init_distributed` with gloo on the CPU or nccl on CUDA and MPI
    discovery off. Returns the backend in use."""
    import deepspeed

    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device_type() == "cpu":
        _skip_shm_comm_build()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_backend()  # a launched world: runtime.distributed joined it
    backend = backend or ("nccl" if device_type() == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return backend


def _skip_shm_comm_build() -> None:
    """On the CPU accelerator, DeepSpeed's comm backend compiles a shared-memory all-reduce op at
    init_distributed (~50 s of CPU on a cold cache). Mark the op unavailable: DeepSpeed then uses
    torch.distributed (gloo) as it does whenever the op cannot be built (one process never
    all-reduces; a launched CPU world all-reduces the adapter's gradients only, a few MB)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


def ds_config(micro_batch: int, grad_accum: int, lr: float, weight_decay: float = 0.0,
              pin_memory: bool = False, clip: float = CLIP_NORM, mixed_precision: str | None = None,
              reduce_bucket: int | None = None, max_live: int | None = None) -> dict:
    """ZeRO-3 with parameter and optimizer offload to CPU RAM, AdamW as torch's defaults.

    `pin_memory` only means something on CUDA (page-locked host buffers for faster copies; they
    count in host RAM and cannot be swapped). `mixed_precision` ("bf16"/"fp16") turns on
    DeepSpeed's own mixed precision, which casts *all* parameters (adapters too) to 16 bits; the
    default None keeps the loaded dtypes (see the module docstring).

    Device-memory bounds (DeepSpeed's defaults are sized for full fine-tuning of big models):
    `reduce_bucket` (elements) sizes the gradient bucket that ZeRO-3 allocates *on the device* with
    contiguous_gradients; the default 5e8 is 1.9 GiB of fp32 for any model, even a LoRA of 5M
    parameters: pass the trainable element count. `max_live` (elements) caps the gathered
    parameters kept on the device (default 1e9 = 2 GiB in bf16, also the reuse distance and,
    halved, the prefetch bucket): pass 2 x the largest layer/embedding, the estimator's figure."""
    offload = {"device": "cpu", "pin_memory": bool(pin_memory)}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "gradient_clipping": float(clip),
        "optimizer": {"type": "AdamW", "params": {"lr": float(lr), "betas": list(ADAMW_BETAS), "eps": ADAMW_EPS,
                                                  "weight_decay": float(weight_decay)}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": dict(offload),
            "offload_optimizer": dict(offload),
            "contiguous_gradients": True,
            "overlap_comm": False,
            # every parameter partitioned and offloaded, however small (the default keeps params
            # under 1e5 elements resident on the device, e.g. norms and LoRA A/B)
            "stage3_param_persistence_threshold": 0,
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    zo = cfg["zero_optimization"]
    if reduce_bucket:
        zo["reduce_bucket_size"] = int(min(5e8, max(1, reduce_bucket)))
    if max_live:
        zo["stage3_max_live_parameters"] = int(max_live)
        zo["stage3_max_reuse_distance"] = int(max_live)
        zo["stage3_prefetch_bucket_size"] = int(max(1, max_live // 2))
    if mixed_precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif mixed_precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    elif mixed_precision is not None:
        raise ValueError(mixed_precision)
    return cfg


class _Call(torch.nn.Module):
    """The module DeepSpeed wraps: holds the model, and its forward runs any function of it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


class Zero3Trainer:
    """One trained adapter of `shared` (LoRA A/B + its head copy) under ZeRO-3 offload.

    `forward(fn, *args)` runs `fn(*args)` (e.g. `completion_loss(shared, batch)`) through the
    DeepSpeed engine; `backward(loss)` once per micro-batch, `grad_accum` times; then `step()`
    (clip to `clip`, AdamW, `warmup_cosine` schedule) returns {"grad_norm", "lr"}."""

    resumable = False  # DeepSpeed's partitioned optimizer state is not in our checkpoints yet
    elastic = False  # the micro-batch and accumulation are fixed in the engine's config

    def __init__(self, shared, adapter: str, *, lr: float, total_steps: int, warmup_steps: int = 0,
                 micro_batch: int = 1, grad_accum: int = 1, weight_decay: float = 0.0,
                 pin_memory: bool | None = None, mixed_precision: str | None = None,
                 scheduler: Callable | None = None, config: dict | None = None):
        import deepspeed

        single_process_env()
        self.shared, self.adapter = shared, adapter
        self.grad_accum = int(grad_accum)
        shared.use(adapter)
        params = shared.parameters_of(adapter)
        if not params:
            raise ValueError(f"adapter {adapter!r} has no parameters")
        for n, p in shared.model.named_parameters():
            if p.requires_grad and not any(p is q for q in params):
                raise ValueError(f"{n} requires grad but is not part of adapter {adapter!r}: "
                                 "one trained adapter per engine (see zero3_ppo_equivalence.py)")
        self.names = {id(p): n for n, p in shared.model.named_parameters() if p.requires_grad}
        if pin_memory is None:
            pin_memory = bool(shared.profile.offload_pin_memory) and device_type() == "cuda"
        self.config = config or ds_config(micro_batch, grad_accum, lr, weight_decay, pin_memory,
                                          mixed_precision=mixed_precision,
                                          reduce_bucket=sum(p.numel() for p in params),
                                          max_live=_max_live(shared.model))
        self.module = _Call(shared.model)
        if scheduler is None:
            def scheduler(opt):
                return warmup_cosine(opt, total_steps, warmup_steps)
        self.ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, model_parameters=params, config=self.config, lr_scheduler=scheduler)
        self.params = params
        self._micro = 0

    # ---- the loop ---------------------------------------------------------------------------
    def forward(self, fn: Callable, *args, last: bool = True, **kwargs):
        """`fn(*args, **kwargs)` through the engine (ZeRO-3 gathers each submodule's parameters);
        `last` is the trainer interface's (DeepSpeed counts its own accumulation boundary)."""
        if self.shared.active != self.adapter:
            raise RuntimeError(f"adapter {self.shared.active!r} is active; this engine trains {self.adapter!r}")
        return self.ds_engine(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch, `loss` already scaled as the plain loop scales it."""
        if self._micro >= self.grad_accum:
            raise RuntimeError(f"{self._micro + 1} backward passes before step(); grad_accum={self.grad_accum}")
        self.ds_engine.backward(loss, scale_wrt_gas=False)
        self.shared.abandon()  # the checkpointed forward has had its backward (adapters.py guard)
        self._micro += 1
        if self._micro < self.grad_accum:
            self.ds_engine.step()  # a micro-step: DeepSpeed only advances its accumulation counter

    def step(self, fault: tuple[str, int, int] | None = None) -> dict:
        """Optimizer + scheduler step at the accumulation boundary (DeepSpeed handles overflow
        itself: "skipped" is False; `fault` is not injected here: ZeRO-3 stops on out-of-memory)."""
        if self._micro != self.grad_accum:
            raise RuntimeError(f"step() after {self._micro} backward passes; grad_accum={self.grad_accum}")
        self.ds_engine.step()
        self._micro = 0
        norm = self.ds_engine.get_global_grad_norm()
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": self.lr, "skipped": False}

    def reset(self) -> None:
        """Nothing to undo that a retry could use: ZeRO-3 runs stop on out-of-memory (see oom.py)."""
        self.shared.abandon()

    def checkpoint_parts(self) -> None:
        return None

    def offloaded_bytes(self) -> int:
        """Host bytes DeepSpeed holds: the offloaded model, adapter and optimizer (pinned buffers aside)."""
        return sum(v for k, v in self.cpu_buffers().items() if k != "pinned")

    @property
    def device(self) -> torch.device:
        """Where batches go (the compute device; parameters are gathered onto it)."""
        return torch.device(self.ds_engine.device)

    @property
    def lr(self) -> float:
        return float(self.ds_engine.get_lr()[0])

    def train(self) -> None:
        self.ds_engine.train()

    def eval(self) -> None:
        self.ds_engine.eval()

    # ---- weights ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self, params=None):
        """Full (unpartitioned) tensors of `params` (default: the trained adapter) inside the block."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params if params is not None else self.params),
                                               modifier_rank=None):
            yield

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained adapter's parameters (full tensors, CPU copies), keyed by parameter name."""
        with self.gathered():
            return {self.names[id(p)]: p.detach().to("cpu", copy=True) for p in self.params}

    def save_adapter(self, out_dir: str | Path, extra_meta: dict | None = None) -> Path:
        """`SharedBase.save_adapter` with the partitioned adapter gathered first (by every rank of
        a launched world: the gather is collective; rank 0 alone writes)."""
        from lowmem_rlhf.runtime.distributed import world

        with self.gathered():
            if not world().main:
                return Path(out_dir)
            return self.shared.save_adapter(self.adapter, out_dir, extra_meta=extra_meta)

    # ---- memory -----------------------------------------------------------------------------
    def cpu_buffers(self) -> dict[str, int]:
        """Bytes of CPU tensors DeepSpeed holds, by kind (each storage counted once):

        * `param_partitions`: every parameter's ZeRO-3 partition (`ds_tensor`): the offloaded model,
          in its own dtype, padded per parameter; the adapters' live inside the flat buffer below.
        * `optimizer_states`: DeepSpeedCPUAdam's exp_avg + exp_avg_sq (fp32).
        * `fp32_master`: the fp32 flat partition the optimizer steps (with offload_optimizer).
        * `fp32_grads`: the fp32 gradient partition kept on the CPU for the optimizer.
        * `grad_partitions`: the flat gradient partition in the parameters' dtype
          (`grad_partitions_flat_buffer`, where backward's reduced gradients land).
        * `other_optimizer_buffers`: every other CPU tensor reachable from the ZeRO-3 optimizer.
        * `pinned`: how many of all these bytes are page-locked (CUDA only)."""
        seen: set[int] = set()
        out = {"param_partitions": 0, "optimizer_states": 0, "fp32_master": 0, "fp32_grads": 0,
               "grad_partitions": 0, "other_optimizer_buffers": 0, "pinned": 0}

        def add(kind: str, t) -> None:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                return
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in seen:
                return
            seen.add(key)
            out[kind] += st.nbytes()
            if t.is_pinned():
                out["pinned"] += st.nbytes()

        opt = self.ds_engine.optimizer
        for t in getattr(opt, "fp32_partitioned_groups_flat", []):
            add("fp32_master", t)
            add("fp32_grads", t.grad)
        for state in self.ds_engine.basic_optimizer.state.values():
            for v in state.values():
                add("optimizer_states", v)
        for p in self.shared.model.parameters():
            add("param_partitions", getattr(p, "ds_tensor", None))
        add("grad_partitions", getattr(opt, "grad_partitions_flat_buffer", None))
        for v in _tensors_in(opt.__dict__, depth=3):
            add("other_optimizer_buffers", v)
        return out


def _max_live(model: torch.nn.Module) -> int:
    """2 x the elements of the largest decoder layer or embedding-like parameter (gathered params
    in flight: the current module and the prefetched one)."""
    from lowmem_rlhf.plan.model_spec import find_decoder_layers

    try:
        layer = max(sum(p.numel() for p in blk.parameters()) for blk in find_decoder_layers(model))
    except Exception:  # no recognisable decoder stack: leave DeepSpeed's default
        return 0
    largest = max(p.numel() for p in model.parameters())
    return 2 * max(layer, largest)


def _tensors_in(obj, depth: int):
    """Tensors reachable through dicts/lists/tuples and object attributes, to a small depth."""
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
        return
    if depth <= 0:
        return
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth - 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth - 1)


__all__ = ["single_process_env", "ds_config", "device_type", "Zero3Trainer"]
