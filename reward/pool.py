"""Run reward calls in worker processes, each call under a hard wall-clock limit.

    pool = WorkerPool(num_workers=2, timeout_s=5.0)
    results = pool.run([(ref, args, kwargs), ...])   # ref: a registry name or "package.module:function"
    pool.close()

Workers are started with the "spawn" start method by default (never fork: the parent holds torch / vLLM
threads), import `reward.math_answer` and any preloaded references, warm up, then serve one call at a time.
The parent times every call from the moment it is handed to a worker. A call that overruns is answered
"timeout" at once; its worker is killed (SIGKILL) and a fresh one started, so a hung reward can never wedge
the pool. A worker that dies mid-call (segfault, os._exit) gives "error" and is replaced the same way.
Workers live across `run` calls (starting one costs ~1 s); they exit when the parent closes the pool, exits,
or dies (they watch their parent).

`call_inline` is the in-process equivalent (num_workers=0): SIGALRM on the main thread, else a helper thread
that is abandoned on timeout (Python cannot kill a thread: the call keeps running in the background).
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import math
import multiprocessing as mp
import numbers
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

from reward.registry import call_reward

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0


@dataclass
class CallResult:
    status: str               # "ok" | "error" | "timeout"
    value: float | None = None
    error: str = ""
    elapsed: float = 0.0      # seconds the call ran (the limit, for a timeout)


class RewardValueError(Exception):
    pass


def to_reward(value) -> float:
    """A reward function's return value as a finite float, or RewardValueError (None, NaN, inf, non-number)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        if math.isfinite(f):
            return f
        raise RewardValueError(f"returned {f!r}")
    if value is None:
        raise RewardValueError("returned None")
    raise RewardValueError(f"returned a non-number ({type(value).__name__})")


def _describe(exc: BaseException) -> str:
    msg = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {msg}"[:300] if msg else type(exc).__name__


def to_rewards(value, n: int) -> tuple[list, str]:
    """A batched / group reward's return value as `n` entries, each a finite float or None (that entry is not a
    number), plus the first entry's error. RewardValueError if it is not a sequence of exactly `n` entries."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise RewardValueError(f"returned {type(value).__name__}, expected a list of {n} numbers")
    values = list(value)
    if len(values) != n:
        raise RewardValueError(f"returned {len(values)} values for {n} completions")
    out, first = [], ""
    for v in values:
        try:
            out.append(to_reward(v))
        except RewardValueError as exc:
            out.append(None)
            first = first or f"entry {len(out) - 1}: {exc}"
    return out, first


def _convert(value, expect):
    if expect is None:
        return to_reward(value), ""
    return to_rewards(value, expect)


def execute(ref: str, args: tuple, kwargs: dict, opts: dict | None = None) -> CallResult:
    """Resolve `ref` and call it (no time limit). Never raises (except on KeyboardInterrupt/SystemExit).

    opts None: a per-completion call, `value` is a float. opts {"expect": n}: a batched or group call, `value` is
    a list of n floats or None (entries that are not numbers; `error` names the first). opts {"many": [(args,
    kwargs, expect), ...], "concurrency": c, "timeout": t}: async calls awaited concurrently (at most c at a time,
    each under t seconds); `value` is a list of (status, value, error, elapsed) per call and `args`, `kwargs`
    are unused."""
    if opts and "many" in opts:
        return _execute_many(ref, opts)
    expect = opts.get("expect") if opts else None
    t0 = time.perf_counter()
    try:
        out = call_reward(ref, args, kwargs)
        if inspect.isawaitable(out):
            out = _loop().run_until_complete(out)
        value, err = _convert(out, expect)
        return CallResult("ok", value, err, time.perf_counter() - t0)
    except RewardValueError as exc:
        return CallResult("error", None, str(exc), time.perf_counter() - t0)
    except (Exception, SystemExit) as exc:  # a reward calling sys.exit() must not end the run
        return CallResult("error", None, _describe(exc), time.perf_counter() - t0)


_LOOP = None


def _loop():
    """One event loop per process, reused across calls (so a reward may keep an async client between batches).
    Never `asyncio.run`: it waits for the default executor, i.e. for any abandoned blocking thread."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP


