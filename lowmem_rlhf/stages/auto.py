"""`lowmem-rlhf auto`: plan, then SFT -> RM -> PPO into one run folder, each stage starting from
the last. With no model and no data: the embedded default (SmolLM2-135M-Instruct) on the bundled
demo task (lowmem_rlhf/algo/demo_task.py), scored by its checker on held-out prompts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

from lowmem_rlhf.config import (
    CRITIC_FREE,
    AutoConfig,
    GRPOConfig,
    Profile,
    dataclass_from_dict,
)
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.runtime.runs import (
    ensure_writable,
    has_checkpoint,
    is_complete,
    write_json,
)
from lowmem_rlhf.runtime.stopping import Interrupted
from lowmem_rlhf.stages.grpo import check_grpo, run_grpo
from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo
from lowmem_rlhf.stages.rl import check_rollout
from lowmem_rlhf.stages.rm import RMConfig, run_rm
from lowmem_rlhf.stages.sft import SFTConfig, run_sft

AUTO_CONFIG = "auto.json"
# what a run written before a knob existed (or before its default became per shape) did
PRE_KNOB = {"samples_per_prompt": 1, "ppo_epochs": 2, "kl_coef": 0.05, "kl_penalty": "reward", "whiten": True,
            "rm_reward": True}


def save_auto_config(cfg: AutoConfig, run: Path) -> None:
    write_json(run / AUTO_CONFIG, {**asdict(cfg), "profile": cfg.profile.to_dict()})


def load_auto_config(run: Path) -> AutoConfig:
    """The settings an `auto` run was started with (RUN/auto.json), for `auto --resume RUN`."""
    path = Path(run) / AUTO_CONFIG
    if not path.exists():
        raise UserError(f"--resume {run}: no {AUTO_CONFIG} there; pass a folder that `lowmem-rlhf auto` created")
    d = json.loads(path.read_text())
    if "sft_len" in d:  # written before SFT and RM shared one --seq-len (they always ran at the same length)
        d["seq_len"] = d.pop("sft_len")
        d.pop("rm_len", None)
    for k, then in PRE_KNOB.items():  # written before the knob: the run goes on as it ran
        if d.get(k) is None:
            d[k] = then
    d["profile"] = dataclass_from_dict(Profile, d["profile"], str(path))
    d["out"] = Path(d["out"])
    return dataclass_from_dict(AutoConfig, d, str(path))


def run_auto(cfg: AutoConfig, plan_dict: dict | None, console, resume: bool = False) -> dict:
    """SFT -> RM -> PPO (or GRPO/RLOO, cfg.algo). With resume: finished stages are kept, the one in
    progress continues from its newest checkpoint, the rest start fresh."""
    t0 = time.time()
    spp = cfg.samples_per_prompt
    algo = cfg.algo
    if algo in CRITIC_FREE:
        rl_cfg = GRPOConfig(algo=algo, group_size=spp, **({} if cfg.beta is None else {"beta": cfg.beta}))
        check_grpo(dataclasses.replace(rl_cfg, rollout_batch=cfg.rollout_batch), "--samples-per-prompt")  # before SFT
    else:
        check_rollout(cfg.rollout_batch, spp)
    run = Path(cfg.out)
    ensure_writable(run)
    if not resume:
        write_json(run / "plan.json", plan_dict)
        save_auto_config(cfg, run)
    common = dict(model=cfg.model, out=run, profile=cfg.profile, seed=cfg.seed, max_vram=cfg.max_vram,
                  trust_remote_code=cfg.trust_remote_code, progress=cfg.progress)

    def stage(name: str, title: str, fn, stage_cfg):
        if resume and is_complete(run / name):
            console.print(f"[bold]{title}[/bold]: finished earlier, kept ({run / name})")
            return json.loads((run / name / "summary.json").read_text())
        stage_cfg.resume = resume and has_checkpoint(run, name)
        console.print(f"[bold]{title}[/bold]" + (" (resuming)" if stage_cfg.resume else ""))
        try:
            return fn(stage_cfg, console=console)
        except Interrupted as e:
            raise Interrupted(str(e).replace("run the same command with --resume",
                                             f"run `lowmem-rlhf auto --resume {run}`")) from None

    sft = stage("sft", f"1/3 SFT on {cfg.sft_data}", run_sft,
                SFTConfig(data=cfg.sft_data, max_len=cfg.seq_len, batch=cfg.sft_batch, max_steps=cfg.sft_steps,
                          **common))
    rm = None
    program = cfg.program_reward()
    if cfg.trains_rm():
        rm = stage("rm", f"2/3 reward model on {cfg.pairs}", run_rm,
                   RMConfig(data=cfg.pairs, init_from=run / "sft", max_len=cfg.seq_len, batch=cfg.rm_batch,
                            max_steps=cfg.rm_steps, eval_fraction=0.1, **common))
    else:
        console.print("2/3 reward model skipped: the reward is a program")
    # the RM is a reward unless it was trained beside a program with --no-rm-reward
    rm_rewards = rm is not None and (not program or cfg.rm_reward)
    if rm is not None and not rm_rewards:
        console.print(f"the reward model is trained and scored, not a reward: RL optimises {program} alone "
                      "(--rm-reward adds it)")
    reward = " + ".join(x for x in ("the reward model" if rm_rewards else "", program) if x)
    # the program's weight against the reward model's (1) where both are rewards
    weights = [1.0, cfg.reward_weight or 1.0] if rm_rewards and program else None
    rl = dict(prompts=cfg.prompts, sft=run / "sft", reward_model=run / "rm" if rm_rewards else None,
              reward_weights=weights, temperature=cfg.temperature, missing_eos_penalty=cfg.missing_eos_penalty,
              reward=cfg.reward, reward_cmd=cfg.reward_cmd, iterations=cfg.ppo_iterations, lr=cfg.ppo_lr,
              rollout_batch=cfg.rollout_batch, prompt_len=cfg.prompt_len, response_len=cfg.response_len,
              eval_prompts=cfg.heldout, eval_reward=cfg.eval_reward, **common)
    if algo in CRITIC_FREE:
        ppo = stage(algo, f"3/3 {algo.upper()} on {cfg.prompts} (reward: {reward}; {cfg.rollout_batch // spp} "
                    f"prompts x {spp})", run_grpo, dataclasses.replace(rl_cfg, **rl))
    else:
        ppo = stage("ppo", f"3/3 PPO on {cfg.prompts} (reward: {reward})", run_ppo,
                    PPOConfig(ppo_epochs=cfg.ppo_epochs, kl_coef=cfg.kl_coef, kl_target=cfg.kl_target or None,
                              kl_horizon=cfg.kl_horizon or 10000, kl_penalty=cfg.kl_penalty,
                              whiten_advantages=cfg.whiten, samples_per_prompt=spp, **rl))
    before, after = ppo["heldout_before"] or {}, ppo["heldout_after"] or {}
    summary = {
        "run": str(run), "profile": cfg.profile.name, "wall_seconds": time.time() - t0,
        "sft": {"eval_loss_before": sft["eval_loss_before"], "eval_loss_after": sft["eval_loss_after"]},
        "rm": None if rm is None else {"heldout_accuracy_before": (rm["eval_before"] or {}).get("accuracy"),
                                       "heldout_accuracy": (rm["eval_after"] or {}).get("accuracy")},
        "algo": algo, "seconds_rl": ppo.get("seconds"),
        "heldout_checker_sft": before.get("score"), "heldout_checker_ppo": after.get("score"),
        "heldout_n": after.get("n"),
        "heldout_correct_sft": before.get("correct"), "heldout_correct_ppo": after.get("correct"),
        "heldout_lenient_sft": before.get("lenient"), "heldout_lenient_ppo": after.get("lenient"),
        "ppo_reward_first5": ppo["reward_first5"], "ppo_reward_last5": ppo["reward_last5"],
        "ppo_kl_last5": ppo.get("kl_last5"), "ppo_kl_coef_final": ppo.get("kl_coef_final"),
        "plot": str(run / algo / f"{algo}.png"),
    }
    write_json(run / "summary.json", summary)
    return summary
