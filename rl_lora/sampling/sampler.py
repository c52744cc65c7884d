"""The vLLM sampler: one engine, loaded once, serving immutable adapter versions that are hot-swapped in.

Every learner update becomes a new adapter version: a new LoRA id *and* name (vLLM's prefix cache keys
adapters by name + path, so reusing a name would serve stale KV), written as PEFT files to a RAM-backed
directory and loaded into the running engine; the previous version is evicted. Nothing is merged into the
base weights and the engine is never restarted.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from rl_lora.errors import ConfigError, EngineError
from rl_lora.rollout import Completion
from rl_lora.seeds import request_seeds


def _configure_cpu_env(kvcache_gib: int) -> None:
    """vLLM-CPU settings measured on a 2-core machine; must be set before vLLM is imported."""
    # Default reserves 1 of 2 cores for the engine frontend: 1.5x slower sampling here.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gib))
    # In-process engine core: 7 s start instead of 35 s, and adapters can be loaded without IPC.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Otherwise the in-process engine drops torch to 1 thread, halving the learner's speed.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


def _add_expert_parallel_group() -> None:
    """vLLM's model-parallel groups are process globals, made once by the first engine whose worker runs in this
    process (the in-process engine core, rl-lora's CPU default), for that engine's model: a dense model gets no
    expert-parallel group, and an MoE engine started later in the same process finds the groups made and fails
    building its experts ("expert parallel group is not initialized"; measured: tests/e2e/test_moe_sampler.py after a
    tiny-Llama engine). Where that is the case, add the group as vLLM makes it for a one-process world. A no-op
    before the first in-process engine, or where the workers run elsewhere (their groups are theirs)."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps._EP is not None:
        return
    world = ps.get_world_group()
    if world.world_size == 1:
        import torch.distributed as dist

        ps._EP = ps.init_model_parallel_group([[0]], world.local_rank, dist.get_backend(world.device_group),
                                              group_name="ep")


def _ram_dir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="rl-lora-adapters-", dir=base))


