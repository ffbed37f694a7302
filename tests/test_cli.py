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


def test_spectrum_prints_training_loss_next_to_each_report(capsys, tmp_path, seed):
    import re

    import torch

    from fusedopt import Adam
    from fusedopt.hessian.cli import synthetic_problem

    data_seed, steps = seed % 1000, 3
    assert main(["spectrum", "--steps", str(steps), "--k", "1", "--seed", str(data_seed),
                 "--plot-prefix", str(tmp_path / "sp"), "--track-every", str(steps)]) == 0
    out = capsys.readouterr().out
    # --track-every: one tracked step, plain and preconditioned, with Adam's threshold at lr 1e-2
    row = re.search(rf"^ +{steps} +(\S+) +(\S+) +(\S+) +(\d+)$", out, re.M)
    assert row is not None and "sharpness during training" in out, out
    assert float(row.group(1)) > 0 and float(row.group(2)) > 0
    assert float(row.group(3)) == pytest.approx((2 + 2 * 0.9) / (0.1 * 1e-2), rel=1e-4)
    # The training loss the command should report, computed here the same way it trains.
    model, X, y = synthetic_problem(data_seed)
    loss_fn = torch.nn.functional.cross_entropy
    expected = [loss_fn(model(X), y).detach().item()]
    opt = Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    expected.append(loss_fn(model(X), y).detach().item())
    headers = re.findall(r"^== (init|final): step (\d+), training loss (\S+) ==$", out, re.M)
    assert [(h[0], int(h[1])) for h in headers] == [("init", 0), ("final", steps)], out
    for (_, _, printed), want in zip(headers, expected):
        assert float(printed) == pytest.approx(want, rel=1e-5)
    # each report right under its header, with the minimum ratio and its standard error
    assert len(re.findall(r"training loss \S+ ==\nHessian report", out)) == 2
    assert len(re.findall(r"minimum ratio: +[01]\.\d{3} \+/- \d\.\d{3} ", out)) == 2
