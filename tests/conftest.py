"""Test configuration: strict dtype promotion, float64 off, hypothesis profiles."""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# A silent int8 -> f32 upcast is a bug: every test runs with strict promotion.
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    return f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}"


@pytest.fixture
def rng():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer over 94 printable characters (ids 2..95) with <s>=0 and
    </s>=1, for the small random Llama models of the LLM tests."""
    from jqx.llm import Tokenizer  # noqa: PLC0415  (flax is imported only by LLM tests)

    tokens = ["<s>", "</s>"] + [chr(c) for c in range(ord("!"), ord("!") + 94)]
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3] + [1] * 94,
            "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1,
        }
    )


# A script the sharding test runs in its own process (it sets XLA_FLAGS at
# import): never import it into the test process, not even for doctests.
collect_ignore = ["_sharding_check.py"]
# Scripts that made the golden files once with the reference tools (torch, ...).
collect_ignore_glob = ["golden/*/make_golden.py"]
