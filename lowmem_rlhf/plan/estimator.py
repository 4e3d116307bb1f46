"""Peak-memory estimate of each stage, in bytes per component, before any weight is loaded.

Pure arithmetic over a `ModelSpec`, a `Profile` and a `Shape`. Each term follows what the code that
will run actually keeps (transformers 5 + peft + bitsandbytes, validated against counted tensors on
CPU in tests/test_estimator_counted.py):

* weights: 16-bit params at 2 B; NF4/FP4 at 4 bits + one fp32 absmax per 64 weights (4.5 bits), with
  double quantization 8-bit absmax + fp32 per 256 blocks (4.127 bits); int8 at 1 B + fp32 scale per
  row. Only decoder-layer linears are quantized: embeddings, the output layer and norms stay 16-bit,
  or fp32 when peft's k-bit preparation upcasts them (`kbit_fp32_upcast`).
* adapters: LoRA A (r x in) and B (out x r) per targeted linear, fp32 (peft upcasts adapters).
* activations: what autograd saves. Per decoder layer: each RMSNorm keeps an fp32 copy of its input;
  each LoRA'd linear keeps its fp32-cast input (twice with dropout: the mask and the dropped input),
  the base 16-bit/4-bit linears keep nothing (frozen weights); SDPA keeps q, k, v, the output and an
  fp32 log-sum-exp (no seq^2 term); a gated MLP keeps gate, act(gate) and up.
  With gradient checkpointing only each layer's input is kept, and one layer is recomputed at a time.
* logits: the loss upcasts logits to fp32 and log-softmax keeps its fp32 output; backward adds the
  fp32 gradient. KV cache: 2 x layers x kv_heads x head_dim x tokens x batch x bytes.

Three GPU figures: `allocated` (torch.cuda.max_memory_allocated), `reserved` (allocator reserve on
top) and `device` (nvidia-smi: + CUDA context + paged optimizer state, which lives in unified memory
outside the torch allocator), plus CPU RAM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lowmem_rlhf.config import (
    CRITIC_FREE,
    GIB,
    RL_STAGES,
    STAGES,
    GRPOConfig,
    Profile,
    Shape,
)
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.plan.model_spec import LinearSpec, ModelSpec

GRPO_BETA = next(f.default for f in dataclasses.fields(GRPOConfig) if f.name == "beta")  # its KL weight's default
# Why the zero3-offload profile never runs PPO; the planner, the estimator and the CLI all say this.
ZERO3_PPO_REASON = ("PPO does not run under ZeRO-3: with actor and critic adapters on one DeepSpeed engine the "
                    "critic never moved and the actor took twice torch's update "
                    "(scripts/zero3_ppo_equivalence.py; docs/pitfalls.md #4)")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Overheads outside the arithmetic above. Sources: docs/pitfalls.md (published measurements).
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # context + cuBLAS/cuDNN kernels: 0.3-1.4 GB seen; 0.6 typical
ALLOCATOR_RESERVE = 0.10  # reserved runs 3-20% above allocated
PROCESS_RAM_BYTES = int(1.0 * GIB)  # python + torch + transformers + peft + bitsandbytes, imported
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer state below this many elements
BNB_OPT_BLOCK = 256  # 8-bit optimizer state: one fp32 absmax per 256 elements
NF4_BLOCK = 64
DQ_BLOCK = 256

# Bytes autograd keeps per element of the MLP's intermediate activation, by activation function.
# Gated (SwiGLU): gate, act(gate), up. GPT-2's gelu_new is written in Python ops: x, tanh(...),
# 0.5*x and 1+tanh(...). relu keeps its output; gelu (erf) and fused tanh-gelu keep their input.
MLP_SAVED_TENSORS = {"gated": 3, "gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2, "relu": 1, "gelu": 1,
                     "gelu_pytorch_tanh": 1, "silu": 2, "swish": 2}


@dataclass
class Phase:
    """Memory of one phase (a training step, generation, ...) in bytes by component."""

    name: str
    components: dict[str, int]  # inside the torch allocator
    paged: int = 0  # outside the torch allocator on the GPU (paged optimizer state)
    cpu_offload: int = 0  # host RAM held by ZeRO-3 offload (params, optimizer, pinned buffers)
    target: str = "cuda"
    host: int = 0  # host RAM of the optimizer step's undo copy (runtime.optim.StepUndo)

    @property
    def allocated(self) -> int:
        return sum(self.components.values())

    @property
    def reserved(self) -> int:
        return int(self.allocated * (1 + ALLOCATOR_RESERVE))

    @property
    def device(self) -> int:
        if self.target != "cuda":
            return 0
        return self.reserved + CUDA_CONTEXT_BYTES + self.paged

    @property
    def cpu_ram(self) -> int:
        base = PROCESS_RAM_BYTES + self.cpu_offload + self.host
        if self.target == "cuda":
            return base
        return base + self.allocated + self.paged

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocated_gib": self.allocated / GIB,
            "reserved_gib": self.reserved / GIB,
            "device_gib": self.device / GIB,
            "cpu_ram_gib": self.cpu_ram / GIB,
            "components": dict(self.components),
            "paged_bytes": self.paged,
            "cpu_offload_bytes": self.cpu_offload,
            "host_bytes": self.host,
        }


@dataclass
class Estimate:
    """A stage's phases; its figures are those of the phase with the highest device memory."""

    stage: str
    model: str
    profile: str
    target: str
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        key = (lambda p: p.device) if self.target == "cuda" else (lambda p: p.cpu_ram)
        return max(self.phases, key=key)

    @property
    def allocated(self) -> int:
        return max(p.allocated for p in self.phases)

    @property
    def reserved(self) -> int:
        return max(p.reserved for p in self.phases)

    @property
    def device(self) -> int:
        return max(p.device for p in self.phases)

    @property
    def cpu_ram(self) -> int:
        return max(p.cpu_ram for p in self.phases)

    @property
    def components(self) -> dict[str, int]:
        return self.peak.components

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "model": self.model,
            "profile": self.profile,
            "target": self.target,
            "peak_phase": self.peak.name,
            "allocated_gib": self.allocated / GIB,
            "reserved_gib": self.reserved / GIB,
            "device_gib": self.device / GIB,
            "cpu_ram_gib": self.cpu_ram / GIB,
            "components": dict(self.components),
            "phases": {p.name: p.to_dict() for p in self.phases},
            "notes": list(self.notes),
        }


