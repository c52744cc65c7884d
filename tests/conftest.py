"""Shared fixtures: a tiny random Llama (built offline, loadable by HF and vLLM) and one vLLM engine."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from tiny_models import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def sampler(request, _session_sampler):
    """The session's engine; a test that uses it starts vLLM, so it must be marked slow."""
    if request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} starts a vLLM engine: mark it @pytest.mark.slow")
    return _session_sampler


@pytest.fixture(scope="session")
def _session_sampler(tiny_model):
    """One engine for the whole session (vLLM start is the slow part)."""
    from rl_lora.sampling.sampler import Sampler

    s = Sampler(tiny_model, max_model_len=512, max_lora_rank=1, max_loras=2, kvcache_gib=1)
    yield s
    s.close()


@pytest.fixture
def make_config(tmp_path, tiny_model):
    """make_config(section={...}, ...) -> path of a tiny-model run config (defaults in runhelpers.py)."""
    from runhelpers import write_config

    return lambda **sections: write_config(tmp_path, tiny_model, **sections)
