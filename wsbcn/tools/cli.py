"""The ``wsbcn`` command: info | bench | autotune | plot | train | report-kernels."""
import argparse
import sys

from . import commands


def _cmd_info(args) -> int:
    from . import info

    for key, value in info.collect().items():
        print(f"{key:>18}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsbcn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="device, versions, backend and interpreter state")
    p.set_defaults(func=_cmd_info)
    commands.add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
