"""finetune.py on tiny random models: only adapters train, the loss falls, the saved adapter applies."""

import json

import pytest
import torch

from cqil_kernels import CQILConfig, CQILLlama
from cqil_kernels.files import safetensors_metadata
from cqil_kernels.finetune import add_lora, finetune, kd_loss, save_adapter

from conftest import random_hf_model

GROUPS = CQILConfig(groups=((1, 2), (3, 4)))


def _model(cqil=GROUPS, seed=41, device="cpu"):
    return CQILLlama.from_pretrained(random_hf_model(seed=seed), cqil=cqil, device=device)


def _text(n=400, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def test_empty_grouping_and_fresh_adapters_give_zero_loss():
    model = _model(CQILConfig())
    add_lora(model, rank=4)
    assert kd_loss(model, _text()[None, :64]).item() == 0.0


def test_only_adapters_train_and_the_loss_falls():
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _text()
    with torch.no_grad():
        before = kd_loss(model, ids[None, :120]).item()
    log = finetune(model, ids, steps=40, rank=4, window=48, batch=4, lr=5e-3, seed=1)
    with torch.no_grad():
        after = kd_loss(model, ids[None, :120]).item()
    assert after < 0.7 * before, (before, after)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    state = model.state_dict()
    for key, value in base.items():  # base weights bit-identical (LoRALinear keeps them as .base)
        key = key if key in state else key.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(state[key], value), key
    assert len(log.losses) == 40


def test_training_is_reproducible():
    runs = []
    for _ in range(2):
        model = _model()
        runs.append(finetune(model, _text(), steps=5, rank=2, window=32, batch=2, seed=3).losses)
    assert runs[0] == runs[1]


def test_saved_adapter_applies_and_peft_reads_it(tmp_path):
    peft = pytest.importorskip("peft")
    model = _model()
    finetune(model, _text(), steps=10, rank=4, window=48, batch=2, lr=5e-3, seed=2)
    save_adapter(model, tmp_path, base_name="tiny")
    ids = _text(30, seed=9)[None]
    with torch.no_grad():
        expected = model(ids)
    loaded = CQILLlama.from_pretrained(random_hf_model(seed=41), lora=tmp_path, device="cpu")
    assert loaded.cqil == GROUPS  # the grouping comes with the adapter
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, atol=1e-5, rtol=1e-5)
    hf = peft.PeftModel.from_pretrained(random_hf_model(seed=41), tmp_path).merge_and_unload()
    loaded.cqil = CQILConfig()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no CQIL groups"):
        finetune(_model(CQILConfig()), _text(), steps=1)
    with pytest.raises(ValueError, match="fewer than one training window"):
        finetune(_model(), _text(20), steps=1, window=32)
    with pytest.raises(ValueError, match="rank must be"):
        finetune(_model(), _text(), steps=1, rank=0, window=32)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(_model(), tmp_path)
    with pytest.raises(ValueError, match="schedule must be"):
        finetune(_model(), _text(), steps=1, window=32, schedule="linear")
    with pytest.raises(ValueError, match="warmup must be"):
        finetune(_model(), _text(), steps=3, window=32, warmup=4)
    with pytest.raises(ValueError, match="learning rate must be"):
        finetune(_model(), _text(), steps=3, window=32, lr=0.0)


def test_cli_finetune_end_to_end(tmp_path, capsys):
    from cqil_kernels.cli import main

    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "text.pt")
    torch.save(ids.flip(0), tmp_path / "held_out.pt")
    CQILConfig(groups=((4, 5), (6, 7))).save(tmp_path / "groups.json")
    args = ["finetune", "tiny", "--cqil", str(tmp_path / "groups.json"), "--text", str(tmp_path / "text.pt"),
            "--eval-text", str(tmp_path / "held_out.pt"), "--steps", "3", "--lora-rank", "2", "--window", "64",
            "--batch", "2", "--out", str(tmp_path / "adapter"), "--autocast", "bfloat16", "--recompute", "on",
            "--eval-tokens", "200"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "grouped, after" in printed and "first 200 of 300 tokens" in printed
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    csv = (tmp_path / "adapter" / "train_log.csv").read_text().splitlines()
    assert csv[0] == "step,kd_loss" and len(csv) == 4
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "adapter" / "loss.png").stat().st_size > 1000
    except ImportError:
        pass
    assert CQILConfig.load(tmp_path / "adapter" / "cqil.json").groups == ((4, 5), (6, 7))
    assert main(args) == 2  # the output directory exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(args[:-1] + ["32", "--overwrite"]) == 2
    assert "less than one --window" in capsys.readouterr().err


