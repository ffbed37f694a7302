"""The command line: bad values are one argparse error line (exit 2, no
traceback), no command prints the help, --version exists."""
import pytest

import fusedopt
from fusedopt.__main__ import main


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fusedopt") and "bench" in out and "spectrum" in out
    assert out.count("fused optimizers and Hessian tools") == 1 and "``" not in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"fusedopt {fusedopt.__version__}"


@pytest.mark.parametrize("argv,message", [
    (["spectrum", "--steps", "-5"], "argument --steps: must be an integer >= 0, got -5"),
    (["spectrum", "--k", "0"], "argument --k: must be an integer >= 1, got 0"),
    (["spectrum", "--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
    (["spectrum", "--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["spectrum", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
])
def test_bad_values_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
