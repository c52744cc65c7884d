"""How a step's samples reach the learner, as pure functions (no model): prompt groups, micro-batch packing by a
token budget, adapter runs and routing segments, and the data-parallel shards.

Shape suffixes: `_K` per adapter of the run; a micro-batch is a list of samples whose rows of one adapter are
contiguous (the LoRA layers apply each adapter to a slice of rows).
"""

from __future__ import annotations

import itertools


def group_keys(samples) -> tuple[list, list[int]]:
    """Distinct (adapter, prompt) pairs in order of first appearance, and each sample's position among them."""
    units: dict[tuple, int] = {}
    index = [units.setdefault((s.adapter, tuple(s.prompt_ids)), len(units)) for s in samples]
    return list(units), index


def shared_cost(n_prompts: int, prompt_width: int, n_samples: int, completion_width: int, kv_weight: float) -> float:
    """Budget cost of a shared-prompt micro-batch: its padded prompts and completions through the model, plus each
    completion's gathered copy of its prompt's keys/values (`prefix.kv_copy_weight` per prompt token)."""
    return n_prompts * prompt_width + n_samples * (completion_width + kv_weight * prompt_width)


def pack_microbatches(samples: list, budget: int, kv_weight: float | None = None) -> list[list]:
    """Pack samples into micro-batches of at most `budget` padded tokens. With prompt sharing (`kv_weight` given)
    the unit is a group (the samples of one adapter and prompt, split if it alone exceeds the budget), costed as
    one padded prompt plus its padded completions plus each completion's gathered copy of the prompt's keys/values
    (shared_cost); without it (None), one sample, costed as padded prompt+completion. A unit over the budget on its
    own gets a micro-batch of its own. Rows of one adapter are contiguous in each micro-batch."""
    if kv_weight is not None:
        batches = _pack_groups(samples, budget, kv_weight)
    else:
        order = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.completion_ids), reverse=True)
        batches, current, longest = [], [], 0
        for s in order:
            length = len(s.prompt_ids) + len(s.completion_ids)
            if current and max(longest, length) * (len(current) + 1) > budget:
                batches.append(current)
                current, longest = [], 0
            current.append(s)
            longest = max(longest, length)
        if current:
            batches.append(current)
    return [sorted(mb, key=lambda s: s.adapter) for mb in batches]


def _pack_groups(samples: list, budget: int, kv: float) -> list[list]:
    units, index = group_keys(samples)
    members: list[list] = [[] for _ in units]
    for s, u in zip(samples, index):
        members[u].append(s)
    pieces = []  # (prompt length, samples) costing <= budget as one micro-batch, or one sample
    for group in members:
        group.sort(key=lambda s: len(s.completion_ids), reverse=True)
        p, piece = len(group[0].prompt_ids), []
        for s in group:
            if piece and shared_cost(1, p, len(piece) + 1, len(piece[0].completion_ids), kv) > budget:
                pieces.append((p, piece))
                piece = []
            piece.append(s)
        pieces.append((p, piece))
    pieces.sort(key=lambda x: x[0] + len(x[1][0].completion_ids), reverse=True)
    batches, current, n_prompts, n_samples, width_p, width_c = [], [], 0, 0, 0, 0
    for p, piece in pieces:
        wp, wc = max(width_p, p), max(width_c, len(piece[0].completion_ids))
        if current and shared_cost(n_prompts + 1, wp, n_samples + len(piece), wc, kv) > budget:
            batches.append(current)
            current, n_prompts, n_samples, wp, wc = [], 0, 0, p, len(piece[0].completion_ids)
        current += piece
        n_prompts, n_samples, width_p, width_c = n_prompts + 1, n_samples + len(piece), wp, wc
    if current:
        batches.append(current)
    return batches


def adapter_runs(mb: list) -> list[tuple[int, list]]:
    """Consecutive samples of the same adapter: [(adapter, samples)] in order."""
    out: list[tuple[int, list]] = []
    for s in mb:
        if out and out[-1][0] == s.adapter:
            out[-1][1].append(s)
        else:
            out.append((s.adapter, [s]))
    return out


def route_segments(adapters: list[int]) -> list[tuple[int, int, int]]:
    """(adapter, first row, end row) of each run of equal adapter indices: what the LoRA layers apply to which rows."""
    segments, start = [], 0
    for k, rows in itertools.groupby(adapters):
        n = len(list(rows))
        segments.append((k, start, start + n))
        start += n
    return segments


def tokens_per_adapter(samples: list, K: int) -> list[int]:
    """Completion tokens of each adapter's samples: each adapter's loss normaliser."""
    tokens_K = [0] * K
    for s in samples:
        tokens_K[s.adapter] += len(s.completion_ids)
    return tokens_K


def shard(samples: list, rank: int, size: int) -> list:
    """Rank's share of a step. Whole groups (one adapter and prompt: the learner runs their prompt once) go to the
    least-loaded rank, largest first, so ranks get similar token counts; with fewer groups than ranks, samples are
    dealt longest first, round-robin. Each rank keeps the step's order."""
    def cost(i):
        return len(samples[i].prompt_ids) + len(samples[i].completion_ids)

    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.adapter, tuple(s.prompt_ids)), []).append(i)
    if len(groups) < size:
        order = sorted(range(len(samples)), key=lambda i: -cost(i))
        return [samples[i] for i in sorted(order[rank::size])]
    loads, mine = [0] * size, []
    costed = [(sum(cost(i) for i in members), members) for members in groups.values()]
    for total, members in sorted(costed, key=lambda c: -c[0]):  # stable: ties keep step order
        r = loads.index(min(loads))
        loads[r] += total
        if r == rank:
            mine += members
    return [samples[i] for i in sorted(mine)]
