"""``wsbcn train``: WS+BCN learns the generated task at batch size 2, the command
explains its options, ends with one table holding every norm and writes a PNG."""
import argparse
import math

import pytest
import torch
from matplotlib import image

from wsbcn.tools import cli, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ("BN", "GN", "WS+GN", "WS+BCN")


def table_rows(out):
    """The table's rows, by the name in their first column."""
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in NAMES}


def test_ws_bcn_learns_at_batch_size_2(tmp_path):
    lines = []
    table, runs, _ = train.run(norms=("bn", "ws_bcn"), steps=300, batch_size=2, eval_every=100, progress=False,
                               log=lines.append, plot=tmp_path / "curves.png")
    assert list(table["norm"]) == ["BN", "WS+BCN"]
    ws_bcn = table.set_index("norm").loc["WS+BCN"]
    assert ws_bcn["test accuracy (%)"] > 50  # 10 classes: chance is 10 %
    assert ws_bcn["status"] == "ok"
    # the curve starts untrained and ends at the table's number
    assert runs[1].curve_steps == [0, 100, 200, 300]
    assert runs[1].curve_accuracy[0] < 0.3
    assert 100 * runs[1].curve_accuracy[-1] == ws_bcn["test accuracy (%)"]


def test_run_prints_one_table_with_every_norm_and_writes_a_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    plot = tmp_path / "sub" / "curves.png"
    assert train.main(["--steps", "4", "--eval-every", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.strip()].count("norm") == 1  # one table
    rows = table_rows(out)
    assert set(rows) == set(NAMES)
    for values in rows.values():
        assert 0 <= float(values[0]) <= 100  # test accuracy (%)
        assert math.isfinite(float(values[2]))  # train loss
    assert out.rstrip().endswith(str(plot.resolve()))
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = image.imread(plot).shape  # a PNG that a decoder reads
    assert height > 100 and width > 100
    assert torch.get_num_threads() == threads  # the training's thread count is not left behind


def test_wsbcn_train_writes_its_plot_under_perf_plots_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--norms", "gn", "ws_gn", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert set(table_rows(out)) == {"GN", "WS+GN"}
    plot = tmp_path / "perf" / "plots" / "cpu" / "train.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert str(plot.resolve()) in out


def test_divergence_is_reported_in_the_table(tmp_path):
    table, runs, _ = train.run(norms=("gn",), steps=30, lr=1e12, progress=False, log=lambda line: None,
                               plot=tmp_path / "curves.png")
    assert runs[0].diverged_at is not None
    assert table["status"][0] == f"diverged at step {runs[0].diverged_at}"


def test_help_explains_every_option_with_its_default(capsys):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.dest for a in options} == {"norms", "steps", "batch_size", "lr", "seed", "eval_every", "device",
                                         "threads", "plot"}
    for action in options:
        assert action.help and "default" in action.help, action.dest
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in options:
        assert action.option_strings[0] in text
        if action.default is not None and not isinstance(action.default, list):
            assert f"(default: {action.default})" in text, action.dest
    assert "test accuracy" in text and "PNG" in text


@pytest.mark.parametrize("bad", [dict(norms=()), dict(norms=("batchnorm",)), dict(steps=0), dict(batch_size=2.5),
                                 dict(lr=-0.1), dict(lr=float("nan")), dict(eval_every=0), dict(threads=0),
                                 dict(device="tpu")])
def test_bad_settings_are_refused_before_anything_trains(tmp_path, bad):
    plot = tmp_path / "curves.png"
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        train.run(**bad, progress=False, log=lambda line: pytest.fail(f"logged {line!r}"), plot=plot)
    assert not plot.exists()


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--lr", "-1"], ["--norms", "batchnorm"]])
def test_bad_options_are_refused_by_the_parser(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv + ["--plot", str(tmp_path / "curves.png")])
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()
