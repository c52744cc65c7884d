"""Evaluation sets: the holdout benchmarks named by the recipes, local files, the demo task; decontamination.

    load_eval_set("aime2024", data_cfg) -> EvalSet(name, problems, origin)

Named sets (HF hub; on a cluster they come from the HF cache or the network):

    name       HF dataset                 config(s)                  split  question  answer  rows
    aime2024   HuggingFaceH4/aime_2024    -                          train  problem   answer    30
    aime2025   opencompass/AIME2025       AIME2025-I + AIME2025-II   test   question  answer    30
    math500    HuggingFaceH4/MATH-500     -                          test   problem   answer   500
    gsm8k      openai/gsm8k               main                       test   question  answer  1319

Anything ending in .jsonl / .parquet is read locally: a question column (`question`, else `problem`) and an
`answer` column; other columns are kept. GSM8K-style answers ('... #### 42') are reduced to 42 (data.py).
`arithmetic` is the seeded demo task's held-out set, built from the run's DataConfig exactly as training
built it (so an adapter trained on it is scored on problems it never saw).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from rl_lora.config import ConfigError, DataConfig
from rl_lora.data import Problem, _rows_to_problems, load_problems, read_file_rows


@dataclass(frozen=True)
class HFEvalSpec:
    hf_name: str
    configs: tuple[str, ...]  # concatenated in order; ("",) = the dataset's only config
    split: str
    question_key: str
    answer_key: str = "answer"


HF_EVAL_SETS: dict[str, HFEvalSpec] = {
    "aime2024": HFEvalSpec("HuggingFaceH4/aime_2024", ("",), "train", "problem"),
    # The 2025 contest came in two sittings (I and II), 15 problems each, stored as two configs.
    "aime2025": HFEvalSpec("opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "test", "question"),
    "math500": HFEvalSpec("HuggingFaceH4/MATH-500", ("",), "test", "problem"),
    "gsm8k": HFEvalSpec("openai/gsm8k", ("main",), "test", "question"),
}

QUESTION_KEYS = ("question", "problem")
ANSWER_KEYS = ("answer",)


@dataclass
class EvalSet:
    name: str  # as the user wrote it in --data: "aime2024", "arithmetic", "path/to/file.jsonl"
    problems: list[Problem]
    origin: str  # where it came from, for the results file


def parse_data_arg(text: str) -> list[str]:
    """'aime2024, aime2025' -> ['aime2024', 'aime2025'] (duplicates dropped, order kept)."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise ConfigError("--data: name at least one eval set (e.g. aime2024,aime2025 or a .jsonl file)")
    return names


def load_eval_set(name: str, data_cfg: DataConfig | None = None) -> EvalSet:
    """One eval set by name (see the module docstring). Raises ConfigError with a one-line message."""
    data_cfg = data_cfg or DataConfig()
    if name == "arithmetic":
        cfg = dataclasses.replace(data_cfg, source="arithmetic")
        _, held_out = load_problems(cfg)
        if not held_out:
            raise ConfigError("--data arithmetic: data.eval_size is 0 (no held-out problems)")
        return EvalSet(name, held_out, f"arithmetic held-out (seed {cfg.seed}, {len(held_out)} problems, "
                                         f"max_operand {cfg.max_operand}, operations '{cfg.operations}')")
    key = name.lower()
    if key in HF_EVAL_SETS:
        return _load_hf(key, HF_EVAL_SETS[key])
    path = Path(name)
    if path.suffix in (".jsonl", ".parquet"):
        return EvalSet(name, rows_to_eval_problems(_read_rows(path), f"--data {name}"), str(path))
    raise ConfigError(f"--data: unknown eval set '{name}' (known: {', '.join(HF_EVAL_SETS)}, arithmetic, "
                      "or a .jsonl/.parquet file)")


def _read_rows(path: Path) -> list[dict]:
    try:
        return read_file_rows(path)
    except ConfigError as exc:  # reword data.py's training-config wording for the eval command
        raise ConfigError(str(exc).replace("data.source", "--data")) from None