def test_resume_reaches_the_same_weights(tmp_path):
    full = _model()
    finetune(full, _text(), steps=8, rank=2, window=32, batch=2, seed=4)
    first = _model()
    finetune(first, _text(), steps=8, rank=2, window=32, batch=2, seed=4, checkpoint=tmp_path / "ck.st",
             checkpoint_every=3)

    def interrupt_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    # a run interrupted at step 5 leaves the checkpoint of step 3; a fresh model resumes it to step 8
    with pytest.raises(KeyboardInterrupt):
        finetune(_model(), _text(), steps=8, rank=2, window=32, batch=2, seed=4, checkpoint=tmp_path / "ck2.st",
                 checkpoint_every=3, progress=interrupt_at_5)
    assert json.loads(safetensors_metadata(tmp_path / "ck2.st")["cqil"])["step"] == 3
    resumed = _model()
    log = finetune(resumed, _text(), steps=8, rank=2, window=32, batch=2, seed=4, checkpoint=tmp_path / "ck2.st",
                   resume=True)
    assert log.steps == list(range(1, 9))
    for key, a in full.adapters.items():
        assert torch.equal(resumed.adapters[key].lora_B, a.lora_B), key
        assert torch.equal(first.adapters[key].lora_A, a.lora_A), key
    with pytest.raises(ValueError, match="another base model"):
        finetune(_model(seed=42), _text(), steps=8, rank=2, window=32, batch=2, seed=4,
                 checkpoint=tmp_path / "ck2.st", resume=True)
    with pytest.raises(ValueError, match="same --steps"):  # the cosine schedule depends on the run's length
        finetune(_model(), _text(), steps=9, rank=2, window=32, batch=2, seed=4,
                 checkpoint=tmp_path / "ck2.st", resume=True)


def test_a_run_in_parts_ends_where_one_run_does(tmp_path):
    """until: a cosine run of 8 steps trained as steps 1-3, 4-6 and 7-8 (each part a fresh process's model,
    resumed from the checkpoint the part before left) gives the uninterrupted run's adapters bit for bit."""
    kw = dict(steps=8, rank=2, window=32, batch=2, seed=4, checkpoint=tmp_path / "ck.st")
    full = _model()
    finetune(full, _text(), **{**kw, "checkpoint": None})
    log = finetune(_model(), _text(), until=3, **kw)
    assert log.steps == [1, 2, 3] and json.loads(safetensors_metadata(tmp_path / "ck.st")["cqil"])["step"] == 3
    finetune(_model(), _text(), until=6, resume=True, **kw)
    last = _model()
    log = finetune(last, _text(), resume=True, **kw)
    assert log.steps == list(range(1, 9))
    for key, a in full.adapters.items():
        assert torch.equal(last.adapters[key].lora_A, a.lora_A), key
        assert torch.equal(last.adapters[key].lora_B, a.lora_B), key
    with pytest.raises(ValueError, match="not past it"):
        finetune(_model(), _text(), until=5, resume=True, **kw)
    with pytest.raises(ValueError, match="until must be"):
        finetune(_model(), _text(), until=9, **kw)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        finetune(_model(), _text(), until=2, **{**kw, "checkpoint": None})


def test_a_constant_schedule_can_be_extended(tmp_path):
    kw = dict(rank=2, window=32, batch=2, seed=4, schedule="constant", warmup=2)
    full = _model()
    finetune(full, _text(), steps=7, **kw)
    part = _model()
    finetune(part, _text(), steps=4, checkpoint=tmp_path / "ck.st", **kw)
    longer = _model()
    finetune(longer, _text(), steps=7, checkpoint=tmp_path / "ck.st", resume=True, **kw)
    for key, a in full.adapters.items():
        assert torch.equal(longer.adapters[key].lora_B, a.lora_B), key
    with pytest.raises(ValueError, match="same --steps"):
        finetune(_model(), _text(), steps=7, checkpoint=tmp_path / "ck.st", resume=True, **{**kw, "lr": 2e-3})


