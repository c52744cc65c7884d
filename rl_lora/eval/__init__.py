"""Holdout evaluation, in four rooms:

- `metrics`: pure functions of per-sample outcomes (pass@k, maj@k, bootstrap intervals, summaries, paired deltas);
- `runner`: sampling and scoring through a running sampler (`eval_live` for the training loop, `evaluate_models`
  for the base-vs-adapters table);
- `reports`: the Markdown table, the pass@k plot and the result files;
- `command`: `rl-lora eval` (flags -> EvalConfig -> `run_eval`).

Nothing is imported here, so `rl-lora --help` stays instant.
"""
