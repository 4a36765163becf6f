"""Package a WS+BCN model for inference with AOTInductor and check it against eager.

    python perf/tools/aoti_package.py                  # ResNet-50 WS+BCN, N=2, 224^2, on CUDA
    python perf/tools/aoti_package.py --model tiny --device cpu   # a small net, for a CPU check

torch.export keeps every wsbcn layer as its op (wsbcn::ws_forward, norm_forward);
``torch._inductor.aoti_compile_and_package`` then traces into the ops (they are
torch.library.triton_ops): on CUDA it compiles the wsbcn Triton kernels into the
package, on CPU the ops' torch closed form. The package is loaded back and its outputs
compared with eager's. Prints one line per check and exits non-zero on a mismatch.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import wsbcn
from wsbcn.tools import models


def build(name, device):
    torch.manual_seed(0)
    if name == "tiny":
        model = torch.nn.Sequential(
            wsbcn.WSConv2d(3, 16, 3, padding=1, bias=False), wsbcn.BatchChannelNorm2d(16, num_groups=4, activation="relu"),
            wsbcn.WSConv2d(16, 16, 3, padding=1, bias=False), wsbcn.GroupNorm(4, 16, activation="silu"))
        size = 16
    else:
        model = models.resnet50("wsbcn_ws_bcn")
        size = 224
    model = model.to(device)
    with torch.no_grad():  # running estimates that are not the initial ones
        model.train()(torch.randn(4, 3, size, size, device=device))
    return model.eval(), size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet50", "tiny"), default="resnet50")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="input and parameter dtype of the packaged model")
    parser.add_argument("--out", type=Path, default=None, help="where to write the .pt2 package (default: a temp dir)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model, size = build(args.model, args.device)
    model = model.to(dtype)
    x = torch.randn(args.batch_size, 3, size, size, device=args.device, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
    ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("wsbcn.")})
    print(f"exported: {sum(str(n.target).startswith('wsbcn.') for n in program.graph.nodes)} wsbcn op nodes ({', '.join(ops)})")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / f"{args.model}_ws_bcn.pt2"
        start = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        print(f"packaged in {time.perf_counter() - start:.0f} s: {package}")
        runner = torch._inductor.aoti_load_package(package)
        with torch.no_grad():
            got = runner(x)
    got = got[0] if isinstance(got, (list, tuple)) else got
    err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ok = err <= tol
    print(f"package vs eager: relative error {err:.2e} (tolerance {tol:g}) -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
