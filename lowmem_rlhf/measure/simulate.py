"""Dry run by simulation: one real step of each stage on **meta** tensors, its peak measured.

The model is built from its config on the meta device (sizes, no data: a 13B model costs no RAM),
through the project's own loading steps (`loading.prepare_base`, bitsandbytes NF4/FP4 via the real
`Linear4bit`/`Params4bit`/`QuantState` classes, quantized by bitsandbytes' own meta kernels), carries
the profile's LoRA adapters and heads through `adapters.SharedBase`, and runs the stages' own step
functions with their configs' defaults (no copied steps, no copied constants):

* SFT: `algo.supervised.completion_loss` on one micro-batch, backward, `runtime.optim.optimizer_step`.
* RM: `algo.pairwise.pair_scores` (chosen + rejected in one forward) and `pair_loss`, backward,
  `optimizer_step`.
* PPO: `algo.experience.make_experience` (generation, scoring of every micro-batch by the reward,
  reference, actor and critic, KL, GAE) and `algo.ppo.ppo_update` (one epoch; later epochs repeat
  the same allocations; with one minibatch the critic's values and GAE come from its update's
  first forward, as in the stage). Only the sampler is the simulation's own: `generate` decides
  on data (EOS, sampling) that meta tensors lack, so `_Rehearsal.generation` runs what it
  allocates: the prefill of the prompts into a `DynamicCache`, the cache grown to full length,
  two decode steps.

`alloc_tracker.AllocTracker` counts every storage those ops create; the optimizers' state exists
before the step (steady state), as in every step after the first.

Where meta/CPU kernels differ from CUDA's, `cuda_semantics()` makes the run follow CUDA:
dropout through `native_dropout` (CUDA keeps a 1-byte bool mask; CPU/meta keep a full-dtype one),
SDPA without a mask through the flash-attention op (meta otherwise takes the math path with a
seq x seq fp32 softmax), and bitsandbytes' `gemm_4bit`, which on CUDA dequantizes the weight to a
16-bit transient for more than a few tokens, gets that transient added (`bnb_dequant_rule`).
Inputs are full rows (no padding; attention mask None), so the shared base passes no mask and SDPA
runs causal, as it does on CUDA for unpadded batches.

Not modelled (the estimator's figures are added for them): CUDA context and kernels, allocator
fragmentation/reserve, kernel workspaces (cuBLAS, flash-attention backward), paged optimizer
state (CUDA unified memory, outside the allocator; counted here, then moved to `paged`).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from lowmem_rlhf.algo.experience import Rollout
from lowmem_rlhf.config import RL_STAGES, STAGES, Profile, Shape
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.measure.alloc_tracker import AllocTracker, PhasePeak
from lowmem_rlhf.plan.estimator import (
    ALLOCATOR_RESERVE,
    CUDA_CONTEXT_BYTES,
    GIB,
    Estimate,
    ddp_bucket_bytes,
    estimate,
)

NOT_MODELLED = {
    "cuda_context": "CUDA context + cuBLAS/cuDNN kernels (outside the allocator): estimator's constant",
    "fragmentation": "allocator reserve/fragmentation above allocated: estimator's ratio",
    "workspaces": "kernel workspaces (cuBLAS, flash-attention backward): not counted by either",
    "paged": "paged optimizer state lives in CUDA unified memory: counted, then moved out of allocated",
    "padding": "inputs are unpadded rows: masked (padded) batches use the memory-efficient kernel instead",
    "decode": "generation runs prefill + 2 decode steps at full cache length; the cache is grown in one chunk",
}
# the tag of what a phase creates (backward and optimizer steps inside it are tagged automatically)
PHASE_TAGS = {"train_step": "activations", "generation": "generation", "scoring": "scoring",
              "actor_update": "activations", "critic_update": "activations"}
GEMM_4BIT_CUSTOM_MAX_M = 4  # bitsandbytes CUDA: above this many rows gemm_4bit may dequantize (arch heuristic)


# ---- CUDA semantics on CPU/meta ----------------------------------------------------------------
def bnb_dequant_rule(func, args: tuple, kwargs: dict) -> int:
    """Bytes of the 16-bit weight bitsandbytes' CUDA `gemm_4bit` dequantizes into for M > 4 rows
    (plus the fp32 absmax it dequantizes first under double quantization); 0 for other ops."""
    if "gemm_4bit" not in getattr(func, "__name__", "") and "gemm_4bit" not in str(func):
        return 0
    A, shape_b = args[0], args[2]
    M = A.numel() // A.shape[-1]
    if M <= GEMM_4BIT_CUSTOM_MAX_M:
        return 0
    n, k = int(shape_b[0]), int(shape_b[1])
    extra = 0
    if kwargs.get("absmax_8bit") is not None or (len(args) > 7 and args[7] is not None):
        blocks = -(-n * k // int(args[4]))
        extra = blocks * 4
    return n * k * A.element_size() + extra


@contextlib.contextmanager
def cuda_semantics(attention_op: str = "cuda") -> Iterator[None]:
    """Make dropout and SDPA allocate as CUDA does. `attention_op`: "cuda" routes unmasked SDPA to
    the CUDA flash-attention op (meta kernel); "cpu" to the CPU flash op (real CPU tensors)."""
    orig_dropout = F.dropout
    orig_sdpa = F.scaled_dot_product_attention

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0 and input.is_floating_point():
            return torch.ops.aten.native_dropout(input, p, True)[0]  # bool mask, as CUDA's fused kernel
        return orig_dropout(input, p, training, inplace)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:  # padded batches: CUDA's memory-efficient kernel; not rehearsed
            return orig_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        if attention_op == "cuda":  # flash attention (dropout included) keeps out + fp32 logsumexp
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]

    import transformers.masking_utils as mu

    orig_packed = mu.find_packed_sequence_indices
    F.dropout, F.scaled_dot_product_attention = dropout, sdpa
    # transformers checks position ids for packed sequences with a data-dependent `.all()`; the
    # rehearsal's rows are never packed, which is the check's answer on CUDA too
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = orig_dropout, orig_sdpa
        mu.find_packed_sequence_indices = orig_packed


# ---- the model on meta -------------------------------------------------------------------------
def model_config(model: str) -> dict[str, Any]:
    """The config.json fields of a preset, a local folder / config.json or a hub id."""
    from pathlib import Path

    from lowmem_rlhf.plan.model_spec import (
        PRESET_ALIASES,
        PRESET_CONFIGS,
        _hub_config,
        read_config_json,
    )

    key = PRESET_ALIASES.get(model.strip().lower(), model.strip().lower())
    if key in PRESET_CONFIGS:
        return dict(PRESET_CONFIGS[key])
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return read_config_json(path / "config.json")
    if path.suffix == ".json" and path.exists():
        return read_config_json(path)
    if "/" in model and not model.startswith((".", "/", "~")):
        return _hub_config(model)
    from lowmem_rlhf.plan.model_spec import load_spec

    load_spec(model)  # raises the one-line error naming the presets
    raise UserError(f"unknown model {model!r}")


def _quantize_meta(lm: torch.nn.Module, profile: Profile) -> None:
    """Replace decoder linears by bitsandbytes 4-bit layers, quantized on meta by bitsandbytes."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from lowmem_rlhf.model.loading import _quant_config, output_layer

    out_name, _ = output_layer(lm)
    qc = _quant_config(profile)
    replace_with_bnb_linear(lm, modules_to_not_convert=[out_name], quantization_config=qc)
    dtype = qc.bnb_4bit_compute_dtype
    for m in lm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.nn.Params4bit(torch.empty(m.out_features, m.in_features, dtype=dtype, device="meta"),
                                  requires_grad=False, quant_type=qc.bnb_4bit_quant_type,
                                  compress_statistics=qc.bnb_4bit_use_double_quant, blocksize=64,
                                  quant_storage=torch.uint8, module=m)
            m.weight = w._quantize("meta")
            if m.bias is not None:
                m.bias = torch.nn.Parameter(torch.empty(m.out_features, dtype=dtype, device="meta"),
                                            requires_grad=False)


