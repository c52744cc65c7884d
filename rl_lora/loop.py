"""The GRPO loop's pure stages between the sampler and the learner (no model): group assembly, staleness,
scoring, advantages, training samples, step metrics, the guards that stop a broken run, and the `<name>/` metric
prefix added once, at the logging boundary.

Shape suffixes: `_K` per adapter of the run (K = 1 is a list of one), `_D` per dataset of the run, `_P` per
group of the step (adapter-major: adapter k's prompts, then k+1's), `_G` per completion of a group. Each stage
returns new values; none mutates a Group.
"""

from __future__ import annotations

import dataclasses

import torch

from rl_lora.advantages import valid_group_advantages
from rl_lora.rollout import Group, TrainSample
from rl_lora.sync import RunError


def assemble_groups(completions_P: list, idx_D: list[list[int]], tasks_D: list, task_of_K: list[int]) -> list[Group]:
    """The step's groups, adapter-major as sampled: adapter k's prompts are its dataset's problems `idx_D[d]`."""
    groups, j = [], 0
    for k, d in enumerate(task_of_K):
        task = tasks_D[d]
        for i in idx_D[d]:
            groups.append(Group(i, task.train[i].question, task.train_prompts[i], completions_P[j], adapter=k))
            j += 1
    return groups


def staleness(version: int, groups: list[Group], version_of, submitted: int) -> int:
    """How many versions behind the learner the step's oldest completion was sampled. `version_of(adapter_id,
    submitted)` maps a completion's LoRA id to its run version (the policy's)."""
    return version - min(version_of(c.adapter_version, submitted) for g in groups for c in g.completions)


def check_staleness(lag: int, max_staleness: int, step: int) -> None:
    if lag > max_staleness:
        raise RunError(f"step {step} was sampled {lag} versions behind the learner "
                       f"(train.max_staleness={max_staleness}): a bug in the request pipeline")


@dataclasses.dataclass
class Scored:
    """Scores of the step's completions, flat in group order (group j's completions are [j*G, (j+1)*G))."""

    rewards: list[float]  # weighted sum per completion
    correct: list[float]  # math_answer per completion where it is among the rewards, else the reward
    timeouts: int
    errors: int
    calls: int  # reward calls made (completions x rewards)
    failed: list[bool] = dataclasses.field(default_factory=list)  # per completion: no real score (a call failed)
    metrics_K: list[dict] = dataclasses.field(default_factory=list)  # per adapter: reward/<name>/{mean,...}


def score_completions(scorers_K: list, groups: list[Group], problems_K: list) -> Scored:
    """Score the step's completions (adapter-major, as sampled): adapter k's with its own reward runner, against
    its own dataset's problems. Each group's completions are passed as one group (group rewards, metrics). The
    adapters that share a runner are scored in one round of calls to its workers (K = 64: one, not 64)."""
    out = Scored([], [], 0, 0, 0)
    per = len(groups) // len(scorers_K)
    mine_K = [[(g, c) for g in groups[k * per:(k + 1) * per] for c in g.completions] for k in range(len(scorers_K))]
    result_K = [None] * len(scorers_K)
    by_runner: dict[int, list[int]] = {}
    for k, scorer in enumerate(scorers_K):
        by_runner.setdefault(id(scorer), []).append(k)
    for ks in by_runner.values():
        both = [(k, g, c) for k in ks for g, c in mine_K[k]]
        parts = scorers_K[ks[0]].score_parts(
            [g.prompt for _, g, _ in both], [c.text for _, _, c in both],
            [{"answer": problems_K[k][g.problem_index].answer, **problems_K[k][g.problem_index].fields}
             for k, g, _ in both], [id(g) for _, g, _ in both], [len(mine_K[k]) for k in ks])
        for k, res in zip(ks, parts):
            result_K[k] = res
    for k, res in enumerate(result_K):
        out.metrics_K.append(dict(getattr(res, "metrics", {})))
        out.rewards += res.rewards
        out.correct += res.per_reward.get("math_answer", res.rewards)
        out.timeouts, out.errors = out.timeouts + res.timeouts, out.errors + res.errors
        out.calls += len(mine_K[k]) * len(scorers_K[k].specs)
        out.failed += res.failed
    return out


