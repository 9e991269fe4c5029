"""`python -m jqx formats` and `python -m jqx formats NAME`."""

import os
import subprocess
import sys

import pytest

from jqx.cli import main
from jqx.core import formats as F


def test_table_lists_every_format_with_its_anatomy(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in F.names():
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        assert F.get(name).layout() in row
    e4m3 = next(line for line in lines if line.startswith("fp8_e4m3"))
    assert "448" in e4m3 and "S EEEE MMM" in e4m3 and " 7 " in e4m3  # bias 7
    e3m0 = next(line for line in lines if line.startswith("fp4_e3m0"))
    assert " 16 " in e3m0 and "x2/byte" in e3m0


@pytest.mark.parametrize(
    "name,expect",
    [
        ("e3m0", ["fp4_e3m0", "exponent bias  3", "15 distinct values", "0.25", "16"]),
        ("e1m2", ["exponent bias  0", "3.5", "smallest subnormal 0.5"]),
        ("int8", ["[-128, 127]", "symmetric      [-127, 127]", "256 distinct values"]),
        ("fp8_e5m2", ["57344", "inf / NaN      yes / yes", "247 distinct values"]),
        ("nf4", ["-0.696193", "0.0795803"]),
        ("bf16", ["bfloat16", "S E8 M7"]),
    ],
)
def test_one_format_with_its_value_grid(capsys, name, expect):
    assert main(["formats", name]) == 0
    out = capsys.readouterr().out
    for e in expect:
        assert e in out, (e, out)


def test_value_grid_is_the_exact_value_set(capsys):
    main(["formats", "e2m1"])
    out = capsys.readouterr().out
    grid = out.split("distinct values:")[1].split()
    assert [float(v) for v in grid] == list(F.get("e2m1").values)


def test_four_bit_formats_list_every_code(capsys):
    main(["formats", "e3m0"])
    lines = capsys.readouterr().out.splitlines()
    parts = [line.split() for line in lines]
    rows = {p[1]: p[2] for p in parts if len(p) == 3 and p[0].isdigit() and set(p[1]) <= {"0", "1"}}
    assert len(rows) == 16
    # S EEE: 0111 is exponent 7 - bias 3 = 2^4; 1001 is -2^(1-3); 0000 and 1000 are zero
    assert (rows["0111"], rows["1001"], rows["0000"], rows["1000"]) == ("16", "-0.25", "0", "0")


def test_unknown_name_exits_2_and_lists_valid_names(capsys):
    assert main(["formats", "fp5"]) == 2
    err = capsys.readouterr().err
    assert "format='fp5' is not a known format" in err and "fp8_e4m3" in err and "nf4" in err


def test_python_dash_m_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-m", "jqx", "formats", "nf4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("nf4: QLoRA NormalFloat4")
