"""Problems and prompts: seeded procedural tasks (small arithmetic; multi-digit arithmetic), local jsonl/parquet
files, or HF datasets.

Every problem is a question plus a reference answer (and any extra columns, passed to reward functions).
Prompts use the model's chat template and ask for the final answer in \\boxed{} (the demo), or, with
`data.chat_template: false`, are plain text for the model to continue: `data.shots` worked examples, one per
line ("123 + 456 = 579"), then the question (the capability task, configs/capability_cpu.yaml).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from rl_lora.config import ConfigError, DataConfig


@dataclass
class Problem:
    question: str
    answer: str
    fields: dict = field(default_factory=dict)  # extra dataset columns, handed to reward functions


# ----------------------------------------------------------------------------------------------------------
# Sources


def arithmetic_problems(count: int, seed: int, max_operand: int, exclude: set[str] = frozenset(),
                        operations: str = "+-*") -> list[Problem]:
    """`count` distinct problems 'a + b' / 'a - b' / 'a * b' (small b for products), none of them in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Problem] = []
    space = len(set(operations)) * (max_operand + 1) ** 2
    if count > space - len(exclude):
        raise ConfigError(f"data.train_size: only {space - len(exclude)} distinct arithmetic problems with "
                          f"data.max_operand={max_operand}")
    while len(out) < count:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(operations)
        if op == "*":
            b = b % 10
        question = f"What is {a} {op} {b}?"
        if question in seen:
            continue
        seen.add(question)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(Problem(question, str(value)))
    return out


def multidigit_problems(count: int, seed: int, digits: int, operations: str, exclude: set[str] = frozenset()
                        ) -> list[Problem]:
    """`count` distinct problems 'a + b =' / 'a - b =' / 'a * b =' with `digits`-digit operands, none in
    `exclude`. A capability task: the asked format is trivial (a number), the computation is not."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    space = len(set(operations)) * (hi - lo + 1) ** 2
    if count > space - len(exclude):
        raise ConfigError(f"data.train_size: only {space - len(exclude)} distinct {digits}-digit problems")
    seen, out = set(exclude), []
    while len(out) < count:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(operations)
        question = f"{a} {op} {b} ="
        if question in seen:
            continue
        seen.add(question)
        out.append(Problem(question, str(a + b if op == "+" else a - b if op == "-" else a * b)))
    return out


def procedural(cfg: DataConfig, count: int, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
    """`count` problems of the procedural source `cfg.source` drawn with `seed`, none in `exclude`."""
    if cfg.source == "multidigit":
        return multidigit_problems(count, seed, cfg.digits, cfg.operations, exclude)
    return arithmetic_problems(count, seed, cfg.max_operand, exclude, cfg.operations)


PROCEDURAL = ("arithmetic", "multidigit")


def worked_examples(cfg: DataConfig) -> list[Problem]:
    """The `data.shots` worked examples shown before every question: drawn with data.seed + 2, so they are the
    same for every prompt and disjoint from the training and held-out problems (load_problems excludes them)."""
    if not cfg.shots:
        return []
    return procedural(cfg, cfg.shots, cfg.seed + 2)


def _rows_to_problems(rows, cfg: DataConfig, origin: str) -> list[Problem]:
    problems = []
    for i, row in enumerate(rows):
        if cfg.question_key not in row or cfg.answer_key not in row:
            raise ConfigError(f"{origin}: row {i} lacks column '{cfg.question_key}' or '{cfg.answer_key}' "
                              f"(set data.question_key / data.answer_key; columns: {sorted(row)})")
        answer = str(row[cfg.answer_key])
        if "####" in answer:  # GSM8K: the reference answer follows '####'
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        extra = {k: v for k, v in row.items() if k not in (cfg.question_key, cfg.answer_key)}
        problems.append(Problem(str(row[cfg.question_key]), answer, extra))
    return problems


def read_file_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"data.source: file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        return rows
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    raise ConfigError(f"data.source: {path} must be .jsonl or .parquet")


def load_hf_rows(name: str, config: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # offline, unknown name, missing split: one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"data.source: cannot load HF dataset '{name}' (split {split}): {first}. "
                          "Offline? Point data.source at a local .jsonl/.parquet file instead.") from None
    return list(ds)


def load_problems(cfg: DataConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): disjoint by question text."""
    if cfg.source in PROCEDURAL:
        shown = {p.question for p in worked_examples(cfg)}
        held_out = procedural(cfg, cfg.eval_size, cfg.seed + 1, shown)
        train = procedural(cfg, cfg.train_size, cfg.seed, shown | {p.question for p in held_out})
        return train, held_out
    if cfg.source.startswith("hf:"):
        rows = load_hf_rows(cfg.source[3:], cfg.hf_config, cfg.split)
        origin = cfg.source
    else:
        rows = read_file_rows(Path(cfg.source))
        origin = cfg.source
    problems = _rows_to_problems(rows, cfg, origin)
    if not problems:
        raise ConfigError(f"data.source: {origin} has no rows")
    order = list(range(len(problems)))
    random.Random(cfg.seed).shuffle(order)
    held_out = [problems[i] for i in order[: cfg.eval_size]]
    held_questions = {p.question for p in held_out}
    train = [problems[i] for i in order[cfg.eval_size:] if problems[i].question not in held_questions]
    if not train:
        raise ConfigError(f"data.source: {origin} has {len(problems)} rows, none left for training after "
                          f"holding out data.eval_size={cfg.eval_size}")
    return train, held_out


# ----------------------------------------------------------------------------------------------------------
# Prompts


def _asked(problem: Problem, cfg: DataConfig) -> str:
    return problem.question if not cfg.instruction else f"{problem.question} {cfg.instruction}"


def prompt_messages(problem: Problem, cfg: DataConfig) -> list[dict]:
    """Chat messages: the system prompt, each worked example as a user turn and a bare-answer assistant turn, the
    question."""
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    for shot in worked_examples(cfg):
        messages += [{"role": "user", "content": _asked(shot, cfg)}, {"role": "assistant", "content": shot.answer}]
    messages.append({"role": "user", "content": _asked(problem, cfg)})
    return messages


def prompt_text(problem: Problem, cfg: DataConfig) -> str:
    """A plain-completion prompt (`data.chat_template: false`): the system prompt, one line per worked example
    ("question answer"), then the question, for the model to continue (stop at the newline: sampler.stop)."""
    lines = ([cfg.system_prompt] if cfg.system_prompt else []) + [f"{_asked(p, cfg)} {p.answer}"
                                                                   for p in worked_examples(cfg)]
    return "".join(f"{line}\n" for line in lines) + _asked(problem, cfg)


def prompt_token_ids(tokenizer, problem: Problem, cfg: DataConfig) -> list[int]:
    if not cfg.chat_template:
        return tokenizer(prompt_text(problem, cfg), add_special_tokens=True)["input_ids"]
    messages = prompt_messages(problem, cfg)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer("\n".join(m["content"] for m in messages) + "\n", add_special_tokens=True)["input_ids"]


class PromptStream:
    """Deterministic, resumable order over the training problems: a fresh seeded shuffle every epoch."""

    def __init__(self, num_problems: int, seed: int, position: int = 0):
        self.num_problems = num_problems
        self.seed = seed
        self.position = position  # problems handed out so far, across epochs

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num_problems))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(self.position, self.num_problems)
            take = min(count - len(out), self.num_problems - offset)
            out.extend(self._order(epoch)[offset: offset + take])
            self.position += take
        return out
