"""The sampler fleet: every vLLM engine of a run behind one interface, with engine restarts built in.

- `LocalFleet`: one in-process engine (the default on one machine). With `asynchronous=True` its calls run on
  one worker thread, so generation for the next steps overlaps the learner's update (`train.max_staleness`).
- `RayFleet`: N engines as Ray actors (one per GPU or tensor-parallel group). Prompts are dealt round-robin
  across engines; since every request carries its own seed, the groups do not depend on how they were dealt.
  An adapter version is `ray.put` ONCE and every engine loads it from the object store (a rank-1 adapter of
  an 8B model is ~11 MB in fp32, so a push to the whole fleet costs one copy per node, not one per engine).

Both keep a copy of the tensors of every live adapter version (and of the last full-FT weights), so an engine
that dies is rebuilt with exactly what the learner pushed (not what it has learned since) and its unfinished
requests are submitted again, with the same seeds: no step is lost, no prompt is scored twice. An actor's calls
run in the order they were submitted (Ray's ordering per caller; one thread locally), so a push queued behind a
generation never changes the adapter under it.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass

from rl_lora.errors import EngineError, FleetError, RunError
from rl_lora.sampling.sampler import AdapterRef, engine_call, engine_core_of
from rl_lora.seeds import request_seeds

MAX_RESTARTS = 2  # per request: a third death in a row is not a transient fault
ENGINE_START_TIMEOUT_S = 900  # an 8B engine loads in minutes; longer means Ray has nowhere to put it
START_ATTEMPTS = 3  # a replacement engine that dies while starting (e.g. its GPU not yet free) is tried again
FREE_TIMEOUT_S = 120  # how long the processes of a dead engine may take to exit once killed


@dataclass
class _Request:
    prompt_ids_P: list
    versions_P: list  # adapter version (LoRA id) per prompt, None = base
    seeds_P: list
    n: int
    sampling: dict
    pending: object = None  # backend handle(s)
    restarts: int = 0


class _Fleet:
    """What both fleets share: the live adapters (to rebuild an engine) and request bookkeeping."""

    num_engines = 1  # prompt i of a request is served by engine i % num_engines (RayFleet deals round-robin)

    def __init__(self, say=None):
        self.say = say or (lambda text: None)
        self.adapters: dict[int, tuple[int, object, dict]] = {}  # version -> (slot, tensors or ObjectRef, config)
        self.latest_in_slot: dict[int, int] = {}  # slot (the run's adapter k) -> newest version
        self.slot_of: dict[int, int] = {}  # every version ever pushed -> its slot
        self.weights = None  # last full-FT weights pushed (tensors or ObjectRef), reloaded into a rebuilt engine
        self.restarts = 0
        self._call_failures = 0  # non-generation engine calls failed since one last succeeded (each rebuilt)

    def _current(self, version):
        """A request for an adapter version evicted while it waited (its engine died): the newest version of the
        same adapter. The completions say which version produced them."""
        if version is None or version in self.adapters or version not in self.slot_of:
            return version
        return self.latest_in_slot[self.slot_of[version]]

    def generate(self, prompt_ids_P, *, n, adapters, seed=0, seeds=None, use_tqdm=False, **sampling):
        """Sampler.generate's interface (rl_lora/eval/runner.py uses it unchanged): submit and wait."""
        return self.result(self.submit(prompt_ids_P, n=n, adapters=adapters, seed=seed, seeds=seeds, **sampling))

    def submit(self, prompt_ids_P, *, n, adapters, seed=0, seeds=None, **sampling) -> _Request:
        if seeds is None:
            seeds = request_seeds(seed, len(prompt_ids_P), n)
        versions = [None if a is None else (a.version if isinstance(a, AdapterRef) else int(a)) for a in adapters]
        req = _Request(list(prompt_ids_P), versions, list(seeds), n, sampling)
        self._submit(req)
        return req

    def push_adapters(self, items: list[tuple[int, int, dict, dict]], evict: list[int]) -> list[AdapterRef]:
        """Push several adapter versions, each (version, slot, tensors, config), then evict the versions in
        `evict`. The tensors must not change afterwards (a snapshot: kept as they are for a rebuild). This
        default pushes one by one; LocalFleet and RayFleet make it one call per engine."""
        refs = [self.push_adapter(v, slot, tensors, config) for v, slot, tensors, config in items]
        for version in evict:
            self.evict(version)
        return refs

    def _record_push(self, version: int, slot: int, tensors, config, copy: bool = True):
        """Keep what a rebuilt engine must load for `version`: a copy of `tensors` (they may be the learner's live
        parameters, which the next step changes in place; an ObjectRef is already a copy; `copy=False`: a
        snapshot, kept as it is). Returns what is kept."""
        if version < 1 or version in self.adapters:
            raise ValueError(f"adapter version {version} must be new and >= 1")
        if isinstance(tensors, dict) and copy:
            tensors = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}
        self.adapters[version] = (slot, tensors, config)
        self.latest_in_slot[slot] = version
        self.slot_of[version] = slot
        return tensors

    def _failed(self, req: _Request, exc: Exception) -> None:
        if req.restarts >= MAX_RESTARTS:
            raise FleetError(f"the sampler failed {req.restarts + 1} times on one request "
                             f"({type(exc).__name__}: {exc}); stopping") from exc
        req.restarts += 1
        req.versions_P = [self._current(v) for v in req.versions_P]


