"""K concurrent adapters on one base vs one adapter (issues 6 and 18).

1. loop (the default): `rl-lora train` steps with K = 1, 8, 64 rank-1 adapters at EQUAL completions per step
   (`--loop-prompts` prompts per step shared by the K adapters: K = 64 gets 1 prompt each), each configuration
   in its own process, `--rounds` interleaved rounds with the order rotated (the machine is shared: drift hits
   every K alike). Per K: median over steps 2.. of sample / learn / push / push-check / whole-step time, the
   process's peak RSS (learner + in-process vLLM engine, whose LoRA slots are sized K + 1) and its growth per
   extra adapter, and what one adapter's learner state is (params, grads, AdamW moments: 4x its fp32 tensors).
   `--model tiny` is the tests' tiny random Llama (built under /tmp, no download), where fixed costs show.
   Goal (issue 18): K = 64 <= 1.25x K = 1.
2. learner: one train_step of K = 1, 2, 4 rank-1 adapters (SmolLM2-135M fp32 by default), each adapter with
   the same per-adapter batch (default 4 sequences x 128 tokens). Two micro-batch settings:
   - `packed`: the whole K-adapter batch in one micro-batch (the fastest; activations grow with K);
   - `bounded`: optim.tokens_per_microbatch = one adapter's batch (activations fixed, so peak memory grows only
     by what each adapter owns: parameters, gradients and AdamW state, counted exactly and compared with RSS);
   - a reference: ONE adapter trained on the whole K = 4 batch, to separate the cost of K x the tokens (which
     any K runs pay too) from the cost of routing rows to K adapters.
   The `bounded` workers run with MALLOC_MMAP_THRESHOLD_=65536, so that freed activations return to the OS and
   peak RSS measures live memory, not glibc's retained heap (it also makes them ~2x slower: compare their times
   only with each other).

    python benchmarks/multi_adapter.py --model tiny            # K = 1, 8, 64 loop steps, tiny model
    python benchmarks/multi_adapter.py                         # the same on SmolLM2-135M (demo task)
    python benchmarks/multi_adapter.py --parts learner         # the learner-only table (K = 1, 2, 4)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def learner_worker(args) -> dict:
    import torch

    from rl_lora.config import ALL_LINEAR, AdapterSpec
    from rl_lora.learner.learner import Learner, TrainSample
    from rl_lora.models import resolve_model_path

    K = args.k
    per_tokens = args.seqs * (args.prompt + args.completion)
    budget = per_tokens * K if args.packing == "packed" else per_tokens
    specs = [AdapterSpec(f"a{k}", target_modules=ALL_LINEAR, lr=1e-4 * (k + 1)) for k in range(K)]
    if args.packing == "one-adapter":  # the reference: ONE adapter with the K-adapter batch (same tokens)
        specs, budget = specs[:1], per_tokens * K
    learner = Learner(resolve_model_path(args.model), specs, tokens_per_microbatch=budget)
    g = torch.Generator().manual_seed(0)
    vocab = learner.model.config.vocab_size
    batch = []
    for k in range(K):
        for i in range(args.seqs):
            p = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
            c = torch.randint(0, vocab, (args.completion,), generator=g).tolist()
            batch.append(TrainSample(p, c, [-8.0] * args.completion, 1.0 if i % 2 else -1.0,
                                     0 if args.packing == "one-adapter" else k))
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        learner.train_step(batch)
        times.append(time.perf_counter() - t0)
    # what the adapters own: parameters + AdamW exp_avg/exp_avg_sq (+ gradients while a step runs)
    state = sum(t.numel() * t.element_size() for opt in learner.optimizers for st in opt.state.values()
                for t in st.values() if torch.is_tensor(t))
    params = sum(p.numel() * p.element_size() for p in learner.params)
    return {"k": K, "packing": args.packing, "step_s": min(times[1:]), "peak_gib": _rss_gib(),
            "adapter_bytes": params * 2 + state, "trainable": learner.num_trainable()}


TINY_RUN = {  # the tiny random Llama of the tests, where the loop's fixed costs show
    "data": {"source": "arithmetic", "max_operand": 20, "train_size": 1000, "eval_size": 0},
    "sampler": {"samples_per_prompt": 8, "temperature": 1.0, "max_tokens": 16},
    "optim": {"lr": 5e-3},
    "reward": {"rewards": [{"name": "reward_fixtures:ascii_start"}], "num_workers": 1},
}


def _model_path(model: str) -> str:
    """`tiny`: the tests' tiny random Llama, built once under /tmp (no download)."""
    if model != "tiny":
        return model
    from tests.tiny_models import build_tiny_llama

    target = Path(tempfile.gettempdir()) / "rl-lora-bench-tiny-llama"
    if not (target / "config.json").exists():
        build_tiny_llama(target)
    return str(target)


