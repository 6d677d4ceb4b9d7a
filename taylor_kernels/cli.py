"""Command line: ``taylor-kernels info | demo | bench``.

Bad command lines (unknown flags, a ``--device`` that is not a usable device, an ``--out`` that
is empty or cannot be written; for ``bench`` also an invalid ``TAYLOR_KERNELS_BACKEND``) end
with one line on stderr and exit code 2, before any work starts.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line ``prog: error: ...`` (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def device_arg(text: str):
    """``--device`` value -> ``torch.device``: ``cpu``, or ``cuda[:i]`` of a visible GPU.

    Raises ``argparse.ArgumentTypeError`` (argparse reports it as one line, exit 2) otherwise.
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; use cpu or cuda[:i]") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda[:i] are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (device.index or 0) >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} visible CUDA "
                                         "device(s); use cpu")
    return device


def require_writable(path: Path, prog: str) -> None:
    """Exit 2 with one line unless a file can be written at ``path`` (creates its folder).

    Opens the file for appending (and removes it again if it did not exist), so a later write
    after a long run cannot fail on permissions, a missing folder or a folder in the way.
    """
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        print(f"{prog}: error: --out {str(path)!r} is not writable ({exc.strerror or exc})",
              file=sys.stderr)
        raise SystemExit(2)
    if not existed:
        path.unlink()


def info() -> dict:
    """Versions, devices, built backends, and which backend each op uses per device."""
    import torch

    import taylor_kernels as tk
    from taylor_kernels import _native, backends

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        forced = backends.current()
    except ValueError as exc:  # e.g. TAYLOR_KERNELS_BACKEND names no backend: say so
        forced = f"invalid: {exc}"
    from taylor_kernels.backend_table import OPS

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def backend_of(op: str, dev: str) -> str:
        try:
            return backends.resolve(torch.device(dev), op)
        except (RuntimeError, ValueError) as exc:
            return f"unavailable: {exc}"
    return {
        "taylor_kernels": tk.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton_version,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "backends_built": backends.available(), "forced_backend": forced,
        "extension_error": _native.LOAD_ERROR,
        "ops": {op: {dev: backend_of(op, dev) for dev in devices} for op in OPS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="taylor-kernels", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices and backends")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    # demo and bench take their own flags (``taylor-kernels demo --help``): passed through.
    sub.add_parser("demo", add_help=False,
                   help="train a small CNN, explain it with IG/EG/SIG, write an HTML report")
    sub.add_parser("bench", add_help=False,
                   help="run the benchmarks, print one table per family (--quick on CPUs)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            p_info.error(f"unrecognized arguments: {' '.join(rest)}")
        data = info()
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for key, value in data.items():
                print(f"{key:16s} {value}")
        return 0
    if args.command == "demo":
        from taylor_kernels.demo import main as demo_main
        return demo_main(rest)
    from taylor_kernels.benchmarks import main as bench_main
    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
