"""The runner that scores a batch of completions with several weighted rewards (see reward/registry.py for
what a reward is and how it is named).

Failure semantics (RewardRunner.score): a call that raises, returns None / NaN / inf / a non-number, or runs
past `timeout_s` scores 0.0 for that completion and that reward, is counted (`errors` / `timeouts`) and
logged (logger "reward.runner", one warning per reward per batch), and never stops the run. The completion is
marked in `failed` (when the reward has a non-zero weight: its weighted sum is then not a real score), so a
trainer can leave it out rather than learn from a made-up 0.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field

from reward.pool import CallResult, WorkerPool, call_inline
from reward.registry import RewardSpec, check_callable, kind_name, kind_of, reference, resolve

log = logging.getLogger(__name__)


@dataclass
class RewardResult:
    rewards: list[float]                 # weighted sum per completion
    per_reward: dict[str, list[float]]   # each reward's unweighted value per completion
    timeouts: int                        # scores lost to the wall-clock limit (completion x reward)
    errors: int                          # scores lost to a raise, a wrong length, NaN/None/non-number
    # per completion: a reward with non-zero weight failed or timed out, so `rewards[i]` is not a real score
    failed: list[bool] = field(default_factory=list)
    # per reward: "reward/<key>/mean" (over its scored completions), ".../std_in_group" (mean over groups of the
    # std of its scored values), ".../failures", ".../latency_p50_ms", ".../latency_p99_ms" (per call)
    metrics: dict[str, float] = field(default_factory=dict)
    # per reward: a bool per completion, True where that reward's score was lost
    failed_per_reward: dict[str, list[bool]] = field(default_factory=dict)
    # per reward: per completion, "timeout" or "error" where its score was lost, else None (to split a result)
    lost_status: dict[str, list] = field(default_factory=dict)


_RESERVED = ("prompt", "completion")
DEFAULT_CONCURRENCY = 16


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(math.floor(k))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def group_indices(n: int, prompts: list[str], group_size: int | None = None,
                  group_ids: list | None = None) -> list[list[int]]:
    """The completions of each prompt: by `group_ids` (any hashable per completion), else consecutive runs of
    `group_size`, else the same prompt string (in order of first appearance)."""
    if group_ids is not None:
        if len(group_ids) != n:
            raise ValueError(f"score: {len(group_ids)} group_ids for {n} completions")
        keys = group_ids
    elif group_size is not None:
        if not isinstance(group_size, int) or group_size < 1 or n % group_size:
            raise ValueError(f"score: group_size {group_size!r} does not divide {n} completions")
        keys = [i // group_size for i in range(n)]
    else:
        keys = prompts
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


class _Reward:
    """One spec, resolved: how its calls are cut and sent."""

    def __init__(self, spec: RewardSpec, runner_timeout: float):
        fn = resolve(spec.name)  # eager: a bad config fails before any model loads
        self.kind, self.is_async = kind_of(fn, spec.kind, spec.name)
        check_callable(fn, self.kind, spec.name)
        options = getattr(fn, "__reward_options__", {})
        self.ref = reference(spec.name)
        self.timeout_s = spec.timeout_s or options.get("timeout_s") or runner_timeout
        self.batch_size = spec.batch_size or options.get("batch_size")
        self.concurrency = spec.max_concurrency or options.get("max_concurrency") or DEFAULT_CONCURRENCY
        self.warmup = callable(getattr(fn, "__reward_warmup__", None))


class RewardRunner:
    """Scores completions with weighted rewards, each call under a wall-clock limit, in worker processes.

    Each reward is of one kind (declared by the function or the spec's `kind`): per completion (the default),
    batched (lists in, list out), group (one prompt's completions in, a list out), any of them `async def`
    (awaited concurrently in a worker, at most `max_concurrency` at a time, each call under the limit).
    num_workers=0 runs in-process (SIGALRM / thread timeout) -- for tests and debugging.
    """

    def __init__(self, specs: list, timeout_s: float = 5.0, num_workers: int = 2, start_method: str = "spawn"):
        if not isinstance(specs, (list, tuple)) or not specs:
            raise ValueError("RewardRunner needs at least one reward spec")
        if not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
            raise ValueError(f"reward timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"reward num_workers must be an int >= 0, got {num_workers!r}")
        self.specs = [RewardSpec.coerce(s) for s in specs]
        self.timeout_s = float(timeout_s)
        self._rewards = [_Reward(s, self.timeout_s) for s in self.specs]
        self.keys = []
        for s in self.specs:  # unique per_reward keys: "math_answer", "math_answer#2", ...
            key, k = s.name, 2
            while key in self.keys:
                key, k = f"{s.name}#{k}", k + 1
            self.keys.append(key)
        self.num_workers = num_workers
        self._pool = None
        if num_workers > 0:
            preload = []
            for spec, r in zip(self.specs, self._rewards):
                if r.warmup:
                    preload.append((r.ref, dict(spec.kwargs)))
                elif ":" in r.ref:
                    preload.append(r.ref)
            self._pool = WorkerPool(num_workers, self.timeout_s, preload=tuple(preload), start_method=start_method)

    def kinds(self) -> dict[str, str]:
        """Each reward's kind, as the runner will call it ("completion", "batched", "group", "async", ...)."""
        return {key: kind_name(r.kind, r.is_async) for key, r in zip(self.keys, self._rewards)}

    def _units(self, j: int, prompts, completions, fields_N, groups) -> list[tuple[list[int], tuple, dict]]:
        """(completion indices, args, kwargs) of each call of reward j."""
        spec, r = self.specs[j], self._rewards[j]
        n = len(completions)
        if r.kind == "completion":
            return [([i], (prompts[i], completions[i]), {**fields_N[i], **spec.kwargs}) for i in range(n)]
        if r.kind == "group":
            return [(idx, (prompts[idx[0]], [completions[i] for i in idx]), {**fields_N[idx[0]], **spec.kwargs})
                    for idx in groups]
        size = r.batch_size or n
        units = []
        names = sorted({k for f in fields_N for k in f} - set(spec.kwargs))
        for a in range(0, n, size):
            idx = list(range(a, min(n, a + size)))
            cols = {k: [fields_N[i].get(k) for i in idx] for k in names}
            units.append((idx, ([prompts[i] for i in idx], [completions[i] for i in idx]), {**cols, **spec.kwargs}))
        return units

    def score(self, prompts: list[str], completions: list[str], examples: list[dict] | None = None,
              group_size: int | None = None, group_ids: list | None = None) -> RewardResult:
        """Score completions; groups (for group rewards and the std-within-group metric) are given by
        `group_ids` or `group_size` (consecutive), else by equal prompts."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"score: {len(prompts)} prompts for {n} completions")
        if examples is None:
            examples = [{}] * n
        if len(examples) != n:
            raise ValueError(f"score: {len(examples)} examples for {n} completions")
        groups = group_indices(n, prompts, group_size, group_ids)
        fields_N = [{k: v for k, v in (ex or {}).items() if k not in _RESERVED} for ex in examples]
        calls, plan = [], []   # plan[t] = (reward j, [(indices, expect), ...] per item, is_many)
        for j, r in enumerate(self._rewards):
            units = self._units(j, prompts, completions, fields_N, groups)
            expect = (lambda idx: None) if r.kind == "completion" else len
            if r.is_async and units:
                chunk = max(1, math.ceil(r.concurrency / max(1, self.num_workers)))
                for a in range(0, len(units), chunk):
                    part = units[a:a + chunk]
                    items = [(args, kwargs, expect(idx)) for idx, args, kwargs in part]
                    # the chunk's calls run concurrently, each under the limit; the worker gets a little more
                    deadline = r.timeout_s + 1.0 + 0.1 * r.timeout_s
                    calls.append((r.ref, (), {}, {"many": items, "concurrency": chunk, "timeout": r.timeout_s,
                                                  "deadline_s": deadline}))
                    plan.append((j, [(idx, expect(idx)) for idx, _, _ in part], True))
            else:
                for idx, args, kwargs in units:
                    opts = None if r.kind == "completion" else {"expect": len(idx)}
                    if r.timeout_s != self.timeout_s:
                        opts = {**(opts or {}), "deadline_s": r.timeout_s}
                    calls.append((r.ref, args, kwargs) if opts is None else (r.ref, args, kwargs, opts))
                    plan.append((j, [(idx, expect(idx))], False))
        if self._pool is not None:
            results = self._pool.run(calls)
        else:
            results = [call_inline(c[0], c[1], c[2], self.timeout_s, c[3] if len(c) > 3 else None) for c in calls]
        return self._collect(results, plan, n, groups)

    def score_parts(self, prompts: list[str], completions: list[str], examples: list[dict], group_ids: list,
                    sizes: list[int]) -> list[RewardResult]:
        """`score` of consecutive parts of the batch (e.g. K adapters' completions) in ONE round of calls to the
        workers, returned as each part's own RewardResult (its metrics over its own completions and groups; the
        latencies are the whole round's)."""
        full = self.score(prompts, completions, examples, group_ids=group_ids)
        latency = {key: [] for key in self.keys}  # the round's latencies are copied in below
        parts, a = [], 0
        for size in sizes:
            b = a + size
            per = {key: v[a:b] for key, v in full.per_reward.items()}
            lost = {key: v[a:b] for key, v in full.failed_per_reward.items()}
            status = {key: v[a:b] for key, v in full.lost_status.items()}
            groups = group_indices(size, prompts[a:b], group_ids=group_ids[a:b])
            metrics = self._metrics(per, lost, latency, groups)
            for key in self.keys:
                for q in ("p50", "p99"):
                    metrics[f"reward/{key}/latency_{q}_ms"] = full.metrics[f"reward/{key}/latency_{q}_ms"]
            parts.append(RewardResult(full.rewards[a:b], per, sum(x == "timeout" for v in status.values() for x in v),
                                      sum(x == "error" for v in status.values() for x in v), full.failed[a:b],
                                      metrics, lost, status))
            a = b
        return parts

    def _collect(self, results: list[CallResult], plan, n: int, groups) -> RewardResult:
        per = {key: [0.0] * n for key in self.keys}
        lost = {key: [False] * n for key in self.keys}
        status = {key: [None] * n for key in self.keys}
        latency: dict[str, list[float]] = {key: [] for key in self.keys}
        rewards = [0.0] * n
        failed = [False] * n
        timeouts = errors = 0
        failures: dict[str, list] = {}
        for res, (j, items, many) in zip(results, plan):
            key, weight = self.keys[j], self.specs[j].weight
            if res is None:
                res = CallResult("error", None, "no result")
            if many and res.status == "ok":
                outcomes = [CallResult(*o) for o in res.value]
            else:
                outcomes = [res] * len(items)  # a chunk that timed out or died costs each of its calls
            for (idx, expect), out in zip(items, outcomes):
                latency[key].append(out.elapsed * 1000.0)
                if out.status == "ok":
                    values = [out.value] if expect is None else out.value
                else:
                    values = [None] * len(idx)
                for i, v in zip(idx, values):
                    if v is not None:
                        per[key][i] = v
                        rewards[i] += weight * v
                        continue
                    if out.status == "timeout":
                        timeouts += 1
                    else:
                        errors += 1
                    status[key][i] = "timeout" if out.status == "timeout" else "error"
                    lost[key][i] = True
                    failed[i] = failed[i] or weight != 0
                    failures.setdefault(key, []).append(out.error or "no result")
        for key, errs in failures.items():
            log.warning("reward '%s': %d of %d scores failed and count as 0 (first: %s)", key, len(errs), n, errs[0])
        return RewardResult(rewards, per, timeouts, errors, failed, self._metrics(per, lost, latency, groups),
                            lost, status)

    def _metrics(self, per, lost, latency, groups) -> dict[str, float]:
        m = {}
        for key in self.keys:
            ok = [v for v, f in zip(per[key], lost[key]) if not f]
            stds = []
            for idx in groups:
                vals = [per[key][i] for i in idx if not lost[key][i]]
                if len(vals) >= 2:
                    mu = sum(vals) / len(vals)
                    stds.append(math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)))
            m[f"reward/{key}/mean"] = sum(ok) / len(ok) if ok else 0.0
            m[f"reward/{key}/std_in_group"] = sum(stds) / len(stds) if stds else 0.0
            m[f"reward/{key}/failures"] = float(sum(lost[key]))
            m[f"reward/{key}/latency_p50_ms"] = _percentile(latency[key], 0.5)
            m[f"reward/{key}/latency_p99_ms"] = _percentile(latency[key], 0.99)
        return m

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
