"""The micro-batch training demo runs and WS+BCN learns the generated task."""
from wsbcn.tools import cli, train


def test_ws_bcn_learns_at_batch_size_2():
    lines = []
    results = train.run(norms=("bn", "ws_bcn"), steps=300, batch_size=2, progress=False, log=lines.append)
    assert set(results) == {"bn", "ws_bcn"}
    assert len(lines) == 2 and all("test accuracy" in line for line in lines)
    assert results["ws_bcn"] > 0.5  # 10 classes: chance is 0.1


def test_train_subcommand_prints_one_line_per_norm(capsys):
    assert cli.main(["train", "--norms", "gn", "ws_gn", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("test accuracy") == 2