def rows_to_eval_problems(rows: list[dict], origin: str) -> list[Problem]:
    """Rows with a question (`question` or `problem`) and an `answer` column -> Problems."""
    if not rows:
        raise ConfigError(f"{origin}: no rows")
    columns = set(rows[0])
    question_key = next((k for k in QUESTION_KEYS if k in columns), None)
    answer_key = next((k for k in ANSWER_KEYS if k in columns), None)
    if question_key is None or answer_key is None:
        missing = "a question column ('question' or 'problem')" if question_key is None else "an 'answer' column"
        raise ConfigError(f"{origin}: needs {missing}; columns: {sorted(columns)}")
    cfg = DataConfig(question_key=question_key, answer_key=answer_key)
    return _rows_to_problems(rows, cfg, origin)


def _load_hf(name: str, spec: HFEvalSpec) -> EvalSet:
    import datasets

    rows: list[dict] = []
    for config in spec.configs:
        try:
            rows.extend(datasets.load_dataset(spec.hf_name, config or None, split=spec.split))
        except Exception as exc:  # offline, renamed, gated: one line for the user
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--data {name}: cannot load HF dataset '{spec.hf_name}'"
                              f"{' (' + config + ')' if config else ''} split {spec.split}: {first}. Offline? "
                              f"Pass a local .jsonl/.parquet with '{spec.question_key}' and 'answer' columns "
                              "instead.") from None
    cfg = DataConfig(question_key=spec.question_key, answer_key=spec.answer_key)
    origin = f"hf:{spec.hf_name}" + (f" ({'+'.join(spec.configs)})" if spec.configs != ("",) else "") \
        + f" split {spec.split}"
    return EvalSet(name, _rows_to_problems(rows, cfg, f"--data {name}"), origin)


# ----------------------------------------------------------------------------------------------------------
# Decontamination

_LATEX_SPACING = re.compile(r"\\(?:[,;:! ]|quad\b|qquad\b|thinspace\b|medspace\b|thickspace\b)|~")
_LATEX_SIZING = re.compile(r"\\(?:left|right|bigg|big|displaystyle|textstyle)\b")
# Sentence punctuation and math-mode delimiters only: operators (+ - * / = ^) stay, otherwise
# "What is 2 + 3?" and "What is 2 - 3?" would collide.
_PUNCT = re.compile(r"[.,;:!?\"'`$]")
_SPACE_AROUND_SYMBOL = re.compile(r"\s*([^\w\s])\s*")


def normalise_question(text: str) -> str:
    """Lowercase, drop LaTeX spacing/sizing commands, sentence punctuation and $, collapse whitespace
    (and drop it around symbols)."""
    text = _LATEX_SPACING.sub(" ", str(text).lower())
    text = _LATEX_SIZING.sub("", text)
    text = _PUNCT.sub(" ", text)
    # "2x+1" and "2x + 1" are the same question: no spaces around symbols, single spaces between words.
    return _SPACE_AROUND_SYMBOL.sub(r"\1", " ".join(text.split())).strip()


@dataclass
class DecontaminationReport:
    eval_size: int
    overlap: int  # eval questions whose normalised text is also a training question
    examples: list[str]  # up to 3 overlapping eval questions, for the warning

    @property
    def fraction(self) -> float:
        return self.overlap / self.eval_size if self.eval_size else 0.0

    def warning(self, eval_name: str = "eval set") -> str | None:
        if not self.overlap:
            return None
        shown = "; ".join(repr(q[:80]) for q in self.examples)
        return (f"warning: {self.overlap}/{self.eval_size} questions of {eval_name} also appear in the training "
                f"data (normalised text match), e.g. {shown}")


def decontamination_report(train_questions, eval_questions) -> DecontaminationReport:
    """Exact match after `normalise_question`: catches copies that differ in case, spacing, punctuation or
    LaTeX spacing; not paraphrases or a question embedded in a longer prompt."""
    train = {normalise_question(q) for q in train_questions}
    eval_questions = list(eval_questions)
    hits = [q for q in eval_questions if normalise_question(q) in train]
    return DecontaminationReport(len(eval_questions), len(hits), hits[:3])
