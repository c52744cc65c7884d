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


def register(name: str):
    """Decorator: make a function available under a registry name. The defining module must be importable
    by worker processes (it is re-imported there by `module:function`), so define rewards in a module."""
    def deco(fn):
        if not callable(fn):
            raise TypeError(f"reward '{name}' is not callable")
        _REGISTRY[name] = fn
        return fn
    return deco


def builtin_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve(name: str) -> Callable[..., float]:
    """The reward function for a registry name or 'package.module:function'. ValueError (one line) if not found."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name in _REGISTRY:
        return _REGISTRY[name]
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
    if name in ("math_answer", "boxed_format") or ":" in name:
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


@dataclass
class RewardSpec:
    name: str                 # registry name ("math_answer", "boxed_format") or "package.module:function"
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def coerce(cls, spec) -> "RewardSpec":
        if isinstance(spec, RewardSpec):
            out = spec
        elif isinstance(spec, str):
            out = cls(spec)
        elif isinstance(spec, dict):
            extra = set(spec) - {"name", "weight", "kwargs"}
            if extra:
                raise ValueError(f"reward spec {spec.get('name', spec)!r}: unknown key '{sorted(extra)[0]}' "
                                 "(known: name, weight, kwargs)")
            if "name" not in spec:
                raise ValueError(f"reward spec {spec!r}: missing 'name'")
            out = cls(spec["name"], spec.get("weight", 1.0), spec.get("kwargs") or {})
        else:
            raise ValueError(f"reward spec must be a dict or RewardSpec, got {type(spec).__name__}")
        if not isinstance(out.weight, numbers.Real) or isinstance(out.weight, bool) or not math.isfinite(out.weight):
            raise ValueError(f"reward '{out.name}': weight must be a finite number, got {out.weight!r}")
        if not isinstance(out.kwargs, dict):
            raise ValueError(f"reward '{out.name}': kwargs must be a mapping, got {type(out.kwargs).__name__}")
        return RewardSpec(out.name, float(out.weight), dict(out.kwargs))


@dataclass
class RewardResult:
    rewards: list[float]                 # weighted sum per completion
    per_reward: dict[str, list[float]]   # each reward's unweighted value per completion
    timeouts: int                        # calls that hit the wall-clock limit
    errors: int                          # calls that raised or returned NaN/None/non-number
    # per completion: a reward with non-zero weight failed or timed out, so `rewards[i]` is not a real score
    failed: list[bool] = field(default_factory=list)


_RESERVED = ("prompt", "completion")


class RewardRunner:
    """Scores completions with weighted rewards, each call under a wall-clock limit, in worker processes.

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
        self._refs = []
        for s in self.specs:
            fn = resolve(s.name)  # eager: a bad config fails before any model loads
            try:
                inspect.signature(fn).bind_partial("prompt", "completion")
            except TypeError:
                raise ValueError(f"reward '{s.name}': must accept (prompt, completion, **fields)") from None
            except ValueError:
                pass  # builtins without a signature
            self._refs.append(reference(s.name))
        self.keys = []
        for s in self.specs:  # unique per_reward keys: "math_answer", "math_answer#2", ...
            key, k = s.name, 2
            while key in self.keys:
                key, k = f"{s.name}#{k}", k + 1
            self.keys.append(key)
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.total_timeouts = 0
        self.total_errors = 0
        self._pool = None
        if num_workers > 0:
            preload = tuple(r for r in self._refs if ":" in r)
            self._pool = WorkerPool(num_workers, self.timeout_s, preload=preload, start_method=start_method)

    def score(self, prompts: list[str], completions: list[str], examples: list[dict] | None = None) -> RewardResult:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"score: {len(prompts)} prompts for {n} completions")
        if examples is None:
            examples = [{}] * n
        if len(examples) != n:
            raise ValueError(f"score: {len(examples)} examples for {n} completions")
        calls = []
        for i in range(n):
            fields = {k: v for k, v in (examples[i] or {}).items() if k not in _RESERVED}
            for spec, ref in zip(self.specs, self._refs):
                calls.append((ref, (prompts[i], completions[i]), {**fields, **spec.kwargs}))
        if self._pool is not None:
            results = self._pool.run(calls)
        else:
            results = [call_inline(ref, args, kwargs, self.timeout_s) for ref, args, kwargs in calls]
        return self._collect(results, n)

    def _collect(self, results: list[CallResult], n: int) -> RewardResult:
        m = len(self.specs)
        per = {key: [0.0] * n for key in self.keys}
        rewards = [0.0] * n
        failed = [False] * n
        timeouts = errors = 0
        failures: dict[str, list] = {}
        for idx, res in enumerate(results):
            i, j = divmod(idx, m)
            key = self.keys[j]
            if res is not None and res.status == "ok":
                per[key][i] = res.value
                rewards[i] += self.specs[j].weight * res.value
                continue
            if res is not None and res.status == "timeout":
                timeouts += 1
            else:
                errors += 1
            failed[i] = failed[i] or self.specs[j].weight != 0
            failures.setdefault(key, []).append(res.error if res is not None else "no result")
        for key, errs in failures.items():
            log.warning("reward '%s': %d of %d calls failed and scored 0 (first: %s)", key, len(errs), n, errs[0])
        self.total_timeouts += timeouts
        self.total_errors += errors
        return RewardResult(rewards, per, timeouts, errors, failed)

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