def loop_worker(args) -> dict:
    """`rl-lora train` steps with K adapters x (total prompts / K) prompts each: equal completions per step."""
    import yaml

    from rl_lora.config import load_config
    from rl_lora.metrics import read_metrics
    from rl_lora.train import train

    K, prompts = args.k, args.loop_prompts // args.k
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            cfg_path = Path(tmp) / "tiny.yaml"
            cfg_path.write_text(yaml.safe_dump({"model": {"path": _model_path("tiny"), "max_model_len": 256},
                                                **TINY_RUN}))
        else:
            cfg_path = ROOT / "configs" / "demo_cpu.yaml"
        overrides = [f"train.steps={args.loop_steps}", "train.save_every=0", "train.eval_every=0", "data.eval_size=0",
                     f"train.output_dir={tmp}/run", "train.wandb_project=", f"train.prompts_per_step={prompts}"]
        if args.model != "tiny":
            overrides += [f"model.path={args.model}", f"sampler.samples_per_prompt={args.loop_samples}",
                          f"sampler.max_tokens={args.loop_tokens}"]
        if K > 1:  # K learning rates around the demo's, on the same data (paired prompts and seeds)
            overrides.append("adapters=[" + ", ".join(f"{{lr: {1e-4 * 1.1 ** k:.6g}}}" for k in range(K)) + "]")
        train(load_config(cfg_path, overrides), quiet=True)
        rows = [r for r in read_metrics(Path(tmp) / "run") if "time/step" in r][1:]
        # what each adapter is: its exported fp32 tensors; the learner holds 4x that (params, grads, 2 moments)
        files = list((Path(tmp) / "run").glob("adapter*/**/adapter_model.safetensors"))
        adapter_bytes = sum(f.stat().st_size for f in files) / max(len(files), 1)
    med = {key: statistics.median(r[key] for r in rows)
           for key in ("time/sample", "time/learn", "time/push", "time/push_check", "time/step")}
    return {"k": K, **med, "completions": statistics.median(r["groups/total"] for r in rows) * (
            args.loop_samples if args.model != "tiny" else TINY_RUN["sampler"]["samples_per_prompt"]),
            "tokens": statistics.median(r["learn/tokens"] for r in rows), "peak_gib": _rss_gib(),
            "adapter_state_mib": 4 * adapter_bytes / 2**20}


