"""benchmarks/llm_gpu.py (the GPU decode benchmark) end to end on its tiny --smoke model.

The script is loaded from its file and its ``main`` run in this process: every format
must produce a row, and the int4 rows through XLA and through the Pallas W4A16 kernel
(interpreted on CPU) must agree, since both compute ``x . dequantize(W)`` from the same
codes and scales.
"""

import json

import _benchmarks  # tests/_benchmarks.py
import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench():
    return _benchmarks.load("llm_gpu")


def test_smoke_run_every_format_and_int4_xla_equals_pallas(bench, tmp_path, capsys):
    path = tmp_path / "rows.json"
    # The prompt runs through the decode step (--prefill steps): one compile per format.
    argv = ["--smoke", "--steps", "2", "--prompt-len", "4", "--reps", "1", "--prefill", "steps"]
    argv += ["--json", str(path)]
    result = bench.main(argv)
    out = capsys.readouterr().out

    names = [r["format"] for r in result["rows"]]
    assert names == list(bench.DEFAULT_FORMATS)
    assert [r["format"] for r in json.loads(path.read_text())["rows"]] == names
    # The stamp line comes first (the suite's XLA_FLAGS lead its command).
    assert out.startswith("command: `") and "python " in out.splitlines()[0]
    rows = {r["format"]: r for r in result["rows"]}
    for r in rows.values():
        assert f"| {r['label']} |" in out
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0
        assert r["greedy_total"] == 2

    # the Pallas row runs every block matmul on the kernel, the XLA rows on none
    assert rows["int4-pallas"]["matmuls"] == "pallas.w4a16 x8"
    assert all("pallas" not in rows[f]["matmuls"] for f in ("bf16", "int8", "int4-xla"))
    # jqx's byte accounting: the same codes in either layout, fewer bytes per bit
    b = {f: r["weight_bytes"] for f, r in rows.items()}
    assert b["int4-xla"] == b["int4-pallas"] < b["int8"] < b["bf16"]

    # the reference against itself, and the two int4 paths against each other
    assert rows["bf16"]["max_abs_logit_diff"] == 0 and rows["bf16"]["greedy_agree"] == 2
    xla, pallas = result["last_logits"]["int4-xla"], result["last_logits"]["int4-pallas"]
    np.testing.assert_allclose(pallas, xla, rtol=0, atol=1e-4 * np.abs(xla).max())
    assert rows["int4-pallas"]["greedy_agree"] == rows["int4-xla"]["greedy_agree"]
    assert result["int4_pallas_vs_xla_max_abs_logit_diff"] <= 1e-4 * np.abs(xla).max()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--formats", "bf16,int3"], "--formats='bf16,int3': unknown 'int3'"),
        (["--formats", "bf16,bf16"], "names a format twice"),
        (["--steps", "0"], "--steps='0' must be a positive integer"),
    ],
)
def test_bad_arguments_say_what_to_give(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_group_size_must_divide_every_input_width(bench):
    with pytest.raises(ValueError, match=r"--group-size=96 .* use --group-size 128"):
        bench.main(["--smoke", "--group-size", "96"])
