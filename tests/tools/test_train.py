"""``wsbcn train``: the fair protocol (every method, an lr grid chosen on validation,
several seeds) at a tiny budget, the digits split, the missing-extra message, the
options and their refusals."""
import argparse
import sys

import pytest
import torch

from wsbcn.tools import cli, train

NAMES = [name for _, _, name in train.METHODS.values()]


def _sklearn():
    return pytest.importorskip("sklearn", reason="the demo extra (scikit-learn) is not installed")


def test_digits_split_is_fixed_stratified_and_disjoint():
    _sklearn()
    a, b = train.load_digits_data(), train.load_digits_data()
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (1097, 300, 400)
    assert a.x_train.shape[1:] == (1, 8, 8)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_val, b.y_val)  # fixed
    for y in (a.y_train, a.y_val, a.y_test):  # stratified: every class, in proportion
        counts = torch.bincount(y, minlength=10).float() / len(y)
        assert counts.min() > 0.08 and counts.max() < 0.12
    flat = [x.reshape(len(x), -1) for x in (a.x_train, a.x_val, a.x_test)]
    assert not (torch.cdist(flat[2], flat[0]).min(dim=1).values == 0).all()  # not the same images


def test_full_protocol_at_a_tiny_budget_prints_every_method(capsys):
    _sklearn()
    lines = []
    table, grid_view, grid, seed_runs = train.run(steps=3, lrs=(0.01, 0.1), seeds=2, progress=False,
                                                  log=lines.append)
    assert list(table["method"]) == NAMES
    assert list(table["batch"]) == [2, 32, 2, 2, 2, 2, 32]
    for m in train.METHODS:
        assert [r.lr for r in grid[m]] == [0.01, 0.1]
        chosen = train.choose_lr(grid[m])
        assert [(r.lr, r.seed) for r in seed_runs[m]] == [(chosen.lr, 0), (chosen.lr, 1)]
        assert seed_runs[m][0] is chosen  # seed 0's grid run is reused
    assert table["lr"].isin([0.01, 0.1]).all()
    assert ((table["test acc mean (%)"] >= 0) & (table["test acc mean (%)"] <= 100)).all()
    assert list(grid_view.columns) == ["method", "lr 0.01", "lr 0.1"]
    out = "\n".join(lines)
    assert "digits: 1097 train / 300 validation / 400 test" in out
    assert out.count("| WS(center)+GN | 2 |") == 1 and " ± " in out


def test_digits_are_learned_by_ws_bcn_at_batch_2():
    _sklearn()
    data = train.load_digits_data()
    r = train.train_one("ws_bcn", data, steps=150, lr=0.02)
    assert r.diverged_at is None and r.val_accuracy > 0.5  # 10 classes: chance is 10 %


def test_lr_choice_and_status():
    def run(lr, val, diverged=None):
        return train.Run("gn", lr, 0, val_accuracy=val, test_accuracy=val, diverged_at=diverged)

    grid = {"gn": [run(0.01, 0.5), run(0.1, 0.9), run(1.0, 0.0, diverged=3)],
            "ws_gn": [run(0.01, 0.11), run(0.1, 0.12)], "wsc_gn": [run(0.01, 0.9), run(0.1, 0.5), run(1.0, 0.1)]}
    assert train.choose_lr(grid["gn"]).lr == 0.1
    assert train.choose_lr([run(0.1, 0.5), run(0.01, 0.5)]).lr == 0.01  # a tie: the smaller lr
    seeds = {"gn": [grid["gn"][1], run(0.1, 0.8), run(0.1, 0.0, diverged=7)], "ws_gn": [grid["ws_gn"][1]],
             "wsc_gn": [grid["wsc_gn"][0]]}
    table = train.results_table(["gn", "ws_gn", "wsc_gn"], (0.01, 0.1, 1.0), grid, seeds).set_index("method")
    assert table.loc["GN", "test acc mean (%)"] == pytest.approx(100 * (0.9 + 0.8) / 3)
    assert table.loc["GN", "status"] == "1 seed(s) diverged"
    assert table.loc["WS+GN", "status"] == "near chance at every lr"  # reported, not hidden
    assert table.loc["WS+GN", "test acc std (%)"] == 0
    assert table.loc["WS(center)+GN", "status"] == "ok; lr at the edge of the grid"  # said, not hidden


def test_synthetic_data_is_an_explicit_option(capsys):
    assert train.main(["--data", "synthetic", "--methods", "gn", "ws_gn", "--steps", "2", "--lrs", "0.01",
                       "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("synthetic: 2000 train / 500 validation / 500 test")
    assert "| GN | 2 |" in out and "| WS+GN | 2 |" in out


def test_missing_demo_extra_is_named_and_nothing_trains(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setattr(train, "train_one", lambda *a, **k: pytest.fail("trained without the data"))
    assert cli.main(["train", "--steps", "2"]) == 1
    captured = capsys.readouterr()
    assert "pip install 'wsbcn[demo]'" in captured.err and "scikit-learn" in captured.err
    assert captured.out == ""


def test_help_explains_every_option_with_its_default(capsys):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.dest for a in options} == {"data", "methods", "steps", "lrs", "seeds", "device", "threads"}
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
    assert "(default: 0.0003 0.001 0.003 0.01 0.03 0.1)" in text
    assert "validation" in text and "mean +- std" in text


@pytest.mark.parametrize("bad", [dict(methods=()), dict(methods=("batchnorm",)), dict(steps=0), dict(seeds=2.5),
                                 dict(lrs=()), dict(lrs=(0.1, -0.1)), dict(lrs=(float("nan"),)), dict(threads=0),
                                 dict(device="tpu"), dict(data="mnist")])
def test_bad_settings_are_refused_before_anything_trains(monkeypatch, bad):
    monkeypatch.setattr(train, "train_one", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=next(iter(bad))):
        train.run(**bad, progress=False, log=lambda line: pytest.fail(f"logged {line!r}"))


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--lrs", "-1"], ["--methods", "batchnorm"],
                                  ["--data", "mnist"]])
def test_bad_options_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err
