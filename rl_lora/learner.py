"""The learner: a frozen HF base with our rank-r adapters, trained on sampled completions.

Built for small adapters on small machines:
- logits are computed only at completion positions (never the prompt), in chunks, with the chunk's
  [tokens, vocab] fp32 logits recomputed in the backward pass instead of stored: full-vocabulary logits are
  what dominates a stock learner's peak memory;
- micro-batches are packed by a token budget (padded prompt + completion tokens), so memory is bounded
  by `optim.tokens_per_microbatch` whatever the completion lengths;
- a step whose loss or gradient is not finite is skipped: adapter and optimizer are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rl_lora import lora as lora_mod
from rl_lora.loss import LossInputs, ppo_clip_loss, truncated_is_loss

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOGIT_CHUNK = 1024  # completion tokens per logits chunk: 1024 x 49k vocab x 4 B = 200 MB transient


@dataclass
class TrainSample:
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    advantage: float


def _chunk_token_logprobs(hidden_N: torch.Tensor, weight: torch.Tensor, targets_N: torch.Tensor,
                          inv_temperature: float) -> torch.Tensor:
    logits_NV = (hidden_N @ weight.t()).float() * inv_temperature
    return logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - logits_NV.logsumexp(-1)


class Learner:
    def __init__(self, model_path: str, *, rank: int = 1, alpha: float = 32.0, target_modules: list[str],
                 lr: float = 1e-4, lora_plus_ratio: float = 1.0, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 grad_clip: float = 1.0, dtype: str = "float32", tokens_per_microbatch: int = 4096,
                 temperature: float = 1.0, seed: int = 0, full_finetune: bool = False, device: str | None = None,
                 activation_checkpointing: bool = False):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype]).to(self.device)
        self.model.config.use_cache = False
        self.model_path = model_path
        self.rank, self.alpha, self.target_modules = rank, alpha, list(target_modules)
        self.full_finetune = full_finetune
        self.grad_clip = grad_clip
        self.tokens_per_microbatch = tokens_per_microbatch
        self.inv_temperature = 1.0 / temperature
        if full_finetune:
            self.adapters = {}
            for p in self.model.parameters():
                p.requires_grad_(True)
            groups = [{"params": [p for p in self.model.parameters()], "lr": lr}]
        else:
            self.adapters = lora_mod.inject_lora(self.model, self.target_modules, rank, alpha, seed)
            groups = lora_mod.adapter_parameters(self.adapters, lora_plus_ratio, lr)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                           foreach=True)
        self.backbone = getattr(self.model, self.model.base_model_prefix)
        if activation_checkpointing:
            # Recompute each decoder layer in backward instead of storing its activations: peak memory drops to
            # ~one layer's activations, for one extra forward pass. (HF applies it only in train mode; Llama-family
            # models have no dropout, so train mode changes nothing else.)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()
        self.skipped_steps = 0

    # ------------------------------------------------------------------------------------------------------
    # Per-token logprobs

    def _microbatches(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        order = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.completion_ids), reverse=True)
        batches, current, longest = [], [], 0
        for s in order:
            length = len(s.prompt_ids) + len(s.completion_ids)
            if current and max(longest, length) * (len(current) + 1) > self.tokens_per_microbatch:
                batches.append(current)
                current, longest = [], 0
            current.append(s)
            longest = max(longest, length)
        if current:
            batches.append(current)
        return batches

    def token_logprobs(self, samples: list[TrainSample]) -> torch.Tensor:
        """[N] log p_learner of every completion token of `samples`, concatenated in order."""
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        longest = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        rows, cols, targets = [], [], []
        for i, (s, x) in enumerate(zip(samples, seqs)):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
            n_prompt = len(s.prompt_ids)
            pos = list(range(n_prompt - 1, len(x) - 1))  # hidden state at p-1 predicts token p
            rows += [i] * len(pos)
            cols += pos
            targets += s.completion_ids
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden_N = hidden[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]
        targets_N = torch.tensor(targets, device=self.device)
        weight = self.model.get_output_embeddings().weight
        out = []
        for start in range(0, hidden_N.shape[0], _LOGIT_CHUNK):
            h, t = hidden_N[start: start + _LOGIT_CHUNK], targets_N[start: start + _LOGIT_CHUNK]
            if torch.is_grad_enabled():
                out.append(checkpoint(_chunk_token_logprobs, h, weight, t, self.inv_temperature, use_reentrant=False))
            else:
                out.append(_chunk_token_logprobs(h, weight, t, self.inv_temperature))
        return torch.cat(out)

    @torch.no_grad()
    def score(self, samples: list[TrainSample]) -> list[list[float]]:
        """Per-sample lists of learner logprobs (no grad), e.g. for the sampler/learner agreement probe."""
        out = []
        for mb in self._microbatches(samples):
            lp = self.token_logprobs(mb).float().cpu()
            offset = 0
            for s in mb:
                out.append((id(s), lp[offset: offset + len(s.completion_ids)].tolist()))
                offset += len(s.completion_ids)
        by_id = dict(out)
        return [by_id[id(s)] for s in samples]

    # ------------------------------------------------------------------------------------------------------
    # One optimizer step

    def train_step(self, samples: list[TrainSample], is_cap: float = 2.0, ppo_clip: float = 0.0) -> dict:
        num_tokens = sum(len(s.completion_ids) for s in samples)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"is/ratio_sum": 0.0, "is/limited_sum": 0.0, "is/kl_sum": 0.0}
        ratio_max, loss_total = 0.0, 0.0
        for mb in self._microbatches(samples):
            logp_T = self.token_logprobs(mb)
            inputs = LossInputs(
                logp_learner_T=logp_T,
                logp_sampler_T=torch.tensor([lp for s in mb for lp in s.sampler_logprobs], device=self.device),
                advantages_T=torch.tensor([s.advantage for s in mb for _ in s.completion_ids], device=self.device),
                num_tokens=num_tokens,
            )
            out = ppo_clip_loss(inputs, ppo_clip) if ppo_clip > 0 else truncated_is_loss(inputs, is_cap)
            out.loss.backward()
            loss_total += out.loss.item()
            for k in sums:
                sums[k] += out.metrics[k]
            ratio_max = max(ratio_max, out.metrics["is/ratio_max"])
        clip = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip).item()
        finite = math.isfinite(grad_norm) and math.isfinite(loss_total) and math.isfinite(sums["is/ratio_sum"])
        if finite:
            self.optimizer.step()
        else:  # leave adapter and optimizer state untouched
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss/pg": loss_total,
            "loss/grad_norm": grad_norm,
            "loss/skipped": 0.0 if finite else 1.0,
            "is/ratio_mean": sums["is/ratio_sum"] / max(num_tokens, 1),
            "is/ratio_max": ratio_max,
            "is/frac_limited": sums["is/limited_sum"] / max(num_tokens, 1),
            "is/kl_sampler_learner": sums["is/kl_sum"] / max(num_tokens, 1),
            "learn/tokens": float(num_tokens),
        }

    # ------------------------------------------------------------------------------------------------------
    # Adapter export / state

    def peft_config(self) -> dict:
        return lora_mod.peft_config(self.rank, self.alpha, self.target_modules, self.model_path)

    def write_adapter(self, path) -> None:
        lora_mod.write_peft_adapter(path, lora_mod.peft_state_dict(self.adapters), self.peft_config())

    def load_adapter(self, path) -> None:
        lora_mod.load_peft_adapter(path, self.adapters)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)
