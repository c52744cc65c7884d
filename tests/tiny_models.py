"""Tiny random models, built offline on a byte-level tokenizer, loadable by HF and vLLM: `build_tiny_llama` (the
test suite's model, tests/conftest.py; benchmarks import it as tests.tiny_models) and several other families,
each with the output-layer feature that sets its family apart switched on and large enough to matter:
Gemma-2's final-logit soft-capping, Granite's logits_scaling (divides), Cohere's logit_scale (multiplies), Phi's
lm_head bias. Head size 64 and one KV head, as vLLM's CPU attention needs."""

import json
from pathlib import Path

import torch

HIDDEN = 128

# A ChatML template like SmolLM2's, used by the tiny test model.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def _common(fast, **kw) -> dict:
    return dict(vocab_size=TINY_VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                initializer_range=0.1, **special_ids(fast), **kw)


def _build(target, config_cls, model_cls, seed=0, **kw) -> Path:
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    fast = byte_tokenizer(target)
    torch.manual_seed(seed)
    config = config_cls(**_common(fast, **kw))
    return save_tiny(model_cls(config), fast, target)


def llama_untied(target) -> Path:
    return build_tiny_llama(target, tie_word_embeddings=False)


def qwen2(target) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(target, Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=True)


def qwen3(target) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(target, Qwen3Config, Qwen3ForCausalLM, tie_word_embeddings=False)


def gemma2(target, softcap: float = 5.0, **kw) -> Path:
    """Soft-capping at 5 (Gemma-2 ships 30): this random model's logits reach ~±20 and are capped hard."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _build(target, Gemma2Config, Gemma2ForCausalLM, final_logit_softcapping=softcap,
                  query_pre_attn_scalar=64, sliding_window=512, **kw)


def granite(target, logits_scaling: float = 8.0) -> Path:
    from transformers import GraniteConfig, GraniteForCausalLM

    return _build(target, GraniteConfig, GraniteForCausalLM, logits_scaling=logits_scaling,
                  tie_word_embeddings=True)


def cohere(target, logit_scale: float = 4.0) -> Path:
    from transformers import CohereConfig, CohereForCausalLM

    return _build(target, CohereConfig, CohereForCausalLM, logit_scale=logit_scale)


def phi(target) -> Path:
    """Phi-1/2: its lm_head has a bias (random here: the base init leaves it at zero)."""
    from transformers import PhiConfig, PhiForCausalLM

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    fast = byte_tokenizer(target)
    torch.manual_seed(0)
    kw = _common(fast)
    kw.pop("head_dim")
    model = PhiForCausalLM(PhiConfig(**kw))
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 1.0)
    return save_tiny(model, fast, target)


BUILDERS = {"llama_tied": build_tiny_llama, "llama_untied": llama_untied, "qwen2": qwen2, "qwen3": qwen3,
            "gemma2": gemma2, "granite": granite, "cohere": cohere, "phi": phi}


def build_tiny_qwen3_moe(target, seed: int = 0) -> Path:
    """Qwen3-MoE with 4 experts, top-2 routing, every layer sparse (transformers 5 stores the experts as fused
    3-D parameters `mlp.experts.gate_up_proj` [E, 2F, H] and `mlp.experts.down_proj` [E, H, F])."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return _build(target, Qwen3MoeConfig, Qwen3MoeForCausalLM, seed=seed, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=HIDDEN, decoder_sparse_step=1, norm_topk_prob=True,
                  tie_word_embeddings=False)


def build_tiny_mixtral(target, seed: int = 0) -> Path:
    """Mixtral with 4 experts, top-2 routing (transformers 5: `mlp.experts.gate_up_proj` like Qwen3-MoE; its
    checkpoints, and vLLM: `block_sparse_moe.experts.<i>.w1` (gate), `w3` (up), `w2` (down))."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _build(target, MixtralConfig, MixtralForCausalLM, seed=seed, num_local_experts=4, num_experts_per_tok=2,
                  tie_word_embeddings=False)