# ---- weights -----------------------------------------------------------------------------------
def quantized_weight_bytes(numel: int, rows: int, quant: str, double_quant: bool) -> int:
    """Storage of one quantized weight matrix (packed data + quantization constants)."""
    if quant in ("nf4", "fp4"):
        packed = (numel + 1) // 2
        blocks = math.ceil(numel / NF4_BLOCK)
        if double_quant:
            # absmax quantized to uint8, fp32 absmax per 256 blocks, 256-entry fp32 code, fp32 offset
            absmax = blocks + math.ceil(blocks / DQ_BLOCK) * 4 + 256 * 4 + 4
        else:
            absmax = blocks * 4
        return packed + absmax + 16 * 4  # + the 16-value fp32 NF4/FP4 code
    if quant == "int8":
        return numel + rows * 4  # int8 weight + fp32 scale per output row (SCB)
    raise ValueError(quant)


def weight_bytes(spec: ModelSpec, profile: Profile) -> dict[str, int]:
    """Frozen/base weight bytes split into quantized linears and 16-bit (or fp32) remainder."""
    wb = DTYPE_BYTES[profile.dtype]
    other_b = 4 if (profile.quant != "none" and profile.kbit_fp32_upcast) else wb
    L = spec.num_layers
    if profile.quant == "none":
        return {"weights": spec.total_params * wb}
    q = sum(quantized_weight_bytes(lin.in_features * lin.out_features, lin.out_features,
                                   profile.quant, profile.double_quant) for lin in spec.linears) * L
    biases = sum(lin.out_features for lin in spec.linears if lin.bias) * L
    rest = spec.total_params - spec.layer_linear_params * L + biases
    return {"weights": q + rest * other_b}


# ---- adapters, gradients, optimizer -------------------------------------------------------------
def lora_tensors(spec: ModelSpec, profile: Profile) -> list[int]:
    """Element counts of every LoRA tensor of one adapter (A and B per targeted linear per layer)."""
    r = profile.lora_r
    out = []
    for lin in spec.resolve_targets(profile.lora_targets):
        out += [r * lin.in_features, lin.out_features * r]
    return out * spec.num_layers


