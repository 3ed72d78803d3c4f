"""The README opens with the two commands (install + `cqil demo`; install + tests), and CI runs exactly
the second one (.ci/run), so rewording the README cannot silently change what CI does."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_the_demo_and_the_test_commands():
    blocks = _code_blocks((ROOT / "README.md").read_text())
    demo, tests = blocks[0], blocks[1]
    assert demo.endswith("cqil demo") and "pip install" in demo and "python3 -m venv" in demo
    assert tests == "python3 -m venv .venv && . .venv/bin/activate && bash .ci/test.sh"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r'^TEST_COMMAND="(.*)"$', ci, flags=re.M).group(1)
    assert command == _code_blocks((ROOT / "README.md").read_text())[1]
    script = (ROOT / ".ci" / "test.sh").read_text()
    assert "'.[test]'" in script and "pytest" in script and "torch==2.13.0" in script


def test_readme_is_for_users():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\bissue \d+\b|\bP[0-9]\b is", text)  # no internal goal labels
    for name in re.findall(r"benchmarks/results/([\w.-]+\.json)", text):
        assert (ROOT / "benchmarks" / "results" / name).is_file(), name


def test_every_record_the_docs_cite_exists():
    text = (ROOT / "docs" / "performance.md").read_text()
    cited = set(re.findall(r"\[([a-z0-9_.-]+)\]", text)) | {n for group in re.findall(r"\[([a-z0-9_., -]+)\]", text)
                                                             for n in group.split(", ")}
    cited = {name for name in cited if "_" in name or name == "reductions"}
    assert len(cited) >= 10
    for name in cited:
        assert (ROOT / "benchmarks" / "results" / f"{name}.json").is_file(), name
