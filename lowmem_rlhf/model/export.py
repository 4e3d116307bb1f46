"""Export a run as a standalone model: the base in 16-bit (never quantized), the SFT adapter and
the PPO actor merged in, saved with its tokenizer for plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.adapters import read_meta
from lowmem_rlhf.model.loading import TORCH_DTYPES, merge_adapter, resolve_source

POLICY_ADAPTERS = (("ppo", "actor"), ("grpo", "actor"), ("rloo", "actor"), ("sft", "adapter"))  # RL policies, then SFT


def policy_adapters(run: Path) -> tuple[list[Path], str]:
    """Adapters to merge, in order: (merged SFT adapters recorded by the stage, the policy adapter).
    The policy is the RL stage that finished last (ppo, grpo or rloo), else SFT."""
    run = Path(run)
    rl = [(s, n) for s, n in POLICY_ADAPTERS[:-1] if (run / s / "summary.json").exists()]
    rl.sort(key=lambda sn: (run / sn[0] / "summary.json").stat().st_mtime, reverse=True)
    for stage, name in rl + [POLICY_ADAPTERS[-1]]:
        adapter = run / stage / name
        if (adapter / "adapter_config.json").exists() and (run / stage / "summary.json").exists():
            meta = read_meta(adapter)
            merged = [Path(p) for p in meta.get("merged", [])]
            for p in merged:
                if not (p / "adapter_config.json").exists():
                    raise UserError(f"{adapter}: it was trained on a base merged with {p}, which is gone; "
                                    "restore that SFT folder")
            return merged + [adapter], meta.get("source", "")
    raise UserError(f"{run}: no finished policy to export (looked for ppo/, grpo/ or rloo/actor and sft/adapter with summary.json)")


def export_run(run: Path, out: Path, dtype: str = "bf16", model: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    adapters, source = policy_adapters(run)
    source = resolve_source(model or source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder")
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=TORCH_DTYPES[dtype])
    for a in adapters:
        lm = merge_adapter(lm, a)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        lm.save_pretrained(str(tmp))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(str(tmp))
        (tmp / "lowmem_rlhf_export.json").write_text(json.dumps(
            {"run": str(Path(run).resolve()), "base": source, "adapters": [str(a) for a in adapters],
             "dtype": dtype}, indent=2))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out