def trainable_tensors(spec: ModelSpec, profile: Profile) -> tuple[list[int], int]:
    """(element counts of trainable tensors, bytes per element) for one trained model/adapter."""
    if profile.is_lora:
        return lora_tensors(spec, profile), 4
    # full fine-tune: every parameter, in the weight dtype
    sizes = [lin.in_features * lin.out_features for lin in spec.linears] * spec.num_layers
    sizes.append(spec.total_params - sum(sizes))
    return sizes, DTYPE_BYTES[profile.dtype]


def optimizer_bytes(sizes: list[int], elem_bytes: int, optimizer: str) -> int:
    """AdamW state: two moments per trainable element (+ the step counter)."""
    total = 0
    eight_bit = optimizer.endswith("8bit")
    for n in sizes:
        if eight_bit and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * (n + math.ceil(n / BNB_OPT_BLOCK) * 4)
        elif eight_bit:
            total += 2 * n * 4  # bitsandbytes keeps small tensors' state in fp32
        else:
            total += 2 * n * elem_bytes + 4  # torch AdamW: exp_avg, exp_avg_sq, step
    return total


# ---- activations -------------------------------------------------------------------------------
def act_bytes(profile: Profile) -> int:
    """Bytes per element of the residual stream and block activations."""
    if profile.dtype == "fp32" or (profile.quant != "none" and profile.kbit_fp32_upcast):
        return 4
    return 2


def mlp_saved_factor(spec: ModelSpec) -> int:
    if spec.gated_mlp or spec.activation in ("swiglu",):
        return MLP_SAVED_TENSORS["gated"]
    return MLP_SAVED_TENSORS.get(spec.activation, 2)


def layer_saved_bytes(spec: ModelSpec, profile: Profile, tokens: int, target: str = "cuda",
                      trainable_full: bool = False) -> int:
    """Bytes autograd keeps for one decoder layer over `tokens` tokens (no checkpointing)."""
    T, h, p = tokens, spec.hidden_size, act_bytes(profile)
    total = 0
    # norms
    if spec.norm == "rmsnorm":
        total += spec.norms_per_layer * (4 * T * h + 4 * T)
    else:  # LayerNorm keeps its input, mean and rstd
        total += spec.norms_per_layer * (p * T * h + 8 * T)
    # attention kernel (SDPA flash / memory-efficient): q, k, v, out, fp32 logsumexp
    total += p * T * (2 * spec.q_dim + 2 * spec.kv_dim) + 4 * T * spec.num_heads
    # MLP nonlinearity
    total += mlp_saved_factor(spec) * p * T * spec.intermediate_size
    # dropout in the base model (GPT-2, OPT): two residual dropouts per layer keep a mask each
    if spec.hidden_dropout > 0:
        total += 2 * T * h * (1 if target == "cuda" else p)
    if trainable_full:
        # trainable linears keep their inputs for the weight gradient (one per distinct input)
        total += sum(p * T * lin.in_features for lin in _distinct_inputs(spec.linears))
        if spec.norm == "rmsnorm":
            total += spec.norms_per_layer * p * T * h  # normalized input kept for the weight grad
    if profile.is_lora:
        targets = spec.resolve_targets(profile.lora_targets)
        r = profile.lora_r
        mask_b = 1 if target == "cuda" else 4
        if profile.lora_dropout > 0:
            total += sum((mask_b + 4) * T * lin.in_features for lin in targets)
        elif p == 4:
            # inputs already fp32: the LoRA path keeps the block's own input, once per distinct input
            total += sum(4 * T * lin.in_features for lin in _distinct_inputs(targets))
        else:
            total += sum(4 * T * lin.in_features for lin in targets)  # each casts its own fp32 copy
        total += sum(4 * T * r for _ in targets)  # lora_A output, kept by lora_B
    return total


def _distinct_inputs(linears) -> list[LinearSpec]:
    """One representative per distinct input tensor: block inputs are shared by the 'in' linears."""
    seen, out = set(), []
    for lin in linears:
        key = (lin.block, lin.role) if lin.role == "in" else (lin.block, lin.name)
        if key not in seen:
            seen.add(key)
            out.append(lin)
    return out


