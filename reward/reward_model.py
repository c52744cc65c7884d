"""Reward model: an HF sequence-classification model scoring completions in batches on one device.

    reward:
      rewards:
        - name: reward_model
          batch_size: 64           # completions per call (one worker call scores them in micro-batches)
          timeout_s: 120           # per call
          kwargs: {model: /models/my-rm, device: cuda:1, micro_batch: 16, max_length: 2048}

A batched reward (lists in, list out). torch and transformers are imported only inside the call (in the reward
worker process, or in-process with num_workers: 0), so `import reward` stays light. The model is loaded once per
process and kept (worker processes load it while they start, before the first call's time limit runs: the
runner calls `reward_model.__reward_warmup__` with the entry's kwargs). Each worker holds its own copy, so use
`num_workers: 1` for a large model, or give it its own device.

Input: with `input_format: chat` (the default when the tokenizer has a chat template) the prompt and completion are
the user and assistant turns of the chat template; with `input_format: pair` they are a text pair. The reward is the
model's logit when it has one label, else the probability of `label` (default: the last class).

kwargs: model (local path or hub name already in the HF cache), device ("cpu", "cuda", "cuda:1"), dtype
("float32", "bfloat16", "float16"), micro_batch (16), max_length (1024 tokens; longer inputs are truncated),
input_format ("auto" | "chat" | "pair"), label (class index for multi-class heads), threads (torch CPU threads
per worker; on CPU set it so that workers x threads <= cores: oversubscribed, a forward is several times slower).
"""

from __future__ import annotations

from reward.registry import batched

_MODELS: dict = {}


def _load(model: str, device: str = "cpu", dtype: str = "float32", threads: int | None = None):
    key = (model, device, dtype)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if key not in _MODELS:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not model:
            raise ValueError("reward_model needs kwargs model (a local path or hub name)")
        tok = AutoTokenizer.from_pretrained(model)
        net = AutoModelForSequenceClassification.from_pretrained(model, dtype=getattr(torch, dtype))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if net.config.pad_token_id is None:
            net.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        net.to(torch.device(device)).train(False)
        _MODELS[key] = (tok, net)
    return _MODELS[key]


def _texts(tok, prompts, completions, input_mode: str):
    mode = input_mode
    if mode == "auto":
        mode = "chat" if getattr(tok, "chat_template", None) else "pair"
    if mode == "chat":
        return [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                        tokenize=False) for p, c in zip(prompts, completions)], None
    if mode == "pair":
        return list(prompts), list(completions)
    raise ValueError(f"reward_model: input_format must be auto, chat or pair, got {input_mode!r}")


@batched
def reward_model(prompts: list[str], completions: list[str], model: str = "", device: str = "cpu",
                 dtype: str = "float32", micro_batch: int = 16, max_length: int = 1024, input_format: str = "auto",
                 label: int | None = None, threads: int | None = None, **_) -> list[float]:
    import torch

    tok, net = _load(model, device, dtype, threads)
    first, second = _texts(tok, prompts, completions, input_format)
    out: list[float] = []
    for a in range(0, len(first), micro_batch):
        b = a + micro_batch
        enc = tok(first[a:b], second[a:b] if second is not None else None, padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt", add_special_tokens=second is not None)
        with torch.no_grad():
            logits = net(**{k: v.to(net.device) for k, v in enc.items()}).logits.float()
        classes = logits.shape[-1]
        k = classes - 1 if label is None else label
        if not 0 <= k < classes:
            raise ValueError(f"reward_model: label {k} out of range for {classes} classes")
        out += (logits[:, 0] if classes == 1 else logits.softmax(-1)[:, k]).tolist()
    return out


def _warmup(model: str = "", device: str = "cpu", dtype: str = "float32", threads: int | None = None, **_):
    _load(model, device, dtype, threads)


reward_model.__reward_warmup__ = _warmup
