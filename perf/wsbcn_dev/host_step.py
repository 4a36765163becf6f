"""Host time of one eager ResNet-50 training step (forward + backward) with wsbcn's WS
and BCN, against the floor's, over the stub CUDA driver (issue 22, item 4).

    python perf/wsbcn_dev/host_step.py [--rounds 21] [--calls 5] [--batch-size 2] [--image-size 32]

Why not against plain BN: torch's CPU build has no CUDA BatchNorm to time. Instead four
models of one topology (models.ResNet: 53 convs, 53 norm layers, avgpool and fc):

  base                  stub convs, norm layers nn.Identity, no WS;
  floor                 stub convs whose weight first goes through host_bench.Floor with
                        (1, 1) launches (WS), and norms that are host_bench.Floor with
                        (3, 3) launches saving x and 4 affine parameters (BCN);
  wsbcn_ws_bcn          wsbcn.WSConv2d (per-layer WS) + wsbcn.BatchChannelNorm2d
                        (training, batch statistics), fp32;
  wsbcn_ws_bcn_modelws  the same under wsbcn.ModelWeightStandardizer (one WS launch
                        each way for all 53 weights).

The stub conv: on CPU tensors a real convolution would compute, and its time would
drown the host time. Every model's convs are an autograd Function that allocates its
output (shape from the conv formula) and, backward, both gradients (empty_like), with
1 launch forward and 2 backward of host_bench's empty kernel, as cuDNN would launch.
Activations are then uninitialized memory in every model alike (flush-denormal on, so
ReLU, max-pool and residual adds do not slow on denormals; one torch thread, so all
work stays on the timed thread). Gradients are set to None outside the timed span.

and three with WS alone (norm layers nn.Identity), for issue 22's item 3 (model-wide
WS of the 53 weights at <= 3 per-layer WS floors):

  ws_floor              stub convs whose weight first goes through host_bench.Floor (WS);
  wsbcn_ws              wsbcn.WSConv2d, per-layer WS;
  wsbcn_ws_modelws      the same under wsbcn.ModelWeightStandardizer;
  ws_node_floor         stub convs whose weights all go through ONE autograd node first
                        (NodeFloor: 53 inputs and outputs, W_hat and dW as views of one
                        buffer each way, 1 + 1 launches, no checks), handed over as
                        ModelWeightStandardizer does: the least any one-node design pays.

Subtracting base leaves the norm + WS host work: per layer (T - T_base) / 53 for
wsbcn and for the floor, and their ratio (T - T_base) / (T_floor - T_base); the
whole-step ratio T / T_floor also carries the shared rest (stub convs, ReLU, adds,
pooling, fc, cross-entropy, autograd's engine). WS alone: (T - T_base) of the 53
weights in per-layer WS floors, (T_ws_floor - T_base) / 53 each; the weights'
AccumulateGrad nodes and the driver of the backward are in base too, so this is what
WS adds to a step. The clock is the calling thread's CPU
time (time.thread_time_ns: autograd runs backward on the caller over the stub, and
other processes do not move it); medians over rounds of the four models interleaved
(host_bench.time_host). Launches per step are counted by the stub. Run from the
checkout; TRITON_INTERPRET is dropped (triton picks interpreter or compiler when
kernels are defined). Over the stub nothing executes; see docs/benchmarks.md, "Host
time", for what the stub cannot see.
"""
import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as host_bench (silences triton 3.9's warning)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import wsbcn  # noqa: E402
from wsbcn import backends  # noqa: E402
from wsbcn.tools.host_bench import Floor, floor_launcher, time_host  # noqa: E402
from wsbcn.kernels.ws_multi_plan import PackLayout  # noqa: E402
from wsbcn.tools.models import ResNet  # noqa: E402
from wsbcn_dev import GPU_NAME, SM_COUNT, stub_driver  # noqa: E402

MODELS = ("base", "floor", "wsbcn_ws_bcn", "wsbcn_ws_bcn_modelws", "ws_floor", "wsbcn_ws", "wsbcn_ws_modelws",
          "ws_node_floor")
CONV_LAUNCHES, WS_LAUNCHES, BCN_LAUNCHES = (1, 2), (1, 1), (3, 3)  # (forward, backward)
NUM_GROUPS = 32


class StubConv(torch.autograd.Function):
    """A convolution's host side without its compute: outputs, gradients, launches."""

    @staticmethod
    def forward(ctx, launch, x, weight, stride, padding, dilation):
        size = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                for s, k, st, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
        out = x.new_empty((x.shape[0], weight.shape[0], *size))
        ctx.launch = launch
        ctx.save_for_backward(x, weight)
        launch(CONV_LAUNCHES[0], out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = torch.empty_like(x), torch.empty_like(weight)
        ctx.launch(CONV_LAUNCHES[1], grad_x)  # data gradient and weight gradient
        return None, grad_x, grad_w, None, None, None


class _Stub:
    launch = None  # the floor launcher, set on each instance (build_model)

    def _conv_forward(self, input, weight, bias):
        return StubConv.apply(self.launch, input, weight, self.stride, self.padding, self.dilation)


class StubConv2d(_Stub, nn.Conv2d):
    pass


class StubWSConv2d(_Stub, wsbcn.WSConv2d):
    pass


class FloorWSConv2d(StubConv2d):
    def forward(self, input):
        return self._conv_forward(input, Floor.apply(self.launch, WS_LAUNCHES, self._parameters["weight"]), None)


class NodeFloor(torch.autograd.Function):
    """One node for all weights: views of one fresh buffer each way, one launch each way."""

    @staticmethod
    def forward(ctx, launch, layout, *weights):
        ctx.launch, ctx.layout = launch, layout
        ctx.save_for_backward(*weights)
        flat = weights[0].new_empty(layout.numel)
        launch(1, flat)
        return layout.views(flat)

    @staticmethod
    def backward(ctx, *grads):
        flat = grads[0].new_empty(ctx.layout.numel)
        ctx.launch(1, flat)
        return (None, None, *ctx.layout.views(flat))


class NodeFloorConv2d(StubConv2d):
    hat = None  # set by node_floor_hook for one forward

    def forward(self, input):
        hat, self.hat = self.hat, None
        return self._conv_forward(input, hat, None)


def node_floor_hook(convs, launch):
    """A forward pre-hook that runs NodeFloor over ``convs``' weights and hands out W_hat."""
    weights = [m._parameters["weight"] for m in convs]
    layout = PackLayout([tuple(w.shape) for w in weights], [tuple(w.stride()) for w in weights])

    def hook(module, args):
        for m, hat in zip(convs, NodeFloor.apply(launch, layout, *[m._parameters["weight"] for m in convs])):
            m.hat = hat

    return hook


class FloorNorm(nn.Module):
    """BCN's floor: saves x and BCN's 4 affine parameters, 3 + 3 launches."""

    launch = None

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.group_weight = nn.Parameter(torch.ones(1, NUM_GROUPS, 1))
        self.group_bias = nn.Parameter(torch.zeros(1, NUM_GROUPS, 1))

    def forward(self, x):
        p = self._parameters
        return Floor.apply(self.launch, BCN_LAUNCHES, x, p["weight"], p["bias"], p["group_weight"], p["group_bias"])


def build_model(name, launch, layers):
    ws_conv = partial(StubWSConv2d, eps=1e-5, correction=1, eps_mode="std")  # as models.resnet50
    identity = lambda c: nn.Identity()  # noqa: E731
    conv, norm = {"base": (StubConv2d, identity), "floor": (FloorWSConv2d, FloorNorm),
                  "wsbcn_ws_bcn": (ws_conv, partial(wsbcn.BatchChannelNorm2d, num_groups=NUM_GROUPS)),
                  "wsbcn_ws_bcn_modelws": (ws_conv, partial(wsbcn.BatchChannelNorm2d, num_groups=NUM_GROUPS)),
                  "ws_floor": (FloorWSConv2d, identity), "wsbcn_ws": (ws_conv, identity),
                  "wsbcn_ws_modelws": (ws_conv, identity), "ws_node_floor": (NodeFloorConv2d, identity)}[name]
    net = ResNet(layers=layers, conv=conv, norm=norm).train()
    for m in net.modules():
        if isinstance(m, (_Stub, FloorNorm)):
            m.launch = launch
    if name.endswith("_modelws"):
        wsbcn.ModelWeightStandardizer(net)
    if name == "ws_node_floor":
        net.register_forward_pre_hook(node_floor_hook([m for m in net.modules() if isinstance(m, _Stub)], launch))
    return net


def expected_launches(name, convs):
    """Launches of one step with ``convs`` conv + norm pairs: the stub convs', plus WS's
    and BCN's (or their floors'); model-wide WS makes one launch each way."""
    ws = 0 if name == "base" else 2 if name.endswith(("_modelws", "_node_floor")) else convs * sum(WS_LAUNCHES)
    bcn = 0 if name in ("base", "ws_floor", "wsbcn_ws", "wsbcn_ws_modelws", "ws_node_floor") else convs * sum(
        BCN_LAUNCHES)
    return convs * sum(CONV_LAUNCHES) + ws + bcn


def run(rounds=21, calls=5, batch_size=2, image_size=32, layers=(3, 4, 6, 3), warmup=3, log=print):
    """Times the four models' steps; returns a dict (see main's --json)."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stub_driver.install()
    backends.emulate_gpu(GPU_NAME, SM_COUNT)
    launch = floor_launcher("cpu")
    x = torch.randn(batch_size, 3, image_size, image_size)
    target = torch.randint(0, 1000, (batch_size,))
    models = {name: build_model(name, launch, layers) for name in MODELS}
    layer_count = sum(isinstance(m, nn.Conv2d) for m in models["base"].modules())
    params = [p for net in models.values() for p in net.parameters()]

    def clear_grads():
        for p in params:
            p.grad = None

    steps = {name: (lambda net=net: F.cross_entropy(net(x), target).backward()) for name, net in models.items()}
    launches = {}
    for name, step in steps.items():
        for _ in range(warmup):  # the first step compiles wsbcn's kernels for sm_90
            clear_grads()
            step()
        clear_grads()
        before = stub_driver.launch_count()
        step()
        launches[name] = stub_driver.launch_count() - before
    times = time_host(list(steps.values()), clear_grads, rounds, calls, time.thread_time_ns)
    t = {name: p50 for name, (p50, _, _) in zip(MODELS, times)}
    result = dict(batch_size=batch_size, image_size=image_size, layers=list(layers), layer_count=layer_count,
                  rounds=rounds, calls=calls, device=f"cpu (stub driver, emulating {GPU_NAME})",
                  torch=torch.__version__, triton=triton.__version__,
                  models={name: dict(step_ms=t[name], step_ms_p20=times[i][1], step_ms_p80=times[i][2],
                                     launches=launches[name], expected_launches=expected_launches(name, layer_count))
                          for i, name in enumerate(MODELS)})
    floor_us = (t["floor"] - t["base"]) / layer_count * 1e3
    for name in ("wsbcn_ws_bcn", "wsbcn_ws_bcn_modelws"):
        result["models"][name].update(per_layer_us=(t[name] - t["base"]) / layer_count * 1e3,
                                      floor_per_layer_us=floor_us,
                                      ratio_to_floor=(t[name] - t["base"]) / (t["floor"] - t["base"]),
                                      step_ratio_to_floor=t[name] / t["floor"])
    ws_floor_us = (t["ws_floor"] - t["base"]) / layer_count * 1e3  # one per-layer WS floor
    for name in ("wsbcn_ws", "wsbcn_ws_modelws", "ws_node_floor"):
        result["models"][name].update(ws_us=(t[name] - t["base"]) * 1e3, ws_floor_us=ws_floor_us,
                                      # no ratio to a floor lost in the noise (a small model, few rounds)
                                      ws_floors=(t[name] - t["base"]) * 1e3 / ws_floor_us if ws_floor_us > 0
                                      else float("nan"))
    log(f"ResNet layers {tuple(layers)}: {layer_count} convs + {layer_count} norms, N={batch_size}, "
        f"{image_size}x{image_size}, fp32; {rounds} rounds x {calls} calls, thread CPU time; "
        f"torch {torch.__version__}, triton {triton.__version__}, stub driver emulating {GPU_NAME}")
    log(f"{'model':<22} {'step ms':>8} {'p20':>7} {'p80':>7} {'launches':>9}  {'WS+BCN us/layer':>16} "
        f"{'floor us/layer':>15} {'ratio':>6} {'step/floor':>10}")
    for name, row in result["models"].items():
        mark = "" if row["launches"] == row["expected_launches"] else f" (expected {row['expected_launches']})"
        extra = (f"  {row['per_layer_us']:16.1f} {row['floor_per_layer_us']:15.1f} {row['ratio_to_floor']:6.2f} "
                 f"{row['step_ratio_to_floor']:10.2f}") if "per_layer_us" in row else ""
        log(f"{name:<22} {row['step_ms']:8.2f} {row['step_ms_p20']:7.2f} {row['step_ms_p80']:7.2f} "
            f"{row['launches']:9d}{extra}{mark}")
    for name in ("wsbcn_ws", "wsbcn_ws_modelws", "ws_node_floor"):
        row = result["models"][name]
        log(f"WS alone, {name}: {row['ws_us']:.0f} us per step = {row['ws_floors']:.1f} per-layer WS floors "
            f"({row['ws_floor_us']:.1f} us each) for {layer_count} weights")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=21, help="rounds; the four models interleaved in each")
    p.add_argument("--calls", type=int, default=5, help="steps per model per round")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--layers", type=int, nargs=4, default=[3, 4, 6, 3], help="blocks per stage (ResNet-50: 3 4 6 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (the first compiles)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    result = run(args.rounds, args.calls, args.batch_size, args.image_size, tuple(args.layers), args.warmup)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    mismatched = [n for n, r in result["models"].items() if r["launches"] != r["expected_launches"]]
    if mismatched:
        print(f"host_step: launch counts differ from the expected ones for {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
