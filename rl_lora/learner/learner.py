"""The learner: a frozen HF base with our rank-r adapters, trained on sampled completions.

Built for small adapters on small machines:
- one prompt forward per GRPO group (rl_lora/learner/prefix.py): the G completions of a prompt share one computation
  of its keys/values, forward and backward;
- logits are computed only at completion positions (never the prompt), in chunks. With a frozen output layer
  (LoRA) a chunk's gradient with respect to its hidden states is computed in the same pass as its logprobs
  and kept ([tokens, hidden], small), so the [tokens, vocab] logits are neither stored nor recomputed; full
  fine-tuning (which needs the output layer's weight gradient) recomputes the chunk's logits in backward;
- SwiGLU MLPs under a frozen down projection keep only gate and up for backward (lora._SwiGLUDown): the
  [tokens, d_ff] silu output and product are recomputed there, one elementwise pass;
- micro-batches are packed by a token budget (padded prompt + completion tokens), so memory is bounded
  by `optim.tokens_per_microbatch` whatever the completion lengths;
- the output layer is the model family's own (rl_lora/learner/heads.py: final-logit soft-capping, logit scale, lm_head
  bias; eager attention where SDPA would drop Gemma-2's attention soft-cap), and at load the learner's logprobs are
  checked against the model's own forward (`_check_head`): a family it would get wrong is refused, not trained;
- full fine-tuning of a bf16/fp16 model steps fp32 master weights (fp32 AdamW state) and copies them back;
- a step whose loss or gradient is not finite is skipped: adapter and optimizer are left as they were;
- K adapters on one base (`specs`) train in the same micro-batches: each sample names its adapter, the rows of
  an adapter are contiguous, and each adapter has its own AdamW, LR, loss normaliser and gradient clip; the K
  AdamW steps run as one fused update over flat buffers (rl_lora/learner/optim.py), exact to torch's per adapter.
"""

from __future__ import annotations

import math

import torch

from rl_lora import atomic
from rl_lora.errors import ConfigError
from rl_lora.learner import heads, optim, prefix
from rl_lora.learner import lora as lora_mod
from rl_lora.learner.batching import adapter_runs, group_keys, pack_microbatches, route_segments, tokens_per_adapter
from rl_lora.learner.logprobs import completion_logprobs
from rl_lora.loss import LossFn, LossInputs, truncated_is_loss
from rl_lora.rollout import TrainSample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Per adapter, the loss sums reduced over a step's micro-batches (and ranks), synced to the host once per step.
_SUM_KEYS = ("is/ratio_sum", "is/limited_sum", "is/kl_sum")


def _default_loss(inputs: LossInputs):
    return truncated_is_loss(inputs, is_cap=2.0)