def build_meta_model(model: str, profile: Profile, training: bool = True):
    """A `LoadedModel` whose tensors are all on the meta device, prepared as `load_model` would."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem_rlhf.model.loading import (
        TORCH_DTYPES,
        LoadedModel,
        attention_implementation,
        fingerprint_of,
        guard_bnb_cpu_repack,
        prepare_base,
    )
    from lowmem_rlhf.plan.model_spec import spec_from_model

    if profile.quant not in ("none", "nf4", "fp4"):
        raise UserError(f"--simulate supports quant none, nf4 and fp4, not {profile.quant}; drop --simulate")
    if profile.offload != "none":
        raise UserError("--simulate does not model ZeRO-3 offload; drop --simulate or use --offload none")
    cfg = model_config(model)
    if cfg.get("model_type") == "chatglm" or "auto_map" in cfg:
        raise UserError(f"{model}: --simulate needs an architecture transformers knows (no remote code)")
    clean = {k: v for k, v in cfg.items() if k not in ("auto_map", "quantization_config", "torch_dtype", "dtype")}
    try:
        config = AutoConfig.for_model(**clean)
    except (ValueError, KeyError) as e:
        raise UserError(f"{model}: transformers does not know model_type {cfg.get('model_type')!r} ({e})") from None
    config._attn_implementation = attention_implementation(profile.attn_impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[profile.dtype])
        if profile.quant in ("nf4", "fp4"):
            _quantize_meta(lm, profile)
    guard_bnb_cpu_repack(lm)
    spec = spec_from_model(lm, name=model, source=f"meta {model}")
    prepare_base(lm, profile, training)
    return LoadedModel(lm, None, spec, f"meta:{model}", fingerprint_of(spec))


# ---- results -----------------------------------------------------------------------------------
@dataclass
class SimPhase:
    """One phase: simulated allocator peak (bytes by tag at that peak) beside the analytic one."""

    name: str
    peak: int  # inside the torch allocator (paged optimizer state excluded)
    by_tag: dict[str, int]
    paged: int  # optimizer state a paged optimizer keeps outside the allocator
    analytic: int  # estimator's allocated figure for the same phase
    analytic_components: dict[str, int]

    @property
    def device(self) -> int:
        """nvidia-smi figure: simulated peak + the estimator's reserve, context and paged state."""
        return int(self.peak * (1 + ALLOCATOR_RESERVE)) + CUDA_CONTEXT_BYTES + self.paged

    @property
    def drift(self) -> float:
        return (self.analytic - self.peak) / self.peak if self.peak else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"simulated_allocated_gib": self.peak / GIB, "analytic_allocated_gib": self.analytic / GIB,
                "drift": self.drift, "simulated_device_gib": self.device / GIB, "paged_gib": self.paged / GIB,
                "simulated_by_tag": dict(self.by_tag), "analytic_components": dict(self.analytic_components)}