def engine_call(method):
    """A call into the vLLM engine: what it raises, other than bad input (ValueError: a prompt too long, ...), is
    the engine failing under it (vLLM's EngineDeadError when its engine-core process died; anything the
    in-process core raises, e.g. an AssertionError once it is shut down) and comes out as EngineError, the one
    type the fleet rebuilds an engine for. Errors of our own code around the engine are not turned into it."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ValueError:
            raise
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
            if type(exc).__name__ != "EngineDeadError" and _engine_core_died(args[0] if args else None):
                # the death races the call: it may surface as a closed socket (ZMQError) or a half shut-down
                # client before vLLM's monitor marks the engine dead; name the cause, keep what was raised
                what = f"EngineDeadError: the engine-core process died ({what})"
            raise EngineError(what) from exc
    return call


def engine_core_of(sampler) -> tuple:
    """(vLLM's engine-core client, its background resources, their process manager) of a Sampler; each None where
    it has none: the manager for the in-process engine core, all three for anything that is not a live Sampler."""
    core = getattr(getattr(getattr(sampler, "llm", None), "llm_engine", None), "engine_core", None)
    resources = getattr(core, "resources", None)
    return core, resources, getattr(resources, "engine_manager", None)


def _engine_core_died(sampler) -> bool:
    """Has the engine-core process of a Sampler on vLLM's multiprocess engine exited? False for the in-process
    engine core, or anything that is not a Sampler with a live LLM."""
    _, resources, manager = engine_core_of(sampler)
    if getattr(resources, "engine_dead", False):
        return True
    return any(not p.is_alive() for p in getattr(manager, "processes", None) or ())


CPU_BLOCK_SIZE = 32  # tokens per KV-cache block on CPU (see engine_kwargs)


def engine_kwargs(model_path: str, *, on_cpu: bool, dtype: str = "float32", max_model_len: int = 0,
                  max_lora_rank: int = 1, max_loras: int = 2, gpu_memory_utilization: float = 0.5,
                  tensor_parallel_size: int = 1, seed: int = 0) -> dict:
    """The arguments of vLLM's engine (LLM(**kwargs)) for our sampler; `on_cpu`: vLLM runs on its CPU platform."""
    kwargs = dict(
        model=model_path, dtype=dtype, enable_lora=True,
        # vLLM accepts ranks from a fixed list; 1 is allowed. Round up for larger ranks.
        max_lora_rank=_vllm_rank(max_lora_rank), max_loras=max_loras, max_cpu_loras=max_loras,
        # Logprobs of the distribution actually sampled (temperature applied); the default
        # raw_logprobs ignores temperature and would bias every importance ratio.
        logprobs_mode="processed_logprobs",
        seed=seed, enable_prefix_caching=True,
        # Full fine-tuning pushes weights through collective_rpc("rl_lora_load_weights"): a method of this class,
        # added to vLLM's worker wherever the worker runs (in-process, engine-core process, TP workers).
        worker_extension_cls="rl_lora.sampling.sampler.WeightLoader",
    )
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if on_cpu:
        kwargs["enforce_eager"] = True  # LoRA forces eager mode on CPU anyway
        # Per-request seeds make sampling reproducible, but vLLM-CPU crashes when it rewinds a seeded CPU
        # generator after a partial (chunked) prefill ("CPU Generator does not use offset"): on CPU, prefill
        # whole prompts. CUDA generators support offsets, so a GPU engine keeps chunked prefill.
        kwargs["enable_chunked_prefill"] = False
        # The prefix cache shares whole blocks only, and vLLM-CPU's default block is 128 tokens: a shorter prompt
        # was never shared, so each of a group's G completions prefilled it again. 32 is the smallest block the
        # CPU attention takes; 64 prompts x 8 samples of a 51-token prompt: 43.6 s -> 18.8 s (SmolLM2-135M).
        kwargs["block_size"] = CPU_BLOCK_SIZE
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    return kwargs


@dataclass(frozen=True)
class AdapterRef:
    version: int
    path: str

    @property
    def name(self) -> str:
        return f"v{self.version}"


class Sampler:
    rank1_path = False  # rl_lora.sampling.vllm_cpu_lora serves this engine's LoRA layers (CPU, rank 1; read from the worker)

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 0, max_lora_rank: int = 1,
                 max_loras: int = 2, kvcache_gib: int = 1, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, seed: int = 0):
        import torch

        if not torch.cuda.is_available():
            _configure_cpu_env(kvcache_gib)  # before vLLM is imported; harmless if vLLM then finds another device
        from vllm import LLM
        from vllm.platforms import current_platform

        # The workarounds below are for vLLM-CPU's bugs; a GPU engine gets vLLM's own defaults.
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            from rl_lora.sampling import vllm_plugin

            # before the engine builds its LoRA layers: here, and (entry point) in an engine-core process
            vllm_plugin.request(_vllm_rank(max_lora_rank))
        _add_expert_parallel_group()
        self.llm = LLM(**engine_kwargs(model_path, on_cpu=self.on_cpu, dtype=dtype, max_model_len=max_model_len,
                                       max_lora_rank=max_lora_rank, max_loras=max_loras,
                                       gpu_memory_utilization=gpu_memory_utilization,
                                       tensor_parallel_size=tensor_parallel_size, seed=seed))
        if self.on_cpu:  # where the engine core runs elsewhere, only its worker knows which wrapper it built
            from rl_lora.sampling.vllm_cpu_lora import QUALNAME

            wrappers = [name for worker in self.llm.collective_rpc("rl_lora_punica") for name, _ in worker]
            self.rank1_path = bool(wrappers) and all(name == QUALNAME for name in wrappers)
        # the engine core runs in this process (rl-lora's CPU default), not in vLLM's engine-core process
        self.in_process = type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"
        if self.in_process:
            _IN_PROCESS.add(self)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._dir = _ram_dir()
        self.live: dict[int, AdapterRef] = {}  # version -> ref, for versions still loaded
        self.max_loras = max_loras  # the engine's adapter cache (max_cpu_loras = max_loras)
        self.last_push_s = 0.0
        self._weights_pushed = 0

    # ------------------------------------------------------------------------------------------------------
    # Adapters

    @engine_call
    def push(self, version: int, write_adapter, evict_older: bool = True) -> AdapterRef:
        """Load adapter `version` into the running engine; `write_adapter(dir)` writes its PEFT files.

        Returns once the engine holds it. By default every other live version is evicted (a training run
        serves one policy); `evict_older=False` keeps them (evaluating several adapters in one engine).
        """
        from vllm.lora.request import LoRARequest

        if version < 1 or version in self.live:
            raise ValueError(f"adapter version {version} must be new and >= 1")
        t0 = time.perf_counter()
        path = self._dir / f"v{version}"
        write_adapter(path)
        ref = AdapterRef(version, str(path))
        self.llm.llm_engine.add_lora(LoRARequest(ref.name, version, ref.path))
        if evict_older:
            for old in list(self.live):
                self.evict(old)
        self.live[version] = ref
        self.last_push_s = time.perf_counter() - t0
        return ref

    @engine_call
    def push_many(self, items: list[tuple[int, dict, dict]], evict: list[int]) -> list[AdapterRef]:
        """Evict the versions in `evict`, then load every (version, PEFT tensors, adapter config) of `items`: a
        training run's push of all K adapters, one call into the sampler."""
        from vllm.lora.request import LoRARequest

        from rl_lora.learner.lora import write_peft_adapter

        for version, _, _ in items:
            if version < 1 or version in self.live:
                raise ValueError(f"adapter version {version} must be new and >= 1")
        t0 = time.perf_counter()
        gone = [self.live.pop(v) for v in evict if v in self.live]
        if gone:  # one engine call for all of them (WeightLoader), then their files
            self.llm.collective_rpc("rl_lora_remove_loras", args=([r.version for r in gone],))
            for ref in gone:
                shutil.rmtree(ref.path, ignore_errors=True)
        refs = [AdapterRef(version, str(self._dir / f"v{version}")) for version, _, _ in items]
        # In-process engine, every adapter fitting in its cache (so vLLM never reloads one from its path) and no MoE
        # experts (vLLM's file loader handles their layouts): the worker builds each adapter from our tensors.
        # Measured (tiny Llama, K = 64, load ~10 on 2 cores): writing the 64 PEFT dirs and vLLM reading them back
        # were ~70% of the push (0.08 + 0.12 s of 0.26 s under cProfile).
        if (self.in_process and len(self.live) + len(items) <= self.max_loras
                and not any(".experts." in name for _, tensors, _ in items[:1] for name in tensors)):
            self.llm.collective_rpc("rl_lora_add_loras_from_tensors",
                                    args=([(LoRARequest(r.name, r.version, r.path), tensors, config)
                                           for r, (_, tensors, config) in zip(refs, items)],))
        else:
            for ref, (_, tensors, config) in zip(refs, items):
                write_peft_adapter(ref.path, tensors, config)
            # one engine call loads all K (vLLM's own loader and LRU cache, in the worker), not K add_lora round trips
            self.llm.collective_rpc("rl_lora_add_loras", args=([(r.name, r.version, r.path) for r in refs],))
        self.live.update((r.version, r) for r in refs)
        self.last_push_s = time.perf_counter() - t0
        return refs

    @engine_call
    def load_weights(self, hf_state: dict) -> None:
        """Overwrite the engine's base weights in place with `hf_state` (HF parameter names; full fine-tuning),
        and drop the prefix cache (its KV was computed with the old weights). Llama-family layouts: vLLM fuses
        q/k/v and gate/up. Raises ConfigError if a weight of either side has no counterpart.

        The weights travel as one safetensors file in RAM (/dev/shm), written from CPU copies: the engine (in this
        process, in vLLM's engine-core process, or in a Ray actor's) reads it by name through
        `collective_rpc("rl_lora_load_weights", path)`, so no closure is pickled and no CUDA tensor of the
        learner crosses a process boundary. The file is removed once loaded."""
        from safetensors.torch import save_file

        self._weights_pushed += 1
        path = self._dir / f"weights-{self._weights_pushed}.safetensors"
        try:
            # CPU copies in the engine's dtype (the engine casts to it anyway; fp32 master weights make a file half
            # the size). copy=True: on CPU `.to()` alone could alias the live parameters, and tied ones each other.
            dtype = self.llm.llm_engine.model_config.dtype
            save_file({k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
                       .contiguous() for k, v in hf_state.items()}, str(path))
            missing = self.llm.collective_rpc("rl_lora_load_weights", args=(str(path),))[0]
        finally:
            path.unlink(missing_ok=True)
        if missing:
            raise ConfigError(f"full fine-tuning: the engine has no place for {missing[:3]} (unsupported architecture)")
        self.llm.reset_prefix_cache()

    @engine_call
    def evict(self, version: int) -> None:
        ref = self.live.pop(version, None)
        if ref is None:
            return
        self.llm.llm_engine.remove_lora(version)
        shutil.rmtree(ref.path, ignore_errors=True)

    def request_for(self, ref: AdapterRef | None):
        from vllm.lora.request import LoRARequest

        return None if ref is None else LoRARequest(ref.name, ref.version, ref.path)

    # ------------------------------------------------------------------------------------------------------
    # Generation

    def generate(self, prompt_ids_P: list[list[int]], *, n: int, adapters: list[AdapterRef | None],
                 seed: int, temperature: float, max_tokens: int, top_p: float = 1.0, top_k: int = -1,
                 use_tqdm: bool = False, seeds: list[int] | None = None, stop: list[str] | None = None
                 ) -> list[list[Completion]]:
        """For each prompt, `n` completions with the sampled tokens' logprobs. `adapters`: one ref (None = the
        base) per prompt (multi-LoRA batching: prompts under different adapters share a call).
        Request seeds are seed + i*n for prompt i, or `seeds` (one per prompt, spaced >= n apart). `stop`: stop
        strings (vLLM keeps the token that completed one, and its logprob)."""
        if seeds is None:
            seeds = request_seeds(seed, len(prompt_ids_P), n)
        if len(seeds) != len(prompt_ids_P):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids_P)} prompts")
        if len(adapters) != len(prompt_ids_P):
            raise ValueError(f"{len(adapters)} adapters for {len(prompt_ids_P)} prompts")
        for ids in prompt_ids_P:
            if len(ids) + max_tokens > self.max_model_len:
                raise ConfigError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the engine's "
                                  f"context of {self.max_model_len} tokens (model.max_model_len)")
        base_idx = [i for i, a in enumerate(adapters) if a is None]
        if self.on_cpu and not self.rank1_path and base_idx and len(base_idx) < len(adapters):
            # vLLM-CPU 0.32 applies a LoRA to no-adapter rows that share a batch with LoRA rows (measured:
            # logprobs off by ~0.8 nats; its CPU LoRA ops have no "no adapter" row), so on CPU base requests run
            # in a call of their own. vLLM's GPU (punica) kernels skip such rows, and so does the rank-1 path
            # (rl_lora/sampling/vllm_cpu_lora.py). Seeds stay per prompt.
            lora_idx = [i for i, a in enumerate(adapters) if a is not None]
            out: list = [None] * len(prompt_ids_P)
            for idx in (base_idx, lora_idx):
                for i, g in zip(idx, self._generate_seeded([prompt_ids_P[i] for i in idx], [adapters[i] for i in idx],
                                                           [seeds[i] for i in idx], n, temperature, max_tokens,
                                                           top_p, top_k, use_tqdm, stop)):
                    out[i] = g
            return out
        return self._generate_seeded(prompt_ids_P, adapters, seeds, n, temperature, max_tokens, top_p, top_k, use_tqdm,
                                     stop)

    @engine_call
    def _generate_seeded(self, prompt_ids_P, adapters, seeds_P, n, temperature, max_tokens, top_p, top_k, use_tqdm,
                         stop=None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Per-request seeds are reproducible (the engine-level seed is not); vLLM gives the n children of a
        # request seeds seed..seed+n-1, so requests are spaced n apart.
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                 logprobs=0, seed=s, stop=stop or None) for s in seeds_P]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids_P]
        outputs = self.llm.generate(prompts, params, lora_request=[self.request_for(a) for a in adapters],
                                    use_tqdm=use_tqdm)
        groups = []
        for out, ref in zip(outputs, adapters):
            group = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                token_ids = list(o.token_ids)
                lps = [step[tok].logprob for step, tok in zip(o.logprobs, token_ids)]
                group.append(Completion(token_ids, lps, o.text, o.finish_reason or "length",
                                        0 if ref is None else ref.version))
            groups.append(group)
        return groups

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        core = self.llm.llm_engine.engine_core
        _IN_PROCESS.discard(self)
        try:
            if self.in_process and _IN_PROCESS:
                _shutdown_keeping_parallel_state(core)
            else:
                core.shutdown()
        except Exception:  # best effort: the process is ending anyway
            pass