def _sub(args, **kw) -> dict | None:
    cmd = [sys.executable, __file__, "--model", args.model, "--seqs", str(args.seqs), "--prompt", str(args.prompt),
           "--completion", str(args.completion), "--steps", str(args.steps), "--loop-steps", str(args.loop_steps),
           "--loop-prompts", str(args.loop_prompts), "--loop-samples", str(args.loop_samples),
           "--loop-tokens", str(args.loop_tokens)]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    # The memory rows: a fixed mmap threshold returns freed activation buffers to the OS, so peak RSS measures
    # what is live rather than what glibc's heap kept from earlier micro-batches.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    if kw.get("packing") == "bounded":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"{kw}: failed\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--parts", default="loop", help="loop (K = 1, 8, 64 steps), learner (K = 1, 2, 4 steps)")
    ap.add_argument("--seqs", type=int, default=4, help="sequences per adapter (learner part)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed learner steps after a warm-up (min reported)")
    ap.add_argument("--ks", default="1,8,64", help="adapter counts of the loop part")
    ap.add_argument("--rounds", type=int, default=2, help="loop part: rounds of every K, the order rotated")
    ap.add_argument("--loop-steps", type=int, default=4, help="loop steps per K (the first is not counted)")
    ap.add_argument("--loop-prompts", type=int, default=64,
                    help="prompts per step over all adapters (loop part): each of K adapters gets this / K")
    ap.add_argument("--loop-samples", type=int, default=2, help="samples per prompt (loop part, not tiny)")
    ap.add_argument("--loop-tokens", type=int, default=16, help="max completion tokens (loop part, not tiny)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--packing", default="packed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(learner_worker(args) if args.worker == "learner" else loop_worker(args)))
        return
    parts = args.parts.split(",")
    if "learner" in parts:
        res = [r for packing in ("packed", "bounded") for k in (1, 2, 4)
               if (r := _sub(args, worker="learner", k=k, packing=packing))]
        ref = _sub(args, worker="learner", k=4, packing="one-adapter")
        print(f"\nlearner step, K adapters x {args.seqs} seqs x {args.prompt + args.completion} tokens each, {args.model}")
        print(f"{'packing':<9}{'K':>3}{'step s':>8}{'vs K=1':>8}{'peak GiB':>10}{'+MiB vs K=1':>13}"
              f"{'adapter state MiB':>19}")
        for packing in ("packed", "bounded"):
            rows = [r for r in res if r["packing"] == packing]
            one = next((r for r in rows if r["k"] == 1), None)
            for r in rows:
                grow = (r["peak_gib"] - one["peak_gib"]) * 1024 if one else float("nan")
                extra = (r["adapter_bytes"] - one["adapter_bytes"]) / 2**20 if one else float("nan")
                print(f"{packing:<9}{r['k']:>3}{r['step_s']:>8.2f}{r['step_s'] / one['step_s']:>7.2f}x"
                      f"{r['peak_gib']:>10.3f}{grow:>13.1f}{extra:>19.1f}")
        if ref:
            four = next((r for r in res if r["packing"] == "packed" and r["k"] == 4), None)
            print(f"reference: ONE adapter with the 4-adapter batch ({4 * args.seqs} seqs, one micro-batch): "
                  f"{ref['step_s']:.2f} s, peak {ref['peak_gib']:.3f} GiB"
                  + (f"; 4 adapters cost {four['step_s'] / ref['step_s']:.2f}x of it (the routing overhead)" if four else ""))
    if "loop" in parts:
        ks = [int(k) for k in args.ks.split(",")]
        runs: dict[int, list[dict]] = {k: [] for k in ks}
        loads = []
        for r in range(args.rounds):  # interleaved, the order rotated: drift on a shared machine hits every K
            for k in ks[r % len(ks):] + ks[: r % len(ks)]:
                loads.append(os.getloadavg()[0])
                if (res := _sub(args, worker="loop", k=k)):
                    runs[k].append(res)
        loads.append(os.getloadavg()[0])
        med = {k: {key: statistics.median(x[key] for x in rs) for key in rs[0]} for k, rs in runs.items() if rs}
        one = med.get(1)
        print(f"\nRL step, {args.model}, {args.loop_prompts} prompts per step shared by K adapters (equal completions), "
              f"median of steps 2..{args.loop_steps}, median of {args.rounds} interleaved rounds; "
              f"1-min load {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
        print(f"{'K':>3}{'completions':>13}{'sample s':>10}{'learn s':>9}{'push ms':>9}{'check ms':>10}{'step s':>8}"
              f"{'vs K=1':>8}{'peak GiB':>10}{'MiB/extra':>11}{'state MiB':>11}")
        for k, r in med.items():
            ratio = r["time/step"] / one["time/step"] if one else float("nan")
            extra = (r["peak_gib"] - one["peak_gib"]) * 1024 / (k - 1) if one and k > 1 else float("nan")
            print(f"{k:>3}{r['completions']:>13.0f}{r['time/sample']:>10.2f}{r['time/learn']:>9.2f}"
                  f"{1000 * r['time/push']:>9.0f}{1000 * r['time/push_check']:>10.0f}{r['time/step']:>8.2f}"
                  f"{ratio:>7.2f}x{r['peak_gib']:>10.3f}{extra:>11.2f}{r['adapter_state_mib']:>11.3f}")
        print("per round, step s: " + "; ".join(f"K={k}: " + ", ".join(f"{x['time/step']:.2f}" for x in rs)
                                                 for k, rs in runs.items()))


if __name__ == "__main__":
    main()
