"""Cluster-scale features on this machine (issue 7): asynchronous vs synchronous steps, and pushing to a fleet.

Four runs of `rl-lora train`, each in its own process, one after the other, same prompts and seeds:

  engines  max_staleness
  1        0   one in-process engine, synchronous (the default)
  1        1   one in-process engine, the next step sampled while this one is learned
  2        0   two vLLM engines as Ray actors, synchronous
  2        1   two Ray engines, asynchronous

Reported per run (steps 2..N; step 1 pays warm-ups): seconds per step (wall, from the start of a step to the end
of its push), completions per second, and the push: loading every adapter version into every engine (for Ray:
one `ray.put`, then each actor writes and loads it; timed after the generations queued before it have run), and
the push check. On a 2-core CPU the sampler and the
learner compete for the same cores, so overlap gains little here; on a GPU cluster they run on different GPUs.

    python benchmarks/fleet.py [--model tiny|smollm2-135m-gguf] [--steps 6] [--prompts 8]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = [(1, 0), (1, 1), (2, 0), (2, 1)]


def ascii_start(prompt: str, completion: str, **fields) -> float:
    """The tiny random model's reward: learnable, with variance in every group (see tests/reward_fixtures.py)."""
    return float(bool(completion) and ord(completion[0]) < 128)


def worker(args) -> dict:
    from rl_lora.config import load_config
    from rl_lora.metrics import read_metrics
    from rl_lora.train import train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"train.steps={args.steps}", "train.save_every=0", "train.eval_every=0", "data.eval_size=0",
                     f"train.output_dir={tmp}/run", "train.wandb_project=", f"train.prompts_per_step={args.prompts}",
                     f"sampler.num_engines={args.engines}", f"train.max_staleness={args.staleness}"]
        if args.model == "tiny":
            from tests.tiny_models import build_tiny_llama

            path = build_tiny_llama(Path(tmp) / "tiny")
            overrides += [f"model.path={path}", "model.max_model_len=256", "sampler.max_tokens=16",
                          "sampler.temperature=1.0", "reward.rewards=[{name: 'fleet:ascii_start'}]", "optim.lr=5e-3"]
        else:
            overrides.append(f"model.path={args.model}")
        train(load_config(ROOT / "configs" / "demo_cpu.yaml", overrides), quiet=True)
        rows = [r for r in read_metrics(Path(tmp) / "run") if "time/step" in r][1:]
    total = sum(r["time/step"] for r in rows)
    completions = len(rows) * args.prompts * 8
    return {"engines": args.engines, "staleness": args.staleness, "step_s": total / len(rows),
            "completions_per_s": completions / total,
            "sample_s": statistics.mean(r["time/sample"] for r in rows),
            "learn_s": statistics.mean(r["time/learn"] for r in rows),
            "push_ms": 1000 * statistics.mean(r["time/push"] for r in rows),
            "check_ms": 1000 * statistics.mean(r["time/push_check"] for r in rows),
            "wait_s": statistics.mean(r["time/push_wait"] for r in rows),
            "lag": max(r["async/staleness"] for r in rows), "reward": statistics.mean(r["reward/mean"] for r in rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny (a random 2-layer Llama built here) or a model.path")
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first is not counted)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (x 8 samples)")
    ap.add_argument("--engines", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--staleness", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engines:
        print(json.dumps(worker(args)))
        return
    results = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]))
    for engines, staleness in RUNS:
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--prompts",
               str(args.prompts), "--engines", str(engines), "--staleness", str(staleness)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"engines={engines} max_staleness={staleness}: failed\n{out.stderr[-2000:]}")
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nRL steps of the demo task, {args.model}, {args.prompts} prompts x 8 samples, mean of steps 2..{args.steps}")
    print(f"{'engines':>8}{'staleness':>10}{'step s':>8}{'vs sync':>9}{'compl/s':>9}{'sample s':>10}{'learn s':>9}"
          f"{'wait s':>8}{'push ms':>9}{'push/step':>11}{'check ms':>10}{'max lag':>9}")
    for r in results:
        sync = next((s for s in results if s["engines"] == r["engines"] and s["staleness"] == 0), r)
        print(f"{r['engines']:>8}{r['staleness']:>10}{r['step_s']:>8.2f}{sync['step_s'] / r['step_s']:>8.2f}x"
              f"{r['completions_per_s']:>9.1f}{r['sample_s']:>10.2f}{r['learn_s']:>9.2f}{r['wait_s']:>8.2f}{r['push_ms']:>9.1f}"
              f"{r['push_ms'] / 10 / r['step_s']:>10.2f}%{r['check_ms']:>10.0f}{r['lag']:>9}")
    print("vs sync: throughput relative to the synchronous run with the same engines (> 1 = faster). sample s: "
          "waiting for the step's completions (async: already in flight). wait s: before the push, waiting for "
          "generations queued under the old version. push/step: the push to every engine as a share of the step.")


if __name__ == "__main__":
    main()
