"""Benchmark the math-answer verifier against HuggingFace math-verify on the labelled case set.

    python benchmarks/verifier.py                 # both verifiers, 5 s limit per call, 2 worker processes
    python benchmarks/verifier.py --show-failures # also list every case a verifier gets wrong
    python benchmarks/verifier.py --only ours     # skip math-verify

Cases: tests/reward_cases.py (category, response, gold, label). Every call runs in a worker process under the
same hard wall-clock limit (reward.pool.WorkerPool), so a verifier that hangs on a hostile input is counted
and killed instead of stalling the benchmark. Latency is the time of the call itself inside the worker
(a timed-out call counts as the limit); pairs/s is cases / wall time with all workers.

math-verify is a dev dependency (`pip install -e '.[dev]'` or `pip install math-verify`). It is imported
lazily, only in the worker processes; if it is missing, only our verifier is reported. It is called as
`verify(parse(gold), parse(response))`. A raw gold (no \\boxed, $, \\( \\[ or ####) is given to it as `$gold$`
first -- math-verify's LaTeX extraction needs delimiters; this scored it 217/249 non-hostile cases against
198/249 for `parse(gold)` as is -- falling back to the bare string if that parses to nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(ROOT / "tests"), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

PWNED = "/tmp/pwned_reward_case"  # the hostile case set tries to create this file


def ours(response: str, gold: str) -> float:
    from reward.math_answer import score

    return score(response, gold)


def math_verify_score(response: str, gold: str) -> float:
    import logging

    import math_verify  # lazily: a dev dependency

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every parse timeout

    if any(t in gold for t in ("\\boxed", "$", "\\(", "\\[", "####")):
        g = math_verify.parse(gold)
    else:
        g = math_verify.parse(f"${gold}$") or math_verify.parse(gold)
    p = math_verify.parse(response)
    return 1.0 if math_verify.verify(g, p) else 0.0


VERIFIERS = {"ours": "verifier:ours", "math-verify": "verifier:math_verify_score"}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def run_one(name: str, cases, timeout_s: float, workers: int):
    from reward.pool import WorkerPool

    ref = VERIFIERS[name]
    with WorkerPool(workers, timeout_s, preload=(ref,)) as pool:
        pool.wait_ready()
        pool.run([(ref, ("\\boxed{1}", "1"), {})] * (2 * workers))  # warm-up, not measured
        t0 = time.perf_counter()
        results = pool.run([(ref, (c.response, c.gold), {}) for c in cases])
        wall = time.perf_counter() - t0
    return results, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=5.0, help="wall-clock limit per call, seconds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=sorted(VERIFIERS))
    ap.add_argument("--show-failures", action="store_true")
    args = ap.parse_args(argv)

    from reward_cases import CASES, CATEGORIES

    names = [args.only] if args.only else list(VERIFIERS)
    if "math-verify" in names and importlib.util.find_spec("math_verify") is None:
        print("NOTE: math-verify is not installed (pip install -e '.[dev]' or pip install math-verify); "
              "reporting our verifier only.\n")
        names = [n for n in names if n != "math-verify"]
    if os.path.exists(PWNED):
        os.remove(PWNED)

    n = len(CASES)
    print(f"{n} labelled cases, {len(CATEGORIES)} categories; limit {args.timeout:g} s per call, "
          f"{args.workers} worker processes\n")
    report = {}
    for name in names:
        results, wall = run_one(name, CASES, args.timeout, args.workers)
        report[name] = (results, wall)

    # accuracy
    header = f"{'category':16s} {'n':>4s}" + "".join(f" {nm:>12s}" for nm in names)
    print(header)
    print("-" * len(header))
    rows = CATEGORIES + ["OVERALL"]
    for cat in rows:
        idx = [i for i, c in enumerate(CASES) if cat == "OVERALL" or c.category == cat]
        line = f"{cat:16s} {len(idx):4d}"
        for name in names:
            res = report[name][0]
            ok = sum(1 for i in idx if res[i].status == "ok" and (res[i].value == 1.0) == CASES[i].label)
            line += f" {100 * ok / len(idx):11.1f}%"
        if cat == "OVERALL":
            print("-" * len(header))
        print(line)

    # latency
    print()
    print("latency of one call (ms); 'excl. hostile' leaves out the hostile category")
    print(f"{'verifier':12s} {'p50':>8s} {'p99':>8s} {'max':>9s} {'p99 excl. hostile':>18s} {'pairs/s':>8s} "
          f"{'timeouts':>9s} {'errors':>7s}")
    for name in names:
        res, wall = report[name]
        lat = [r.elapsed if r.status != "timeout" else args.timeout for r in res]
        benign = [x for x, c in zip(lat, CASES) if c.category != "hostile"]
        timeouts = sum(r.status == "timeout" for r in res)
        errors = sum(r.status == "error" for r in res)
        print(f"{name:12s} {1000 * percentile(lat, 50):8.2f} {1000 * percentile(lat, 99):8.2f} "
              f"{1000 * max(lat):9.1f} {1000 * percentile(benign, 99):18.2f} {n / wall:8.1f} {timeouts:9d} {errors:7d}")

    for name in names:
        res = report[name][0]
        slow = [(CASES[i], r) for i, r in enumerate(res) if r.status != "ok"]
        if slow:
            print(f"\n{name}: calls that timed out or failed:")
            for c, r in slow:
                print(f"  [{c.category}] {r.status}: {c.response[:70]!r} vs {c.gold[:30]!r} ({r.error[:80]})")
    print(f"\ncode execution check: {PWNED} {'EXISTS -- a payload ran!' if os.path.exists(PWNED) else 'absent (no payload ran)'}")

    if args.show_failures:
        for name in names:
            res = report[name][0]
            print(f"\n{name}: wrong cases")
            for i, c in enumerate(CASES):
                got = res[i].value == 1.0 if res[i].status == "ok" else None
                if got != c.label:
                    print(f"  [{c.category}] label={c.label} got={got}: {c.response[:80]!r} vs {c.gold[:40]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
