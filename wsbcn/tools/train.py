"""``wsbcn train`` / ``python -m wsbcn.tools.train``: the paper's claim at small scale.

Trains the same small CNN four times, once per normalization (BN, GN, WS+GN,
WS+BCN with estimated statistics), at the same micro-batch size on a synthetic
10-class image task that it generates (no download). It measures test accuracy
as training goes, prints one comparison table at the end and saves the accuracy
curves as a PNG.
"""
import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("bn", "gn", "ws_gn", "ws_bcn")
SHORT_NAMES = {"bn": "BN", "gn": "GN", "ws_gn": "WS+GN", "ws_bcn": "WS+BCN"}  # the table's
LABELS = {  # the plot's legend
    "bn": "BN (BatchNorm)",
    "gn": "GN (GroupNorm)",
    "ws_gn": "WS+GN (weight standardization + GroupNorm)",
    "ws_bcn": "WS+BCN (weight standardization + batch-channel norm, estimated statistics)",
}
CLASSES = 10
DESCRIPTION = """\
Trains the same small CNN four times, once per normalization (BN, GN, WS+GN,
WS+BCN with estimated statistics), at the same micro-batch size on a generated
10-class image task (no download), measuring test accuracy as it goes."""
EPILOG = """\
At the end it prints one table (per norm: final and best test accuracy, the
training loss averaged over the last 50 steps, training time, ms per step) and
writes the test-accuracy curves (accuracy vs step, one line per norm) to a PNG
whose path it prints."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_plot_path(device: str) -> Path:
    """perf/plots/<device>/train.png, the device named as the other plots name it."""
    from .info import device_slug

    return Path("perf") / "plots" / (device_slug() if device.startswith("cuda") else "cpu") / "train.png"


def make_dataset(n_train=2000, n_test=500, classes=CLASSES, size=16, seed=0):
    """Images = a class template, randomly shifted, scaled and offset, plus noise.
    The per-image scale and offset are what batch statistics of 1-2 images chase."""
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

    return sample(n_train), sample(n_test)


def small_cnn(norm: str, classes=CLASSES, width=32, num_groups=8) -> nn.Module:
    """Four 3x3 conv + norm + ReLU blocks (two of them stride 2), global average
    pooling and a linear classifier. The wsbcn norms apply the ReLU themselves."""
    import wsbcn

    conv = wsbcn.WSConv2d if norm.startswith("ws_") else nn.Conv2d
    norms = {
        "bn": lambda c: nn.BatchNorm2d(c),
        "gn": lambda c: nn.GroupNorm(num_groups, c),
        "ws_gn": lambda c: wsbcn.GroupNorm(num_groups, c, activation="relu"),
        "ws_bcn": lambda c: wsbcn.BatchChannelNorm2d(c, num_groups=num_groups, estimate=True, activation="relu"),
    }
    fused = norm in ("ws_gn", "ws_bcn")
    layers, c_in = [], 3
    for c_out, stride in ((width, 1), (width * 2, 2), (width * 2, 1), (width * 4, 2)):
        layers += [conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), norms[norm](c_out)]
        if not fused:
            layers.append(nn.ReLU(inplace=True))
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


def accuracy(model, images, labels, batch_size=100) -> float:
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
    """One network's training: its test-accuracy curve and what the table shows."""
    norm: str
    curve_steps: list = field(default_factory=list)  # steps at which test accuracy was measured
    curve_accuracy: list = field(default_factory=list)  # test accuracy (fraction) at those steps
    losses: list = field(default_factory=list)  # training loss of every step
    train_seconds: float = 0.0  # wall time of the SGD steps alone, evaluations excluded
    diverged_at: int | None = None  # step whose loss was not finite; training stopped there


def train_one(norm, data, steps, batch_size, lr, seed=0, eval_every=25, device="cpu", progress=True) -> Run:
    """SGD with momentum 0.9 and weight decay 1e-4, the learning rate annealed from
    ``lr`` to 0 on a cosine; test accuracy at step 0, every ``eval_every`` steps
    and at the last step."""
    (x_train, y_train), (x_test, y_test) = [(x.to(device), y.to(device)) for x, y in data]
    torch.manual_seed(seed)
    model = small_cnn(norm).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)  # the same sequence of micro-batches for every norm
    run = Run(norm)

    def evaluate(step):
        run.curve_steps.append(step)
        run.curve_accuracy.append(accuracy(model, x_test, y_test))

    evaluate(0)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        idx = torch.randint(0, len(x_train), (batch_size,), generator=gen).to(device)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        if not torch.isfinite(loss):
            run.diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run.losses.append(loss.item())  # .item() waits for the step: the time below is the step's
        run.train_seconds += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            evaluate(step)
            if progress:
                print(f"{norm:>6} step {step}/{steps}: loss {run.losses[-1]:.3f}, test accuracy "
                      f"{100 * run.curve_accuracy[-1]:.1f} %", file=sys.stderr)
    if run.diverged_at is not None:
        evaluate(run.diverged_at)
    return run


