"""What the run trains, chosen once at setup (`policy_of`): K LoRA adapters on a frozen base, or the whole model
(`lora.rank: full`, the full fine-tuning baseline). The loop, the pusher and the checkpoints call the same methods
on either and never ask which it is.

Each strategy owns: pushing a new version into the engines (new LoRA ids, old ones evicted; or the engines'
weights overwritten in place), the learner's logprobs under the previous version for the push check (adapters
only: full fine-tuning keeps no copy), what a checkpoint holds (PEFT directories; or the model's state dict), the
final weights (`adapter/`, `adapters/<name>/`; or `model/`, HF format) and the final table's rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rl_lora.errors import ConfigError


def lora_id(version: int, K: int, k: int) -> int:
    """Adapter k of run version `version`: a LoRA id unique per engine, (version-1)*K + k + 1."""
    return (version - 1) * K + k + 1


def version_of(adapter_id: int, K: int, submitted: int) -> int:
    """The run version of a completion, from the LoRA id it was sampled under (the inverse of `lora_id`). Full FT
    serves no adapter (id 0), so its version is the one live when the request was submitted."""
    return (adapter_id - 1) // K + 1 if adapter_id else submitted


class Adapters:
    """K LoRA adapters on a frozen base: each version is pushed as new immutable LoRA ids; the previous version's
    tensors are kept for the push check's staleness test."""

    def __init__(self, learner):
        self.learner = learner
        self.K = learner.num_adapters
        # copies of each adapter's tensors as pushed: the live version and the one before it (for the guard), as
        # PEFT tensors (for the engines) and as the learner's trainable parameters (swapped in and back bit for bit)
        self.pushed_K: list[dict] | None = None
        self.previous_K: list[dict] | None = None
        self.params_K: list[list] | None = None
        self.previous_params_K: list[list] | None = None

    @property
    def names(self) -> list[str]:
        """Each trained model's name in the final table: `adapter` alone, else each adapter's own."""
        return ["adapter"] if self.K == 1 else [s.name for s in self.learner.specs]

    @property
    def weight_dirs(self) -> list[str]:
        """Where each trained model lives in a run or checkpoint directory."""
        return [self.learner.adapter_dirname(k) for k in range(self.K)]

    def push(self, fleet, version: int, live_refs: list, stale: bool) -> list:
        """Every adapter as LoRA id `lora_id(version, K, k)`, each one's previous version evicted. `stale` (the
        fault): the engine gets the previous version again (zeros where there is none: the base)."""
        from rl_lora import lora as lora_mod

        pushed_K = [{n: t.clone() for n, t in lora_mod.peft_state_dict(views).items()}
                    for views in self.learner.adapter_sets]
        refs = []
        for k in range(self.K):
            tensors = pushed_K[k]
            if stale:
                tensors = self.pushed_K[k] if self.pushed_K else {n: torch.zeros_like(v) for n, v in tensors.items()}
            refs.append(fleet.push_adapter(lora_id(version, self.K, k), k, tensors, self.learner.peft_config(k)))
            if len(live_refs) > k:
                fleet.evict(live_refs[k].version)
        self.previous_K, self.pushed_K = self.pushed_K, pushed_K
        self.previous_params_K = self.params_K
        self.params_K = [[p.detach().clone() for p in ps] for ps in self.learner.param_sets]
        return refs

    def push_previous(self, fleet, version: int) -> list | None:
        """The previous version reloaded under its own ids (the stale_request fault), or None where there is none."""
        if not self.previous_K:
            return None
        return [fleet.push_adapter(lora_id(version - 1, self.K, k), k, self.previous_K[k],
                                   self.learner.peft_config(k)) for k in range(self.K)]

    def version_of(self, adapter_id: int, submitted: int) -> int:
        return version_of(adapter_id, self.K, submitted)

    def score_previous(self, samples: list) -> list[list[float]] | None:
        """The learner's logprobs of `samples` under the previous version (its tensors swapped in, then the live
        version's bit-exact copies swapped back), or None before the second push."""
        if not self.previous_params_K:
            return None
        self._load(self.previous_params_K)
        try:
            return self.learner.score(samples)
        finally:
            self._load(self.params_K)

    @torch.no_grad()
    def _load(self, params_K: list[list]) -> None:
        """The learner's trainable parameters set to saved copies (LoRA's A and B; a scalars adapter's s)."""
        for params, saved in zip(self.learner.param_sets, params_K):
            for p, value in zip(params, saved):
                p.copy_(value)

    def save_checkpoint(self, root: Path) -> dict:
        """Each adapter's PEFT directory under `root`; nothing more for trainer_state.pt."""
        self.write(root)
        return {}

    def load_checkpoint(self, root: Path, payload: dict) -> None:
        for k, d in enumerate(self.weight_dirs):
            if not (root / d).is_dir():
                raise ConfigError(f"checkpoint {root} has no {d}/ (a different adapter list?)")
            self.learner.load_adapter(root / d, k)

    def write(self, root: Path) -> None:
        """The trained adapters as PEFT directories under `root` (the run's final weights, or a checkpoint's)."""
        for k, d in enumerate(self.weight_dirs):
            self.learner.write_adapter(root / d, k)

    def final_rows(self, fleet, model_path: str, labels: list[str], refs: list, evaluate, k: int) -> tuple[list, list]:
        """Base and trained rows from ONE generate call of the running engine (multi-LoRA; base rows run without
        an adapter). `evaluate(models)` runs evaluate_models on the held-out set."""
        return evaluate([("base", None)] + list(zip(labels, refs)))


