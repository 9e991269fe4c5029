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


# A script the sharding test runs in its own process (it sets XLA_FLAGS at
# import): never import it into the test process, not even for doctests.
collect_ignore = ["_sharding_check.py"]
# Scripts that made the golden files once with the reference tools (torch, ...).
collect_ignore_glob = ["golden/*/make_golden.py"]