def layer_forward_transient(spec: ModelSpec, profile: Profile, tokens: int) -> int:
    """Live bytes inside one layer's forward under no_grad (what inference needs beyond its input)."""
    T, h, p = tokens, spec.hidden_size, act_bytes(profile)
    return 4 * T * h + p * T * (2 * h + spec.q_dim + 2 * spec.kv_dim + 3 * spec.intermediate_size)


def head_saved_bytes(spec: ModelSpec, profile: Profile, tokens: int, lm_logits: bool) -> int:
    """Final norm + what the loss keeps: fp32 log-softmax output over the vocabulary (+ int64 labels)."""
    h, p = spec.hidden_size, act_bytes(profile)
    norm = 4 * tokens * h + 4 * tokens if spec.norm == "rmsnorm" else p * tokens * h + 8 * tokens
    if not lm_logits:
        return norm
    return norm + 4 * tokens * spec.vocab_size + 8 * tokens


def activation_bytes(spec: ModelSpec, profile: Profile, tokens: int, target: str = "cuda") -> dict[str, int]:
    """Saved activations of a training forward, and the recompute transient when checkpointing."""
    full = not profile.is_lora
    per_layer = layer_saved_bytes(spec, profile, tokens, target, trainable_full=full)
    p = act_bytes(profile)
    emb_drop = tokens * spec.hidden_size * (1 if target == "cuda" else p) if spec.hidden_dropout > 0 else 0
    if profile.grad_ckpt:
        kept = spec.num_layers * p * tokens * spec.hidden_size + emb_drop
        return {"activations": kept, "recompute": per_layer}
    saved = spec.num_layers * per_layer + emb_drop
    if profile.is_lora:
        saved -= emb_drop + _first_layer_discount(spec, profile, tokens, target)
    return {"activations": saved, "recompute": 0}


def _first_layer_discount(spec: ModelSpec, profile: Profile, tokens: int, target: str) -> int:
    """With LoRA and no checkpointing the frozen embedding's output does not require grad: the
    first layer's input norm and the dropout masks of its attention-input adapters save nothing."""
    T, h, p = tokens, spec.hidden_size, act_bytes(profile)
    norm = 4 * T * h + 4 * T if spec.norm == "rmsnorm" else p * T * h + 8 * T
    masks = 0
    if profile.lora_dropout > 0:
        mask_b = 1 if target == "cuda" else 4
        masks = sum(mask_b * T * lin.in_features for lin in spec.resolve_targets(profile.lora_targets)
                    if lin.block == "attn" and lin.role == "in")
    return norm + masks


def logits_bytes(spec: ModelSpec, profile: Profile, tokens: int) -> int:
    """Peak of the LM head + loss: 16-bit logits, fp32 log-softmax kept, fp32 gradient in backward."""
    p = act_bytes(profile)
    return (p + 4 + 4) * tokens * spec.vocab_size


LOGPROB_VOCAB_CHUNK = 4096  # ppo_math.VOCAB_CHUNK: vocabulary columns per block


def chunked_logprob_bytes(spec: ModelSpec, profile: Profile, tokens: int, grad: bool) -> int:
    """Peak of PPO's log-probs (ppo_math.token_logprobs), which never builds (tokens, vocab) logits:
    one (tokens, chunk) block at a time, its product taken in fp32 (docs: log-prob precision):
    the chunk's fp32 weight copy and the hidden states' fp32 copy, the fp32 logits and the
    exp/product temporaries (entropy, under no_grad), or in the checkpointed backward the
    recomputed block and its fp32 gradient; plus the gathered target rows in fp32 (tokens, hidden).
    Correction from the meta-device rehearsal (simulate.py): the estimator charged PPO the SFT
    loss's full-vocabulary logits over prompt + response, +25-50% on small models' actor update."""
    chunk = min(LOGPROB_VOCAB_CHUNK, spec.vocab_size)
    per_elem = 16 if grad else 12
    return per_elem * tokens * chunk + 4 * chunk * spec.hidden_size + 16 * tokens * spec.hidden_size


