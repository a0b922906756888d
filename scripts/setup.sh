#!/usr/bin/env bash
# Set up tvbasis on a fresh machine: system data packages, a virtualenv, the package and its extras.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real labelled data for the text suite (Debian packages); see docs/data.md.
DEBS=(wordnet-base fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs fortunes-eo)
if command -v apt-get >/dev/null 2>&1 && ! dpkg -s "${DEBS[@]}" >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${DEBS[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch 2.13.0 is the CPU build these machines carry locally; other versions download gigabytes.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[dev,text,plots,distributed,peft,remote,vision]"
