"""Find the final answer in a model response (and in a reference answer).

Rules, in order (the first that applies wins):

1. ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``): the LAST one, with nested braces. Several boxes in the
   final stretch of text that are separated only by ``,``/``and``/``or``/``$``/spaces are joined (``\\boxed{2}
   and \\boxed{3}`` -> ``2, 3``). If the last ``\\boxed{`` is never closed (a truncated completion) there is
   NO answer, even if an earlier box was complete: the model was still changing its mind.
2. GSM8K ``#### 42``: the rest of the line after the last ``####``.
3. An answer phrase: "the (final) answer is X", "Answer: X", "Final Answer: X", "the correct option is (B)".
   The last such phrase; X runs to the end of the sentence (a ``$...$`` span is taken whole).
4. Fallback, only where a careful grader would accept it:
   a. the whole response is a short bare answer (one line, at most 60 characters, e.g. ``42``,
      ``$\\frac{1}{2}$``, ``x = 5``, ``(B)``), or
   b. the final sentence is a conclusion -- it starts with therefore/thus/hence/so/finally/in total/
      altogether, ends with ``.``/``!`` (so it was not cut off) -- and either ends in ``= X`` / ``is X``,
      or contains exactly one number or one ``$...$`` expression.
   Anything else (e.g. the last number of a chain of reasoning that stops mid-way) is no answer.

Pure string work: no sympy, no evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

MAX_RESPONSE_CHARS = 200_000  # responses longer than this are only searched in their last part
_TAIL_CHARS = 20_000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


def match_brace(s: str, open_idx: int) -> int:
    """Index of the '}' matching the '{' at open_idx, or -1. Escaped braces (\\{ \\}) do not count."""
    depth = 0
    i, n = open_idx, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


class Box(NamedTuple):
    """One box command in a text, as `boxes` finds it."""
    command: str         # "boxed" or "fbox"
    start: int           # index of its backslash
    end: int             # index just past it (past the closing brace)
    content: str | None  # None: never closed (a truncated completion), or nothing follows the command
    braced: bool         # written with braces (``\\boxed{5}``), not ``\\boxed 5``


def _box_at(s: str, m: re.Match) -> Box:
    """The box command matched by m."""
    command = m.group(0)[1:]
    j = m.end()
    while j < len(s) and s[j] in " \t":
        j += 1
    if j < len(s) and s[j] == "{":
        k = match_brace(s, j)
        if k < 0:
            return Box(command, m.start(), len(s), None, True)
        return Box(command, m.start(), k + 1, s[j + 1:k], True)
    # "\boxed 5": the next run of non-space characters, up to '$'
    mm = re.match(r"[^\s$]+", s[j:])
    if mm and m.end() < len(s) and s[m.end()] in " \t":
        return Box(command, m.start(), j + mm.end(), mm.group(0), False)
    return Box(command, m.start(), j, None, False)


def boxes(s: str) -> Iterator[Box]:
    """Every ``\\boxed`` / ``\\fbox`` command in s, in order, with its content (nested braces matched)."""
    for m in _BOX_RE.finditer(s):
        yield _box_at(s, m)


_BETWEEN_BOXES = re.compile(r"^(?:\s|\$|\\\(|\\\)|\\\[|\\\]|,|;|and|or|&|\\quad|\\qquad|\\text\{\s*(?:and|or|,)\s*\})*$",
                            re.IGNORECASE)


def last_boxed(s: str) -> tuple[str | None, bool]:
    """(content of the last box or None, whether a box command was seen at all)."""
    matches = list(_BOX_RE.finditer(s))
    if not matches:
        return None, False
    content = _box_at(s, matches[-1]).content
    start = matches[-1].start()
    if content is None:
        return None, True
    parts = [content]
    # join boxes that sit side by side at the end: "\boxed{2} and \boxed{3}" (only boxes that close before
    # the next one starts are looked at, so this stays linear)
    for m in reversed(matches[:-1][-10:]):
        if start - m.end() > 2000:
            break
        prev = _box_at(s[:start], m)
        if prev.content is None or prev.end > start:
            break
        if not _BETWEEN_BOXES.match(s[prev.end:start]):
            break
        parts.insert(0, prev.content)
        start = prev.start
    if len(parts) > 1:
        return ", ".join(p.strip() for p in parts), True
    return content, True


_GSM_RE = re.compile(r"####\s*([^\n]*)")

_ANSWER_PHRASE = re.compile(
    r"(?:"
    r"(?:the\s+)?(?:final\s+)?answer\s+(?:is|would\s+be|should\s+be|will\s+be)\s*:?"
    r"|(?:the\s+)?(?:correct|right|best)\s+(?:answer|option|choice)\s+(?:is|would\s+be)\s*:?"
    r"|(?:final\s+)?answer\s*:"
    r"|final\s+answer\b\s*[:\-]?"
    r")",
    re.IGNORECASE)

_CUE = re.compile(r"^(?:therefore|thus|hence|so|finally|in\s+total|altogether|in\s+conclusion|consequently|overall)\b",
                  re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def _strip_md(s: str) -> str:
    return s.replace("**", "").replace("__", "")


def _math_span(s: str) -> str | None:
    """If s starts with a math delimiter, the delimited span."""
    s = s.lstrip()
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(open_):
            k = s.find(close, len(open_))
            if k > len(open_):
                return s[len(open_):k]
            return None
    return None


def _sentence_end(s: str) -> str:
    """s up to the end of its first sentence: a newline, or '.'/'!'/'?' followed by space/end (not 3.5)."""
    s = s.split("\n", 1)[0]
    m = re.search(r"[.!?](?=\s|$)", s)
    # don't stop at the dot of "(B)." or of "etc." -- fine either way, we strip trailing punctuation
    return s[:m.start()] if m else s


def _phrase_answer(text: str) -> tuple[str | None, int]:
    """(answer after the last answer phrase, where that phrase starts) or (None, -1)."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    for m in reversed(matches):
        rest = _strip_md(text[m.end():]).lstrip(" \t:*")
        if rest.startswith("\n"):  # "**Final Answer**\n\n42"
            rest = rest.lstrip()
        span = _math_span(rest)
        if span is not None:
            ans = span
        else:
            ans = _sentence_end(rest)
            # "The answer is 5 because ..." -> "5"
            ans = re.split(r"\s+(?:because|since|as|which|so|for|when|where)\b|;|\s+\(since", ans, maxsplit=1)[0]
        ans = ans.strip().rstrip(".,;:!").strip()
        if ans:
            return ans, m.start()
    return None, -1


