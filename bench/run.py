#!/usr/bin/env python
"""Benchmark runner: ``python bench/run.py [--quick] [--only FAMILY] [--out PATH]``.

Same as ``taylor-kernels bench``; see bench/README.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without install

from taylor_kernels.benchmarks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python bench/run.py"))