def dequant_transient_bytes(spec: ModelSpec, profile: Profile) -> int:
    """bitsandbytes' CUDA gemm_4bit dequantizes the largest 4-bit weight to a 16-bit copy for more
    than a few tokens (prefill, training): one (out, in) transient. Found by the meta-device
    rehearsal (simulate.py); 0 for 16-bit weights."""
    if profile.quant not in ("nf4", "fp4"):
        return 0
    return max(lin.in_features * lin.out_features for lin in spec.linears) * DTYPE_BYTES[profile.dtype]


PCIE_BYTES_PER_S = 12e9  # pinned host <-> device copies, PCIe 4.0 x16 (~25 GB/s peak, about half in practice)


def parks_idle_state(optimizer: str, device_type: str) -> bool:
    """Whether PPO parks the idle role's optimizer state in host RAM (`runtime.optim.OptimizerParking`):
    on an accelerator (CUDA, or the simulation's meta device), unless the optimizer is paged
    (its state already lives in CUDA unified memory, which bitsandbytes prefetches as paged
    memory at each step). On the CPU the host is the device: nothing to move."""
    return device_type in ("cuda", "meta") and not optimizer.startswith("paged_")


UNDO_MAX_BYTES = 1 << 30  # runtime.optim.StepUndo copies at most this much (3x the trained parameters' bytes)


def undo_host_bytes(param_bytes: int, optimizer_state_bytes: int) -> int:
    """Host RAM `runtime.optim.StepUndo` holds during an optimizer step: the trained parameters
    and their optimizer state, or 0 when they are too large to copy every step (full
    fine-tuning)."""
    return param_bytes + optimizer_state_bytes if 3 * param_bytes <= UNDO_MAX_BYTES else 0


def generation_rows(profile: Profile, rollout_batch: int) -> int:
    """Rollout rows sampled at once: the profile's generation_batch (0: all), at most the rollout."""
    return min(profile.generation_batch or rollout_batch, rollout_batch)


def kv_cache_bytes(spec: ModelSpec, profile: Profile, batch: int, tokens: int) -> int:
    """Keys and values of every layer: 2 x L x kv_heads x head_dim x tokens x batch x bytes."""
    return 2 * spec.num_layers * spec.kv_dim * tokens * batch * act_bytes(profile)


# ---- stages ------------------------------------------------------------------------------------
def _train_step(name: str, spec: ModelSpec, profile: Profile, tokens: int, static: dict[str, int],
                trained: list[tuple[list[int], int]], lm_logits: bool, target: str,
                paged_ok: bool = True) -> Phase:
    comps = dict(static)
    grads = sum(sum(s) * eb for s, eb in trained)
    opt = sum(optimizer_bytes(s, eb, profile.optimizer) for s, eb in trained)
    comps["gradients"] = grads
    paged = 0
    if profile.paged and target == "cuda" and paged_ok:
        paged = opt
        comps["optimizer"] = 0
    else:
        comps["optimizer"] = opt
    acts = activation_bytes(spec, profile, tokens, target)
    comps["activations"] = acts["activations"] + head_saved_bytes(spec, profile, tokens, lm_logits)
    # backward peak: either the logits' gradient or one recomputed layer, whichever is larger
    logits = logits_bytes(spec, profile, tokens) - 4 * tokens * spec.vocab_size if lm_logits else 0
    comps["logits"] = logits
    comps["recompute"] = acts["recompute"]
    comps["dequant"] = dequant_transient_bytes(spec, profile)  # simulation-found transient (4-bit only)
    # an out-of-memory inside the optimizer step is undone from a host copy of what it trains
    return Phase(name, comps, paged=paged, target=target, host=undo_host_bytes(grads, opt))


