"""Rewards used by the training tests (importable by name in reward worker processes)."""


def explodes(prompt: str, completion: str, **fields) -> float:
    raise RuntimeError("this reward always fails")


def ascii_start(prompt: str, completion: str, **fields) -> float:
    """1 if the completion starts with an ASCII character. Trivially learnable even by a random model: the first
    completion token always follows the same chat-template tokens, so a rank-1 update can shift that one
    distribution consistently (~0.4 at the start, near 1 after a few dozen steps)."""
    return float(bool(completion) and ord(completion[0]) < 128)


def hangs(prompt: str, completion: str, **fields) -> float:
    import time

    time.sleep(60)
    return 1.0


def returns_nan(prompt: str, completion: str, **fields) -> float:
    return float("nan")


def prompt_contains(prompt: str, completion: str, text: str = "", **fields) -> float:
    """1 if the prompt (the problem's question) contains `text`: tells which dataset a completion came from."""
    return 1.0 if text in prompt else 0.0
