"""bench.py: the byte count behind the bandwidth figures, and refusals without a GPU."""

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cqil_kernels.bench import SHAPES, decode_step_bytes, plot
from cqil_kernels.cli import main
from cqil_kernels.config import LlamaArgs

from conftest import import_benchmark


def test_decode_step_bytes_llama7b():
    """LLaMA-7B has 6,738,415,616 parameters; a decode step reads all of them once except the embedding,
    of which it reads one row, plus the KV cache."""
    args = LlamaArgs.from_hf(dict(SHAPES["llama-7b"], model_type="llama"))
    weights = decode_step_bytes(args, torch.bfloat16, batch=1, seq=0)
    assert weights == 2 * (6_738_415_616 - 32000 * 4096 + 4096)
    kv = decode_step_bytes(args, torch.bfloat16, batch=1, seq=512) - weights
    assert kv == 2 * 32 * 32 * 512 * 128 * 2  # k and v, 32 layers, 32 heads, 512 positions, 128 dims


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the refusal without a GPU")
def test_bench_needs_a_gpu(capsys):
    assert main(["bench", "--shape", "smollm2-135m"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_bench_cut_short_keeps_the_variants_it_measured(monkeypatch, tmp_path):
    """cqil bench writes its record after every variant, with the variants still to run `pending` (a run cut by
    a timeout on the H100 at d1a3c1f lost two measured variants with its third); the whole run's record has no
    `pending`. GPU parts faked: a tiny CPU model, made-up timings."""
    from types import SimpleNamespace

    from conftest import random_hf_model as tiny_hf

    from cqil_kernels import bench

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import tables

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name="a faked GPU"))
    monkeypatch.setattr(bench, "random_hf_model", lambda shape, dtype, device: tiny_hf())
    monkeypatch.setattr(bench, "copy_bandwidth_gbps", lambda device: 1000.0)
    monkeypatch.setattr(bench, "_warm_up_gpu", lambda device: None)
    ran = []

    def measure(variant, hf, *args):
        ran.append((variant, hf is not None))
        if variant == "triton-cqil":
            raise RuntimeError("cut here")  # as a timeout's kill: what was written stays
        return dict(prefill_ms=1.0, ttft_ms=1.5, decode_ms_per_token=0.5, decode_gbps=2.0, decode_pct_of_copy=0.2)

    monkeypatch.setattr(bench, "_measure_variant", measure)
    out = tmp_path / "bench.json"
    args = ["bench", "--shape", "smollm2-135m", "--groups", "1-5:2", "--out", str(out)]
    with pytest.raises(RuntimeError, match="cut here"):
        main(args + ["--variants", "hf-compiled,triton-seq,triton-cqil"])
    record = json.loads(out.read_text())
    assert list(record["results"]) == ["hf-compiled", "triton-seq"] and record["pending"] == ["triton-cqil"]
    assert "cut short before triton-cqil" in tables.load(out)["what"]
    assert main(args + ["--variants", "hf-compiled,triton-seq"]) == 0
    record = json.loads(out.read_text())
    assert list(record["results"]) == ["hf-compiled", "triton-seq"] and "pending" not in record
    assert record["card"] == "a faked GPU" and not list(tmp_path.glob("*.part"))
    # transformers' model is let go once no hf variant is left (its weights: room for our variants' caches)
    assert ran == [("hf-compiled", True), ("triton-seq", False), ("triton-cqil", False), ("hf-compiled", True),
                   ("triton-seq", False)]


def test_ab_trees_alternates_two_builds_and_takes_medians(monkeypatch, tmp_path):
    """benchmarks/ab_trees.py runs a script once per build and round, the builds' order reversed every other
    round, the old build first on PYTHONPATH; its record holds each build's rows with the numeric cells' medians
    over the rounds and passes tables.py's checks, and the rounds compared pairwise (how often the new build was
    lower, the median difference). The script here is a stand-in writing made-up figures."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import ab_trees
    import tables

    old = tmp_path / "old"
    (old / "cqil_kernels").mkdir(parents=True)
    (old / "cqil_kernels" / "__init__.py").write_text("")
    log = tmp_path / "order.txt"
    script = tmp_path / "fake_rows.py"
    script.write_text(f"""import json, os, sys
old = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] == {str(old)!r}
out = sys.argv[sys.argv.index("--out") + 1]
with open({str(log)!r}, "a") as f:
    f.write("old " if old else "new ")
runs = len(open({str(log)!r}).read().split())
rows = [["s", "base", "none", T, (3.0 if old else 2.0) + runs / 100, 1.5] for T in (64, 512)]
json.dump(dict(title="fake", columns=["shape", "variant", "groups", "tokens", "wall", "device"], rows=rows,
               card="c"), open(out, "w"))
""")
    out = tmp_path / "ab.json"
    ab_trees.main(["--old", str(old), "--old-name", "before", "--new-name", "after", "--script", str(script),
                   "--rounds", "3", "--out", str(out), "--", "--rows", "64"])
    assert log.read_text().split() == ["old", "new", "new", "old", "old", "new"]
    record = tables.load(out)
    tables.check(record, out.name)
    assert record["columns"] == ["build", "shape", "variant", "groups", "tokens", "wall", "device"]
    # wall: 3 + run / 100 for the old build's runs 1, 4, 5 (median 3.04), 2 + run / 100 for the new's 2, 3, 6
    assert record["rows"] == [[build, "s", "base", "none", T, wall, 1.5]
                              for build, wall in (("before", 3.04), ("after", 2.03)) for T in (64, 512)]
    # paired by round: (old, new) runs (1, 2), (4, 3), (5, 6): wall new - old -0.99, -1.01, -0.99; device equal
    assert record["paired_columns"] == ["row", "column", "rounds after lower", "rounds", "median of after - before"]
    assert record["paired"] == [[f"s / base / none / {T}", column, lower, 3, diff]
                                for T in (64, 512) for column, lower, diff in (("wall", 3, -0.99), ("device", 0, 0.0))]
    with pytest.raises(SystemExit, match="no cqil_kernels"):
        ab_trees.main(["--old", str(tmp_path), "--out", str(out)])


def test_kernel_timeline_splits_the_span_into_own_and_idle_time():
    """profile_step.kernel_timeline: a kernel that starts while the one before runs (programmatic dependent
    launch) counts only its time past that one's end as its own; the device's idle time goes to the kernel
    after it; own and idle add up to the whole span."""
    profile_step = import_benchmark("profile_step")
    kernels = [("c", 25.0, 30.0), ("a", 0.0, 10.0), ("b", 8.0, 20.0), ("a", 30.0, 40.0), ("d", 31.0, 35.0)]
    rows = profile_step.kernel_timeline(kernels)
    assert rows == [["a", 2, 10.0, 10.0, 0.0], ["b", 1, 12.0, 10.0, 0.0], ["c", 1, 5.0, 5.0, 5.0],
                    ["d", 1, 4.0, 0.0, 0.0]]
    assert sum(n * (own + idle) for _, n, _, own, idle in rows) == 40.0


def test_kernel_sequence_gives_each_launch_of_a_step_its_own_row():
    """profile_step.kernel_sequence: two steps of launches a, b, a (the same name twice: a layer's GEMMs)
    -> one row per launch in order, own and idle averaged over the steps as kernel_timeline counts them;
    steps whose launches differ are an error, not a silent mix."""
    profile_step = import_benchmark("profile_step")
    kernels = [("a", 0.0, 10.0), ("b", 8.0, 20.0), ("a", 20.0, 24.0),
               ("a", 30.0, 40.0), ("b", 40.0, 46.0), ("a", 50.0, 52.0)]
    assert profile_step.kernel_sequence(kernels, 2) == [["a", 10.0, 3.0], ["b", 8.0, 0.0], ["a", 3.0, 2.0]]
    with pytest.raises(ValueError, match="not 4 steps"):
        profile_step.kernel_sequence(kernels, 4)
    with pytest.raises(ValueError, match="launch 1 of a step is b in the first step, c in another"):
        profile_step.kernel_sequence(kernels[:4] + [("c", 40.0, 46.0)] + kernels[5:], 2)


def test_loaded_device_time_replays_a_captured_step_in_batches_until_its_time_is_up(monkeypatch):
    """bench.loaded_device_ms (fakes for CUDA's graphs, streams and events: its logic on the CPU): before()
    and run() run once outside the capture and once inside it; the graph is replayed in whole batches of
    `repeats`, each replay between events, until `seconds` have passed; the median of the last batch; None
    when the capture runs out of memory."""
    from cqil_kernels import bench

    clock, log = [0.0], []
    step_ms = iter([4.0, 6.0, 5.0] * 100)

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def elapsed_time(self, end):
            return end.t - self.t

    class Graph:
        def replay(self):
            log.append("replay")
            clock[0] += next(step_ms)

    capturing = [False]

    @contextlib.contextmanager
    def graph(g, capture_error_mode="global"):
        capturing[0] = True
        try:
            yield
        finally:  # as torch's: the capture ends when its body raises
            capturing[0] = False

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    seconds = iter([0.0, 0.1, 0.2, 0.6])  # t0, then after each batch
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(seconds))

    def run():
        log.append("run, captured" if capturing[0] else "run")

    ms = bench.loaded_device_ms(run, 3, before=lambda: log.append("before"), seconds=0.5)
    # graphs' capture (_CapturedLazily) replays the graph once as it is captured, untimed
    assert log[:5] == ["before", "run", "before", "run, captured", "replay"]
    assert log.count("replay") == 10 and log[5:] == (["sync"] + ["replay"] * 3 + ["sync"]) * 3
    assert ms == 5.0

    def out_of_memory():
        if capturing[0]:
            raise torch.OutOfMemoryError("no room for the graph")

    with pytest.warns(RuntimeWarning, match="no memory to capture"):
        assert bench.loaded_device_ms(out_of_memory, 3) is None


def test_replay_regimes_time_each_regime_a_bounded_number_of_replays(monkeypatch):
    """graph_launch.replay_regimes (fakes for CUDA's events and sleeps: the loop's logic on the CPU): each
    regime runs at least `repeats` replays and stops once its time is up, before() ahead of each replay, the
    back-to-back regime in batches of `repeats` (a loop that queued replays until the host's clock ran out
    would queue thousands of an 11 ms step a second)."""
    graph_launch = import_benchmark("graph_launch")
    clock, log = [0.0], []

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    class Graph:
        def replay(self):
            log.append("replay")
            clock[0] += 5.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append("gpu sleep"))
    monkeypatch.setattr(graph_launch.time, "sleep", lambda s: log.append("host sleep"))
    rows = graph_launch.replay_regimes(Graph(), 3, before=lambda: log.append("before"), seconds=0.0)
    assert [row[0] for row in rows] == ["queued back to back", "from idle, synchronised between",
                                       "after 0.3 s of host sleep", "behind a 0.2 s GPU sleep",
                                       "behind a 20 ms GPU sleep"]
    assert all(row[1] == 5000.0 for row in rows)  # us per replay
    assert log.count("replay") == 15 and log.count("before") == 15
    assert log.count("host sleep") == 3 and log.count("gpu sleep") == 6
    assert log[:6] == ["before", "replay"] * 3


def test_plot_redraws_a_saved_record(tmp_path):
    pytest.importorskip("matplotlib")
    result = dict(prefill_ms=20.0, decode_ms_per_token=1.0, decode_gbps=300.0, decode_pct_of_copy=10.0)
    record = dict(card="a card", date="2026-12-04", commit="abc", command="cqil bench", shape="smollm2-135m",
                  groups="2-26:4", batch=1, prompt=512, new_tokens=64, dtype="bfloat16", copy_gbps=3000.0,
                  decode_step_bytes=1, floor_ms_per_token=0.1,
                  results={v: dict(result) for v in ("hf-eager", "hf-compiled", "torch", "triton-seq", "triton-cqil")})
    json.dumps(record)  # what `cqil bench --plot FILE.json` reads back
    plot(record, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_python_docs_text_makes_plain_text_and_splits_by_document(tmp_path):
    """benchmarks/python_docs_text.py (the fine-tuning text of the GPU result): reST roles, literals and
    links keep their text, headings keep their title, directives go; every tenth document is held out."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "python_docs_text.py"
    spec = importlib.util.spec_from_file_location("python_docs_text", path)
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    rst = ("The len function\n================\n\n.. function:: len(s)\n   :noindex:\n\n"
           "   Return the length of :func:`len`'s argument ``s``; see :ref:`the tutorial <tut>` and\n"
           "   `Python <https://python.org>`_.\n")
    text = docs.plain_text(rst)
    assert text == ("The len function\n\n   Return the length of len's argument s; see the tutorial and\n"
                    "   Python.\n")
    src = tmp_path / "_sources"
    for i in range(12):
        (src / f"d{i:02d}.rst.txt").parent.mkdir(parents=True, exist_ok=True)
        (src / f"d{i:02d}.rst.txt").write_text(f"document {i}\n")
    assert docs.main([str(src), str(tmp_path / "out")]) == 0
    held = (tmp_path / "out" / "held_out.txt").read_text()
    train = (tmp_path / "out" / "train.txt").read_text()
    assert "document 0\n" in held and "document 10\n" in held and "document 0\n" not in train
    assert all(f"document {i}\n" in train for i in range(1, 10)) and "document 11\n" in train


def test_ab_decode_variant_syntax(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from ab_decode import parse_variant

    assert parse_variant("base:") == ("base", {})
    assert parse_variant("x:CQIL_PREFILL_BLAS_ROWS=8,CQIL_PDL=0") == (
        "x", {"CQIL_PREFILL_BLAS_ROWS": 8, "CQIL_PDL": False})
    assert parse_variant("t:GEMM_AUTOTUNED=all") == ("t", {"GEMM_AUTOTUNED": "all"})
    assert parse_variant("h:GEMM_AUTOTUNED=32000+4096+32000,CQIL_PDL=0") == (
        "h", {"GEMM_AUTOTUNED": (4096, 32000), "CQIL_PDL": False})
    for bad in ("base", ":A=1", "x:A", "x:=1", "x:CQIL_NOPE=1", "x:CQIL_PDL=yes", "x:GEMM_AUTOTUNED=0",
                "x:GEMM_AUTOTUNED=lm_head", "x:GEMM_AUTOTUNED=", "x:GEMM_AUTOTUNED=4096+"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_ab_variants_choose_gemm_configs_apart(monkeypatch, tmp_path):
    """ab_decode.settings: a variant with GEMM_AUTOTUNED has triton.autotune choose the decode keys of those
    widths (the launcher's own timing for the others), each variant keeps its own choices across its runs, and
    the launcher's memory and tuner are put back after each."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import ab_decode
    from ab_decode import settings

    from cqil_kernels import envs
    from cqil_kernels.ops import group_gemm as G
    from cqil_kernels.ops.group_gemm import group_linear
    from cqil_kernels.reference.group_gemm import group_linear_ref

    candidates = [(16, 32, 32, 4, 3), (16, 16, 32, 4, 2)]
    monkeypatch.setattr(G._group_gemm_kernel, "configs", [G._config(*c) for c in candidates])
    monkeypatch.setattr(G, "_tunes_here", lambda x: True)
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(ab_decode, "_CHOICES", {})  # no variant's choices from an earlier test
    timed = []
    monkeypatch.setattr(G, "_graph_us", lambda launch: timed.append(1) or 2.0 + len(timed) % 2)  # 2nd faster
    tune = G._tune_decode
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU: Triton's interpreter, as CI runs it)
    x = torch.randn(1, 24, device=device)
    w20, w30 = torch.randn(1, 20, 24, device=device), torch.randn(1, 30, 24, device=device)

    def run():
        for w in (w20, w30):
            torch.testing.assert_close(group_linear(x, w), group_linear_ref(x, w), rtol=1e-5, atol=1e-5)
        return {key[1]: (c["BLOCK_N"], c["num_stages"]) for key, c in G._CHOSEN.items()}
    with envs.overridden(CQIL_CACHE_DIR=str(tmp_path)):
        for timings in [(2, 4), (4, 4)]:  # the second round: each variant's choices kept, nothing timed again
            with settings({"GEMM_AUTOTUNED": (20,)}):
                chosen = run()
            assert chosen[30] == (16, 2) and chosen[20] in [(32, 3), (16, 2)] and len(timed) == timings[0]
            assert G._CHOSEN == {} and G._tune_decode is tune
            with settings({}):
                assert run() == {20: (16, 2), 30: (16, 2)} and len(timed) == timings[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_ab_prefill_needs_a_gpu_and_parses_variants(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from ab_prefill import main

    with pytest.raises(SystemExit, match="CUDA"):
        main(["--variant", "kernels:CQIL_PREFILL_BLAS_ROWS=0", "--variant", "blas:CQIL_PREFILL_BLAS_ROWS=1"])
    with pytest.raises(SystemExit):  # argparse: a malformed variant
        main(["--variant", "blas"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_prefill_rows_needs_a_gpu_and_parses_variants(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from prefill_rows import main

    with pytest.raises(SystemExit, match="CUDA"):
        main(["--variant", "default:", "--variant", "kernels:CQIL_PREFILL_BLAS_ROWS=0", "--rows", "32"])
    with pytest.raises(SystemExit):  # argparse: a malformed variant
        main(["--variant", "kernels"])


def test_prefill_rows_writes_a_record_the_table_script_draws(monkeypatch, tmp_path):
    """prefill_rows.py's record (its GPU parts faked: a small CPU model, the split timings made up) holds a
    row per length, variant and grouping, and passes benchmarks/tables.py's checks."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import prefill_rows
    import tables
    from conftest import random_hf_model

    from cqil_kernels import CQILLlama, bench

    small = CQILLlama.from_pretrained(random_hf_model(num_hidden_layers=6))
    small.backend = "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a faked GPU")
    monkeypatch.setattr(bench, "random_model", lambda *a, **k: small)
    monkeypatch.setattr(bench, "_warm_up_gpu", lambda *a: None)
    monkeypatch.setattr(bench, "prefill_split_ms", lambda model, ids, repeats: dict(
        wall_ms=1.0 + ids.shape[1], loaded_device_ms=None if ids.shape[1] == 3 else 0.6, rested_ms=0.75,
        device_ms=0.5, host_ms=2.0, eager_ms=3.0, graph_host_ms=0.25))  # 3 tokens: the loaded graph did not fit
    out = tmp_path / "rows.json"
    prefill_rows.main(["--shape", "smollm2-135m", "--groups", "1-5:2", "--variant", "base:", "--rows", "3",
                       "--rows", "7", "--rounds", "1", "--repeats", "1", "--out", str(out)])
    record = tables.load(out)
    tables.check(record, out.name)
    assert [row[1:6] for row in record["rows"]] == [["base", "none", 3, 4.0, None], ["base", "1-5:2", 3, 4.0, None],
                                                    ["base", "none", 7, 8.0, 0.6], ["base", "1-5:2", 7, 8.0, 0.6]]
    assert record["card"] == "a faked GPU"


def test_ab_settings_set_and_restore(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from ab_decode import settings

    from cqil_kernels import envs

    before = envs.get("CQIL_PREFILL_BLAS_ROWS")
    with pytest.raises(RuntimeError):
        with settings({"CQIL_PREFILL_BLAS_ROWS": 3}):
            assert envs.get("CQIL_PREFILL_BLAS_ROWS") == 3
            raise RuntimeError("a failed run")
    assert envs.get("CQIL_PREFILL_BLAS_ROWS") == before


def test_every_result_is_a_record_the_table_script_draws(monkeypatch, capsys):
    """Each figure the docs cite is a record in benchmarks/results/ with its card, date, commit and command;
    benchmarks/tables.py draws them all."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import tables

    files = sorted(tables.RESULTS.glob("*.json"))
    assert files and all(p.suffix == ".json" for p in tables.RESULTS.iterdir())
    for path in files:
        record = tables.load(path)
        for key in tables.META:
            assert record.get(key) not in (None, "") or key in record["columns"], (path.name, key)
    tables.main([])
    drawn = capsys.readouterr().out
    assert drawn.count("source: ") == len(files) and drawn.count("**") == 2 * len(files)
    with pytest.raises(ValueError, match="no commit"):
        tables.check(dict(title="t", what="w", columns=["a"], rows=[[1]], source="s", card="c", date="d",
                          command="x"), "bad.json")


def test_ttft_times_the_first_token_of_both_generates():
    """The two calls `cqil bench` times as time to first token run and give one token per row."""
    from conftest import random_hf_model

    from cqil_kernels import CQILLlama
    from cqil_kernels.bench import ttft_ms

    hf = random_hf_model(seed=3)
    model = CQILLlama.from_pretrained(hf)
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    seen = []

    def ours():
        seen.append(model.generate(ids, 1)[:, -1].cpu())

    def theirs():
        seen.append(hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                pad_token_id=0)[:, -1].cpu())

    assert ttft_ms(ours, 3) > 0 and ttft_ms(theirs, 3) > 0
    assert len(seen) == 8 and all(t.shape == (2,) for t in seen)
    assert torch.equal(seen[0], seen[4])  # the same greedy token: the same model


def test_layer_slope_shard_shapes(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from layer_slope import shard_overrides

    from cqil_kernels.bench import shape_args

    over = shard_overrides("llama-7b", 4, 2)
    assert over == dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, intermediate_size=2752,
                        head_dim=128)
    args = shape_args("llama-7b", **over)
    assert (args.hidden_size, args.num_attention_heads, args.head_dim, args.num_hidden_layers) == (4096, 8, 128, 2)
    with pytest.raises(SystemExit, match="divide by tp=3"):
        shard_overrides("llama-7b", 3, 2)


def test_random_model_overrides():
    from cqil_kernels.bench import random_model

    model = random_model("smollm2-135m", torch.float32, torch.device("cpu"), num_hidden_layers=1,
                         intermediate_size=64)
    assert model.args.num_hidden_layers == 1 and len(model.layers) == 1
    assert model.args.intermediate_size == 64 and model.args.hidden_size == 576


def test_hf_compiled_runner_matches_generate():
    """The hf-compiled variant's loop (StaticCache, compiled forward; dynamo without code generation here)
    gives transformers' own greedy tokens."""
    from conftest import random_hf_model

    from cqil_kernels.bench import HFCompiled

    hf = random_hf_model(seed=3, num_hidden_layers=2)
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                       pad_token_id=0)[:, 7:]
    runner = HFCompiled(hf, 2, 12, mode=None, backend="eager")
    keys = [layer.keys for layer in runner.cache.layers]  # allocated before any compiled call, never again
    assert all(k.shape == (2, hf.config.num_key_value_heads, 12, 8) for k in keys)  # head_dim 48 / 6
    for _ in range(2):  # the second prompt starts from a reset cache
        toks = [runner.prefill(ids)]
        for _ in range(4):
            toks.append(runner.step(toks[-1]))
        assert torch.equal(torch.stack(toks, 1), want)
        assert all(layer.keys is k for layer, k in zip(runner.cache.layers, keys))
    runner.step(toks[-1])  # position 11, the cache's last
    with pytest.raises(ValueError, match="holds 12 positions; 12 \\+ 1 do not fit"):
        runner.step(toks[-1])
