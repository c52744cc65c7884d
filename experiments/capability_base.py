"""Measure the base model on candidate capability tasks, to choose one where it answers in the asked format
(> 90% of samples) but computes poorly (accuracy well below ceiling). The prompts are the training prompts
(rl_lora.data, data.source: multidigit); vLLM with per-request seeds; the held-out problems x 4 samples at
T = 0.7 (the configs' temperature) and at T = 0.01 (vLLM's lowest: ~greedy).

    python experiments/capability_base.py [--problems 64] [--out experiments/capability_base.json]

Formats: `plain` = data.chat_template: false (worked examples one per line, then the question), stopped at the
newline (sampler.stop); `chat` = the model's chat template with the worked examples as earlier user/assistant
turns, stopped by the model's own end of turn. An answer is given when the verifier extracts one (a bare number
is one); correct = reward.math_answer, as in training and evaluation.
"""

import argparse
import json
import time

from reward import extract
from reward.math_answer import score
from rl_lora.config import DataConfig
from rl_lora.data import load_problems, prompt_token_ids

TASKS = {"add1": ("+", 1), "add2": ("+", 2), "add3": ("+", 3), "add4": ("+", 4), "mul2": ("*", 2), "sub3": ("-", 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--formats", default="plain,chat")
    ap.add_argument("--temperatures", default="0.7,0.01", help="0.01: vLLM's lowest temperature, ~greedy")
    ap.add_argument("--out", default="experiments/capability_base.json")
    args = ap.parse_args()
    from rl_lora.models import resolve_model_path
    from rl_lora.sampling.sampler import Sampler
    from rl_lora.seeds import request_seeds

    sampler = Sampler(resolve_model_path("smollm2-135m-gguf"), max_model_len=512)  # the training engine's settings
    results = []
    for task in args.tasks.split(","):
        op, digits = TASKS[task]
        for fmt in args.formats.split(","):
            data = DataConfig(source="multidigit", digits=digits, operations=op, shots=args.shots, train_size=10,
                              eval_size=args.problems, instruction="", chat_template=fmt == "chat")
            _, held_out = load_problems(data)
            prompts = [prompt_token_ids(sampler.tokenizer, p, data) for p in held_out]
            stop = ["\n"] if fmt == "plain" else None
            for temp in map(float, args.temperatures.split(",")):
                n = 4 if temp > 0.05 else 1
                t0 = time.perf_counter()
                groups = sampler.generate(prompts, n=n, adapters=[None] * len(prompts), seed=0, temperature=temp,
                                          max_tokens=12, seeds=request_seeds(1000, len(prompts), n), stop=stop)
                answered = correct = total = trunc = misaligned = tokens = 0
                examples = []
                for p, g in zip(held_out, groups):
                    for c in g:
                        total += 1
                        answered += extract(c.text) is not None
                        correct += score(c.text, p.answer) > 0
                        trunc += c.finish_reason == "length"
                        tokens += len(c.token_ids)
                        misaligned += len(c.logprobs) != len(c.token_ids)  # the learner scores token_ids
                        if len(examples) < 4:
                            examples.append([p.question, p.answer, c.text])
                row = {"task": task, "format": fmt, "temperature": temp, "samples": total,
                       "answered": answered / total, "accuracy": correct / total,
                       "accuracy_given_answer": correct / answered if answered else None,
                       "truncated": trunc / total, "mean_tokens": tokens / total, "logprobs_misaligned": misaligned,
                       "prompt_tokens": len(prompts[0]), "time_s": round(time.perf_counter() - t0, 1),
                       "examples": examples}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
                with open(args.out, "w") as f:  # after every row: a stopped run keeps what it measured
                    json.dump({"model": "smollm2-135m-gguf", "shots": args.shots, "problems": args.problems,
                               "date": time.strftime("%Y-%m-%d", time.gmtime()), "results": results}, f, indent=1)
    sampler.close()


if __name__ == "__main__":
    main()
