"""Moved to the `rl_lora.eval` package (metrics, runner, reports, command). This alias keeps
`from rl_lora.evaluate import ...` working for branches written before the split; import from `rl_lora.eval.*`.
"""

from rl_lora.eval.command import EvalConfig, default_out_dir, eval_data_config, parse_adapters, run_eval  # noqa: F401
from rl_lora.eval.metrics import (BOOTSTRAP_RESAMPLES, bootstrap_ci, majority_vote, paired_delta,  # noqa: F401
                                  pass_at_k, summarise, vote_key)
from rl_lora.eval.reports import format_table, plot_pass_at_k, write_results  # noqa: F401
from rl_lora.eval.runner import LIVE_EVAL_SEED, eval_live, evaluate_models, live_ks, score_groups  # noqa: F401
