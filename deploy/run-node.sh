#!/usr/bin/env bash
# The README's "run it" command: installs the node into .venv on first use
# (CPU build of torch, no CUDA download) and runs it on its embedded default:
# listener on 127.0.0.1:11112 as GLIOMANODE, index and spool in ./dicomnode-data,
# no external services. Options go to `dicomnode` before `serve`, e.g.
# --config node.toml; a first argument that is a command runs that command
# instead, e.g. `bash deploy/run-node.sh demo` (the README's "run it").
set -euo pipefail
cd "$(dirname "$0")/.."
# (re)install when the venv is new or pyproject.toml changed since (new dependencies, e.g. deepbet)
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x .venv/bin/dicomnode ] || [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e .
  rm -f .venv/.installed-* && touch "$stamp"
fi
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  exec .venv/bin/dicomnode "$@"
fi
exec .venv/bin/dicomnode "$@" serve
