"""``wsbcn train`` / ``python -m wsbcn.tools.train``: the paper's claim, measured fairly.

The same small CNN and the same number of SGD steps for every method: BN at batch
size 2 and at 32 (the large-batch reference), GN, WS+GN, WS(centering only)+GN and
WS+BCN with micro-batch (running) estimates at batch size 2, WS+BCN with batch
statistics at 32. Data: scikit-learn's bundled handwritten digits (1,797 real 8x8
images, no download; the ``demo`` extra) in a fixed stratified train / validation /
test split, or ``--data synthetic``, a generated 10-class task. For each method the
learning rate is chosen on the validation split from a grid (seed 0), then the chosen
setting is trained with ``--seeds`` seeds; the table gives the test accuracy as
mean +- std over them.
"""
import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

# method -> (network, batch size, the table's name)
METHODS = {
    "bn_2": ("bn", 2, "BN, batch 2"),
    "bn_32": ("bn", 32, "BN, batch 32"),
    "gn": ("gn", 2, "GN"),
    "ws_gn": ("ws_gn", 2, "WS+GN"),
    "wsc_gn": ("wsc_gn", 2, "WS(center)+GN"),
    "ws_bcn": ("ws_bcn", 2, "WS+BCN (estimates)"),
    "ws_bcn_32": ("ws_bcn_batch", 32, "WS+BCN (batch stats), batch 32"),
}
DEFAULT_LRS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)  # two and a half decades
DATA = ("digits", "synthetic")
CLASSES = 10
NEAR_CHANCE = 0.2  # best validation accuracy below this at every lr: "near chance at every lr"
EXTRA_MESSAGE = ("wsbcn train --data digits needs scikit-learn (the bundled handwritten digits): "
                 "pip install 'wsbcn[demo]' (or pip install scikit-learn), or use --data synthetic")
DESCRIPTION = """\
Trains the same small CNN with the same step budget per method: BN at batch 2 and
32, GN, WS+GN, WS(centering only)+GN, WS+BCN (micro-batch estimates) at batch 2 and
WS+BCN (batch statistics) at 32, on scikit-learn's handwritten digits (1,797 real
8x8 images, a fixed stratified 1097/300/400 train/validation/test split). Each
method's learning rate is chosen on the validation split (seed 0), then the chosen
setting is trained with several seeds: test accuracy as mean +- std."""
EPILOG = """\
It prints the validation accuracy of every method at every learning rate, then one
table: per method the batch size, the chosen lr, test accuracy mean +- std over the
seeds and its status (a method near chance at every lr says so)."""


class MissingExtra(RuntimeError):
    """An optional dependency of the demo is not installed."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str

    def to(self, device):
        return Data(*(getattr(self, f).to(device) for f in ("x_train", "y_train", "x_val", "y_val", "x_test",
                                                             "y_test")), self.name)


def load_digits_data(size=8, n_val=300, n_test=400) -> Data:
    """scikit-learn's handwritten digits (1,797 8x8 images, values 0..16),
    standardized with the training split's mean and std, kept at 8x8 (``size`` > 8:
    upsampled, bilinear); a fixed stratified split (random_state 0): 1,097 train,
    300 validation, 400 test images."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise MissingExtra(EXTRA_MESSAGE) from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=n_test, stratify=y.numpy(), random_state=0)
    train, val = train_test_split(rest, test_size=n_val, stratify=y[rest].numpy(), random_state=0)
    mean, std = x[train].mean(), x[train].std()

    def prep(i):
        images = (x[i] - mean) / std
        if size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images.contiguous(), y[i]

    return Data(*prep(train), *prep(val), *prep(test), "digits")


