#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow end-to-end cases included, plus the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