def _zero3_split(phase: Phase, spec: ModelSpec, profile: Profile) -> Phase:
    """ZeRO-3 param + optimizer offload: weights/optimizer/grads live in CPU RAM; the GPU holds the
    gathered parameters of the largest layers in flight (current + prefetched) and activations."""
    wb = DTYPE_BYTES[profile.dtype]
    comps = dict(phase.components)
    weights = comps.pop("weights", 0)
    # host: the base's partitions, plus the copy it was loaded into, which is not given back
    # (measured by scripts/zero3_cpu_vs_estimate.py: loading +228 MiB, initialize +387 MiB for a
    # 256 MiB base)
    cpu = 2 * weights + comps.pop("optimizer", 0) + phase.paged
    if profile.is_lora:
        # the adapter is partitioned too (persistence threshold 0): its fp32 partition, a gradient
        # partition, the fp32 master and fp32 gradient live on the host (16 B per trained parameter
        # besides Adam's 8); the device keeps a gradient bucket sized to the trained parameters
        cpu += 4 * comps.pop("adapters", 0)
    else:
        # fp32 master copy + fp32 gradients on the host; 16-bit grads stream through the GPU
        cpu += spec.total_params * (4 + 4)
        comps["gradients"] = 2 * spec.layer_linear_params * wb
    layer_bytes = spec.layer_linear_params * wb
    emb = spec.vocab_size * spec.hidden_size * wb
    comps["gathered_params"] = 2 * max(layer_bytes, emb)
    if profile.offload_pin_memory:
        cpu += 2 * max(layer_bytes, emb)  # pinned staging buffers
    return Phase(phase.name, comps, paged=0, cpu_offload=cpu, target=phase.target)


def ddp_bucket_bytes(spec: ModelSpec, profile: Profile, stage: str) -> int:
    """Data parallel (`runtime.distributed.AdapterSync`): DDP keeps one flat gradient bucket per
    trained adapter, as large as its parameters (fp32 LoRA A/B, and the head an RM/critic trains),
    allocated when the wrapper is built and held for the run. SFT/GRPO: one adapter; RM: adapter +
    reward head; PPO: the actor, and the critic with its value head."""
    sizes, eb = trainable_tensors(spec, profile)
    adapter, head = sum(sizes) * eb, spec.hidden_size * 4
    return {"sft": adapter, "rm": adapter + head, "ppo": 2 * adapter + head}.get(stage, adapter)


def estimate(spec: ModelSpec, profile: Profile, stage: str, shape: Shape, target: str = "cuda",
             separate_models: bool = False, reward_model: bool = True, beta: float | None = None,
             data_parallel: bool = False) -> Estimate:
    """Per-phase memory of `stage` ("sft", "rm", "ppo", "grpo", "rloo") for this model, profile and
    shape, in one process. GRPO/RLOO: reward_model, a reward adapter + head scores the rollout; beta
    (default GRPOConfig's), the reference runs when it is above 0. data_parallel: one process of a
    torchrun world, which also holds DDP's gradient buckets in every phase (ZeRO-3: DeepSpeed's own
    buckets, already counted)."""
    if stage not in STAGES:
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if target not in ("cuda", "cpu"):
        raise ValueError(target)
    base = weight_bytes(spec, profile)["weights"]
    notes: list[str] = []
    mb = profile.micro_batch
    head = spec.hidden_size * 4 + 4  # scalar head (reward / value), fp32
    if stage in ("sft", "rm"):
        seqs = mb * (2 if stage == "rm" else 1)  # RM: chosen + rejected in one forward
        tokens = seqs * shape.seq_len
        trained = [trainable_tensors(spec, profile)]
        static = {"weights": base}
        if profile.is_lora:
            static["adapters"] = sum(trained[0][0]) * 4
        if stage == "rm":
            static["heads"] = head
            trained.append(([spec.hidden_size], 4))
        phase = _train_step("train_step", spec, profile, tokens, static, trained,
                            lm_logits=(stage == "sft"), target=target)
        phases = [phase]
    else:  # the RL stage runs without dropout (Profile.for_rl, adapters.disable_dropout)
        rl_spec = dataclasses.replace(spec, attn_dropout=0.0, hidden_dropout=0.0)
        critic_free = stage in CRITIC_FREE
        beta = GRPO_BETA if beta is None else beta
        if critic_free and shape.rollout_batch < 2:
            raise UserError(f"--rollout-batch {shape.rollout_batch}: {stage.upper()} compares at least 2 answers to "
                            "a prompt; use --rollout-batch 2 or more")
        if critic_free and separate_models:
            raise UserError("--separate-models is PPO's 4-model layout; GRPO/RLOO run on one shared base")
        phases = _rl_phases(rl_spec, profile.for_rl(), shape, base, head, target, separate_models, notes,
                            critic=not critic_free, reward_model=reward_model or not critic_free,
                            reference=not critic_free or beta > 0)
        if critic_free:
            notes.append(f"{stage.upper()}: no critic, no value head"
                         + ("" if reward_model else ", no reward model")
                         + (", no reference forward (beta 0)" if beta <= 0 else ""))
    if profile.offload == "zero3":
        if stage in RL_STAGES:
            notes.append(ZERO3_PPO_REASON)
        phases = [_zero3_split(ph, spec, profile) for ph in phases]
    elif data_parallel:
        for ph in phases:
            ph.components["ddp_buckets"] = ddp_bucket_bytes(spec, profile, stage)
        notes.append("per process of a data-parallel run: each holds the whole base and its adapters, plus DDP's "
                     "gradient buckets (one copy of each trained adapter)")
    if target == "cpu":
        notes.append("planned for the CPU: figures are host RAM; paged optimizers are not paged on CPU")
        if stage in ("sft", "rm"):  # measured: docs/speed.md
            notes.append("the process's RSS can exceed these figures by the freed heap glibc keeps within a micro-batch "
                         "(the stage gives it back after each one; SmolLM2 at the CPU defaults, at most 512 tokens "
                         "per forward: SFT 1.03x, RM 1.05x; 4 examples per forward: SFT 1.13x, RM 1.32x); "
                         "MALLOC_MMAP_THRESHOLD_=1048576 returns the rest, at up to 40% slower steps (docs/speed.md)")
    return Estimate(stage, spec.name, profile.name, target, phases, notes)


