"""Reward functions by name: the built-ins, `register`, the kind decorators, resolution and config specs.

A reward is any function

    fn(prompt: str, completion: str, **example_fields) -> float

named in a config by its registry name ("math_answer", "boxed_format") or as "package.module:function".
`example_fields` are the dataset row's extra columns (e.g. answer="42") plus the spec's `kwargs` (which win);
a function without **kwargs only receives the keyword arguments it names (`call_reward`).

The runner that scores batches with these is reward/runner.py; the worker processes it calls them in are
reward/pool.py. This module imports neither (they import it).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field


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
    from reward.extraction import boxes

    if not isinstance(completion, str):
        return 0.0
    return float(any(b.command == "boxed" and b.braced and b.content is not None and b.content.strip()
                     for b in boxes(completion)))


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
    # not a callable check: an instance whose __call__ is `async def` is an async reward
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


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
# Specs


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
