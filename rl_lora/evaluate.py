"""Moved to the `rl_lora.eval` package (metrics, runner, reports, command). This alias keeps
`from rl_lora.evaluate import ...` working for branches written before the split; import from `rl_lora.eval.*`.
"""

from rl_lora.eval.command import EvalConfig, default_out_dir, eval_data_config, parse_adapters, run_eval
from rl_lora.eval.metrics import (BOOTSTRAP_RESAMPLES, bootstrap_ci, majority_vote, paired_delta, pass_at_k,
                                  summarise, vote_key)
from rl_lora.eval.reports import format_table, plot_pass_at_k, write_results
from rl_lora.eval.runner import LIVE_EVAL_SEED, eval_live, evaluate_models, live_ks, score_groups

__all__ = ["BOOTSTRAP_RESAMPLES", "LIVE_EVAL_SEED", "EvalConfig", "bootstrap_ci", "default_out_dir",
           "eval_data_config", "eval_live", "evaluate_models", "format_table", "live_ks", "majority_vote",
           "paired_delta", "parse_adapters", "pass_at_k", "plot_pass_at_k", "run_eval", "score_groups", "summarise",
           "vote_key", "write_results"]