def _last_sentence_start(text: str) -> int:
    t = text.rstrip().rstrip(".!").rstrip()
    start = t.rfind("\n") + 1
    ends = [m.end() for m in re.finditer(r"[.!?]\s+(?=[A-Z$\\])", t[start:])]
    return start + (ends[-1] if ends else 0)


def _bare_answer(text: str) -> str | None:
    t = _strip_md(text).strip()
    if not t or "\n" in t or len(t) > 60:
        return None
    t = t.rstrip(".").strip()
    if t.startswith("$") and t.endswith("$") or t.startswith("\\(") or t.startswith("\\["):
        span = _math_span(t)
        return span.strip() if span else None
    if "$" in t or _CUE.match(t):
        return None
    # a bare answer has no sentence-like prose: at most a couple of words (units, "or", a letter)
    words = re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", t))
    if len(words) > 2:
        return None
    return t


_CUE_ANY = re.compile(r"\b(?:therefore|thus|hence|so|finally|in\s+total|altogether|in\s+conclusion|consequently|"
                      r"overall)\b,?", re.IGNORECASE)
_VERB = re.compile(r"(?:=|\bis\b|\bequals\b|\bare\b|\bgives\b|\bwas\b)")


def _short_math_tail(tail: str, max_words: int) -> str | None:
    tail = tail.strip().rstrip(",;").strip()
    span = _math_span(tail)
    if span is not None:
        rest = tail[tail.index("$", 1) + 1:] if tail.startswith("$") else ""
        if len(re.findall(r"[A-Za-z]{2,}", rest)) <= max_words:
            return span.strip()
        return None
    if not tail or len(tail) > 40 or "$" in tail or not re.search(r"\d", tail):
        return None
    if len(re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", tail))) > max_words:
        return None
    return tail


def _conclusion_answer(text: str, require_cue: bool = False) -> str | None:
    t = _strip_md(text).rstrip()
    if not t or t[-1] not in ".!$":  # a finished sentence, not a cut-off one
        return None
    last_line = t.split("\n")[-1].strip()
    pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z$\\])", last_line)
    sent = pieces[-1].strip().rstrip(".!").strip()
    cues = list(_CUE_ANY.finditer(sent))
    if cues:
        seg = sent[cues[-1].end():]
        verbs = [m for m in _VERB.finditer(seg) if not _inside_math(seg, m.start())]
        if verbs:
            ans = _short_math_tail(seg[verbs[-1].end():], 2)
            if ans is not None:
                return ans
        spans = re.findall(r"\$([^$]+)\$", seg)
        if len(spans) == 1:
            return spans[0].strip()
        if not spans:
            nums = _NUMBER.findall(seg)
            if len(nums) == 1:
                return nums[0].strip()
        return None
    if require_cue:
        return None
    # no cue word: only "<subject> is <short answer>." as the very last sentence
    verbs = [m for m in _VERB.finditer(sent) if m.group(0) != "=" and not _inside_math(sent, m.start())]
    if verbs:
        return _short_math_tail(sent[verbs[-1].end():], 1)
    return None


def _inside_math(s: str, pos: int) -> bool:
    return s.count("$", 0, pos) % 2 == 1


def extract(response: str | None) -> str | None:
    """The final answer of a model response (a string, not yet normalised), or None if it gives none."""
    if not isinstance(response, str) or not response.strip():
        return None
    text = response[-_TAIL_CHARS:] if len(response) > MAX_RESPONSE_CHARS else response
    boxed, seen_box = last_boxed(text)
    if seen_box:
        return boxed.strip() if boxed is not None and boxed.strip() else None
    gsm = _GSM_RE.findall(text)
    if gsm:
        ans = gsm[-1].strip().rstrip(".")
        return ans or None
    phrase, where = _phrase_answer(text)
    if phrase is not None:
        # "I first thought the answer is 5. ... So the total is 12." -- a later concluding sentence wins
        if where < _last_sentence_start(text):
            later = _conclusion_answer(text, require_cue=True)
            if later is not None:
                return later
        return phrase
    bare = _bare_answer(text)
    if bare is not None:
        return bare
    return _conclusion_answer(text)


def extract_gold(answer) -> str | None:
    """The reference answer: the content of its last box if it has one, the part after '####' (GSM8K), else
    the whole string. Numbers are accepted too."""
    if answer is None:
        return None
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        answer = repr(answer) if isinstance(answer, float) else str(answer)
    if not isinstance(answer, str):
        return None
    boxed, seen = last_boxed(answer)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip() or None
    return answer.strip() or None