class Learner:
    def __init__(self, model_path: str, adapters: list[lora_mod.AdapterSpec] | None, *, lr: float | None = None,
                 betas=(0.9, 0.99), weight_decay: float = 0.0, grad_clip: float = 1.0, dtype: str = "float32",
                 tokens_per_microbatch: int = 4096, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
                 device: str | None = None, activation_checkpointing: bool = False, share_prompts: bool = True,
                 fuse_mlp: bool = True, loss: LossFn = _default_loss):
        """K LoRA adapters on the frozen base at `model_path`, one per spec of `adapters` (each with its own AdamW
        and LR, all trained in one forward/backward per micro-batch); `adapters=None`: no adapter, the model's own
        weights are trained at `lr` (full fine-tuning: `Learner.full_model`). `share_prompts`: one prompt forward
        per group of completions of the same prompt; `fuse_mlp`: SwiGLU MLPs recompute their [tokens, d_ff]
        intermediates in backward instead of storing them (both exact; off only to compare). `loss`: the step's
        loss function (loss.build_loss; truncated IS with cap 2 by default)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if (adapters is None) == (lr is None):
            raise ValueError("Learner: either adapters (each with its own lr) or lr alone (full fine-tuning)")
        if adapters is not None and not adapters:
            raise ValueError("Learner: an empty adapter list (full fine-tuning is adapters=None)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        attention = heads.attn_implementation(AutoConfig.from_pretrained(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=_DTYPES[dtype], **({"attn_implementation": attention} if attention else {})).to(self.device)
        self.model.config.use_cache = False
        self.head = heads.head_of(self.model.config)
        self.model_path = model_path
        self.loss = loss
        self.grad_clip = grad_clip
        self.tokens_per_microbatch = tokens_per_microbatch
        self.inv_temperature = 1.0 / temperature
        self.truncation = (top_k, top_p)  # the sampler's top-k / top-p, replayed on the learner's logits
        self.specs = list(adapters or [])
        self.routing = None
        adamw = dict(betas=tuple(betas), weight_decay=weight_decay, foreach=True)
        if adapters is None:  # the model's own weights
            self.adapter_sets = [{}]
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.param_sets = [list(self.model.parameters())]
            # Mixed precision: AdamW steps fp32 master copies and the low-precision weights are copied from them,
            # so an update below the weight's bf16 spacing (lr 1e-5 on |w| ~ 0.01-0.1) is kept, not rounded
            # away (stepping bf16 weights in place changed 2.9% of them in 2 steps at lr 1e-5, issue 15).
            self.masters = None
            if any(p.dtype != torch.float32 for p in self.param_sets[0]):
                self.masters = [p.detach().float().clone() for p in self.param_sets[0]]
            self.step_params = [self.masters or self.param_sets[0]]
            self.optimizers = [torch.optim.AdamW(self.step_params[0], lr=lr, **adamw)]
        else:
            self.routing, self.adapter_sets = lora_mod.inject_adapters(self.model, self.specs)
            if fuse_mlp:
                lora_mod.fuse_swiglu(self.model)
            self.optimizers, self.param_sets = [], []
            for spec, views in zip(self.specs, self.adapter_sets):
                groups = lora_mod.adapter_parameters(views, spec.lora_plus_ratio, spec.lr)
                self.param_sets.append([p for g in groups for p in g["params"]])
                self.optimizers.append(torch.optim.AdamW(groups, lr=spec.lr, **adamw))
            self.masters, self.step_params = None, self.param_sets  # adapters are fp32 whatever the base dtype
        # adapters: one fused step of all K optimizers over flat buffers (rl_lora/learner/optim.py); full FT: torch's own
        self.stepper = (optim.LoopedAdamW(self.optimizers, self.step_params) if adapters is None
                        else optim.FusedAdamW(self.optimizers))
        self.adapters = self.adapter_sets[0]  # the single-adapter view
        self.optimizer = self.optimizers[0]
        self.params = [p for ps in self.param_sets for p in ps]
        self.backbone = getattr(self.model, self.model.base_model_prefix)
        self.share_prompts = share_prompts and prefix.supported(self.model)
        self.kv_weight = prefix.kv_copy_weight(self.model.config) if self.share_prompts else 0.0
        self._check_head()
        if activation_checkpointing:
            # Recompute each decoder layer in backward instead of storing its activations: peak memory drops to
            # ~one layer's activations, for one extra forward pass. (HF applies it only in train mode; Llama-family
            # models have no dropout, so train mode changes nothing else.)
            kwargs = {"use_reentrant": False}
            if self.routing is not None:  # a recomputed layer must see the routing of its own forward
                kwargs["context_fn"] = self.routing.checkpoint_context
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if self.share_prompts:
                prefix.allow_with_checkpointing(self.model)
            self.model.train()

    @classmethod
    def full_model(cls, model_path: str, *, lr: float, **kwargs) -> "Learner":
        """Full fine-tuning: every weight of the model trained at `lr` (fp32 masters for a bf16/fp16 model)."""
        return cls(model_path, None, lr=lr, **kwargs)

    @property
    def num_adapters(self) -> int:
        """Parameter sets trained side by side, each with its own optimizer: K adapters, or 1 (the full model)."""
        return len(self.param_sets)

    # ------------------------------------------------------------------------------------------------------
    # Per-token logprobs

    def _microbatches(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        """Micro-batches of at most `tokens_per_microbatch` padded tokens (batching.pack_microbatches); with prompt
        sharing, each completion's gathered copy of its prompt's keys/values is costed too."""
        return pack_microbatches(samples, self.tokens_per_microbatch, self.kv_weight if self.share_prompts else None)

    def _route(self, adapters: list[int]) -> None:
        """Tell the LoRA layers which adapter each row of the next forward belongs to."""
        if self.routing is not None:
            self.routing.segments = route_segments(adapters)

    def _hidden(self, samples: list[TrainSample]) -> torch.Tensor:
        """[N, d] final hidden states at the positions that predict each completion token, one forward per row."""
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        longest = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        rows, cols = [], []
        for i, (s, x) in enumerate(zip(samples, seqs)):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
            pos = list(range(len(s.prompt_ids) - 1, len(x) - 1))  # hidden state at p-1 predicts token p
            rows += [i] * len(pos)
            cols += pos
        self._route([s.adapter for s in samples])
        hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return hidden[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]

    def token_logprobs(self, samples: list[TrainSample]) -> torch.Tensor:
        """[N] log p_learner of every completion token of `samples`, concatenated in order."""
        groups = group_keys(samples)
        try:
            if self.share_prompts and len(groups[0]) < len(samples):
                hidden_N = prefix.shared_hidden(self.backbone, samples, groups, self.device, self._route)
            else:
                hidden_N = self._hidden(samples)
        finally:  # the routing describes this batch only: a later forward (e.g. model(ids)) is adapter 0's again
            if self.routing is not None:
                self.routing.segments = None
        targets_N = torch.tensor([t for s in samples for t in s.completion_ids], device=self.device)
        return completion_logprobs(hidden_N, targets_N, self.model.get_output_embeddings(), self.head,
                                   self.inv_temperature, *self.truncation)

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

    def backward(self, samples: list[TrainSample]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Forward/backward of the step's loss into every adapter's .grad (zeroed first), one pass per
        micro-batch for all adapters. Returns (completion tokens per adapter, [K, 4] float64 sums of loss,
        is/ratio_sum, is/limited_sum, is/kl_sum, [K] maximum ratio), the sums and maxima still on the device."""
        from rl_lora.learner import distributed

        K = self.num_adapters
        tokens_K = tokens_per_adapter(samples, K)
        data_parallel = distributed.active()  # torchrun: `samples` is this rank's shard of the step
        if data_parallel:  # normalise by the whole step's tokens, so the summed gradients are the full-batch ones
            tokens_K = [int(t) for t in distributed.all_reduce_sum(tokens_K, self.device)]
        self.stepper.zero_grad()
        sums_K = torch.zeros(K, 1 + len(_SUM_KEYS), dtype=torch.float64, device=self.device)
        ratio_max_K = torch.zeros(K, dtype=torch.float64, device=self.device)
        for mb in self._microbatches(samples):
            logp_T = self.token_logprobs(mb)
            loss, offset = 0.0, 0
            for k, run in adapter_runs(mb):
                n = sum(len(s.completion_ids) for s in run)
                inputs = LossInputs(
                    logp_learner_T=logp_T[offset: offset + n],
                    logp_sampler_T=torch.tensor([lp for s in run for lp in s.sampler_logprobs], device=self.device),
                    advantages_T=torch.tensor([s.advantage for s in run for _ in s.completion_ids], device=self.device),
                    num_tokens=tokens_K[k],
                )
                offset += n
                out = self.loss(inputs)
                loss = loss + out.loss
                sums_K[k] += torch.stack([out.loss.detach().double(), *(out.metrics[key] for key in _SUM_KEYS)])
                # fmax, like Python's max: a NaN ratio does not replace the running maximum
                ratio_max_K[k] = torch.fmax(ratio_max_K[k], out.metrics["is/ratio_max"])
            loss.backward()
            self._grads_to_masters()  # per micro-batch: the step's gradient is summed in fp32
        if data_parallel:
            self.stepper.all_reduce_grads()
            torch.distributed.all_reduce(sums_K)
            torch.distributed.all_reduce(ratio_max_K, op=torch.distributed.ReduceOp.MAX)
        return tokens_K, sums_K, ratio_max_K

    def train_step(self, samples: list[TrainSample]) -> tuple[dict, list[dict]]:
        """One AdamW step of every adapter on its own samples (one forward/backward per micro-batch for all).

        Each adapter's loss is normalised by its own completion tokens, clipped by its own gradient norm and
        skipped on its own if not finite: the result for adapter k is that of a single-adapter step on its
        samples. The loss sums and gradient norms stay on the device until one transfer at the end of the step.
        Returns the step's metrics over all adapters and each adapter's own (named at the logging boundary)."""
        K = self.num_adapters
        tokens_K, sums_K, ratio_max_K = self.backward(samples)
        clip = self.grad_clip if self.grad_clip > 0 else math.inf
        norms_K = self.stepper.clip_grad_norms(clip, [n > 0 for n in tokens_K])
        host = torch.cat([sums_K.flatten(), ratio_max_K, norms_K.double().to(sums_K.device)]).tolist()  # one sync
        width = 1 + len(_SUM_KEYS)
        per_K, raw_K, step_K = [], [], []
        for k in range(K):
            n = tokens_K[k]
            loss, ratio_sum, limited_sum, kl_sum = host[k * width:(k + 1) * width]
            ratio_max, grad_norm = host[K * width + k], host[K * width + K + k]
            finite = math.isfinite(grad_norm) and math.isfinite(loss) and math.isfinite(ratio_sum)
            step_K.append(bool(n) and finite)  # else: this adapter and its optimizer state stay as they were
            raw_K.append((ratio_sum, limited_sum, kl_sum))
            per_K.append({
                "loss/pg": loss, "loss/grad_norm": grad_norm, "loss/skipped": 0.0 if finite or not n else 1.0,
                "is/ratio_mean": ratio_sum / max(n, 1), "is/ratio_max": ratio_max,
                "is/frac_limited": limited_sum / max(n, 1),
                "is/kl_sampler_learner": kl_sum / max(n, 1), "learn/tokens": float(n)})
        self.stepper.step(step_K)  # every adapter at once
        if any(step_K):
            self._masters_to_model()
        self.stepper.zero_grad()
        n_all = max(sum(tokens_K), 1)
        total = {"loss/pg": sum(m["loss/pg"] for m in per_K),
                 "loss/grad_norm": max(m["loss/grad_norm"] for m in per_K),
                 # the step counts as skipped only if every adapter that had samples was skipped
                 "loss/skipped": float(all(m["loss/skipped"] for m, n in zip(per_K, tokens_K) if n)),
                 "is/ratio_mean": sum(r[0] for r in raw_K) / n_all,
                 "is/ratio_max": max(m["is/ratio_max"] for m in per_K),
                 "is/frac_limited": sum(r[1] for r in raw_K) / n_all,
                 "is/kl_sampler_learner": sum(r[2] for r in raw_K) / n_all,
                 "learn/tokens": float(sum(tokens_K))}
        return total, per_K

    # ------------------------------------------------------------------------------------------------------
    # Adapter export / state

    def peft_config(self, k: int = 0) -> dict:
        spec = self.specs[k]
        return lora_mod.peft_config(spec.rank, spec.alpha, spec.target_modules, self.model_path, self.adapter_sets[k])

    def save_model(self, path) -> None:
        """Full fine-tuning: the whole model (HF format, with its tokenizer), written atomically."""
        from transformers import AutoTokenizer

        def fill(tmp) -> None:
            self.model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(tmp)

        atomic.write_dir(path, fill, durable=False)

    def snapshot(self) -> torch.Tensor:
        """A copy of every adapter's parameters at once (one flat tensor; adapters only)."""
        return self.stepper.snapshot()

    def restore(self, snap: torch.Tensor) -> None:
        """Every adapter's parameters set from a `snapshot`, in one copy."""
        self.stepper.restore(snap)

    def peft_tensors(self, snap: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each adapter's PEFT-named tensors (peft_state_dict's) as views of `snap`, the snapshot of the live
        parameters, moved to the CPU in one copy: K adapters cost one transfer, not one per tensor. A tensor that is
        computed rather than stored (not a view of the parameters) is copied from the live one."""
        snap = snap.cpu()
        out = []
        for views in self.adapter_sets:
            tensors = {}
            for key, t in lora_mod.peft_tensor_views(views).items():
                try:
                    tensors[key] = self.stepper.view_in(snap, t)
                except ValueError:
                    tensors[key] = t.detach().to("cpu", torch.float32, copy=True).contiguous()
            out.append(tensors)
        return out

    def write_adapter(self, path, k: int = 0) -> None:
        from rl_lora.learner import tinylora

        views = self.adapter_sets[k]
        lora_mod.write_peft_adapter(path, lora_mod.peft_state_dict(views), self.peft_config(k), tinylora.state_files(views))

    def load_adapter(self, path, k: int = 0) -> None:
        lora_mod.load_peft_adapter(path, self.adapter_sets[k])

    def adapter_dirname(self, k: int) -> str:
        """Where adapter k lives in a run or checkpoint directory: `adapter` (K = 1) or `adapters/<name>`."""
        return "adapter" if self.num_adapters == 1 else f"adapters/{self.specs[k].name}"

    def optimizer_states(self) -> list[dict]:
        """Each optimizer's state; with fp32 masters (low-precision full fine-tuning) they travel with it."""
        states = [opt.state_dict() for opt in self.optimizers]
        if self.masters is not None:
            states[0] = {**states[0], "fp32_masters": [m.detach().cpu().clone() for m in self.masters]}
        return states

    def load_optimizer_states(self, states: list[dict]) -> None:
        """After the model's own weights are loaded (full fine-tuning): the masters are the checkpoint's, or, from a
        checkpoint without them, the loaded weights."""
        if len(states) != len(self.optimizers):
            raise ConfigError(f"checkpoint has {len(states)} optimizer states, the run has {len(self.optimizers)} "
                             "adapters (a different adapter list?)")
        for opt, st in zip(self.optimizers, states):
            st = dict(st)
            saved = st.pop("fp32_masters", None)  # only the full model's (one) state has masters
            opt.load_state_dict(st)
            with torch.no_grad():
                if self.masters is not None:  # fp32 masters, from the checkpoint or the loaded weights
                    for m, src in zip(self.masters, saved or self.param_sets[0]):
                        m.copy_(src)
                    self._masters_to_model()
                elif saved is not None:  # a low-precision run's masters, resumed in fp32
                    for p, src in zip(self.param_sets[0], saved):
                        p.copy_(src)
        self.stepper.reload_state()  # the loaded moments into the fused step's flat buffers

    def _grads_to_masters(self) -> None:
        """Add the low-precision weights' gradients to the fp32 masters' (and free them)."""
        if self.masters is None:
            return
        for m, p in zip(self.masters, self.param_sets[0]):
            if p.grad is not None:
                m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def _masters_to_model(self) -> None:
        if self.masters is None:
            return
        for m, p in zip(self.masters, self.param_sets[0]):
            p.copy_(m)

    @torch.no_grad()
    def _check_head(self) -> None:
        """Once at load: this learner's logprobs (its own output layer, chunked) equal the model's own
        `log_softmax(model(ids).logits / T)` on a short sequence. A family whose output layer does something the
        learner does not reproduce is refused here rather than trained wrong (heads.check_output_layer refuses the ones it
        can see before any engine starts)."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        ids = (torch.arange(16) * 7919 + 11) % min(vocab, 4096)  # fixed, spread over the vocabulary
        sample = TrainSample(ids[:4].tolist(), ids[4:].tolist(), [0.0] * 12, 0.0)
        kept, self.truncation = self.truncation, (-1, 1.0)  # the model's own forward has no top-k / top-p
        try:
            ours = self.token_logprobs([sample]).float().cpu()
        finally:
            self.truncation = kept
        logits = self.model(input_ids=ids[None].to(self.device)).logits[0, 3:-1].float().cpu()
        theirs = torch.log_softmax(logits * self.inv_temperature, -1).gather(-1, ids[4:, None]).squeeze(-1)
        gap = (ours - theirs).abs().mean().item()
        tol = 1e-3 if self.model.dtype == torch.float32 else 0.1  # as sync.push_check_tol
        if not gap <= tol:
            raise ConfigError(f"model.path: the learner's logprobs differ from {type(self.model).__name__}'s own "
                              f"forward by {gap:.3g} nats per token (output layer applied: {self.head.describe()}): "
                              "its output layer does something the learner does not reproduce; not supported")

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)
