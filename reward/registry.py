"""Reward functions by name, and the runner that scores a batch of completions with several of them.

A reward is any function

    fn(prompt: str, completion: str, **example_fields) -> float

named in a config by its registry name ("math_answer", "boxed_format") or as "package.module:function".
`example_fields` are the dataset row's extra columns (e.g. answer="42") plus the spec's `kwargs` (which win);
a function without **kwargs only receives the keyword arguments it names.

Failure semantics (RewardRunner.score): a call that raises, returns None / NaN / inf / a non-number, or runs
past `timeout_s` scores 0.0 for that completion and that reward, is counted (`errors` / `timeouts`) and
logged (logger "reward.registry", one warning per reward per batch), and never stops the run. The completion is
marked in `failed` (when the reward has a non-zero weight: its weighted sum is then not a real score), so a
trainer can leave it out rather than learn from a made-up 0.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

from reward.pool import CallResult, WorkerPool, call_inline

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Built-in rewards


def math_answer(prompt: str, completion: str, answer=None, **_) -> float:
    """1.0 if the completion's final answer is equivalent to the example's `answer`, else 0.0."""
    if answer is None:
        raise ValueError("math_answer needs the example field 'answer'")
    from reward.math_answer import score

    return score(completion, answer)


def boxed_format(prompt: str, completion: str, **_) -> float:
    """1.0 if the completion contains a complete, non-empty \\boxed{...}, else 0.0."""
    from reward.extraction import _BOX_RE, match_brace

    if not isinstance(completion, str):
        return 0.0
    for m in _BOX_RE.finditer(completion):
        if not completion.startswith("\\boxed", m.start()):
            continue
        j = m.end()
        while j < len(completion) and completion[j] in " \t":
            j += 1
        if j < len(completion) and completion[j] == "{":
            k = match_brace(completion, j)
            if k > j + 1 and completion[j + 1:k].strip():
                return 1.0
    return 0.0


_REGISTRY: dict[str, Callable[..., float]] = {
    "math_answer": math_answer,
    "boxed_format": boxed_format,
}
BUILTINS = {"math_answer", "boxed_format"}  # resolved by name in workers (others register on import)


def register(name: str):
    """Decorator: make a function available under a registry name. The defining module must be importable
    by worker processes (it is re-imported there by `module:function`), so define rewards in a module."""
    def deco(fn):
        if not callable(fn):
            raise TypeError(f"reward '{name}' is not callable")
        _REGISTRY[name] = fn
        return fn
    return deco


KINDS = ("completion", "batched", "group", "async")


def _declare(kind: str, fn=None, **options):
    def deco(f):
        if not callable(f):
            raise TypeError(f"@reward.{kind} needs a function")
        f.__reward_kind__ = kind
        if options:
            f.__reward_options__ = options
        return f
    return deco(fn) if fn is not None else deco


def batched(fn=None, **options):
    """Decorator: `fn(prompts: list[str], completions: list[str], **fields) -> list[float]`, one call per batch;
    each example field arrives as a list (one entry per completion), the spec's kwargs as they are. Options
    (`batch_size=`) are defaults the config entry can override."""
    return _declare("batched", fn, **options)


def group(fn=None, **options):
    """Decorator: `fn(prompt: str, completions: list[str], **fields) -> list[float]`, one call per prompt with its
    G completions; `fields` are that prompt's example fields (plus the spec's kwargs)."""
    return _declare("group", fn, **options)


def _is_async(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def kind_of(fn, declared: str | None = None, name: str = "") -> tuple[str, bool]:
    """(kind, is_async) of a reward, read without calling it: the decorator's kind (@reward.batched /
    @reward.group), else "completion"; `async def` makes it awaited. `declared` is the config's `kind:`, which
    must agree with a decorator. Returned kind is one of completion, batched, group (async is the flag)."""
    own = getattr(fn, "__reward_kind__", None)
    is_async = _is_async(fn)
    if declared is not None:
        if declared not in KINDS:
            raise ValueError(f"reward '{name}': unknown kind '{declared}' (known: {', '.join(KINDS)})")
        if declared == "async":
            if not is_async:
                raise ValueError(f"reward '{name}': kind 'async' needs an `async def` function")
            declared = own or "completion"
        if own is not None and own != declared:
            raise ValueError(f"reward '{name}': the config says kind '{declared}' but the function is "
                             f"decorated @reward.{own}")
        return declared, is_async
    return own or "completion", is_async


def kind_name(kind: str, is_async: bool) -> str:
    if kind == "completion":
        return "async" if is_async else "completion"
    return f"async {kind}" if is_async else kind


def check_callable(fn, kind: str, name: str) -> None:
    """ValueError (one line) if `fn`'s signature cannot take the arguments of its kind."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature
    probe = {"completion": ("prompt", "completion"), "batched": (["prompt"], ["completion"]),
             "group": ("prompt", ["completion"])}[kind]
    shape = {"completion": "(prompt, completion, **fields)", "batched": "(prompts, completions, **fields)",
             "group": "(prompt, completions, **fields)"}[kind]
    try:
        sig.bind_partial(*probe)
    except TypeError:
        raise ValueError(f"reward '{name}': must take {shape} (a {kind} reward must accept these arguments), "
                         f"its signature is {name.rpartition(':')[2]}{sig}") from None


