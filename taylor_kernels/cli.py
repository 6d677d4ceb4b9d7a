"""Command line: ``taylor-kernels info | demo | bench``."""
from __future__ import annotations

import argparse
import json
import platform
import sys


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
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    per_op = {}
    for dev in devices:
        try:
            per_op[dev] = backends.resolve(torch.device(dev))
        except RuntimeError as exc:
            per_op[dev] = f"unavailable: {exc}"
    return {
        "taylor_kernels": tk.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton_version,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "backends_built": backends.available(), "forced_backend": backends.current(),
        "extension_error": _native.LOAD_ERROR,
        "ops": {op: per_op for op in ("path_points", "path_accumulate")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taylor-kernels", description=__doc__)
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