def test_learning_rate_schedule():
    from cqil_kernels.finetune import learning_rate

    lrs = [learning_rate(s, 100, 1e-3, 10) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)  # cosine to lr / 10
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert learning_rate(100, 100, 1e-3, 10, "constant") == 1e-3
    assert learning_rate(1, 1, 1e-3, 0) == 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    from cqil_kernels.finetune import gradient_checkpointing

    grads = []
    for recompute in (False, True):
        model = _model()
        torch.manual_seed(0)
        adapters = add_lora(model, rank=4)
        next(iter(adapters.values())).lora_B.data.normal_()  # non-zero adapters: gradients reach lora_A too
        model.train()
        with gradient_checkpointing(model) if recompute else torch.enable_grad():
            loss = kd_loss(model, _text()[None, :64])
            loss.backward()
        grads.append([p.grad.clone() for a in adapters.values() for p in (a.lora_A, a.lora_B)])
        assert "attend" not in vars(model.layers[0])  # the patch is undone
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bf16_autocast_and_recompute_train(device):
    """The GPU defaults (bf16 autocast + gradient checkpointing), on the CPU and on CUDA: training follows
    the fp32 run (same seed) closely, the loss falls, the adapters stay fp32, the base weights are
    untouched."""
    ids = _text()
    runs = {}
    for dtype in (None, torch.bfloat16):
        model = _model(device=device)
        base = model.layers[1].mlp.up_proj.weight.clone()
        log = finetune(model, ids, steps=40, rank=4, window=48, batch=4, lr=5e-3, seed=1,
                       autocast_dtype=dtype, recompute=True)
        runs[dtype] = (sum(log.losses[:5]) / 5, sum(log.losses[-5:]) / 5)
        assert all(a.lora_A.dtype == torch.float32 for a in model.adapters.values())
        assert torch.equal(model.layers[1].mlp.up_proj.weight, base)
    (_, last32), (first16, last16) = runs[None], runs[torch.bfloat16]
    assert last16 < 0.8 * first16, runs
    assert abs(last16 - last32) < 0.05 * last32, runs
    with pytest.raises(TypeError, match="autocast_dtype"):
        finetune(_model(), ids, steps=1, rank=2, window=32, autocast_dtype="bf16")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_live_adapters_keep_the_fused_kernels_off(device):
    """The Triton backend reads packed base weights: with live (unmerged) adapters "auto" runs the torch
    path (on CUDA the metrics after finetune() once ignored the adapters) and "triton" refuses."""
    from cqil_kernels.ops._common import triton_unavailable_reason

    model = _model(device=device)
    finetune(model, _text(), steps=3, rank=2, window=32, batch=2, lr=5e-3, seed=2)
    assert not model.accelerated()
    x = _text(8)[None].to(device)
    with torch.no_grad():
        live = model(x)
        for a in model.adapters.values():
            a.enabled = False
        assert (model(x) - live).abs().max() > 1e-4  # the adapters are in the result
        for a in model.adapters.values():
            a.enabled = True
    model.backend = "triton"
    expect = "live LoRA adapters" if triton_unavailable_reason(model.device) is None else "cannot run"
    with pytest.raises(ValueError, match=expect):
        model(x)