@dataclass
class Simulation:
    stage: str
    model: str
    profile: Profile
    shape: Shape
    phases: list[SimPhase]
    estimate: Estimate
    seconds: float
    kv_cache: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> SimPhase:
        return max(self.phases, key=lambda p: p.peak)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "model": self.model, "profile": self.profile.name,
                "quant": self.profile.quant, "grad_ckpt": self.profile.grad_ckpt,
                "micro_batch": self.profile.micro_batch, "shape": self.shape.to_dict(),
                "seconds": self.seconds, "kv_cache_bytes": self.kv_cache,
                "peak_phase": self.peak.name, "simulated_allocated_gib": self.peak.peak / GIB,
                "analytic_allocated_gib": self.estimate.allocated / GIB,
                "phases": {p.name: p.to_dict() for p in self.phases},
                "not_modelled": dict(NOT_MODELLED), "notes": list(self.notes)}


# ---- one step of each stage --------------------------------------------------------------------
def _param_tag(name: str) -> str:
    if "lora_" in name:
        return "adapters"
    if "score" in name.split("."):
        return "heads"
    return "weights"


class _Rehearsal:
    """A SharedBase on meta (or real) tensors plus the tracker; each stage's step is run through
    the stage's own functions (`algo/`), with the stage config's defaults for its settings."""

    def __init__(self, loaded, profile: Profile, tracker: AllocTracker):
        from lowmem_rlhf.model.adapters import SharedBase

        self.loaded, self.profile, self.tr = loaded, profile, tracker
        self.engine = SharedBase(loaded, profile)
        self.device = loaded.device
        self.hooks = []
        self.park: bool | None = None  # PPO's optimizer parking (None: as the stage would here)

    # setup ------------------------------------------------------------------------------------
    def add_roles(self, roles: list[tuple[str, bool]]) -> None:
        eng = self.engine
        if self.profile.is_lora:
            for name, head in roles:
                eng.add_adapter(name, with_head=head)
        elif any(h for _, h in roles):
            eng._ensure_head()
            getattr(eng.loaded.model, "score").requires_grad_(True)
        if not self.profile.is_lora:
            for p in eng.model.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)
        for mod in eng.model.modules():  # peft leaves adapters added to a meta base on the CPU
            for pname, p in list(mod.named_parameters(recurse=False)):
                if p.device != self.device:
                    setattr(mod, pname, torch.nn.Parameter(p.detach().to(self.device), requires_grad=p.requires_grad))
        self.tr.register_module(eng.model, _param_tag)
        for name, p in eng.model.named_parameters():  # adapters/heads were created under the tracker
            self.tr.retag(p, _param_tag(name))
        for p in eng.model.parameters():  # a parameter's gradient is "gradients" once accumulated
            if p.requires_grad:
                self.hooks.append(p.register_post_accumulate_grad_hook(lambda q: self.tr.retag(q.grad, "gradients")))

    def params(self, role: str | None) -> list[torch.nn.Parameter]:
        if self.profile.is_lora:
            return self.engine.parameters_of(role)
        return [p for p in self.engine.model.parameters() if p.requires_grad]

    def optimizer(self, role: str | None):
        """The profile's optimizer with its state created (steady state: every step after the first)."""
        from lowmem_rlhf.runtime.optim import make_optimizer

        if role is not None and self.profile.is_lora:
            self.engine.use(role)
        params = self.params(role)
        with self.tr.tag("optimizer"):
            opt = make_optimizer(params, self.profile.optimizer, lr=1e-4, device=self.device)
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return opt

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A stage phase: its peak recorded, storages tagged by what creates them."""
        with self.tr.phase(name), self.tr.tag(PHASE_TAGS.get(name, "activations")):
            yield

    def ids(self, rows: int, cols: int) -> torch.Tensor:
        with self.tr.tag("inputs"):
            return torch.randint(0, self.loaded.spec.vocab_size, (rows, cols), device=self.device)

    # stages -----------------------------------------------------------------------------------
    def sft(self, shape: Shape) -> None:
        """One micro-batch of the SFT step: algo.supervised.completion_loss, backward, optimizer_step."""
        from lowmem_rlhf.algo.supervised import completion_loss
        from lowmem_rlhf.runtime.optim import optimizer_step

        self.add_roles([("sft", False)])
        opt = self.optimizer("sft")
        ids = self.ids(self.profile.micro_batch, shape.seq_len)
        self.engine.model.train()
        with self.phase("train_step"):
            loss, n = completion_loss(self.engine, {"input_ids": ids, "attention_mask": None, "labels": ids})
            self.engine.backward(loss / n)
            del loss
            optimizer_step(opt, self.params("sft"))

    def rm(self, shape: Shape) -> None:
        """One micro-batch of the RM step: algo.pairwise.pair_scores + pair_loss, backward, optimizer_step."""
        from lowmem_rlhf.algo.pairwise import pair_loss, pair_scores
        from lowmem_rlhf.runtime.optim import optimizer_step

        self.add_roles([("reward", True)])
        opt = self.optimizer("reward")
        mb = self.profile.micro_batch
        chosen, rejected = self.ids(mb, shape.seq_len), self.ids(mb, shape.seq_len)
        self.engine.model.train()
        with self.phase("train_step"):
            rc, rr = pair_scores(self.engine, chosen, rejected, 0, self.device)
            loss = pair_loss(rc, rr)
            del rc, rr
            self.engine.backward(loss / mb)
            del loss
            optimizer_step(opt, self.params("reward"))

    def ppo(self, shape: Shape, stage: str = "ppo", reward_model: bool = True, beta: float | None = None,
            kl_penalty: str = "reward") -> int:
        """One RL iteration through the stage's own functions, with its config's defaults. PPO:
        algo.experience.make_experience (generation, scoring, KL, GAE) and algo.ppo.ppo_update, the
        KL to the reference in the reward or (kl_penalty "loss") in the actor's loss;
        GRPO/RLOO: algo.grpo.make_group_experience and group_update (reward adapter + head only
        with reward_model, the reference only when beta > 0; default GRPOConfig's). One epoch:
        later epochs repeat the same allocations. Returns the KV cache's bytes."""
        from lowmem_rlhf.algo.experience import make_experience
        from lowmem_rlhf.algo.grpo import group_update, make_group_experience
        from lowmem_rlhf.algo.ppo import ppo_update
        from lowmem_rlhf.algo.rewards import RewardSet
        from lowmem_rlhf.algo.roles import Roles
        from lowmem_rlhf.config import CRITIC_FREE, GRPOConfig, PPOConfig
        from lowmem_rlhf.model.adapters import disable_dropout
        from lowmem_rlhf.plan.estimator import generation_rows
        from lowmem_rlhf.runtime.oom import MicroBatch
        from lowmem_rlhf.runtime.optim import OptimizerParking, parks

        if not (self.profile.is_lora and self.profile.shared_base):
            raise UserError(f"--simulate models {stage.upper()} on one shared base with LoRA adapters "
                            "(profile shared_base: true, lora_r > 0)")
        critic_free = stage in CRITIC_FREE
        reward_model = reward_model or not critic_free
        trained = ("actor",) if critic_free else ("actor", "critic")
        self.add_roles(([("reward", True)] if reward_model else []) + ([] if critic_free else [("critic", True)])
                       + [("actor", False)])
        disable_dropout(self.engine.model)  # as algo.roles.build_roles: the RL stage has no dropout
        optimizers = {r: self.optimizer(r) for r in trained}
        parking = OptimizerParking(optimizers, parks(self.profile.optimizer, self.device) if self.park is None
                                   else self.park)
        parking.around_moves = lambda: self.tr.tag("optimizer")
        parking.park_all()  # as the stage: no optimizer state on the device outside its update
        B, P, R = shape.rollout_batch, shape.prompt_len, shape.response_len
        if critic_free:
            cfg = GRPOConfig(profile=self.profile, rollout_batch=B, prompt_len=P, response_len=R, algo=stage,
                             group_size=B if B > 1 else 2, **({} if beta is None else {"beta": beta}))
        else:
            cfg = PPOConfig(profile=self.profile, rollout_batch=B, prompt_len=P, response_len=R, ppo_epochs=1,
                            kl_penalty=kl_penalty)
        roles = Roles({r: self.engine for r in ("actor", "critic", "reward", "reference")})
        # the reward: the reward model's head (its scores are what the estimator counts); a program adds none
        rewards = RewardSet(learned=reward_model, weights={"reward_model": 1.0} if reward_model else {})
        size = max(1, min(self.profile.micro_batch, B))
        # fixed sizes (elastic=False): the rehearsal never halves a micro-batch, nor logs to a run folder
        gen_mb, mb = (MicroBatch(n, "ppo", Path(tempfile.gettempdir()), self.profile.name, knob="", elastic=False)
                      for n in (generation_rows(self.profile, B), size))
        prompts = self.ids(B, P)
        kv = [0]

        def sample(rows: int) -> Rollout:  # as generate_in_chunks: `rows` at a time, each chunk's cache freed
            parts = []
            with torch.no_grad():
                for i in range(0, B, rows):
                    k, seqs = self.generation(prompts[i: i + rows], R)
                    kv[0] = max(kv[0], k)
                    parts.append(seqs)
            seqs = torch.cat(parts)
            return Rollout(seqs, None, seqs[:, P:], torch.ones(B, R, device=self.device), [], [],
                           torch.zeros(B, dtype=torch.bool, device=self.device))

        self.engine.model.train()
        order = torch.Generator().manual_seed(0)
        if critic_free:
            if not reward_model:  # a program's scores: one per response, computed on the host
                rewards.programs["reward"] = lambda prompts, texts: [0.0] * B
                rewards.weights["reward"] = 1.0
            exp = make_group_experience(roles, sample, cfg, rewards, gen_mb, mb, 1, self.phase)
            group_update(roles, exp, cfg, optimizers["actor"], None, mb, 1, order, self.phase, parking=parking)
        else:
            exp = make_experience(roles, sample, cfg, cfg.kl_coef, rewards, gen_mb, mb, 1, self.phase)
            ppo_update(roles, exp, cfg, optimizers, {}, mb, 1, order, self.phase, parking=parking)
        return kv[0]

    def generation(self, prompts: torch.Tensor, R: int) -> tuple[int, torch.Tensor]:
        """What `generate` allocates, without its data-dependent decisions: prefill of the prompts
        into a `DynamicCache`, the cache grown to its final length, two decode steps at full length.
        -> (KV cache bytes, (B, P + R) sequences)."""
        from transformers import DynamicCache

        eng, dev = self.engine, self.device
        B = prompts.shape[0]
        eng.model.eval()
        caches = [DynamicCache(config=self.loaded.model.config)]

        def step(tok: torch.Tensor, keep: int = 1) -> torch.Tensor:
            out = eng.model(input_ids=tok, past_key_values=caches[0], use_cache=True, logits_to_keep=keep)
            probs = torch.softmax(out.logits[:, -1].float(), -1)
            return torch.multinomial(probs, 1) if dev.type != "meta" else probs.argmax(-1, keepdim=True)

        nxt = step(prompts)
        decode = min(2, R - 1)
        if R - 1 - decode > 0:  # grow the cache to its final length in one chunk; its peak is not CUDA's
            with self.tr.paused_peak():
                nxt = step(torch.cat([nxt, self.ids(B, R - 2 - decode)], 1))
        for _ in range(decode):
            nxt = step(nxt)
        kv = sum(t.untyped_storage().nbytes() for layer in caches[0].layers for t in (layer.keys, layer.values)
                 if isinstance(t, torch.Tensor))  # meta storages share data_ptr 0: no dedup by address
        caches.clear()
        del nxt
        eng.model.train()
        return kv, torch.cat([prompts, self.ids(B, R)], 1)


def rehearse(loaded, profile: Profile, stage: str, shape: Shape, attention_op: str = "cuda",
             cuda_like: bool = True, cuda_transients: bool = True, park: bool | None = None,
             reward_model: bool = True, beta: float | None = None,
             kl_penalty: str = "reward") -> tuple[dict[str, PhasePeak], AllocTracker, int]:
    """Run one step of `stage` on `loaded` (meta or real tensors) under the tracker. `cuda_like`
    patches dropout/SDPA as CUDA runs them; `cuda_transients` adds CUDA kernels' hidden transients
    (bitsandbytes' dequantized weight), which a CPU allocator never sees. park: PPO parks the idle
    role's optimizer state as on CUDA (default: as the stage would on this device, `parks`); False
    keeps it resident, as a CPU run does. reward_model, beta: GRPO/RLOO's; kl_penalty: PPO's
    (`_Rehearsal.ppo`)."""
    tracker = AllocTracker(transient_rules=[bnb_dequant_rule] if cuda_like and cuda_transients else [])
    if loaded.device.type == "meta":  # the device's memory only: host buffers (parked optimizer state) are not
        tracker.device_type = "meta"
    ctx = cuda_semantics(attention_op) if cuda_like else contextlib.nullcontext()
    kv = 0
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tracker, tracker.auto_tagging(*PHASE_TAGS.values()):
            tracker.register_module(loaded.model, _param_tag)
            reh = _Rehearsal(loaded, profile.for_rl() if stage in RL_STAGES else profile, tracker)
            reh.park = park
            if stage == "sft":
                reh.sft(shape)
            elif stage == "rm":
                reh.rm(shape)
            else:
                kv = reh.ppo(shape, stage, reward_model, beta, kl_penalty)
            for h in reh.hooks:
                h.remove()
    return tracker.phases, tracker, kv


def simulate(model: str, profile: Profile, stage: str, shape: Shape, reward_model: bool = True,
             beta: float | None = None, data_parallel: bool = False, kl_penalty: str = "reward") -> Simulation:
    """Build `model` on meta, rehearse one step of `stage`, and set it beside the estimator
    (GRPO/RLOO: with a reward model or not, at KL weight beta; PPO: its KL in the reward or in the
    actor's loss, which the estimator counts alike). data_parallel: one process of a
    launched world, which also holds DDP's gradient buckets in every phase; DDP cannot be built on
    meta tensors (it reads values at construction), so they are added as a registered storage of
    the estimator's size, which tests/test_distributed.py checks against real DDP."""
    if stage not in STAGES:
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    t0 = time.time()
    loaded = build_meta_model(model, profile)
    phases, _, kv = rehearse(loaded, profile, stage, shape, reward_model=reward_model, beta=beta,
                             kl_penalty=kl_penalty)
    est = estimate(loaded.spec, profile, stage, shape, target="cuda", reward_model=reward_model, beta=beta,
                   data_parallel=data_parallel)
    buckets = ddp_bucket_bytes(loaded.spec, profile, stage) if data_parallel and profile.offload != "zero3" else 0
    by_name = {p.name: p for p in est.phases}
    out = []
    # in the estimate's order (PPO with one minibatch runs the critic's update first: values_at_update)
    for name in sorted(phases, key=lambda n: list(by_name).index(n) if n in by_name else len(by_name)):
        ph = phases[name]
        paged = ph.by_tag.get("optimizer", 0) if profile.paged else 0
        tags = dict(ph.by_tag)
        if paged:
            tags["optimizer"] = 0
        if buckets:
            tags["ddp_buckets"] = buckets
        a = by_name[name]
        out.append(SimPhase(name, ph.peak - paged + buckets, tags, paged, a.allocated, dict(a.components)))
    notes = []
    if profile.paged:
        notes.append(f"{profile.optimizer}: optimizer state is paged (unified memory), shown outside allocated")
    return Simulation(stage, model, profile, shape, out, est, time.time() - t0, kv, notes)


__all__ = ["AllocTracker", "Simulation", "SimPhase", "simulate", "rehearse", "build_meta_model",
           "cuda_semantics", "bnb_dequant_rule", "NOT_MODELLED"]
