"""Rewards used by the training tests (importable by name in reward worker processes)."""


def ascii_fraction(prompt: str, completion: str, **fields) -> float:
    """Fraction of ASCII characters in the completion: ~0.4 for the random tiny model, learnable to ~1."""
    return sum(ord(ch) < 128 for ch in completion) / max(len(completion), 1)


def explodes(prompt: str, completion: str, **fields) -> float:
    raise RuntimeError("this reward always fails")