# --------------------------------------------------------------------------------------------------------------
# One in-process engine


class LocalFleet(_Fleet):
    def __init__(self, make_sampler, *, asynchronous: bool = False, say=None):
        super().__init__(say)
        self.make_sampler = make_sampler
        self.sampler = self._start()
        self.tokenizer, self.max_model_len = self.sampler.tokenizer, self.sampler.max_model_len
        # vLLM's LLM is not thread-safe: in async mode EVERY engine call goes through this one thread, in order.
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sampler") if asynchronous else None
        self._dead = False  # a call failed on the engine: the next call rebuilds it first

    def _start(self):
        sampler = self.make_sampler()
        _wake_on_engine_death(sampler)
        return sampler

    def _guarded(self, fn, *args):
        """Every engine call runs here, in order (async: on the worker thread, so a generation queued behind a
        failed one already finds a rebuilt engine). A call that fails on the engine (EngineError: the Sampler's
        engine_call) marks it dead, whatever the call: a failed generation is raised to `result`, which submits it
        again; any other call (push, evict, weights) is complete once the engine is rebuilt, since the rebuild
        loads the live state it recorded. Any other error (bad input, a bug) is raised as it is."""
        if self._dead:
            self._rebuild()
        try:
            out = fn(*args)
        except EngineError as exc:
            self._dead = True
            self.say(f"sampler failed ({exc})")
            if fn == self._generate_now:
                raise
            # a push/evict/weights call that fails on every fresh engine is a bug, not a dying engine: stop
            # instead of rebuilding at every step (a worker-side error once cost a rebuild per step, unnoticed)
            self._call_failures += 1
            if self._call_failures > MAX_RESTARTS:
                raise FleetError(f"the sampler failed {self._call_failures} engine calls in a row, each on a "
                                 f"rebuilt engine ({exc}); stopping") from exc
            self._rebuild()
            return None
        if fn != self._generate_now:
            self._call_failures = 0
        return out

    def _call(self, fn, *args):
        return self._guarded(fn, *args) if self.pool is None else self.pool.submit(self._guarded, fn, *args).result()

    def _generate_now(self, req: _Request):
        refs = [None if v is None else self.sampler.live[v] for v in req.versions_P]
        return self.sampler.generate(req.prompt_ids_P, n=req.n, adapters=refs, seed=0, seeds=req.seeds_P, **req.sampling)

    def _submit(self, req: _Request) -> None:
        # synchronous: run when the result is asked for (so an injected crash in between is seen)
        req.pending = None if self.pool is None else self.pool.submit(self._guarded, self._generate_now, req)

    def result(self, req: _Request):
        while True:
            try:
                return self._call(self._generate_now, req) if req.pending is None else req.pending.result()
            except EngineError as exc:  # the engine died under it (and is marked dead): again
                self._failed(req, exc)
                self._submit(req)

    def drain(self) -> None:
        """Wait until every call submitted so far has run (async: the queued generations)."""
        self._call(lambda: None)

    def kill_one(self) -> None:
        """Fault injection: the engine dies for real and unannounced (no flag is set), so that the next call on it
        fails inside vLLM: the engine-core process is SIGKILLed (vLLM's multiprocess engine, the GPU default), or
        the in-process engine core is shut down. Async: queued behind the calls already submitted, not waited
        for, so the next queued generation is the call that fails."""
        if self.pool is None:
            _break_engine(self.sampler)
        else:
            self.pool.submit(lambda: _break_engine(self.sampler))

    def _rebuild(self) -> None:
        self.restarts += 1
        self.say(f"restarting the engine and reloading {len(self.adapters)} live adapter version(s)")
        try:
            self.sampler.close()
        except Exception:  # it is already broken
            pass
        self.sampler = self._start()
        self._dead = False
        if self.weights is not None:
            self.sampler.load_weights(self.weights)
        for version, (_, tensors, config) in sorted(self.adapters.items()):
            self.sampler.push(version, _writer(tensors, config), evict_older=False)

    def push_adapter(self, version: int, slot: int, tensors: dict, config: dict) -> AdapterRef:
        tensors = self._record_push(version, slot, tensors, config)
        self._call(lambda: self.sampler.push(version, _writer(tensors, config), evict_older=False))
        return AdapterRef(version, "")  # requests name the version; the engine of the moment knows its files

    def push_adapters(self, items: list[tuple[int, int, dict, dict]], evict: list[int]) -> list[AdapterRef]:
        for version, slot, tensors, config in items:
            self._record_push(version, slot, tensors, config, copy=False)
        for version in evict:
            self.adapters.pop(version, None)
        self._call(lambda: self.sampler.push_many([(v, tensors, config) for v, _, tensors, config in items], evict))
        return [AdapterRef(v, "") for v, _, _, _ in items]

    def evict(self, version: int) -> None:
        self.adapters.pop(version, None)
        self._call(self.sampler.evict, version)

    def load_weights(self, hf_state: dict) -> None:
        # a copy on the CPU, for a rebuild (the learner's parameters change in place at the next step), into the
        # same buffers every push
        if self.weights is None or self.weights.keys() != hf_state.keys():
            self.weights = {name: t.detach().to("cpu", copy=True) for name, t in hf_state.items()}
        else:
            for name, t in hf_state.items():
                self.weights[name].copy_(t.detach())
        self._call(self.sampler.load_weights, hf_state)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.sampler.close()