class FullModel:
    """Full fine-tuning: the engines' base weights ARE the policy and are overwritten in place after every step."""

    K = 1
    names = ["full-ft"]
    weight_dirs = ["model"]

    def __init__(self, learner):
        self.learner = learner

    def push(self, fleet, version: int, live_refs: list, stale: bool) -> list:
        if not stale:  # (the stale fault: the engine keeps the previous weights)
            fleet.load_weights({n: p.detach() for n, p in self.learner.model.named_parameters()})
        return [None]

    def push_previous(self, fleet, version: int) -> None:
        return None

    def version_of(self, adapter_id: int, submitted: int) -> int:
        return submitted  # no adapter id: the version live when the request was submitted

    def score_previous(self, samples: list) -> None:
        return None  # no copy of the previous weights: the push check's tolerance test only

    def save_checkpoint(self, root: Path) -> dict:
        return {"model": self.learner.model.state_dict()}

    def load_checkpoint(self, root: Path, payload: dict) -> None:
        self.learner.model.load_state_dict(payload["model"])

    def write(self, root: Path) -> None:
        self.learner.save_model(root / "model")

    def final_rows(self, fleet, model_path: str, labels: list[str], refs: list, evaluate, k: int) -> tuple[list, list]:
        """The engine holds the trained weights: the trained model is evaluated first, then the original weights
        are loaded back for the base row (two calls, the same request seeds: still paired). Rows: base first."""
        from safetensors.torch import load_file

        from rl_lora.eval.metrics import paired_delta
        from rl_lora.eval.runner import LIVE_EVAL_SEED

        trained, trained_samples = evaluate([(labels[0], None)])
        original = {}
        for f in sorted(Path(model_path).glob("*.safetensors")):
            original.update(load_file(str(f)))
        fleet.load_weights(original)
        rows, sample_rows = evaluate([("base", None)])
        rows, sample_rows = rows + trained, sample_rows + trained_samples
        delta, ci = paired_delta(rows[1]["correct_per_problem"], rows[0]["correct_per_problem"], k, seed=LIVE_EVAL_SEED)
        rows[1]["delta_avg_vs_base"], rows[1]["delta_avg_vs_base_ci95"] = delta, ci
        return rows, sample_rows


def policy_of(learner) -> Adapters | FullModel:
    """The strategy for what `learner` trains, chosen once."""
    return FullModel(learner) if learner.full_finetune else Adapters(learner)
