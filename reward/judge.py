"""LLM judge: a reward asked of a model behind an OpenAI-compatible chat endpoint (a vLLM server, a hosted API).

    reward:
      timeout_s: 5
      rewards:
        - name: llm_judge
          timeout_s: 60            # per call, retries included
          max_concurrency: 32      # requests in flight (over all workers)
          kwargs: {base_url: "http://127.0.0.1:8000/v1", model: judge, parser: yes_no}

An `async def` reward: the runner awaits up to `max_concurrency` calls at once in a worker process, each under
the spec's `timeout_s`. Each call renders `template` with {question} (the prompt), {completion} and {reference}
(the example's `answer` field), posts one chat request (temperature 0 unless `request` says otherwise) with
`request_timeout_s` per attempt, retries connection errors, timeouts, HTTP 429 and 5xx up to `retries` times
with exponential backoff, and parses the reply with `parser`:

- "yes_no" (default): the first of yes / no / correct / incorrect in the reply -> 1.0 / 0.0;
- "score": the first number in the reply divided by `max_score` (10 by default), clipped to [0, 1];
- "number": the first number in the reply, as it is;
- "package.module:function": your function of the reply text -> float (raise if it cannot tell).

A reply the parser cannot read, an HTTP error that is not retried, or a judge that is down after the retries
raises, so that completion's score is a counted failure (left out of the loss, never a made-up 0) and the run
goes on. Only the standard library is used (urllib in a thread per request), so `reward/` stays free of torch,
vLLM and HTTP dependencies. The API key, if any, is read from the environment variable `api_key_env`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.error
import urllib.request

DEFAULT_TEMPLATE = (
    "You are grading a student's answer to a problem.\n\n"
    "Problem:\n{question}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Student's answer:\n{completion}\n\n"
    "Is the student's final answer correct? Reply with one word: yes or no."
)

_YES_NO = re.compile(r"\b(yes|no|correct|incorrect)\b", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class JudgeError(RuntimeError):
    pass


def render(template: str, question: str, completion: str, reference) -> str:
    """The judge prompt. Only {question}, {completion} and {reference} are filled (other braces stay as they
    are, so a template may contain LaTeX or JSON); no format-string evaluation of the model's text."""
    values = {"question": question, "completion": completion, "reference": "" if reference is None else str(reference)}
    return re.sub(r"\{(question|completion|reference)\}", lambda m: values[m.group(1)], template)


def parse_verdict(text: str, parser: str = "yes_no", max_score: float = 10.0) -> float:
    """The reward in a judge's reply; JudgeError if the reply does not contain one."""
    if parser == "yes_no":
        m = _YES_NO.search(text)
        if not m:
            raise JudgeError(f"no yes/no verdict in the judge's reply {text[:80]!r}")
        return 1.0 if m.group(1).lower() in ("yes", "correct") else 0.0
    if parser in ("score", "number"):
        m = _NUMBER.search(text)
        if not m:
            raise JudgeError(f"no number in the judge's reply {text[:80]!r}")
        value = float(m.group(0))
        if parser == "number":
            return value
        return min(1.0, max(0.0, value / max_score))
    if ":" in parser:
        from reward.registry import resolve

        return float(resolve(parser)(text))
    raise JudgeError(f"unknown parser {parser!r} (yes_no, score, number or 'package.module:function')")


def _post(url: str, body: dict, headers: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


_RETRIED_HTTP = (408, 409, 429, 500, 502, 503, 504)


async def chat(base_url: str, model: str, messages: list, request: dict | None = None, retries: int = 2,
               request_timeout_s: float = 30.0, backoff_s: float = 0.5, api_key_env: str = "OPENAI_API_KEY") -> str:
    """The text of one chat completion, with retries; JudgeError when the endpoint cannot give one."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": model, "messages": messages, "temperature": 0.0, **(request or {})}
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            reply = await asyncio.to_thread(_post, url, body, headers, request_timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode(errors="replace") if exc.fp else ""
            last = f"HTTP {exc.code} from {url}: {detail}"
            if exc.code not in _RETRIED_HTTP:
                raise JudgeError(last) from None
            continue
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = f"judge at {url} unreachable ({getattr(exc, 'reason', exc)})"
            continue
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"unexpected reply from {url}: {str(reply)[:200]}") from None
    raise JudgeError(f"{last} after {retries + 1} attempts")


async def llm_judge(prompt: str, completion: str, base_url: str = "", model: str = "",
                    template: str = DEFAULT_TEMPLATE, system: str | None = None, parser: str = "yes_no",
                    max_score: float = 10.0, retries: int = 2, request_timeout_s: float = 30.0,
                    backoff_s: float = 0.5, api_key_env: str = "OPENAI_API_KEY", request: dict | None = None,
                    answer=None, **_) -> float:
    if not base_url or not model:
        raise JudgeError("llm_judge needs kwargs base_url and model")
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": render(template, prompt, completion, answer)})
    text = await chat(base_url, model, messages, request, retries, request_timeout_s, backoff_s, api_key_env)
    return parse_verdict(text, parser, max_score)