def make_dataset(n_train=2000, n_val=500, n_test=500, classes=CLASSES, size=16, seed=0) -> Data:
    """The generated task (``--data synthetic``): images = a class template, randomly
    shifted, scaled and offset, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = F.avg_pool2d(torch.randn(classes, 3, size + 8, size + 8, generator=gen), 5, 1, 2)

    def sample(n):
        labels = torch.randint(0, classes, (n,), generator=gen)
        dx, dy = torch.randint(0, 9, (2, n), generator=gen)
        crops = torch.stack([templates[c, :, y:y + size, x:x + size] for c, x, y in zip(labels, dx, dy)])
        scale = torch.rand(n, 1, 1, 1, generator=gen) * 2 + 0.5
        offset = torch.randn(n, 1, 1, 1, generator=gen)
        images = crops * scale + offset + 0.3 * torch.randn(crops.shape, generator=gen)
        return images, labels

    return Data(*sample(n_train), *sample(n_val), *sample(n_test), "synthetic")


def small_cnn(norm: str, in_channels=1, classes=CLASSES, width=32, num_groups=8) -> nn.Module:
    """Four 3x3 conv + norm + ReLU blocks (two of them stride 2), global average
    pooling and a linear classifier. The wsbcn norms apply the ReLU themselves."""
    import wsbcn

    if norm == "wsc_gn":
        def conv(*args, **kwargs):
            return wsbcn.WSConv2d(*args, standardize="center", **kwargs)
    else:
        conv = wsbcn.WSConv2d if norm.startswith("ws_") else nn.Conv2d
    norms = {
        "bn": lambda c: nn.BatchNorm2d(c),
        "gn": lambda c: nn.GroupNorm(num_groups, c),
        "ws_gn": lambda c: wsbcn.GroupNorm(num_groups, c, activation="relu"),
        "wsc_gn": lambda c: wsbcn.GroupNorm(num_groups, c, activation="relu"),
        "ws_bcn": lambda c: wsbcn.BatchChannelNorm2d(c, num_groups=num_groups, estimate=True, activation="relu"),
        "ws_bcn_batch": lambda c: wsbcn.BatchChannelNorm2d(c, num_groups=num_groups, estimate=False,
                                                           activation="relu"),
    }
    fused = norm not in ("bn", "gn")
    layers, c_in = [], in_channels
    for c_out, stride in ((width, 1), (width * 2, 2), (width * 2, 1), (width * 4, 2)):
        layers += [conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), norms[norm](c_out)]
        if not fused:
            layers.append(nn.ReLU(inplace=True))
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


def accuracy(model, images, labels, batch_size=200) -> float:
    """Fraction of ``images`` classified right, in eval mode (BN and BCN use their
    running statistics), then back to training mode."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train()
    return correct / len(images)


@dataclass
class Run:
    """One training: a method at one lr and seed."""
    method: str
    lr: float
    seed: int
    val_accuracy: float = math.nan
    test_accuracy: float = math.nan
    final_loss: float = math.nan  # training loss averaged over the last 50 steps
    train_seconds: float = 0.0
    diverged_at: int | None = None  # step whose loss was not finite; training stopped there


def train_one(method, data: Data, steps, lr, seed=0) -> Run:
    """SGD with momentum 0.9 and weight decay 1e-4, the learning rate annealed from
    ``lr`` to 0 on a cosine; validation and test accuracy at the end. A diverged run
    scores 0."""
    norm, batch_size, _ = METHODS[method]
    torch.manual_seed(seed)
    model = small_cnn(norm, in_channels=data.x_train.shape[1]).to(data.x_train.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)  # the same sequence of images for every method of a batch size
    run = Run(method, lr, seed)
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data.x_train), (batch_size,), generator=gen).to(data.x_train.device)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        if not torch.isfinite(loss):
            run.diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    run.train_seconds = time.perf_counter() - start
    tail = losses[-50:]
    run.final_loss = sum(tail) / len(tail) if tail else math.nan
    if run.diverged_at is None:
        run.val_accuracy = accuracy(model, data.x_val, data.y_val)
        run.test_accuracy = accuracy(model, data.x_test, data.y_test)
        if not (math.isfinite(run.final_loss)):
            run.diverged_at = steps
    if run.diverged_at is not None:
        run.val_accuracy = run.test_accuracy = 0.0
    return run


