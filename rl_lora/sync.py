"""Keeping the sampler fleet on the learner's policy: pushing adapter versions, the stale-adapter guard, and the
asynchronous pipeline of sampling requests.

- Push: every adapter of the learner becomes a new immutable version (LoRA id (version-1)*K + k + 1, unique per
  engine) in every engine, all K in one call per engine; the previous version of each is evicted. Full fine-tuning overwrites the engines'
  weights instead. Never merged, never restarted.
- Guard: after every push, EVERY engine samples a fixed probe under each adapter at the training sampling settings,
  and its logprobs must match the learner's for the new version (within `train.push_check_tol`) and be much
  closer to the new version than to the previous one (the learner scores the probe under both), so that an
  engine serving an adapter one version stale is caught even when the versions differ by less than the
  tolerance (bf16). Full fine-tuning keeps no copy of the previous weights: the tolerance check only.
- Pipeline (`train.max_staleness` = m): the requests of steps s..s+m are in flight while step s is learned, each
  sampled with the version that was live when it was submitted, so the data of step s is at most m versions
  behind the learner (m = 0: synchronous, on-policy). The sampler's logprobs travel with every completion and
  are the importance-sampling denominator, so a stale completion is corrected, not ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rl_lora import faults
from rl_lora.config import Config, adapter_specs, resident_loras
from rl_lora.errors import RunError
from rl_lora.sampling.sampler import AdapterRef
from rl_lora.seeds import request_seeds, step_seed

PROBE_SEED = 9_000_000  # request seed of the push-check probe
PROBE_TOKENS = 8
PROBE_SAMPLES = 4  # completions per engine and adapter for up to 2 adapters: up to 32 probe tokens each
PROBE_BUDGET = 8  # completions per engine shared out over more adapters (>= 1 each): K = 64 samples 64, not 256
# Past PROBE_BUDGET adapters each adapter's probe is one short completion of a short prompt, so that the check's
# cost (one prefill per adapter: adapters share no prefix cache) stays near a training step's fixed costs: the
# first PROBE_PROMPT_MANY tokens of the probe prompt, PROBE_TOKENS_MANY tokens sampled (the learner, too, computes
# each adapter's prompt on its own: its prefix sharing is per adapter).
PROBE_PROMPT_MANY = 4
PROBE_TOKENS_MANY = 2
# An engine is serving the previous version when its gap to the new version is more than STALE_RATIO times its
# gap to the previous one. With delta = the versions' own mean distance on the probe, the triangle inequality
# gives gap_prev >= delta - gap_new: an engine serving the new version cannot trip the ratio once delta exceeds
# 1.5x its noise (gap_new), and a stale one (gap_prev = its noise) trips it as soon as delta exceeds 3x the
# noise (bf16 here: noise ~0.015 nats per token, a step at lr 1e-3 moves the probe by 0.07-0.09, tolerance 0.1).
# Gaps below STALE_FLOOR * tol are numerical noise (fp32: ~5e-6 measured) and never judged by the ratio:
# versions that close are the same policy.
STALE_RATIO = 2.0
STALE_FLOOR = 0.01


def uses_ray(cfg: Config) -> bool:
    """Engines run as Ray actors when there are several, when a cluster is named, or under torchrun (vLLM would
    otherwise join the learner's process group in rank 0)."""
    from rl_lora.learner.distributed import world

    return cfg.sampler.num_engines > 1 or bool(cfg.sampler.ray_address) or world()[1] > 1


def build_fleet(cfg: Config, model_path: str, say=None):
    """One in-process engine, or `sampler.num_engines` Ray actors."""
    from rl_lora.sampling.fleet import LocalFleet, RayFleet

    kwargs = dict(dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
                  max_lora_rank=max((max(s.rank, s.expert_rank if isinstance(s.expert_rank, int) else 1)
                                     for s in adapter_specs(cfg)), default=1), max_loras=resident_loras(cfg),
                  kvcache_gib=cfg.sampler.cpu_kvcache_gib, gpu_memory_utilization=cfg.sampler.gpu_memory_utilization,
                  tensor_parallel_size=cfg.sampler.tensor_parallel_size, seed=cfg.train.seed)
    if uses_ray(cfg):
        return RayFleet(model_path, kwargs, num_engines=cfg.sampler.num_engines, address=cfg.sampler.ray_address,
                        gpus_per_engine=cfg.sampler.tensor_parallel_size, say=say)
    from rl_lora.sampling.sampler import Sampler

    return LocalFleet(lambda: Sampler(model_path, **kwargs), asynchronous=cfg.train.max_staleness > 0, say=say)


def push_check_tol(cfg: Config) -> float:
    """Mean |logp_sampler - logp_learner| allowed on the probe. fp32 agrees to ~1e-5 (measured); bf16 kernels
    differ more, so its default is looser. 0 = off."""
    if cfg.train.push_check_tol >= 0:
        return cfg.train.push_check_tol
    return 1e-3 if cfg.model.dtype == "float32" else 0.1


@dataclass
class PushResult:
    """What one push measured: the probe gaps (push/probe_gap, and push/probe_gap_prev where the previous version is
    known) and its time: waiting for queued generations, loading the new version, and the probe check after it."""

    probe: dict[str, float]
    wait_s: float
    load_s: float
    check_s: float

    @property
    def gap(self) -> float:
        return self.probe["push/probe_gap"]

    def metrics(self) -> dict[str, float]:
        return {"time/push": self.load_s, "time/push_check": self.check_s, "time/push_wait": self.wait_s, **self.probe}


@dataclass
class Submitted:
    """A step's sampling request in flight: what it asked for and under which run version."""

    step: int
    idx_D: list[list[int]]  # per dataset of the run, the problems drawn for this step
    request: object
    version: int  # run version live when it was submitted
    data_position: list[int]  # each dataset's prompt-stream position after this step's prompts (for checkpoints)


class Run:
    """The sampler side of one training run: the live adapter versions in the fleet, the push and its check, and
    the requests in flight. `policy` (rl_lora/policy.py) says how a version is pushed."""

    def __init__(self, cfg: Config, fleet, learner, policy, probe_ids: list[int]):
        self.cfg, self.fleet, self.learner, self.policy, self.probe_ids = cfg, fleet, learner, policy, probe_ids
        self.version = 0
        self.refs: list[AdapterRef | None] = []  # the live version of each adapter, in adapter order
        self.in_flight: dict[int, Submitted] = {}

    # -- pushing, with the stale-adapter guard ---------------------------------------------------------------

    def push(self, step: int) -> PushResult:
        """Load the learner's policy into the fleet as a new version (evicting each adapter's previous version)
        and check it."""
        t_wait = time.perf_counter()
        self.fleet.drain()  # async: generations queued under the old version finish first (they hold the engine)
        self.version += 1
        t0 = time.perf_counter()
        self.refs = self.policy.push(self.fleet, self.version, self.refs, stale=faults.fire("stale_push", step))
        t1 = time.perf_counter()
        probe = self.check_push(step)
        return PushResult(probe, wait_s=t0 - t_wait, load_s=t1 - t0, check_s=time.perf_counter() - t1)

    def check_push(self, step: int) -> dict[str, float]:
        """Every engine samples the probe under every live adapter (one request per engine); the learner scores
        those tokens under the new version and, where it is known, the previous one. Raises RunError if an engine
        is off the new version by more than the tolerance, or is serving the previous one. Returns the worst gap
        to the new version (push/probe_gap) and the closest to the previous one (push/probe_gap_prev)."""
        tol = push_check_tol(self.cfg)
        if tol == 0 or not self.probe_ids:
            return {"push/probe_gap": 0.0}
        from rl_lora.rollout import TrainSample

        K, N, cfg = len(self.refs), self.fleet.num_engines, self.cfg
        # adapter-major, engine-minor: prompt k*N + e is served by engine e. One call for every adapter, the probe's
        # completions shared out over them: past PROBE_BUDGET adapters, one short completion of a short prompt each,
        # in the same batch and the same learner micro-batch.
        n = min(PROBE_SAMPLES, max(1, PROBE_BUDGET // K))
        many = K > PROBE_BUDGET
        prompt = self.probe_ids[:PROBE_PROMPT_MANY] if many else self.probe_ids
        groups = self.fleet.generate([prompt] * (K * N), n=n,
                                     adapters=[r for r in self.refs for _ in range(N)], seeds=[PROBE_SEED] * (K * N),
                                     temperature=cfg.sampler.temperature, top_p=cfg.sampler.top_p,
                                     top_k=cfg.sampler.top_k,
                                     max_tokens=min(PROBE_TOKENS_MANY if many else PROBE_TOKENS, cfg.sampler.max_tokens))
        probes = [[TrainSample(prompt, c.token_ids, c.logprobs, 0.0, j // N) for c in g if c.token_ids]
                  for j, g in enumerate(groups)]
        flat = [s for p in probes for s in p]
        if not flat:
            return {"push/probe_gap": 0.0}
        new = self.learner.score(flat)
        prev = self.policy.score_previous(flat)

        def gap(scored, samples):
            return (sum(abs(a - b) for s, lp in zip(samples, scored) for a, b in zip(s.sampler_logprobs, lp))
                    / sum(len(lp) for lp in scored))

        worst, closest_prev, offset = 0.0, float("inf"), 0
        for j, samples in enumerate(probes):
            if not samples:
                continue
            mine = slice(offset, offset + len(samples))
            offset += len(samples)
            gap_new = gap(new[mine], samples)
            gap_prev = gap(prev[mine], samples) if prev is not None else float("inf")
            k, e = j // N, j % N
            where = (("" if K == 1 else f" of adapter {self.learner.specs[k].name!r}")
                     + ("" if N == 1 else f" on engine {e}"))
            if gap_new > STALE_FLOOR * tol and gap_new > STALE_RATIO * gap_prev:
                raise RunError(f"push check failed after step {step}: the sampler's logprobs on the probe are "
                               f"{gap_new:.2e} per token from the learner's version {self.version}{where} but "
                               f"{gap_prev:.2e} from version {self.version - 1}: the sampler is serving a stale or "
                               "wrong adapter (the previous version), and training on it would be off-policy "
                               "without knowing it")
            if not gap_new <= tol:
                raise RunError(f"push check failed after step {step}: the sampler's logprobs on the probe differ "
                               f"from the learner's by {gap_new:.2e} per token (tolerance {tol:g}, "
                               f"train.push_check_tol) for version {self.version}{where}: the sampler is serving a "
                               "stale or wrong adapter, and training on it would be off-policy without knowing it")
            worst, closest_prev = max(worst, gap_new), min(closest_prev, gap_prev)
        probe = {"push/probe_gap": worst}
        if prev is not None:
            probe["push/probe_gap_prev"] = closest_prev
        return probe

    # -- sampling: requests submitted ahead (async) or just in time (sync) ------------------------------------

    def submit(self, step: int, idx_D: list[list[int]], prompts_KP: list[list], data_position: list[int],
               sample_seeds_K: list[int]) -> None:
        """G completions of each adapter's P prompts under that adapter (adapter-major: K x P groups), under the
        version live now. Request seeds come from each adapter's sample seed and the step: adapters with the same
        sample seed get the same ones (paired, with the same prompts where they share data)."""
        cfg = self.cfg
        P, n = len(prompts_KP[0]), cfg.sampler.samples_per_prompt
        seeds = [s for sample_seed in sample_seeds_K for s in request_seeds(step_seed(sample_seed, step), P, n)]
        refs = self.refs
        if faults.fire("stale_request", step):  # a pipeline bug: the previous version, reloaded
            refs = self.policy.push_previous(self.fleet, self.version) or refs
        if faults.fire("sampler_crash", step):
            self.fleet.kill_one()  # for real; async: just before this request runs
        request = self.fleet.submit([p for prompts_P in prompts_KP for p in prompts_P], n=n,
                                    adapters=[r for r in refs for _ in range(P)],
                                    seeds=seeds, temperature=cfg.sampler.temperature,
                                    max_tokens=cfg.sampler.max_tokens, top_p=cfg.sampler.top_p, top_k=cfg.sampler.top_k,
                                    stop=cfg.sampler.stop)
        self.in_flight[step] = Submitted(step, idx_D, request, self.version, data_position)

    def collect(self, step: int):
        """Wait for step's completions. A dead engine is rebuilt by the fleet and its prompts submitted again."""
        from rl_lora.sampling.fleet import FleetError

        sub = self.in_flight.pop(step)
        try:
            return sub, self.fleet.result(sub.request)
        except FleetError as exc:
            raise RunError(f"at step {step}: {exc}") from exc
