"""Completions per second for each reward kind, through RewardRunner on this machine.

    python benchmarks/rewards.py                  # every kind, the LLM judge against a local vLLM server
    python benchmarks/rewards.py --no-judge       # skip the judge (no server start)
    python benchmarks/rewards.py -n 512 --workers 2

Kinds measured (all with the runner's worker processes, after one warm-up batch, so worker start and model
loading are not counted):
- completion: the built-in `math_answer` verifier, one call per completion;
- group: the built-in `group_length_correctness`, one call per prompt of 8 completions;
- batched: the built-in `reward_model` on a tiny random Llama sequence classifier built on the fly (CPU, one
  torch thread per worker);
- async: an `async def` that awaits 50 ms (a stand-in for an I/O-bound API), max_concurrency 32;
- llm_judge: the built-in judge against vLLM's OpenAI server on the tiny random Llama (CPU, float32), one
  request of max_tokens 1 per completion, max_concurrency 16.
Completions/s is the batch size over the wall time of `runner.score`; latency is per call; "workers MiB" is the
resident memory of the runner's worker processes after the batch (all of them together).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


async def io_bound(prompt, completion, **_):
    await asyncio.sleep(0.05)
    return 1.0


def _completions(n: int):
    prompts = [f"What is {i % 32} + 1?" for i in range(n)]
    comps = [(f"Let me think. {i % 32} plus one is \\boxed{{{i % 32 + 1}}}." if i % 3 else "I do not know, 7.")
             for i in range(n)]
    answers = [{"answer": str(i % 32 + 1)} for i in range(n)]
    return prompts, comps, answers


def _tiny_rm(tmp: Path) -> tuple[str, str]:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from tests.tiny_models import build_tiny_llama

    lm = build_tiny_llama(tmp / "lm")
    config = AutoConfig.from_pretrained(lm)
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp / "rm")
    AutoTokenizer.from_pretrained(lm).save_pretrained(tmp / "rm")
    return str(tmp / "rm"), str(lm)


def _serve(model: str, log_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--served-model-name", "judge", "--dtype", "float32", "--max-model-len", "1024",
                             "--enforce-eager", "--no-enable-chunked-prefill", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, 9)
    raise SystemExit(f"the judge server did not start (log: {log_path})")


def measure(label: str, spec: dict, n: int, workers: int, group: int = 8) -> None:
    from reward import RewardRunner

    import psutil

    prompts, comps, answers = _completions(n)
    ids = [i // group for i in range(n)]
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. the judge's server
    with RewardRunner([spec], timeout_s=60, num_workers=workers) as runner:
        runner.score(prompts[:group * 2], comps[:group * 2], answers[:group * 2], group_ids=ids[:group * 2])
        t0 = time.perf_counter()
        res = runner.score(prompts, comps, answers, group_ids=ids)
        wall = time.perf_counter() - t0
        rss = sum(p.memory_info().rss for p in psutil.Process().children(recursive=True) if p.pid not in before)
    key = runner.keys[0]
    m = res.metrics
    print(f"{label:<12} {runner.kinds()[key]:<11} {n:>6} {n / wall:>12.1f} {m[f'reward/{key}/latency_p50_ms']:>9.2f} "
          f"{m[f'reward/{key}/latency_p99_ms']:>9.2f} {int(m[f'reward/{key}/failures']):>8} {rss / 2**20:>10.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=256, help="completions per batch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-judge", action="store_true", help="skip the LLM judge (no vLLM server)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    rm, lm = _tiny_rm(tmp)
    print(f"{args.n} completions per batch, {args.workers} worker processes, {os.cpu_count()} CPUs\n")
    print(f"{'reward':<12} {'kind':<11} {'n':>6} {'compl./s':>12} {'p50 ms':>9} {'p99 ms':>9} {'failures':>8} {'workers MiB':>11}")
    measure("math_answer", {"name": "math_answer"}, args.n, args.workers)
    measure("group_len", {"name": "group_length_correctness"}, args.n, args.workers)
    measure("reward_model", {"name": "reward_model", "batch_size": 64,
                             "kwargs": {"model": rm, "micro_batch": 16, "threads": 1}}, args.n, args.workers)
    measure("io_50ms", {"name": "rewards:io_bound", "max_concurrency": 32}, args.n, args.workers)
    if not args.no_judge:
        from transformers import AutoTokenizer

        seven = AutoTokenizer.from_pretrained(lm).convert_tokens_to_ids("7")  # the forced one-token verdict
        proc, url = _serve(lm, tmp / "server.log")
        try:
            measure("llm_judge", {"name": "llm_judge", "max_concurrency": 16,
                                  "kwargs": {"base_url": url, "model": "judge", "parser": "score", "retries": 0,
                                             "template": "{question}|{reference}|{completion}",
                                             "request": {"max_tokens": 1, "logit_bias": {str(seven): 100}}}},
                    args.n, args.workers)
        finally:
            os.killpg(proc.pid, 9)
            proc.wait(60)


if __name__ == "__main__":
    main()