def choose_lr(grid_runs):
    """The run with the best validation accuracy (the smaller lr on a tie)."""
    return max(grid_runs, key=lambda r: (r.val_accuracy, -r.lr))


def _pct(values):
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def results_table(methods, lrs, grid, seeds_runs) -> pd.DataFrame:
    """One row per method: batch size, chosen lr, test accuracy mean and std over the
    seeds (%), validation accuracy at the chosen lr, status."""
    rows = []
    for m in methods:
        chosen = choose_lr(grid[m])
        mean, std = _pct([r.test_accuracy for r in seeds_runs[m]])
        best_val = max(r.val_accuracy for r in grid[m])
        diverged = [r for r in seeds_runs[m] if r.diverged_at is not None]
        if best_val < NEAR_CHANCE:
            status = "near chance at every lr"
        elif diverged:
            status = f"{len(diverged)} seed(s) diverged"
        else:
            status = "ok"
        if len(lrs) > 1 and chosen.lr in (min(lrs), max(lrs)) and best_val >= NEAR_CHANCE:
            status += "; lr at the edge of the grid"  # a wider grid might do better
        rows.append({
            "method": METHODS[m][2],
            "batch": METHODS[m][1],
            "lr": chosen.lr,
            "test acc mean (%)": mean,
            "test acc std (%)": std,
            "val acc (%)": 100 * chosen.val_accuracy,
            "status": status,
        })
    return pd.DataFrame(rows)


def grid_table(methods, lrs, grid) -> pd.DataFrame:
    """Validation accuracy (%) of every method (rows) at every lr (columns), seed 0;
    "div" for a diverged run."""
    rows = []
    for m in methods:
        row = {"method": METHODS[m][2]}
        for r in grid[m]:
            row[f"lr {r.lr:g}"] = "div" if r.diverged_at is not None else f"{100 * r.val_accuracy:.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> str:
    """The results table as Markdown, test accuracy as "mean ± std"."""
    lines = ["| method | batch | lr (chosen on validation) | test accuracy (%) | status |",
             "|---|---:|---:|---:|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['method']} | {r['batch']} | {r['lr']:g} | {r['test acc mean (%)']:.1f} ± "
                     f"{r['test acc std (%)']:.1f} | {r['status']} |")
    return "\n".join(lines)