def test_cli_refuses_an_invalid_grouping_before_training(tmp_path, capsys):
    import json

    from cqil_kernels.cli import main

    torch.save(_text(300), tmp_path / "text.pt")
    for groups, message in (([[2, 3], [3, 4]], "overlap"), ([[30, 31]], "layer")):
        (tmp_path / "groups.json").write_text(json.dumps({"cqil_layers": groups, "d": 0}))
        out = tmp_path / "adapter"
        assert main(["finetune", "tiny", "--cqil", str(tmp_path / "groups.json"), "--text",
                     str(tmp_path / "text.pt"), "--steps", "2", "--window", "64", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # nothing written


# --------------------------------------------------------------------------------------------------
# Checkpoints that cannot run code, outputs that are replaced whole, runs that fail loudly


def _error(err: str) -> str:
    """The one error line `cqil` printed (the progress bar also writes to stderr)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _cli_args(tmp_path, out, *extra):
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "text.pt")
    CQILConfig(groups=((4, 5), (6, 7))).save(tmp_path / "groups.json")
    return ["finetune", "tiny", "--cqil", str(tmp_path / "groups.json"), "--text", str(tmp_path / "text.pt"),
            "--steps", "4", "--lora-rank", "2", "--window", "32", "--batch", "2", "--checkpoint-every", "2",
            "--out", str(out), *extra]


def test_a_crafted_checkpoint_never_runs_code(tmp_path, capsys):
    from cqil_kernels.cli import main
    from conftest import write_malicious_pickle

    out = tmp_path / "adapter"
    marker = tmp_path / "pwned"
    for folder, name in ((out, "checkpoint.pt"), (out.with_name("adapter.partial"), "checkpoint.safetensors")):
        folder.mkdir(exist_ok=True)
        write_malicious_pickle(folder / name, marker)
        assert main(_cli_args(tmp_path, out, "--resume")) == 2
        assert "a pickle can run code" in _error(capsys.readouterr().err)
        assert not marker.exists()
    with pytest.raises(ValueError, match="a pickle can run code"):
        finetune(_model(), _text(), steps=2, rank=2, window=32, checkpoint=out / "checkpoint.pt", resume=True)
    assert not marker.exists()


def test_cli_run_in_parts_writes_the_one_runs_adapter(tmp_path, capsys):
    """cqil finetune --until 1, then --resume --until 3, then --resume: OUT appears only at the end, with the
    adapter an uninterrupted run writes, byte for byte; each part's progress bar ends at the step it reached."""
    from cqil_kernels.cli import main

    one, parted = tmp_path / "one", tmp_path / "parted"
    assert main(_cli_args(tmp_path, one)) == 0
    assert main(_cli_args(tmp_path, parted, "--until", "1")) == 0
    assert "go on with --resume" in capsys.readouterr().out
    assert not parted.exists() and (tmp_path / "parted.partial" / "checkpoint.safetensors").is_file()
    assert main(_cli_args(tmp_path, parted, "--resume", "--until", "3")) == 0
    assert not parted.exists()
    assert "3/3" in capsys.readouterr().err  # the progress bar counts the run's steps, not this call's
    assert main(_cli_args(tmp_path, parted, "--resume")) == 0
    assert not (tmp_path / "parted.partial").exists()
    assert "4/4" in capsys.readouterr().err
    for name in ("adapter_model.safetensors", "adapter_config.json", "cqil.json"):
        assert (parted / name).read_bytes() == (one / name).read_bytes(), name
    assert main(_cli_args(tmp_path, tmp_path / "bad", "--until", "5")) == 2
    assert "--until must be a step in [1, --steps = 4]" in _error(capsys.readouterr().err)


def test_a_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path, capsys):
    from cqil_kernels.cli import main

    out = tmp_path / "adapter"
    assert main(_cli_args(tmp_path, out)) == 0
    checkpoint = out / "checkpoint.safetensors"
    data = checkpoint.read_bytes()
    work = out.with_name("adapter.partial")
    work.mkdir()
    (work / "checkpoint.safetensors").write_bytes(data[:len(data) // 2])
    assert main(_cli_args(tmp_path, out, "--resume")) == 2
    assert "not a readable safetensors file" in _error(capsys.readouterr().err)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(work / "checkpoint.safetensors"), metadata={"cqil": "[]"})
    with pytest.raises(ValueError, match="not a fine-tuning checkpoint this run can resume"):
        finetune(_model(), _text(), steps=2, rank=2, window=32, checkpoint=work / "checkpoint.safetensors",
                 resume=True)


def test_overwrite_replaces_the_output_whole_even_when_interrupted(tmp_path, monkeypatch, capsys):
    from cqil_kernels import cli, finetune as ft

    out = tmp_path / "adapter"
    assert cli.main(_cli_args(tmp_path, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real = ft.kd_loss
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint of step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "kd_loss", interrupted)
    assert cli.main(_cli_args(tmp_path, out, "--overwrite", "--seed", "7")) == 130
    assert "--resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old adapter, whole
    assert (out.with_name("adapter.partial") / "checkpoint.safetensors").is_file()
    monkeypatch.setattr(ft, "kd_loss", real)
    assert cli.main(_cli_args(tmp_path, out, "--resume", "--seed", "7")) == 0  # resumes the interrupted run
    assert not out.with_name("adapter.partial").exists()
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before) and after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "groups.json", "text.pt"]


def test_a_diverging_run_stops_with_an_error_and_writes_nothing(tmp_path, capsys):
    from cqil_kernels.cli import main

    out = tmp_path / "adapter"
    assert main(_cli_args(tmp_path, out, "--lr", "1e30")) == 2
    assert "loss became nan" in _error(capsys.readouterr().err)
    assert not out.exists() and not out.with_name("adapter.partial").exists()
    assert main(_cli_args(tmp_path, out, "--temperature", "0")) == 2
    assert not out.exists() and not out.with_name("adapter.partial").exists()
    model = _model()
    finetune(model, _text(), steps=2, rank=2, window=32)
    next(iter(model.adapters.values())).lora_B.data.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        save_adapter(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_output_paths_that_cannot_work_are_refused_before_training(tmp_path, capsys):
    from cqil_kernels.cli import main

    (tmp_path / "a_file").write_text("x")
    assert main(_cli_args(tmp_path, tmp_path / "a_file")) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(_cli_args(tmp_path, tmp_path / "missing" / "adapter")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_cli_args(tmp_path, tmp_path / "adapter", "--resume")) == 2
    assert "no checkpoint.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter.partial").exists()
