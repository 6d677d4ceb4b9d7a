#!/usr/bin/env bash
# One GPU check for a fresh GPU machine with no network (bench/README.md, section GPU):
# offline wheels, CUDA build for the local arch, op benchmark, GPU-marked tests, model
# benchmarks, compute-sanitizer last; results and the measured backend table. Within 8 minutes;
# steps that fail are recorded, not fatal.  Usage: bench/gpu_check.sh [--dry-run] [--out DIR]
# [--budget S]; TK_COMMIT=<hash> records the commit where the tree has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
