"""The capability task (data.source: multidigit, few-shot plain prompts): the generator, the prompt, the reward
on the completions it gets (no model)."""

import dataclasses

import pytest

from rl_lora.config import ConfigError, DataConfig, load_config
from rl_lora.data import load_problems, multidigit_problems, prompt_messages, prompt_text, worked_examples

CFG = DataConfig(source="multidigit", digits=3, operations="+", shots=4, train_size=500, eval_size=64,
                 instruction="", chat_template=False)


def test_the_generator_is_deterministic_and_its_sets_are_disjoint():
    train, held_out = load_problems(CFG)
    again, held_again = load_problems(CFG)
    assert [p.question for p in train] == [p.question for p in again] and held_out == held_again
    assert (len(train), len(held_out)) == (500, 64)
    shots = {p.question for p in worked_examples(CFG)}
    q_train, q_held = {p.question for p in train}, {p.question for p in held_out}
    assert len(q_train) == 500 and len(q_held) == 64 and len(shots) == 4
    assert not (q_train & q_held) and not (shots & q_train) and not (shots & q_held)
    other, _ = load_problems(dataclasses.replace(CFG, seed=7))
    assert [p.question for p in other] != [p.question for p in train]  # data.seed changes the draw


def test_problems_have_the_asked_digits_and_correct_answers():
    for op, digits in (("+", 3), ("*", 2), ("-", 4)):
        for p in multidigit_problems(50, 1, digits, op):
            a, sign, b, eq = p.question.split()
            assert sign == op and eq == "=" and len(a) == len(b) == digits
            assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b) if op == "*" else
                                     int(a) - int(b))
    with pytest.raises(ConfigError, match="only 100 distinct 1-digit problems"):
        multidigit_problems(101, 0, 1, "+")


def test_the_plain_prompt_is_worked_examples_one_per_line_then_the_question():
    _, held_out = load_problems(CFG)
    text = prompt_text(held_out[0], CFG)
    lines = text.split("\n")
    assert len(lines) == 5 and lines[-1] == held_out[0].question and lines[-1].endswith("=")
    for line, shot in zip(lines, worked_examples(CFG)):
        assert line == f"{shot.question} {shot.answer}"
    chat = prompt_messages(held_out[0], dataclasses.replace(CFG, chat_template=True))
    assert [m["role"] for m in chat] == ["user", "assistant"] * 4 + ["user"]
    assert chat[1]["content"] == worked_examples(CFG)[0].answer


def test_plain_prompt_token_ids_are_the_text_without_a_chat_template(tiny_model):
    from transformers import AutoTokenizer

    from rl_lora.data import prompt_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    _, held_out = load_problems(CFG)
    ids = prompt_token_ids(tok, held_out[0], CFG)
    assert ids == tok(prompt_text(held_out[0], CFG))["input_ids"]
    assert ids != prompt_token_ids(tok, held_out[0], dataclasses.replace(CFG, chat_template=True))


@pytest.mark.parametrize("completion, score", [
    (" 579", 1.0), ("579", 1.0), (" 579 ", 1.0),  # the stopped completion: the answer, the newline left out
    (" 578", 0.0), (" 5790", 0.0), ("", 0.0),
    (" 123 + 456", 0.0),  # the question's computation left undone is not an answer
])
def test_the_reward_reads_the_answer_of_a_stopped_completion(completion, score):
    from reward.math_answer import score as math_answer

    assert math_answer(completion, "579") == score


def test_shots_and_stop_strings_are_checked_at_load():
    with pytest.raises(ConfigError, match="data.shots: worked examples are drawn from the procedural sources"):
        load_config(None, ["data.source=x.jsonl", "data.shots=2"])
    with pytest.raises(ConfigError, match="data.digits: must be in"):
        load_config(None, ["data.source=multidigit", "data.digits=0"])
    with pytest.raises(ConfigError, match="sampler.stop: must be a list of non-empty strings"):
        load_config(None, ["sampler.stop=['']"])
    from runhelpers import ROOT

    assert load_config(ROOT / "configs" / "capability_cpu.yaml").sampler.stop == ["\n"]
