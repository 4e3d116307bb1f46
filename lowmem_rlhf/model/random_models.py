"""Random-initialised models built from configs: no download, real transformers classes.

Tiny ones make fast unit tests; preset-shaped ones (7B, 13B) serve GPU measurements.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config():
    """4-layer Llama with grouped-query attention (8 heads, 2 kv heads), untied output layer."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_gpt2_config():
    """4-layer GPT-2: Conv1D linears, LayerNorm, gelu_new, residual dropout, tied embeddings.

    attn_pdrop=0: with attention dropout the CPU SDPA falls back to the math kernel (a seq^2
    tensor) while CUDA's flash/efficient kernels do not; the estimator models CUDA.
    """
    from transformers import GPT2Config

    return GPT2Config(n_embd=256, n_layer=4, n_head=8, vocab_size=1000, n_positions=512, attn_pdrop=0.0,
                      bos_token_id=1, eos_token_id=2)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer():
    """A real byte-level tokenizer: 3 specials (pad 0, bos 1, eos 2 = <|im_end|>), <|im_start|>,
    then the 256 bytes. Any text round-trips; ids stay below 260, so tiny vocabularies work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<s>", "<|im_end|>", "<|im_start|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", bos_token="<s>",
                                   eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE, padding_side="right")


def save_random(config, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                tokenizer=None, device: str = "cpu") -> Path:
    """Instantiate `config` with random weights and save it (with a tokenizer) as a model folder.
    device="cuda" initialises on the GPU (a 7B model in seconds rather than minutes)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    (tokenizer or byte_tokenizer()).save_pretrained(str(folder))
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return folder
