#!/usr/bin/env bash
# One GPU check for a fresh GPU machine with no network (bench/README.md, section GPU):
# offline wheels, CUDA build for the local arch, GPU-marked tests, compute-sanitizer, op and
# model benchmarks, results and the measured backend table. Within 8 minutes; steps that fail
# are recorded, not fatal.  Usage: bench/gpu_check.sh [--dry-run] [--out DIR] [--budget S]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
