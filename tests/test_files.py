"""files.py: what every loader of the package reads through. Regular files only (a FIFO would block a read
forever), no code from pickles, bounded JSON, errors that name the file."""

import json
import os
import signal

import pytest
import torch

from cqil_kernels import files

from conftest import make_fifo, write_malicious_pickle


@pytest.fixture(autouse=True)
def _no_hang():
    """Every test here fails instead of hanging: SIGALRM after 20 s."""
    def hung(*_):
        raise TimeoutError("a read blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_regular_files_only(tmp_path):
    fifo = make_fifo(tmp_path / "model.safetensors")
    for read in (files.regular_file, files.read_bytes, files.read_json, files.safetensors_shapes,
                 files.load_torch_tensors, files.load_token_tensor):
        with pytest.raises(ValueError, match="is a FIFO, not a regular file"):
            read(fifo)
    with pytest.raises(ValueError, match="is a directory"):
        files.read_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        files.read_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="character device"):
        files.read_bytes("/dev/zero")
    assert not files.is_regular_file(fifo) and not files.is_regular_file(tmp_path / "missing")


def test_json_is_bounded_typed_and_named(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_bytes(os.urandom(64) + b"\xff")
    with pytest.raises(ValueError, match=f"{path}: the JSON file is not UTF-8"):
        files.read_json(path)
    for text, kind in (('"a string"', "string"), ("null", "null"), ("[1, 2]", "array")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"must hold a JSON object at the top level, got {kind}"):
            files.read_json(path)
    path.write_text("{" * 100000)
    with pytest.raises(ValueError, match="not valid JSON|nested too deeply"):
        files.read_json(path)
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 100)
    path.write_text(json.dumps({"x": "y" * 200}))
    with pytest.raises(ValueError, match="more than the 100"):
        files.read_json(path)


def test_pickles_never_run_code(tmp_path):
    marker = tmp_path / "pwned"
    write_malicious_pickle(tmp_path / "evil.bin", marker)
    with pytest.raises(ValueError, match="refused: the weight file holds objects other than tensors"):
        files.load_torch_tensors(tmp_path / "evil.bin", "weight file")
    with pytest.raises(ValueError, match="refused"):
        files.load_token_tensor(tmp_path / "evil.bin")
    assert not marker.exists()
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="dict of named tensors"):
        files.load_torch_tensors(tmp_path / "list.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "evil.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable"):
        files.load_torch_tensors(tmp_path / "cut.bin")


def test_truncated_safetensors_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(64, 64)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    for read in (files.safetensors_shapes, files.load_safetensors):
        with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file"):
            read(tmp_path / "cut.safetensors")
    assert files.safetensors_shapes(tmp_path / "ok.safetensors") == {"a": (64, 64)}


def test_paths_must_stay_inside_the_directory(tmp_path):
    assert files.inside(tmp_path, "model-00001.safetensors", "shard") == tmp_path / "model-00001.safetensors"
    (tmp_path / "sub").mkdir()
    os.symlink("/etc", tmp_path / "sub" / "out")
    for name in ("../secret.safetensors", "/dev/zero", "sub/../../x", "sub/out/passwd", "", 3):
        with pytest.raises(ValueError, match="outside the checkpoint directory|is not a file name"):
            files.inside(tmp_path, name, "shard")


def test_atomic_writes_replace_whole_files_and_directories(tmp_path):
    files.atomic_write_text(tmp_path / "a.json", "old")
    files.atomic_write_text(tmp_path / "a.json", "new")
    assert (tmp_path / "a.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")
    files.replace_directory(tmp_path / "new", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