def _check(methods, steps, seeds, lrs, threads, device, data):
    """Refuse bad settings before anything trains."""
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    if data not in DATA:
        raise ValueError(f"data must be one of {DATA}, got {data!r}")
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"methods must be a non-empty selection of {tuple(METHODS)}, got {list(methods)}")
    for name, value in (("steps", steps), ("seeds", seeds), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lrs or not all(isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
                          for lr in lrs):
        raise ValueError(f"lrs must be a non-empty list of positive finite numbers, got {list(lrs)!r}")


def run(methods=tuple(METHODS), steps=600, lrs=DEFAULT_LRS, seeds=3, *, data="digits", device=None, threads=1,
        progress=True, log=print):
    """The protocol: per method, one run per lr (seed 0) scored on the validation
    split, then the best lr with ``seeds`` seeds (seed 0's run reused) scored on the
    test split. ``log`` prints the grid and the results table. Returns (table, grid
    table, {method: grid runs}, {method: seed runs})."""
    from .info import device_name, git_commit

    methods, lrs = tuple(methods), tuple(lrs)
    device = device or default_device()
    _check(methods, steps, seeds, lrs, threads, device, data)
    dataset = (load_digits_data() if data == "digits" else make_dataset()).to(device)  # MissingExtra: nothing trains
    where = device_name() if device.startswith("cuda") else "cpu"
    log(f"{dataset.name}: {len(dataset.y_train)} train / {len(dataset.y_val)} validation / {len(dataset.y_test)} "
        f"test images of {tuple(dataset.x_train.shape[1:])}; {len(methods)} methods, {steps} steps each, lrs "
        f"{' '.join(f'{lr:g}' for lr in lrs)}, {seeds} seeds; on {where}, commit {git_commit()}")
    # A micro-batch step is far too small to gain from intra-op threads; on a busy
    # machine extra threads mostly wait on each other.
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    grid, seed_runs = {}, {}
    start = time.perf_counter()
    try:
        for m in methods:
            grid[m] = []
            for lr in lrs:
                r = train_one(m, dataset, steps, lr, seed=0)
                grid[m].append(r)
                if progress:
                    print(f"{m:>10} lr {lr:g}: val {100 * r.val_accuracy:.1f} %"
                          f"{' (diverged)' if r.diverged_at is not None else ''}, {r.train_seconds:.1f} s",
                          file=sys.stderr)
            chosen = choose_lr(grid[m])
            seed_runs[m] = [chosen] + [train_one(m, dataset, steps, chosen.lr, seed=s) for s in range(1, seeds)]
            if progress:
                print(f"{m:>10} lr {chosen.lr:g}: test "
                      f"{' '.join(f'{100 * r.test_accuracy:.1f}' for r in seed_runs[m])} %", file=sys.stderr)
    finally:
        torch.set_num_threads(old_threads)
    table = results_table(methods, lrs, grid, seed_runs)
    grid_view = grid_table(methods, lrs, grid)
    log("")
    log("Validation accuracy (%) per learning rate (seed 0):")
    log(grid_view.to_string(index=False))
    log("")
    log(f"Test accuracy over {seeds} seed(s) at the chosen lr ({time.perf_counter() - start:.0f} s in all):")
    log(table.to_string(index=False, float_format=lambda v: f"{v:.2f}" if v >= 0.01 else f"{v:g}"))
    log("")
    log(markdown_table(table))
    return table, grid_view, grid, seed_runs


def _positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``wsbcn train`` (and ``python -m wsbcn.tools.train``)."""
    from .arguments import positive_int

    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the line breaks above
    p.add_argument("--data", choices=DATA, default="digits",
                   help="digits = scikit-learn's bundled handwritten digits (needs the demo extra: pip install "
                        "'wsbcn[demo]'); synthetic = a generated 10-class task (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                   help="which methods to train, in this order: bn_2 / bn_32 = BatchNorm at batch 2 / 32, gn = "
                        "GroupNorm, ws_gn = weight-standardized convs + GroupNorm, wsc_gn = centering-only WS + "
                        "GroupNorm, ws_bcn = WS + batch-channel norm with micro-batch estimates, ws_bcn_32 = WS + "
                        "BCN with batch statistics at batch 32; all but the _32 ones at batch 2 (default: all)")
    p.add_argument("--steps", type=positive_int, default=600,
                   help="SGD steps per training, the same for every method (default: %(default)s)")
    p.add_argument("--lrs", nargs="+", type=_positive_float, default=list(DEFAULT_LRS), metavar="LR",
                   help="learning-rate grid; each method's lr is the one with the best validation accuracy "
                        "(seed 0). SGD, momentum 0.9, weight decay 1e-4, cosine to 0 (default: "
                        + " ".join(f"{lr:g}" for lr in DEFAULT_LRS) + ")")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="seeds (initial weights and order of the images) trained at the chosen lr; the test "
                        "accuracy is their mean +- std (default: %(default)s)")
    p.add_argument("--device", default=default_device(),
                   help="where to train: cpu, or cuda (the Triton kernels) (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads while training; one is fastest for steps this small "
                        "(default: %(default)s)")


def run_from_args(args) -> int:
    """What ``wsbcn train`` runs with its parsed options: 1 with a message when the
    demo extra is missing."""
    try:
        run(args.methods, args.steps, args.lrs, args.seeds, data=args.data, device=args.device,
            threads=args.threads)
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wsbcn.tools.train")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