def _break_engine(sampler) -> None:
    """Kill a Sampler's vLLM engine the way a crash would (fault injection)."""
    import signal

    core, _, manager = engine_core_of(sampler)
    if manager is None:  # in-process engine core: shut down under the LLM, which still believes it is alive
        core.shutdown()
        return
    for proc in manager.processes:
        os.kill(proc.pid, signal.SIGKILL)
    for proc in manager.processes:
        proc.join(timeout=60)


def _wake_on_engine_death(sampler) -> None:
    """vLLM 0.32's synchronous multiprocess client: when the engine-core process dies hard (SIGKILL, the OOM
    killer, a segfault), its output thread exits without a word and a generate() that is waiting for outputs, or
    sent its request before vLLM's monitor noticed, waits forever (seen here: a run hung). A watcher wakes it with
    the EngineDeadError the client raises everywhere else, so the fleet sees a failure and rebuilds the engine."""
    import threading
    from multiprocessing.connection import wait

    core, _, manager = engine_core_of(sampler)
    queue = getattr(core, "outputs_queue", None)
    if manager is None or queue is None or not manager.processes:  # in-process engine core (or a stand-in)
        return

    def watch():
        from vllm.v1.engine.exceptions import EngineDeadError

        wait([p.sentinel for p in manager.processes])
        queue.put_nowait(EngineDeadError())

    threading.Thread(target=watch, daemon=True, name="rl-lora-engine-watch").start()


def _writer(tensors, config):
    from rl_lora.learner.lora import write_peft_adapter

    return lambda path: write_peft_adapter(path, tensors, config)


# --------------------------------------------------------------------------------------------------------------
# N engines as Ray actors


_TORCHRUN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT"}