def comparison_table(runs) -> pd.DataFrame:
    """One row per norm: the final test accuracy, the best one seen, the training
    loss averaged over the last 50 steps (one step at batch size 2 is noise), time."""
    rows = []
    for r in runs:
        tail = r.losses[-50:]
        rows.append({
            "norm": SHORT_NAMES[r.norm],
            "test accuracy (%)": 100 * r.curve_accuracy[-1],
            "best test accuracy (%)": 100 * max(r.curve_accuracy),
            "train loss (last 50 steps)": sum(tail) / len(tail) if tail else math.nan,
            "train time (s)": r.train_seconds,
            "ms per step": 1000 * r.train_seconds / max(1, len(r.losses)),
            "status": f"diverged at step {r.diverged_at}" if r.diverged_at is not None else "ok",
        })
    return pd.DataFrame(rows)


def plot_curves(runs, path, title) -> Path:
    """Test accuracy (%) against training step, one line per norm, chance dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for r in runs:
        ax.plot(r.curve_steps, [100 * a for a in r.curve_accuracy], marker=".", label=LABELS[r.norm])
    ax.axhline(100 / CLASSES, color="grey", linestyle="--", linewidth=1, label=f"chance ({CLASSES} classes)")
    ax.set_xlabel("training step (one SGD update)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)  # below the axes: never over a curve
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _check(norms, steps, batch_size, lr, eval_every, threads, device):
    """Refuse bad settings before anything trains."""
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    unknown = [n for n in norms if n not in NORMS]
    if not norms or unknown:
        raise ValueError(f"norms must be a non-empty selection of {NORMS}, got {list(norms)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def run(norms=NORMS, steps=600, batch_size=2, lr=0.02, seed=0, *, eval_every=25, device=None, threads=1,
        plot=None, progress=True, log=print):
    """Train one network per norm, ``log`` the comparison table and the plot's path.
    Returns (table, runs, plot path)."""
    from .info import device_name, git_commit

    norms = tuple(norms)
    device = device or default_device()
    _check(norms, steps, batch_size, lr, eval_every, threads, device)
    plot = Path(plot) if plot is not None else default_plot_path(device)
    where = device_name() if device.startswith("cuda") else "cpu"
    log(f"Training a small CNN on generated 10-class images ({', '.join(norms)}): {steps} steps at batch size "
        f"{batch_size}, lr {lr}, seed {seed}, on {where}")
    data = make_dataset(seed=seed)
    # A micro-batch step is far too small to gain from intra-op threads; on a busy
    # machine extra threads mostly wait on each other (measured on 2 shared cores:
    # 137 ms per BN step with 2 threads, 5 ms with 1).
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [train_one(n, data, steps, batch_size, lr, seed, eval_every, device, progress) for n in norms]
    finally:
        torch.set_num_threads(old_threads)
    table = comparison_table(runs)
    title = (f"Small CNN, generated 10-class images, batch size {batch_size}, {steps} steps, lr {lr}, seed {seed}\n"
             f"device: {where}; commit {git_commit()}")
    plot = plot_curves(runs, plot, title)
    log("")
    log(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    log("")
    log(f"Accuracy curves (test accuracy vs step): {plot.resolve()}")
    return table, runs, plot


def _positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``wsbcn train`` (and ``python -m wsbcn.tools.train``)."""
    from .commands import positive_int

    p.description = p.description or DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the line breaks above
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), metavar="NORM",
                   help="which networks to train, in this order: bn = BatchNorm, gn = GroupNorm, ws_gn = "
                        "weight-standardized convs + GroupNorm, ws_bcn = weight-standardized convs + "
                        "batch-channel norm with estimated (running) statistics (default: all four)")
    p.add_argument("--steps", type=positive_int, default=600,
                   help="SGD steps per network (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=2,
                   help="images per step, the micro-batch whose statistics BN normalizes with "
                        "(default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=0.02,
                   help="starting learning rate of SGD (momentum 0.9, weight decay 1e-4), annealed to 0 on a "
                        "cosine (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the generated data, the initial weights and the order of the micro-batches, "
                        "the same for every norm (default: %(default)s)")
    p.add_argument("--eval-every", type=positive_int, default=25,
                   help="measure test accuracy (500 held-out images) every this many steps: the points of the "
                        "curves (default: %(default)s)")
    p.add_argument("--device", default=default_device(),
                   help="where to train: cpu, or cuda (the Triton kernels) (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads while training; one is fastest for steps this small "
                        "(default: %(default)s)")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="where to write the accuracy curves (default: perf/plots/<device>/train.png under the "
                        "current directory)")


def run_from_args(args) -> int:
    """What ``wsbcn train`` runs with its parsed options."""
    run(args.norms, args.steps, args.batch_size, args.lr, args.seed, eval_every=args.eval_every,
        device=args.device, threads=args.threads, plot=args.plot)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wsbcn.tools.train")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