def assign_advantages(groups: list[Group], scored: Scored, scale_by_std: bool
                      ) -> tuple[list[tuple[Group, list]], int]:
    """Each signal-carrying group with its advantages over its scored completions (None for those whose reward
    failed), and the number of groups dropped because fewer than 2 of their completions were scored."""
    kept, dropped_for_failure, j = [], 0, 0
    for g in groups:
        n = len(g.completions)
        rewards_G, failed_G = scored.rewards[j:j + n], scored.failed[j:j + n]
        j += n
        valid_G = torch.tensor([not f for f in failed_G], dtype=torch.bool)
        advantages_G = valid_group_advantages(torch.tensor(rewards_G), valid_G, scale_by_std)
        dropped_for_failure += int(valid_G.sum()) < 2
        if advantages_G is not None:
            kept.append((g, [None if f else a for a, f in zip(advantages_G.tolist(), failed_G)]))
    return kept, dropped_for_failure


def make_samples(kept: list[tuple[Group, list]]) -> list[TrainSample]:
    """The learner's samples: every scored, non-empty completion of the kept groups with its advantage."""
    return [TrainSample(g.prompt_ids, c.token_ids, c.logprobs, a, g.adapter)
            for g, advantages_G in kept for c, a in zip(g.completions, advantages_G) if c.token_ids and a is not None]


class Streak:
    """Consecutive steps in which something went wrong; `limit` in a row (0 = never) stops the run."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def update(self, bad: bool) -> bool:
        """Count this step; True when the limit is reached."""
        self.count = self.count + 1 if bad else 0
        return bool(self.limit) and self.count >= self.limit


def check_scored(scored: Scored, streak: Streak, step: int) -> None:
    """Stop when `reward.max_failed_steps` steps in a row had no completion scored (or every call failed)."""
    every_call = scored.timeouts + scored.errors >= scored.calls
    if streak.update(every_call or all(scored.failed)):
        what = "every reward call failed or timed out" if every_call else \
            "every completion had a failed or timed-out reward call"
        raise RunError(f"{what} in {streak.count} steps in a row (last: step {step}; {scored.timeouts} "
                       f"timeouts, {scored.errors} errors of {scored.calls} calls): the reward is broken; fix "
                       "it (or raise reward.timeout_s) and --resume")


def check_learned(learn: dict, streak: Streak, step: int, say) -> bool:
    """Whether the step updated the policy; a non-finite step is reported, and `train.max_skipped_steps` in a row
    stop the run."""
    skipped = bool(learn.get("loss/skipped"))
    stop = streak.update(skipped)
    if skipped:
        say(f"step {step}: non-finite loss or gradient, update skipped (adapter and optimizer "
            f"unchanged; {streak.count} in a row)")
    if stop:
        raise RunError(f"{streak.count} steps in a row had a non-finite loss or gradient (last: step "
                       f"{step}); stopping. Adapter and optimizer are those of the last good step; "
                       "lower optim.lr or check the sampler's logprobs, then --resume")
    return bool(learn) and not skipped


def step_metrics(groups: list[Group], scored: Scored, kept: list, dropped_for_failure: int, K: int
                 ) -> tuple[dict, list[dict]]:
    """The step's reward, response and group metrics: the run's totals, and each adapter's own."""
    flat = [c for g in groups for c in g.completions]
    lengths = [len(c.token_ids) for c in flat]
    total = {"reward/mean": sum(scored.rewards) / len(flat), "reward/accuracy": sum(scored.correct) / len(flat),
             "reward/timeouts": float(scored.timeouts), "reward/errors": float(scored.errors),
             "reward/failed_completions": float(sum(scored.failed)),
             "groups/dropped_reward_failure": float(dropped_for_failure),
             "response/length_mean": sum(lengths) / len(lengths),
             "response/truncated": sum(c.finish_reason == "length" for c in flat) / len(flat),
             "groups/total": float(len(groups)), "groups/kept": float(len(kept)),
             "groups/dropped": float(len(groups) - len(kept))}
    per = len(flat) // K
    per_K = [{"reward/mean": sum(scored.rewards[j] for j in range(k * per, (k + 1) * per)) / per,
              "reward/accuracy": sum(scored.correct[j] for j in range(k * per, (k + 1) * per)) / per,
              **scored.metrics_K[k]} for k in range(K)]
    return total, per_K


def with_names(total: dict, per_K: list[dict], names_K: list[str]) -> dict:
    """The logged metrics: the run's totals, and each adapter's own under `<name>/`. With one adapter its own
    metrics are the run's and carry no prefix."""
    if len(per_K) == 1:
        return {**total, **per_K[0]}
    return {**total, **{f"{name}/{key}": v for name, m in zip(names_K, per_K) for key, v in m.items()}}


def saved_position(positions_D: list[int]) -> int | list[int]:
    """The data position as a checkpoint stores it: the one dataset's position, or one per dataset."""
    return positions_D[0] if len(positions_D) == 1 else list(positions_D)


def loaded_position(saved: int | list[int]) -> list[int]:
    return saved if isinstance(saved, list) else [saved]


def is_due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0