class _Engine:
    """The body of one sampler actor: a Sampler and its adapter versions (Ray resolves ObjectRef arguments).

    Created in two calls, so the driver knows where the engine lives before vLLM starts: the constructor makes the
    actor's process the leader of a process group of its own (vLLM's engine-core and worker processes inherit it,
    and keep it if the actor dies), `where()` names it, and `start()` loads the engine."""

    def __init__(self, model_path: str, kwargs: dict, env: dict):
        # The driver may be rank 0 of a torchrun learner: its process-group variables would make this engine try
        # to join that group. An engine is a world of its own.
        for key in [k for k in os.environ if k in _TORCHRUN_ENV or k.startswith("TORCHELASTIC_")]:
            del os.environ[key]
        os.environ.update(env)
        try:
            os.setpgid(0, 0)
        except OSError:  # already a group leader, or not allowed: the group is then the actor's pid only if it leads
            pass
        self.model_path, self.kwargs, self.sampler = model_path, kwargs, None

    def where(self) -> dict:
        """The node and process group of this engine's processes: what `_reap` kills once the engine is dead."""
        import psutil
        import ray

        me = psutil.Process()
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": me.pid, "pgid": os.getpgid(0),
                "created": me.create_time()}

    @engine_call  # a new engine that fails while starting is an engine failure: RayFleet frees it and tries again
    def start(self) -> dict:
        from rl_lora.sampling.sampler import Sampler

        self.sampler = Sampler(self.model_path, **self.kwargs)
        _wake_on_engine_death(self.sampler)  # a hard engine-core death fails the call (RayTaskError), never hangs it
        return self.info()

    def info(self) -> dict:
        """The engine's context length and the processes that hold its memory: this actor and its children (vLLM's
        engine-core process when VLLM_ENABLE_V1_MULTIPROCESSING=1, the GPU default; its workers)."""
        import psutil

        me = psutil.Process()
        return {"max_model_len": self.sampler.max_model_len, "pid": me.pid,
                "procs": [(p.pid, p.create_time()) for p in [me, *me.children(recursive=True)]]}

    def push(self, version: int, tensors: dict, config: dict) -> None:
        self.sampler.push(version, _writer(tensors, config), evict_older=False)

    def push_many(self, items: list, evict: list[int]) -> None:
        import ray

        # ObjectRefs nested in a list are not resolved by Ray: fetch them here
        self.sampler.push_many([(v, ray.get(t) if isinstance(t, ray.ObjectRef) else t, c) for v, t, c in items], evict)

    def evict(self, version: int) -> None:
        self.sampler.evict(version)

    def load_weights(self, hf_state: dict) -> None:
        self.sampler.load_weights(hf_state)

    def generate(self, prompt_ids_P, versions_P, seeds_P, n, sampling):
        refs = [None if v is None else self.sampler.live[v] for v in versions_P]
        return self.sampler.generate(prompt_ids_P, n=n, adapters=refs, seed=0, seeds=seeds_P, **sampling)


def _engine_failure(exc: Exception) -> None:
    """Return if `exc` says an engine died: its actor (RayActorError and its subclasses ActorDiedError,
    ActorUnavailableError), the objects it held (ObjectLostError), or the vLLM engine inside a live actor (a
    RayTaskError whose cause is the Sampler's EngineError). Raise anything else: a user error raised in the actor
    (bad input, ConfigError: a ValueError; RunError) as itself, so the CLI prints its one line; any other error (a
    bug) as it came, with the actor's traceback."""
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

    if isinstance(exc, (RayActorError, ObjectLostError, EngineError)):
        return
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    if isinstance(cause, EngineError):
        return
    if isinstance(cause, (ValueError, RunError)):
        raise cause from None
    raise exc


def _reap(where: dict, timeout_s: float) -> list[int]:
    """Runs on the dead engine's node: SIGKILL its process group (the actor, vLLM's engine-core and worker
    processes, even those orphaned by the actor's death) and wait until every member has exited. Members are
    processes of that group started no earlier than the actor (so a reused id is never touched). Returns the pids
    still running."""
    import signal
    import time

    import psutil

    def members() -> list[int]:
        out = []
        for p in psutil.process_iter(["pid", "create_time", "status"]):
            try:
                if (os.getpgid(p.info["pid"]) == where["pgid"] and p.info["create_time"] >= where["created"] - 1
                        and p.info["status"] != psutil.STATUS_ZOMBIE):
                    out.append(p.info["pid"])
            except (ProcessLookupError, PermissionError):
                pass
        return out

    if where["pgid"] != where["pid"]:  # not our own group (setpgid failed): only the actor process itself
        try:
            psutil.Process(where["pid"]).kill()
        except psutil.NoSuchProcess:
            pass
        return []
    deadline = time.monotonic() + timeout_s
    left = members()
    while left and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        left = members()
    return left


