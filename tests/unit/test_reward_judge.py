"""The built-in LLM judge (reward.judge): prompt rendering and verdict parsing, a judge that is down, and a real
vLLM OpenAI server on the tiny model (no mock): success, unreadable verdicts and requests over the limit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from runhelpers import wait_for_server

from reward import RewardRunner
from reward.judge import JudgeError, parse_verdict, render

SERVER_START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_render_fills_only_the_three_fields():
    t = "Q={question} R={reference} C={completion} keep {x} and \\frac{1}{2}"
    assert render(t, "2+2?", "{question} 4", 4) == "Q=2+2? R=4 C={question} 4 keep {x} and \\frac{1}{2}"


@pytest.mark.parametrize("text,parser,want", [("Yes.", "yes_no", 1.0), ("no, wrong", "yes_no", 0.0),
                                              ("INCORRECT", "yes_no", 0.0), ("Score: 7/10", "score", 0.7),
                                              ("42", "score", 1.0), ("-3.5 points", "number", -3.5)])
def test_parse_verdict(text, parser, want):
    assert parse_verdict(text, parser) == pytest.approx(want)


@pytest.mark.parametrize("text,parser", [("maybe", "yes_no"), ("seven", "score"), ("1", "nope")])
def test_unreadable_verdict_raises(text, parser):
    with pytest.raises(JudgeError):
        parse_verdict(text, parser)


def test_judge_that_is_down_costs_counted_failures_and_the_run_goes_on():
    port = _free_port()  # nothing listens there
    spec = {"name": "llm_judge", "kwargs": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m",
                                            "retries": 1, "backoff_s": 0.01, "request_timeout_s": 2}}
    with RewardRunner([spec, {"name": "boxed_format"}], timeout_s=10, num_workers=0) as runner:
        assert runner.kinds()["llm_judge"] == "async"
        res = runner.score(["q"] * 3, [r"\boxed{1}", "x", "y"], [{"answer": "1"}] * 3)
    assert res.errors == 3 and res.timeouts == 0 and res.failed == [True] * 3
    assert res.per_reward["boxed_format"] == [1.0, 0.0, 0.0]   # the other reward still counts
    assert res.metrics["reward/llm_judge/failures"] == 3


def test_judge_without_endpoint_is_a_counted_error():
    with RewardRunner(["llm_judge"], num_workers=0) as runner:
        res = runner.score(["q"], ["a"], [{}])
    assert res.errors == 1 and res.failed == [True]


# -- a real server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge_server(tiny_model, tmp_path_factory):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
           "--served-model-name", "judge", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
           "--no-enable-chunked-prefill", "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp_path_factory.mktemp("judge") / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_server(proc, port, log, SERVER_START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=60)
        log.close()


def _token_id(tiny_model, ch: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model).convert_tokens_to_ids(ch)


def _judge(url, tiny_model, forced: str, **extra):
    """The tiny random model says anything; logit_bias makes its one-token verdict `forced`, so the test knows the
    answer the real server must give back."""
    request = {"max_tokens": 1, "logit_bias": {str(_token_id(tiny_model, forced)): 100}, **extra.pop("request", {})}
    return {"name": "llm_judge", "max_concurrency": 4, **extra.pop("spec", {}),
            "kwargs": {"base_url": url, "model": "judge", "template": "{question}|{reference}|{completion}",
                       "parser": "score", "retries": 0, "request": request, **extra}}


@pytest.mark.slow
def test_judge_against_a_real_vllm_server(judge_server, tiny_model):
    with RewardRunner([_judge(judge_server, tiny_model, "7")], timeout_s=60, num_workers=1) as runner:
        res = runner.score(["1+1?"] * 6, [f"answer {i}" for i in range(6)], [{"answer": "2"}] * 6)
    assert res.errors == 0 and res.timeouts == 0, res
    assert res.rewards == [pytest.approx(0.7)] * 6
    assert res.metrics["reward/llm_judge/latency_p50_ms"] > 0


@pytest.mark.slow
def test_real_server_unreadable_verdict_and_overlong_request_are_counted(judge_server, tiny_model):
    unreadable = _judge(judge_server, tiny_model, "x")
    slow = _judge(judge_server, tiny_model, "7", spec={"timeout_s": 0.5},
                  request={"max_tokens": 800, "min_tokens": 800, "ignore_eos": True})
    with RewardRunner([unreadable], timeout_s=60, num_workers=0) as runner:
        res = runner.score(["q"] * 2, ["a", "b"], [{"answer": "1"}] * 2)
    assert res.errors == 2 and res.failed == [True, True]
    with RewardRunner([slow], timeout_s=60, num_workers=0) as runner:
        res = runner.score(["q"] * 2, ["a", "b"], [{"answer": "1"}] * 2)
    assert res.timeouts == 2 and res.failed == [True, True]
    with RewardRunner([_judge(judge_server, tiny_model, "3")], timeout_s=60, num_workers=0) as runner:
        res = runner.score(["q"], ["a"], [{"answer": "1"}])    # the server still answers after the cut requests
    assert res.rewards == [pytest.approx(0.3)] and not res.failed[0]