def check_spec(raw) -> "RewardSpec":
    """Coerce, resolve and check one config entry (name, kind, signature); ValueError (one line) if it is bad."""
    spec = RewardSpec.coerce(raw)
    fn = resolve(spec.name)
    kind, _ = kind_of(fn, spec.kind, spec.name)
    check_callable(fn, kind, spec.name)
    return spec


# built-ins defined in their own modules (imported when first named, so `import reward` stays light)
_LAZY = {
    "llm_judge": "reward.judge:llm_judge",
    "reward_model": "reward.reward_model:reward_model",
    "group_length_correctness": "reward.group_rewards:group_length_correctness",
}


def builtin_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def resolve(name: str) -> Callable[..., float]:
    """The reward function for a registry name or 'package.module:function'. ValueError (one line) if not found."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _LAZY:
        return resolve(_LAZY[name])
    if ":" not in name:
        raise ValueError(f"unknown reward '{name}' (built-in: {', '.join(builtin_names())}; "
                         "a custom reward is named 'package.module:function')")
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward '{name}': expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module raised while importing
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"reward '{name}': cannot import module '{module_name}' ({msg})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward '{name}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward '{name}': '{attr}' is not callable")
    return obj


def reference(name: str) -> str:
    """The name a worker process resolves: built-ins by name, decorator-registered functions by module:qualname."""
    fn = resolve(name)
    if name in _LAZY:
        return _LAZY[name]
    if name in BUILTINS or ":" in name:
        return name
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None)
    if module and qual and "<" not in qual:
        if module == "__main__":
            module = "__mp_main__"  # how spawn re-imports the main script in a worker
        return f"{module}:{qual}"
    return name


_CALL_CACHE: dict[str, tuple[Callable, bool, frozenset]] = {}


def _calling_info(ref: str):
    info = _CALL_CACHE.get(ref)
    if info is None:
        if ref.startswith("__mp_main__:"):
            try:
                fn = resolve(ref)
            except ValueError:
                fn = resolve("__main__:" + ref.split(":", 1)[1])
        else:
            fn = resolve(ref)
        try:
            params = inspect.signature(fn).parameters.values()
            var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
            names = frozenset(p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD))
        except (TypeError, ValueError):
            var_kw, names = True, frozenset()
        info = (fn, var_kw, names)
        _CALL_CACHE[ref] = info
    return info


def call_reward(ref: str, args: tuple, kwargs: dict):
    """Call the reward `ref` with positional `args` and the keyword arguments it can take."""
    fn, var_kw, names = _calling_info(ref)
    if not var_kw:
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Specs and the runner


SPEC_KEYS = ("name", "weight", "kwargs", "kind", "timeout_s", "batch_size", "max_concurrency")


@dataclass
class RewardSpec:
    name: str                 # registry name ("math_answer", "boxed_format") or "package.module:function"
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    kind: str | None = None   # completion | batched | group | async; None = as the function declares
    timeout_s: float | None = None       # per-call limit for this reward; None = the runner's
    batch_size: int | None = None        # batched rewards: completions per call; None = the whole batch
    max_concurrency: int | None = None   # async rewards: calls in flight; None = 16

    @classmethod
    def coerce(cls, spec) -> "RewardSpec":
        if isinstance(spec, RewardSpec):
            out = spec
        elif isinstance(spec, str):
            out = cls(spec)
        elif isinstance(spec, dict):
            extra = set(spec) - set(SPEC_KEYS)
            if extra:
                raise ValueError(f"reward spec {spec.get('name', spec)!r}: unknown key '{sorted(extra)[0]}' "
                                 f"(known: name, weight, kwargs) (options: {', '.join(SPEC_KEYS[3:])})")
            if "name" not in spec:
                raise ValueError(f"reward spec {spec!r}: missing 'name'")
            out = cls(spec["name"], spec.get("weight", 1.0), spec.get("kwargs") or {}, spec.get("kind"),
                      spec.get("timeout_s"), spec.get("batch_size"), spec.get("max_concurrency"))
        else:
            raise ValueError(f"reward spec must be a dict or RewardSpec, got {type(spec).__name__}")
        if not isinstance(out.weight, numbers.Real) or isinstance(out.weight, bool) or not math.isfinite(out.weight):
            raise ValueError(f"reward '{out.name}': weight must be a finite number, got {out.weight!r}")
        if not isinstance(out.kwargs, dict):
            raise ValueError(f"reward '{out.name}': kwargs must be a mapping, got {type(out.kwargs).__name__}")
        if out.kind is not None and out.kind not in KINDS:
            raise ValueError(f"reward '{out.name}': unknown kind {out.kind!r} (known: {', '.join(KINDS)})")
        if out.timeout_s is not None and not (isinstance(out.timeout_s, numbers.Real)
                                              and not isinstance(out.timeout_s, bool) and out.timeout_s > 0):
            raise ValueError(f"reward '{out.name}': timeout_s must be > 0, got {out.timeout_s!r}")
        for key in ("batch_size", "max_concurrency"):
            v = getattr(out, key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"reward '{out.name}': {key} must be an int >= 1, got {v!r}")
        return RewardSpec(out.name, float(out.weight), dict(out.kwargs), out.kind,
                          None if out.timeout_s is None else float(out.timeout_s), out.batch_size,
                          out.max_concurrency)


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
        self._refs = [r.ref for r in self._rewards]
        self.keys = []
        for s in self.specs:  # unique per_reward keys: "math_answer", "math_answer#2", ...
            key, k = s.name, 2
            while key in self.keys:
                key, k = f"{s.name}#{k}", k + 1
            self.keys.append(key)
        self.num_workers = num_workers
        self.total_timeouts = 0
        self.total_errors = 0
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

    def _collect(self, results: list[CallResult], plan, n: int, groups) -> RewardResult:
        per = {key: [0.0] * n for key in self.keys}
        lost = {key: [False] * n for key in self.keys}
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
                    lost[key][i] = True
                    failed[i] = failed[i] or weight != 0
                    failures.setdefault(key, []).append(out.error or "no result")
        for key, errs in failures.items():
            log.warning("reward '%s': %d of %d scores failed and count as 0 (first: %s)", key, len(errs), n, errs[0])
        self.total_timeouts += timeouts
        self.total_errors += errors
        return RewardResult(rewards, per, timeouts, errors, failed, self._metrics(per, lost, latency, groups),
                            lost)

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