class RayFleet(_Fleet):
    def __init__(self, model_path: str, sampler_kwargs: dict, *, num_engines: int, address: str = "",
                 gpus_per_engine: int = 1, say=None):
        import ray
        import torch
        from transformers import AutoTokenizer

        super().__init__(say)
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # a local Ray for this process: one CPU slot per engine on a CPU-only machine
                ray.init(num_cpus=max(num_engines, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        self.on_gpu = torch.cuda.is_available() or bool(ray.cluster_resources().get("GPU"))
        self.model_path, self.sampler_kwargs = model_path, sampler_kwargs
        self.gpus = gpus_per_engine if self.on_gpu else 0
        self.num_engines = num_engines
        self.actors = [self._start(i) for i in range(num_engines)]
        self.procs = ray.get([a.where.remote() for a in self.actors])  # per engine: its node and processes, for _free
        infos = ray.get([a.start.remote() for a in self.actors])
        self.max_model_len = infos[0]["max_model_len"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def _start(self, i: int):
        import ray

        env = {}
        if not self.on_gpu:  # CPU: each engine gets its own cores instead of all engines fighting over all of them
            cores = os.cpu_count() or 1
            env = {"VLLM_CPU_OMP_THREADS_BIND": str(i % cores), "OMP_NUM_THREADS": "1"} if self.num_engines >= cores \
                else {}
        actor_cls = ray.remote(num_cpus=1 if not self.on_gpu else 0, num_gpus=self.gpus, max_restarts=0)(_Engine)
        return actor_cls.remote(self.model_path, self.sampler_kwargs, env)

    # -- requests ------------------------------------------------------------------------------------------------

    def _submit(self, req: _Request, only: int | None = None) -> None:
        """Deal the prompts round-robin over the engines; `only` resubmits one engine's share after a restart."""
        N = len(self.actors)
        if req.pending is None:
            req.pending = [None] * N
        for e in range(N) if only is None else [only]:
            idx = list(range(e, len(req.prompt_ids_P), N))
            if not idx:
                continue
            actor = self.actors[e]
            ref = actor.generate.remote([req.prompt_ids_P[i] for i in idx], [req.versions_P[i] for i in idx],
                                        [req.seeds_P[i] for i in idx], req.n, req.sampling)
            req.pending[e] = (actor, idx, ref)

    def result(self, req: _Request):
        import ray

        out: list = [None] * len(req.prompt_ids_P)
        for e in range(len(req.pending)):
            while req.pending[e] is not None:
                actor, idx, ref = req.pending[e]
                try:
                    groups = ray.get(ref)
                except Exception as exc:  # _engine_failure re-raises what is not a dead engine
                    _engine_failure(exc)
                    self._failed(req, exc)
                    if self.actors[e] is actor:  # not yet replaced by another request that saw the death
                        self.say(f"sampler engine {e} died ({type(exc).__name__}); starting a new one with "
                                 f"{len(self.adapters)} live adapter version(s) and re-queuing its {len(idx)} prompts")
                        self._replace(e)
                    self._submit(req, only=e)
                    continue
                for i, g in zip(idx, groups):
                    out[i] = g
                req.pending[e] = None
        return out

    def drain(self) -> None:
        """Wait until every engine has run the calls submitted to it so far."""
        self._each("info")

    def kill_one(self, e: int = 0) -> None:
        """Fault injection: kill engine `e` for real (its running and queued calls fail)."""
        import ray

        ray.kill(self.actors[e], no_restart=True)

    def _replace(self, e: int) -> None:
        """Engine `e` died: kill what is left of it, wait until its processes (and so its GPU memory) are gone, and
        start another with the live weights and adapters. A replacement that dies while starting (another fault,
        or vLLM's free-memory check on a GPU still held) is freed the same way and tried again."""
        self.restarts += 1
        self._free(self.actors[e], self.procs[e])
        for attempt in range(1, START_ATTEMPTS + 1):
            actor, info = self._start_loaded(e)
            if actor is not None:
                self.actors[e], self.procs[e] = actor, info
                return
            self.say(f"sampler engine {e}: the new engine died while starting ({info}); "
                     f"attempt {attempt} of {START_ATTEMPTS}")
        raise FleetError(f"sampler engine {e}: {START_ATTEMPTS} new engines in a row died while starting (last: "
                         f"{info}); stopping")

    def _start_loaded(self, e: int):
        """(actor, where) of a new engine holding the live weights and adapters, or (None, why) if it died."""
        import ray
        from ray.exceptions import GetTimeoutError

        actor = self._start(e)
        where = None
        try:  # a lost node leaves no free GPU for the new engine: stop instead of waiting forever
            where = ray.get(actor.where.remote(), timeout=ENGINE_START_TIMEOUT_S)
            ray.get(actor.start.remote(), timeout=ENGINE_START_TIMEOUT_S)
            if self.weights is not None:
                ray.get(actor.load_weights.remote(self.weights))
            ray.get([actor.push.remote(v, t, c) for v, (_, t, c) in sorted(self.adapters.items())])
            return actor, where
        except GetTimeoutError:
            self._free(actor, where)
            raise FleetError(f"a new sampler engine did not start within {ENGINE_START_TIMEOUT_S} s (no free "
                             f"{'GPU' if self.on_gpu else 'CPU'} in the Ray cluster?)") from None
        except Exception as exc:  # _engine_failure re-raises what is not a dead engine
            _engine_failure(exc)
            self._free(actor, where)
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

    def _free(self, actor, where: dict | None) -> None:
        """Release a dead (or failing) engine's resources before another takes its place: ray.kill the actor (Ray
        frees its GPU slot), then, on its node, SIGKILL its process group and wait until every process of it has
        exited. vLLM's engine-core process is a child of the actor and can outlive it, holding the GPU memory that
        vLLM's free-memory check at the next engine's start would refuse."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
        if not where:
            return  # it was never placed: no process of it exists
        task = ray.remote(num_cpus=0)(_reap).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(where["node_id"], soft=False))
        try:
            left = ray.get(task.remote(where, FREE_TIMEOUT_S), timeout=FREE_TIMEOUT_S + 60)
        except Exception as exc:  # the node itself is gone: so are its processes
            self.say(f"could not check the dead engine's processes ({type(exc).__name__}); its node is gone?")
            return
        if left:
            raise FleetError(f"the dead sampler engine's processes {left} did not exit within {FREE_TIMEOUT_S} s "
                             "after SIGKILL; its GPU memory is not free")

    def _each(self, method: str, *args) -> list:
        """Call `method` on every engine and wait; an engine found dead is replaced (with the live state)."""
        import ray

        refs = [getattr(a, method).remote(*args) for a in self.actors]
        out = []
        for e, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except Exception as exc:  # _engine_failure re-raises what is not a dead engine
                _engine_failure(exc)
                self.say(f"sampler engine {e} died ({type(exc).__name__}); starting a new one with the live adapters")
                self._replace(e)
                out.append(None)
        return out

    # -- adapters and weights ------------------------------------------------------------------------------------

    def push_adapter(self, version: int, slot: int, tensors: dict, config: dict) -> AdapterRef:
        import ray

        ref = ray.put(tensors)  # once; every engine reads it from the object store
        self._record_push(version, slot, ref, config)
        self._each("push", version, ref, config)
        return AdapterRef(version, "")

    def evict(self, version: int) -> None:
        if self.adapters.pop(version, None) is not None:
            self._each("evict", version)

    def push_adapters(self, items: list[tuple[int, int, dict, dict]], evict: list[int]) -> list[AdapterRef]:
        import ray

        refs = [ray.put(tensors) for _, _, tensors, _ in items]  # once each; every engine reads the object store
        for (version, slot, _, config), ref in zip(items, refs):
            self._record_push(version, slot, ref, config)
        evict = [v for v in evict if self.adapters.pop(v, None) is not None]
        self._each("push_many", [(v, ref, config) for (v, _, _, config), ref in zip(items, refs)], evict)
        return [AdapterRef(v, "") for v, _, _, _ in items]

    def load_weights(self, hf_state: dict) -> None:
        import ray

        self.weights = ray.put({k: v.detach().cpu() for k, v in hf_state.items()})
        self._each("load_weights", self.weights)

    def close(self) -> None:
        for actor, where in zip(self.actors, self.procs):
            try:  # killed with their engine-core processes, which would otherwise keep their GPU memory
                self._free(actor, where)
            except Exception:  # best effort at the end of a run
                pass
        self.actors = []
