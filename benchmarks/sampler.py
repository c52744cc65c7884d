"""Sampler throughput with rank-1 adapters vs the base model, and adapter push latency vs a step's sampling.

One invocation, side by side and interleaved: every configuration runs once per round, for --rounds rounds, and
the best round of each is kept (the machine may be shared; the ratios are what this measures):

- in one LoRA-enabled engine (the Sampler's, max_loras 16): base rows (no adapter); one rank-1 adapter on
  every row; K = 16 rank-1 adapters mixed; half base rows, half one adapter (one call) -- each with rl-lora's
  rank-1 path (rl_lora/sampling/vllm_cpu_lora.py) and with vLLM's own CPU path (the same engine, switched);
- engines built without LoRA support, in subprocesses that wait between rounds: eager (the LoRA engine's
  execution mode: the difference is the cost of LoRA support itself) and vLLM's default on CPU (compiled with
  torch.compile/inductor, which vLLM-CPU turns off whenever LoRA is enabled).

ignore_eos, so every run emits the same token count.

    python benchmarks/sampler.py [--model smollm2-135m-gguf] [--prompts 64] [--tokens 128] [--rounds 3]
    python benchmarks/sampler.py --profile DIR   # cProfile of the LoRA engine's decode, per configuration
    python benchmarks/sampler.py --ops           # the LoRA ops alone, per decode step, vs the base GEMMs

Measured on an idle machine (2026-12-02, AMD EPYC with AVX-512, 2 cores, defaults: 64 prompts x 128 tokens,
best of 3 interleaved rounds; README has the table): base rows 301.8 tok/s [rl-lora path], rank-1 288.3 (0.96x of
base rows), K=16 mixed 268.9 (0.89x), half base + one adapter in one call 292.9 (0.97x); vLLM's path: rank-1 222.9
(0.71x); no-LoRA engines eager 300.6, compiled 335.6. What rank-1 costs over base rows in the engine (cProfile of
both, 64 rows x 32 tokens, OMP_NUM_THREADS=1, same run; tottime differences): addmm_ (the expand) +0.50 s, torch.mm
(the shrink) +0.26 s, the wrapper's Python (add_lora_linear, _stacked) +0.13 s, of a 20.4 s generate: ~4% of
arithmetic that has to read and write each LoRA layer's output once more (eager: nothing fuses it into the
base GEMM), plus the base GEMMs' own round-to-round noise (+0.47 s in that pair).

Where the time goes (cProfile of `generate`, SmolLM2-135M fp32, 64 rows x 32 decode steps, base rows in the
LoRA-enabled engine, rl-lora's path before its lm_head change; 2026-12-01, 2 threads on the shared 2-core
machine at load ~10, so absolute seconds are inflated by contention -- the shares are what to read):

    generate, total                                   110.2 s   100%
      base GEMMs (oneDNN, incl. lm_head)               45.4 s    41%
      fused_add_rms_norm (native torch: pow/mean/mul)  30.9 s    28%   <- fused by inductor in a no-LoRA engine
      attention                                        11.9 s    11%
      sampling                                          9.1 s     8%
      lm_head LoRA (vLLM's add_lora_logits: a          1.0 s   0.9%   <- now skipped (no lm_head adapter)
        vocabulary-sized gather per row, every step)
      LoRA layer wrappers' Python (4 per layer)         0.4 s   0.4%
      add_lora_linear (rl-lora, base rows: returns)     0.2 s   0.2%
      per-step LoRA mapping (convert_mapping etc.)     0.01 s

The LoRA ops alone (`--ops`: one decode step's add_lora_linear calls, SmolLM2 shapes, 64 rows, 30 layers x
qkv/o/gate_up/down, 1 thread, best of 7 interleaved rounds; 2026-12-01 at load ~30, so +-30%; percentages of the
same layers' base GEMMs, which are ~41% of a decode step, so a decode step's share is ~0.4x these):

    rows                     rl-lora's path     vLLM's path
    one adapter, every row        2.4-3.0%      37-84%   (per slice: repeat_interleave, gather copy, einsum)
    K=16 adapters mixed           6.7%          37-42%   (rl-lora: GEMMs over 16 stacked slots, masked;
                                                           8.6% before the per-slice expand)
    half base, one adapter        2.6-3.2%      26-36%
    base rows                     0.0%          0.7-1.2%

So what is left of rank 1 on rl-lora's path is two small GEMMs per LoRA layer (x @ A^T into n*K columns and
S @ B), ~1% of a decode step for one adapter and ~3% for 16 mixed (the stacked slots are dense work, K x a
single adapter's), plus vLLM's per-step mapping (convert_mapping, ~1-7 ms per forward for 64 rows). Folding
the shrink into the base GEMM (extra rows of the oneDNN-packed base weight) would remove one of the two; not
done (it needs re-packing the base weights on every push).

So with base rows the LoRA machinery is ~1.5% of a decode step; the rest of the gap to vLLM's default no-LoRA
engine is compilation: vLLM-CPU turns torch.compile off whenever LoRA is enabled (CpuPlatform sets
CompilationMode.NONE), and eager RMSNorm alone is 28% of the step. With a rank-1 adapter on vLLM's own path,
every LoRA linear layer additionally runs, per slice, repeat_interleave of the token index, a per-token gather
of the adapter (tokens x out copies) and a batched einsum, plus zeroed buffers (rl_lora/sampling/vllm_cpu_lora.py's
docstring); the rank-1 path replaces these with two GEMMs per layer. `--profile DIR` re-measures all of this
per configuration.

Measured (this script, `--prompts 64 --tokens 32 --rounds 2`, OMP_NUM_THREADS=1 to keep OpenMP spin-waits out
of a shared machine; 2026-12-01, load 4-10 from other jobs, and tests ran during round 2: about +-10% noise,
e.g. K=16 mixed came out above one adapter, which it cannot be):

    configuration                        tok/s  vs base rows  vs no-LoRA eager
    base rows       [rl-lora path]        54.6      1.00x          0.94x
    rank-1          [rl-lora path]        50.2      0.92x          0.86x
    K=16 mixed      [rl-lora path]        55.5      1.02x          0.96x
    half base, one call [rl-lora path]    56.5      1.03x          0.97x
    base rows       [vLLM's path]         53.7      1.00x          0.92x
    rank-1          [vLLM's path]         42.6      0.79x          0.73x
    K=16 mixed      [vLLM's path]         46.1      0.86x          0.79x
    half base, one call [vLLM's path]     46.3      0.86x          0.80x  (base rows wrong on vLLM's path)
    no-LoRA engine, eager                 58.1                     1.00x
    no-LoRA engine, compiled              55.8                     0.96x

rl-lora's rank-1 path: 1.18x vLLM's for one adapter, 1.20x for 16 mixed. The goals (rank-1 >= 0.95x of base
rows and >= 0.9x of a no-LoRA engine; base rows >= 0.97x) are not shown met by this noisy run; re-measure on
an idle machine.

Re-run later on 2026-12-01 (`--prompts 32 --tokens 32 --rounds 2 --no-compiled`, before the per-slice expand):
the machine's load rose from ~28 to ~51 (other jobs) during the run and it was stopped after three timed runs of
round 1 -- base rows 3.5 tok/s [rl-lora], 3.7 [vLLM], rank-1 1.1 [rl-lora] -- numbers that measure the load
swing, not the path (the --ops figures above bound rank 1's own cost at ~1% of a decode step). An earlier
attempt at 64 x 64 was stopped after 20 minutes without a result. So the engine-level goals remain unmeasured
here; run this script on an idle machine.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K_MIXED = 16


def _prompts(tokenizer, count):
    from vllm.inputs import TokensPrompt

    from rl_lora.data import DataConfig, arithmetic_problems, prompt_token_ids

    return [TokensPrompt(prompt_token_ids=prompt_token_ids(tokenizer, p, DataConfig()))
            for p in arithmetic_problems(count, 0, 99)]


def _params(tokens):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0, logprobs=0, seed=0)


def _timed(llm, prompts, params, loras=None):
    time.sleep(0.3)  # let the previous run's OpenMP threads stop spinning
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt, dt


def _reply(child) -> str:
    """The child's next reply; its stdout also carries vLLM's log lines, replies are marked."""
    for line in child.stdout:
        if line.startswith("@@ "):
            return line[3:].strip()
    return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pushes", type=int, default=10)
    ap.add_argument("--rank", type=int, default=1, help="the adapters' rank (the engine's max_lora_rank: vLLM rounds "
                    "it up to 8, 16, ...; rl-lora's path serves up to 16 in its one-GEMM form)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled no-LoRA engine (slow to start)")
    ap.add_argument("--profile", metavar="DIR", help="cProfile the LoRA engine's decode instead (pstats into DIR)")
    ap.add_argument("--ops", action="store_true", help="time the LoRA ops alone (no engine): one decode step's "
                    "add_lora_linear calls, both paths, against the base GEMMs of the same layers")
    ap.add_argument("--plain-engine", choices=["eager", "compiled"], help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args()
    if args.plain_engine:
        return plain_engine(args)
    if args.ops:
        return ops(args.prompts)

    import torch

    from rl_lora.sampling import vllm_cpu_lora
    from rl_lora.config import AdapterSpec
    from rl_lora.learner.learner import Learner
    from rl_lora.models import resolve_model_path
    from rl_lora.sampling.sampler import Sampler

    path = resolve_model_path(args.model)
    children = {}
    if not args.profile:  # the no-LoRA engines start while this one does
        for mode in ["eager"] + ([] if args.no_compiled else ["compiled"]):
            children[mode] = subprocess.Popen(
                [sys.executable, __file__, "--plain-engine", mode, "--model", args.model, "--prompts",
                 str(args.prompts), "--tokens", str(args.tokens)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = Sampler(path, max_model_len=1024, max_loras=K_MIXED, max_lora_rank=args.rank)
    if not sampler.rank1_path:
        sys.exit("the rank-1 path is not active (not a CPU platform, or an out-of-process engine core)")
    learner = Learner(path, [AdapterSpec(rank=args.rank)])
    prompts = _prompts(sampler.tokenizer, args.prompts)
    params = _params(args.tokens)

    push_s, refs = [], []
    for v in range(1, args.pushes + 1):  # pushes of one training run: each evicts the previous version
        with torch.no_grad():  # a non-trivial adapter, so the LoRA kernels do real work
            for m in learner.adapters.values():
                m.lora_B.normal_(0, 1e-3)
        sampler.push(v, learner.write_adapter)
        push_s.append(sampler.last_push_s)
    refs.append(sampler.live[args.pushes])
    for v in range(args.pushes + 1, args.pushes + K_MIXED):  # K distinct adapters live at once
        with torch.no_grad():
            for m in learner.adapters.values():
                m.lora_B.normal_(0, 1e-3)
        refs.append(sampler.push(v, learner.write_adapter, evict_older=False))
    one = [sampler.request_for(refs[0])] * len(prompts)
    mixed = [sampler.request_for(refs[i % K_MIXED]) for i in range(len(prompts))]
    half = [sampler.request_for(refs[0]) if i % 2 else None for i in range(len(prompts))]
    one_name = f"rank-{args.rank}"
    configs = [("base rows", None), (one_name, one), (f"K={K_MIXED} mixed", mixed), ("half base, one call", half)]

    if args.profile:
        return profile(sampler, prompts, configs, args.profile)

    for child in children.values():  # wait until the no-LoRA engines are up
        if _reply(child) != "ready":
            sys.exit("a no-LoRA engine failed to start")
    _timed(sampler.llm, prompts, params)  # warm-up
    best: dict[str, tuple[float, float]] = {}

    def keep(name, result):
        print(f"@ {name:40s} {result[0]:8.1f} tok/s", flush=True)  # as it goes: a partial run still says something
        if name not in best or result[0] > best[name][0]:
            best[name] = result

    for _ in range(args.rounds):
        for name, loras in configs:
            for enabled, path_name in ((True, "rl-lora"), (False, "vLLM")):
                vllm_cpu_lora.ENABLED = enabled
                keep(f"{name} [{path_name}]", _timed(sampler.llm, prompts, params, loras))
        vllm_cpu_lora.ENABLED = True
        for mode, child in children.items():
            time.sleep(0.3)
            child.stdin.write("go\n")
            child.stdin.flush()
            keep(f"no-LoRA engine, {mode}", tuple(json.loads(_reply(child))))
    for child in children.values():
        child.stdin.close()
        child.wait()

    ref_name = "no-LoRA engine, eager"
    print(f"\nsampling {args.prompts} prompts x {args.tokens} tokens, model {args.model}, best of {args.rounds} "
          f"interleaved rounds")
    print(f"{'':34s}{'tok/s':>8s}{'vs base rows':>14s}{'vs no-LoRA eager':>18s}")
    for path_name in ("rl-lora", "vLLM"):
        base = best[f"base rows [{path_name}]"][0]
        for name, _ in configs:
            tps = best[f"{name} [{path_name}]"][0]
            print(f"{name + ' [' + path_name + ']':34s}{tps:8.1f}{tps / base:13.2f}x{tps / best[ref_name][0]:17.2f}x")
    for mode in children:
        tps = best[f"no-LoRA engine, {mode}"][0]
        print(f"{'no-LoRA engine, ' + mode:34s}{tps:8.1f}{'':14s}{tps / best[ref_name][0]:17.2f}x")
    sampler.close()
    push_s.sort()
    step_s = best[f"{one_name} [rl-lora]"][1]
    print(f"\nadapter push (write PEFT files to RAM + load into the running engine), {args.pushes} pushes:")
    print(f"  median {1000 * push_s[len(push_s) // 2]:.1f} ms, max {1000 * push_s[-1]:.1f} ms")
    print(f"  = {100 * push_s[len(push_s) // 2] / step_s:.2f}% of this step's sampling time ({step_s:.1f} s)")


# components whose inclusive time the profile reports: (label, part of the file name, function name); "~" is a
# builtin (a torch op called from Python), matched by a part of its name
_PROFILED = [
    ("engine step: model forward (execute_model)", "model_runner.py", "execute_model"),
    ("  LoRA linear layers (base GEMM + LoRA)", "base_linear.py", "_apply_sync"),
    ("    add_lora_linear (the LoRA part)", "", "add_lora_linear"),
    ("      vLLM: sgmv_shrink", "lora_ops.py", "sgmv_shrink"),
    ("      vLLM: sgmv_expand_slice", "lora_ops.py", "sgmv_expand_slice"),
    ("        torch.einsum (per-token gather + contract)", "~", "einsum"),
    ("        repeat_interleave (index, per op)", "~", "repeat_interleave"),
    ("      torch.zeros (buffers; all callers)", "~", "torch.zeros"),
    ("      rl-lora: torch.mm + addmm_", "~", "mm"),
    ("  LoRA mapping per forward (update_metadata)", "", "update_metadata"),
    ("    convert_mapping (per-token Python loop)", "punica_wrapper/utils.py", "convert_mapping"),
    ("    compute_meta (prefill metadata, .item())", "punica_wrapper/utils.py", "compute_meta"),
    ("  set_active_loras (LoRA inputs, per step)", "lora_model_runner_mixin.py", "set_active_loras"),
]


def _matches(key, file_part, func):
    f, _, fn = key
    if file_part == "~":
        return f == "~" and func in fn
    return file_part in f and fn == func


def profile(sampler, prompts, configs, out_dir):
    """cProfile one generate per configuration (short decode), print inclusive seconds per component, and save
    the raw profiles (pstats files) in out_dir."""
    import cProfile
    import pstats

    from rl_lora.sampling import vllm_cpu_lora

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = _params(32)
    _timed(sampler.llm, prompts, params)  # warm-up
    rows = {}
    for name, loras in configs[:2]:
        for enabled, path_name in ((True, "rl-lora"), (False, "vLLM")):
            vllm_cpu_lora.ENABLED = enabled
            wall = _timed(sampler.llm, prompts, params, loras)[1]
            prof = cProfile.Profile()
            prof.enable()
            sampler.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            prof.disable()
            label = f"{name} [{path_name}]"
            prof.dump_stats(str(out_dir / (label.replace(" ", "_").replace("[", "").replace("]", "") + ".pstats")))
            stats = pstats.Stats(prof).stats
            got = {lab: sum(v[3] for k, v in stats.items() if _matches(k, fp, fn)) for lab, fp, fn in _PROFILED}
            rows[label] = (wall, max(v[3] for v in stats.values()), got)
    vllm_cpu_lora.ENABLED = True
    names = list(rows)
    print(f"{'inclusive seconds (cProfile)':50s}" + "".join(f"{n:>22s}" for n in names))
    print(f"{'generate, wall without profiler':50s}" + "".join(f"{rows[n][0]:22.2f}" for n in names))
    print(f"{'generate, under profiler':50s}" + "".join(f"{rows[n][1]:22.2f}" for n in names))
    for label, _, _ in _PROFILED:
        print(f"{label:50s}" + "".join(f"{rows[n][2][label]:22.2f}" for n in names))
    sampler.close()


def ops(rows, layers=30, max_loras=K_MIXED, reps=20, rounds=7):
    """One decode step's LoRA work without an engine (SmolLM2-135M shapes: per layer qkv 576->576+192+192, o,
    gate_up 576->2x1536, down 1536->576; `rows` tokens, fp32, 1 thread): each path's add_lora_linear for the four
    LoRA layers x `layers`, next to plain torch.mm for the same layers' base GEMMs. Interleaved rounds, the
    fastest of each kept. Microseconds per decode step."""
    import torch
    from vllm.lora.layers import LoRAMapping

    from rl_lora.sampling import vllm_cpu_lora

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shapes = [(576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))]
    mats = []
    for h, outs in shapes:
        mats.append((torch.randn(rows, h, generator=gen), torch.zeros(rows, sum(outs)),
                     tuple(torch.randn(max_loras, 1, 1, h, generator=gen) for _ in outs),
                     tuple(torch.randn(max_loras, 1, o, 1, generator=gen) for o in outs), outs,
                     torch.randn(sum(outs), h, generator=gen)))
    slots = list(range(1, max_loras + 1))
    cases = {"one adapter": [1] * rows, f"K={max_loras} mixed": [1 + i % max_loras for i in range(rows)],
             "half base": [i % 2 for i in range(rows)], "base rows": [0] * rows}
    runs = {"base GEMMs of the LoRA layers (torch.mm)": (None, None, lambda: [torch.mm(m[0], m[5].t()) for m in mats])}
    for name, ids in cases.items():
        for enabled, path_name in ((True, "rl-lora"), (False, "vLLM")):
            wrapper = vllm_cpu_lora.PunicaWrapperCPURank1(max_num_batched_tokens=256, max_batches=64, device="cpu")
            wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=True), slots, max_loras + 1, 49152)
            runs[f"{name}, add_lora_linear [{path_name}]"] = (
                enabled, wrapper, lambda w=wrapper: [w.add_lora_linear(y, x, a, b, 1.0, o) for x, y, a, b, o, _ in mats])
    best = {}
    for _ in range(rounds):
        for label, (enabled, wrapper, fn) in runs.items():
            vllm_cpu_lora.ENABLED = enabled is not False
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[label] = min(best.get(label, float("inf")), (time.perf_counter() - t0) / reps * 1e6 * layers)
    vllm_cpu_lora.ENABLED = True
    base = best["base GEMMs of the LoRA layers (torch.mm)"]
    print(f"one decode step, {rows} rows x {layers} layers, microseconds (1 thread, best of {rounds} rounds)")
    for label, us in best.items():
        print(f"{label:48s}{us:10.0f}{100 * us / base:9.1f}% of base")


def plain_engine(args):
    """Base-model serving without LoRA support; runs one timed generate per line read from stdin."""
    from vllm import LLM

    from rl_lora.models import resolve_model_path
    from rl_lora.sampling.sampler import _configure_cpu_env

    import torch

    if not torch.cuda.is_available():
        _configure_cpu_env(1)
    extra = {"enforce_eager": True} if args.plain_engine == "eager" else {}
    llm = LLM(model=resolve_model_path(args.model), dtype="float32", max_model_len=1024, seed=0,
              enable_chunked_prefill=False, **extra)
    prompts = _prompts(llm.get_tokenizer(), args.prompts)
    params = _params(args.tokens)
    _timed(llm, prompts, params)  # warm-up (and compilation)
    print("@@ ready", flush=True)
    for _ in sys.stdin:
        print("@@ " + json.dumps(_timed(llm, prompts, params)), flush=True)


if __name__ == "__main__":
    main()