def _rl_phases(spec: ModelSpec, profile: Profile, shape: Shape, base: int, head: int, target: str,
               separate_models: bool, notes: list[str], critic: bool = True, reward_model: bool = True,
               reference: bool = True) -> list[Phase]:
    """PPO's phases (critic True): generation, scoring, actor_update, critic_update; GRPO/RLOO's
    (critic False): generation, scoring, actor_update, with the reward adapter + head only when
    reward_model, and the reference's log-probs kept only when reference."""
    B, P, R = shape.rollout_batch, shape.prompt_len, shape.response_len
    S = P + R
    mb = min(profile.micro_batch, B)
    actor = trainable_tensors(spec, profile)
    critic_t = (actor[0] + [spec.hidden_size], actor[1])
    shared = profile.is_lora and profile.shared_base and not separate_models
    static: dict[str, int] = {}
    if not critic and profile.is_lora:  # one shared base: the actor's adapter, and the reward model's with its head
        static["weights"] = base
        static["adapters"] = (1 + reward_model) * sum(actor[0]) * 4
    elif not critic:  # full fine-tuning: the actor, and a frozen copy for the reference and the reward model each
        static["weights"] = (1 + int(reference) + int(reward_model)) * base
        notes.append("full fine-tuning GRPO/RLOO needs separate models (actor; reference and reward model frozen)")
    elif shared:
        static["weights"] = base  # one frozen base; reference = adapters disabled
        static["adapters"] = 3 * sum(actor[0]) * 4  # actor, critic, reward
    else:
        if profile.is_lora:
            static["weights"] = 4 * base  # actor, reference, critic, reward: four copies of the base
            static["adapters"] = 3 * sum(actor[0]) * 4
        else:
            static["weights"] = 4 * base
            notes.append("full fine-tuning PPO needs four separate models (actor, critic trained)")
    static["heads"] = (2 if critic else int(reward_model)) * head  # value + reward heads; GRPO: the RM's only
    # optimizer state of actor and critic persists across the whole run: paged (unified memory), or
    # on the device only during its own role's update, parked in host RAM otherwise (runtime.optim)
    opts = {"actor": optimizer_bytes(actor[0], actor[1], profile.optimizer)}
    if critic:
        opts["critic"] = optimizer_bytes(*critic_t, profile.optimizer)
    opt = sum(opts.values())
    paged = opt if (profile.paged and target == "cuda") else 0
    park = profile.is_lora and parks_idle_state(profile.optimizer, target)
    static["optimizer"] = 0 if (paged or park) else opt
    if park:
        moved = " or ".join(f"{v / 2**20:.0f} MiB ({k})" for k, v in opts.items())
        notes.append(f"idle optimizer state parked in host RAM: each update moves {moved} in and out, ~"
                     f"{2 * opt / PCIE_BYTES_PER_S * 1e3:.0f} ms per minibatch at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s")
    p = act_bytes(profile)
    # rollout buffers: token ids, masks; (B, R) fp32: PPO's old/ref log-probs, values, rewards,
    # advantages, entropy; GRPO's old log-probs, entropy, response mask, advantages, + ref log-probs and KL
    static["rollout_buffers"] = B * S * (8 + 8) + B * R * 4 * (6 if critic else 4 + 2 * int(reference))
    phases = []
    # generation: prefill the prompts, then decode with the KV cache; logits for the last token only;
    # generation_batch rows at a time (each chunk's cache is freed before the next chunk starts)
    G = generation_rows(profile, B)
    gen = dict(static)
    gen["kv_cache"] = kv_cache_bytes(spec, profile, G, S)  # full length: also what a static cache (profile.static_cache) preallocates
    gen["transient"] = max(layer_forward_transient(spec, profile, G * P), 0) + G * P * spec.hidden_size * p
    # last-token logits (16-bit, their fp32 copy, the warped fp32 scores) and the row sampler's fp32
    # noise buffer (algo/sampling.py; its output replaces the warped scores)
    gen["logits"] = G * spec.vocab_size * (p + 4 + 4 + 4)
    gen["dequant"] = dequant_transient_bytes(spec, profile)  # prefill: many tokens per 4-bit matmul
    parked = opt if park else 0
    phases.append(Phase("generation", gen, paged=paged, target=target, host=parked))
    # scoring: reward (+ value and reference log-probs), forward only, one micro-batch at a time; PPO
    # with one minibatch takes the values at the critic's update instead (its first forward there,
    # `algo.experience.values_at_update`): one forward fewer here, the same peak (forwards run one
    # at a time); the critic update adds a few (mb, R) fp32 GAE temporaries (kilobytes; the
    # simulation, which runs this path, counts them)
    score = dict(static)
    score["transient"] = layer_forward_transient(spec, profile, mb * S) + 2 * mb * S * spec.hidden_size * p
    score["logits"] = chunked_logprob_bytes(spec, profile, mb * R, grad=False)  # response tokens, chunked
    score["dequant"] = dequant_transient_bytes(spec, profile)
    phases.append(Phase("scoring", score, paged=paged, target=target, host=parked))
    # actor update: forward + backward of the actor adapter over prompt + response. PPO's
    # --kl-penalty loss adds a k3 term that reads the reference log-probs the rollout buffers keep
    # anyway: a few (mb, R) fp32 tensors, no new buffer, so both placements share this estimate
    # (tests/test_simulate.py rehearses both)
    upd = dict(static)
    upd.pop("optimizer")
    # the backbone runs over prompt + response; log-probs only over the response, chunked
    # (simulation-corrected: no full-vocabulary logits, see chunked_logprob_bytes)
    phase = _train_step("actor_update", spec, profile, mb * S, upd, [actor], lm_logits=False,
                        target=target, paged_ok=False)
    # the log-prob block's backward ends before the first checkpointed layer is recomputed: the two
    # transients never coexist, so the block counts only beyond the recomputed layer (the sum
    # overestimated the actor update by the smaller of the two: +2.2% on 7B, +10% on the tiny
    # Llama, against the meta-device rehearsal; the critic, without the block, was within 1%)
    block = chunked_logprob_bytes(spec, profile, mb * R, grad=True)
    phase.components["logits"] = max(block - phase.components["recompute"], 0)
    phase.components["optimizer"] = opts["actor"] if park else static["optimizer"]
    phase.paged, phase.host = paged, phase.host + (opts.get("critic", 0) if park else 0)
    phases.append(phase)
    if not critic:
        return phases
    phase = _train_step("critic_update", spec, profile, mb * S, upd, [critic_t], lm_logits=False,
                        target=target, paged_ok=False)
    phase.components["optimizer"] = opts["critic"] if park else static["optimizer"]
    phase.paged, phase.host = paged, phase.host + (opts["actor"] if park else 0)
    phases.append(phase)
    return phases


__all__ = ["Estimate", "Phase", "estimate", "ddp_bucket_bytes", "generation_rows", "weight_bytes", "optimizer_bytes", "trainable_tensors",
           "lora_tensors", "activation_bytes", "kv_cache_bytes", "layer_saved_bytes", "GIB"]