_IN_PROCESS: weakref.WeakSet = weakref.WeakSet()  # Samplers open in this process whose engine core runs here


def _shutdown_keeping_parallel_state(core) -> None:
    """Shut an in-process engine core down without the teardown of vLLM's process-global parallel groups and
    torch.distributed that ends its shutdown (vllm/v1/engine/core.py: cleanup_dist_env_and_memory): another engine
    of this process still uses them (measured: closing an MoE Sampler left the open tiny-Llama one failing with
    "pipeline model parallel group is not initialized")."""
    from vllm.v1.engine import core as engine_core

    teardown = engine_core.cleanup_dist_env_and_memory
    engine_core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
    try:
        core.shutdown()
    finally:
        engine_core.cleanup_dist_env_and_memory = teardown


def _vllm_rank(rank: int) -> int:
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


class WeightLoader:
    """Mixed into vLLM's worker class (engine_kwargs' worker_extension_cls): called by name through
    LLM.collective_rpc, in whichever process the worker runs."""

    def rl_lora_load_weights(self, path: str) -> list[str]:
        from safetensors.torch import load_file

        return _copy_hf_weights(self.get_model(), load_file(path))

    def rl_lora_add_loras(self, requests: list) -> list[bool]:
        """Several adapters loaded in one call (the worker's own add_lora for each), given as (name, id, path):
        through vLLM's multiprocess engine a LoRARequest in collective_rpc's args arrives as a plain list (msgspec
        encodes the struct as an array and decodes it untyped), so the worker builds the requests itself."""
        from vllm.lora.request import LoRARequest

        return [self.add_lora(LoRARequest(name, lora_id, path)) for name, lora_id, path in requests]

    def rl_lora_add_loras_from_tensors(self, items: list) -> list[bool]:
        """(LoRARequest, PEFT tensors, adapter_config dict) each, loaded through the worker's own add_lora (its
        validation and LRU cache) with vLLM's file reader (`_load_adapter`) replaced, for these requests, by the
        same steps on the tensors given (LoRAModel.from_lora_tensors): no file is written or read."""
        from vllm.lora.peft_helper import PEFTHelper

        manager = self.model_runner.lora_manager
        given = {req.lora_int_id: (tensors, config) for req, tensors, config in items}

        def load(req):
            tensors, config = given[req.lora_int_id]
            # copies: vLLM scales lora_b in place (LoRALayerWeights.optimize), which would change the learner's
            # snapshot of this version (the push check's previous version) under it
            tensors = {name: t.clone() for name, t in tensors.items()}
            peft = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
            peft.validate_legal(manager.lora_config)
            model = manager._adapter_manager.model
            mapper = getattr(model, "hf_to_vllm_mapper", None)
            lora = manager._lora_model_cls.from_lora_tensors(
                req.lora_int_id, tensors, peft, device="cpu", dtype=manager.lora_config.lora_dtype,
                model_vocab_size=manager.vocab_size, weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
                skip_prefixes=getattr(model, "lora_skip_prefixes", None))
            lora.is_3d_lora_weight = req.is_3d_lora_weight
            return lora

        manager._load_adapter = load
        try:
            return [self.add_lora(req) for req, _, _ in items]
        finally:
            del manager._load_adapter  # vLLM's own again

    def rl_lora_remove_loras(self, lora_ids: list[int]) -> list[bool]:
        return [self.remove_lora(i) for i in lora_ids]

    def rl_lora_punica(self) -> list[tuple[str, int]]:
        from rl_lora.sampling.vllm_cpu_lora import report

        return report(self)


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _copy_hf_weights(model, hf_state: dict) -> list[str]:
    """Runs inside the engine: copy HF-named weights into vLLM's (LoRA-wrapped, fused) parameters. Returns the
    HF names that found no place (tied lm_head excepted).

    On CPU, vLLM repacks each linear weight for oneDNN/SGL kernels after loading (keeping a handle, and often an
    empty `weight`): such layers get their new weight and are repacked the same way."""
    import torch

    used = set()
    repack = []  # (module, remove_weight)
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            if "lora_" in name:
                continue
            key = name.replace(".base_layer", "")
            prefix, _, rest = key.rpartition(".")
            owner, _, module_name = prefix.rpartition(".")
            if module_name in _FUSED:
                parts = [f"{owner}.{m}.{rest}" for m in _FUSED[module_name]]
                src = torch.cat([hf_state[k] for k in parts])
            elif key in hf_state:
                parts, src = [key], hf_state[key]
            else:
                raise ConfigError(f"engine parameter {name} has no HF weight (full fine-tuning of this architecture)")
            module = model.get_submodule(name.rpartition(".")[0])
            if param.numel() == 0 and hasattr(module, "cpu_linear"):  # repacked on CPU, weight dropped
                module.weight = torch.nn.Parameter(src.to(param.dtype).contiguous(), requires_grad=False)
                repack.append((module, True))
            else:
                if src.shape[1:] != param.shape[1:] or src.shape[0] > param.shape[0]:
                    raise ConfigError(f"{name}: engine shape {tuple(param.shape)} vs HF {tuple(src.shape)}")
                param[: src.shape[0]].copy_(src.to(param.dtype))  # vocab rows may be padded in the engine
            used.update(parts)
        # layers that kept their weight but packed a copy of it (e.g. a tied lm_head) are repacked too
        done = {id(m) for m, _ in repack}
        repack += [(m, False) for m in model.modules()
                   if hasattr(m, "cpu_linear") and id(m) not in done and getattr(m, "weight", None) is not None
                   and m.weight.numel() > 0]
        if repack:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            for module, remove in repack:
                dispatch_cpu_unquantized_gemm(module, remove_weight=remove)
    return sorted(k for k in set(hf_state) - used if k != "lm_head.weight" or "model.embed_tokens.weight" not in used)
