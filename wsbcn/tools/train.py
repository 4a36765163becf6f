"""``wsbcn train`` / ``python -m wsbcn.train``: the paper's claim at small scale.

Trains the same small CNN with BN, GN, WS+GN and WS+BCN (micro-batch estimates)
at the same micro-batch size on a synthetic 10-class image task that it
generates (no download), then prints each one's held-out accuracy.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

NORMS = ("bn", "gn", "ws_gn", "ws_bcn")


def make_dataset(n_train=2000, n_test=500, classes=10, size=16, seed=0):
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


def small_cnn(norm: str, classes=10, width=32, num_groups=8) -> nn.Module:
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
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    model.train()
    return correct / len(images)


def train_one(norm, data, steps, batch_size, lr, seed=0, progress=True):
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = small_cnn(norm)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=f"{norm:>6} bs={batch_size}", disable=not progress, leave=False)
    diverged = False
    for _ in bar:
        idx = torch.randint(0, len(x_train), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return accuracy(model, x_test, y_test), diverged


def run(norms=NORMS, steps=600, batch_size=2, lr=0.02, seed=0, progress=True, log=print) -> dict:
    data = make_dataset(seed=seed)
    results = {}
    for norm in norms:
        results[norm], diverged = train_one(norm, data, steps, batch_size, lr, seed, progress)
        note = " (training diverged: non-finite loss)" if diverged else ""
        log(f"{norm:>6}: test accuracy {results[norm]:.3f} after {steps} steps at batch size {batch_size}{note}")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wsbcn.train", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    run(args.norms, args.steps, args.batch_size, args.lr, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