def _execute_many(ref: str, opts: dict) -> CallResult:
    items, timeout = opts["many"], opts.get("timeout")
    sem_n = max(1, int(opts.get("concurrency") or len(items) or 1))

    async def one(sem, args, kwargs, expect):
        async with sem:  # the limit counts from the moment the call may run
            t0 = time.perf_counter()
            try:
                coro = call_reward(ref, args, kwargs)
                if not inspect.isawaitable(coro):
                    raise RewardValueError(f"is not async (returned {type(coro).__name__}, not an awaitable)")
                out = await asyncio.wait_for(coro, timeout) if timeout else await coro
                value, err = _convert(out, expect)
                return ("ok", value, err, time.perf_counter() - t0)
            except TimeoutError:  # asyncio.wait_for raises the builtin since Python 3.11
                return ("timeout", None, f"over {timeout:g}s", time.perf_counter() - t0)
            except RewardValueError as exc:
                return ("error", None, str(exc), time.perf_counter() - t0)
            except (Exception, SystemExit) as exc:
                return ("error", None, _describe(exc), time.perf_counter() - t0)

    async def main():
        sem = asyncio.Semaphore(sem_n)
        return await asyncio.gather(*(one(sem, a, k, e) for a, k, e in items))

    t0 = time.perf_counter()
    try:
        return CallResult("ok", list(_loop().run_until_complete(main())), "", time.perf_counter() - t0)
    except (Exception, SystemExit) as exc:
        return CallResult("error", None, _describe(exc), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# In-process


class _CallTimeout(BaseException):
    """Raised inside the call by SIGALRM; a BaseException so `except Exception` in a reward can't swallow it."""


def call_inline(ref: str, args: tuple, kwargs: dict, timeout_s: float, opts: dict | None = None) -> CallResult:
    if opts and opts.get("deadline_s"):
        timeout_s = opts["deadline_s"]
    if timeout_s is None or timeout_s <= 0:
        return execute(ref, args, kwargs, opts)
    use_alarm = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
                 and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if use_alarm:
        def _on_alarm(signum, frame):
            raise _CallTimeout()

        t0 = time.perf_counter()
        old = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                return execute(ref, args, kwargs, opts)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _CallTimeout:
            global _LOOP
            _LOOP = None  # interrupted mid-run: start the next async call on a fresh loop
            return CallResult("timeout", None, f"over {timeout_s:g}s", time.perf_counter() - t0)
        finally:
            signal.signal(signal.SIGALRM, old)
    box: list[CallResult] = []
    th = threading.Thread(target=lambda: box.append(execute(ref, args, kwargs, opts)), daemon=True,
                          name="reward-inline-call")
    t0 = time.perf_counter()
    th.start()
    th.join(timeout_s)
    if th.is_alive() or not box:
        return CallResult("timeout", None, f"over {timeout_s:g}s (call left running in a thread)",
                          time.perf_counter() - t0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------
# Worker process


def _watch_parent(ppid: int):
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(0)


def _worker_main(conn, preload: tuple, ppid: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and shuts us down
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
    try:
        from reward import math_answer, registry

        math_answer.warmup()  # sympy imports lazily and caches on first use: pay that before the first call
        for item in preload:  # "module:function", or (ref, kwargs) for a reward with a warm-up (model loading)
            try:
                ref, kw = (item, None) if isinstance(item, str) else item
                fn = registry.resolve(ref)
                if kw is not None and callable(getattr(fn, "__reward_warmup__", None)):
                    fn.__reward_warmup__(**kw)
            except Exception:
                pass  # reported per call
    except Exception:
        pass
    try:
        conn.send(("ready", os.getpid()))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            tid, ref, args, kwargs, opts = msg
            res = execute(ref, args, kwargs, opts)
            conn.send((tid, res.status, res.value, res.error, res.elapsed))
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


class _Worker:
    __slots__ = ("proc", "conn", "ready", "task", "started")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.task = None          # (tid, deadline, t0)
        self.started = time.monotonic()


_LIVE_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _close_all():
    for pool in list(_LIVE_POOLS):
        try:
            pool.close()
        except Exception:
            pass


class WorkerPool:
    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, preload: tuple = (),
                 start_method: str = "spawn"):
        if num_workers < 1:
            raise ValueError("WorkerPool needs num_workers >= 1 (use call_inline for in-process calls)")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError("start_method must be 'spawn' or 'forkserver' (never fork a process holding torch)")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.preload = tuple(preload)
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._closed = False
        self._startup_failures = 0
        self.restarts = 0
        for _ in range(num_workers):
            self._workers.append(self._start())
        _LIVE_POOLS.add(self)

    # -- lifecycle
    def _start(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self.preload, os.getpid()),
                                 name="reward-worker", daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn)

    def _kill(self, w: _Worker):
        try:
            w.conn.close()
        except OSError:
            pass
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(5)

    def _replace(self, w: _Worker) -> _Worker:
        self._kill(w)
        self.restarts += 1
        nw = self._start()
        self._workers[self._workers.index(w)] = nw
        return nw

    def close(self):
        if self._closed:
            return
        self._closed = True
        polite = []
        for w in self._workers:
            if w.task is None and w.ready:
                try:
                    w.conn.send(None)
                    polite.append(w)
                except (OSError, BrokenPipeError):
                    pass
        deadline = time.monotonic() + 2.0
        for w in polite:
            w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in self._workers:  # busy or still starting: no need to wait
            self._kill(w)
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Block until every worker has started (optional; `run` waits as needed)."""
        end = time.monotonic() + timeout_s
        while not all(w.ready for w in self._workers):
            self._pump(max(0.0, min(1.0, end - time.monotonic())), {}, [])
            if time.monotonic() > end:
                raise RuntimeError("reward workers did not start")

    # -- running calls
    def run(self, calls: list[tuple]) -> list[CallResult]:
        """calls: (ref, args, kwargs) or (ref, args, kwargs, opts) (see `execute`; opts["deadline_s"] replaces
        the pool's timeout for that call)."""
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        results: list[CallResult | None] = [None] * len(calls)
        queue = deque(range(len(calls)))
        while queue or any(w.task is not None for w in self._workers):
            # hand out work to idle, ready workers
            for w in list(self._workers):
                if not queue:
                    break
                if w.ready and w.task is None:
                    tid = queue.popleft()
                    ref, args, kwargs = calls[tid][:3]
                    opts = calls[tid][3] if len(calls[tid]) > 3 else None
                    try:
                        w.conn.send((tid, ref, args, kwargs, opts))
                    except (pickle.PicklingError, TypeError, AttributeError) as exc:
                        results[tid] = CallResult("error", None, f"arguments not picklable: {_describe(exc)}")
                        continue
                    except (OSError, BrokenPipeError):
                        queue.appendleft(tid)
                        self._replace(w)
                        continue
                    now = time.monotonic()
                    limit = (opts or {}).get("deadline_s") or self.timeout_s
                    w.task = (tid, now + limit, now, limit)
            deadlines = [w.task[1] for w in self._workers if w.task is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.5
            self._pump(wait_s, results, queue)
        return results  # type: ignore[return-value]

    def _pump(self, wait_s: float, results, queue):
        conns = {w.conn: w for w in self._workers if not w.ready or w.task is not None}
        if conns:
            for conn in wait(list(conns), timeout=wait_s):
                w = conns[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self._on_death(w, results)
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    self._startup_failures = 0
                    continue
                tid, status, value, error, elapsed = msg
                if w.task is not None and w.task[0] == tid:
                    results[tid] = CallResult(status, value, error, elapsed)
                    w.task = None
        elif wait_s:
            time.sleep(min(wait_s, 0.05))
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.task[1]:
                tid, _, t0, limit = w.task
                results[tid] = CallResult("timeout", None, f"over {limit:g}s", now - t0)
                w.task = None
                self._replace(w)
            elif not w.ready and now - w.started > STARTUP_TIMEOUT_S:
                self._startup_failure(w, "did not start in time")

    def _on_death(self, w: _Worker, results):
        if w.task is not None:
            tid = w.task[0]
            code = w.proc.exitcode
            results[tid] = CallResult("error", None, f"worker died during the call (exit code {code})",
                                      time.monotonic() - w.task[2])
            w.task = None
            self._replace(w)
        else:
            self._startup_failure(w, f"exited while starting (exit code {w.proc.exitcode})")

    def _startup_failure(self, w: _Worker, why: str):
        self._startup_failures += 1
        if self._startup_failures > 3 * self.num_workers:
            self.close()
            raise RuntimeError(f"reward worker {why}; giving up after {self._startup_failures} attempts "
                               "(is the reward package importable in a fresh interpreter?)")
        log.warning("reward worker %s; restarting it", why)
        self._replace(w)
