"""The README and docs/ say what is true: every Python block of the README runs as written, every
command line in them names a real subcommand and real flags, and every relative link leads to a
file that exists."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from modlm.bench import BENCHMARKS
from modlm.cli import build_parser
from modlm.errors import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # the blocks print what they show


# ------------------------------------------------------------------------------- command lines
def _command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `modlm`) of every `modlm ...` / `-m modlm.training ...` line of a bash block."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["modlm"]:
                    found.append((f"{doc.name}: {line.strip()}", words[1:]))
                elif "modlm.training" in words and "-m" in words:  # torchrun ... -m modlm.training FLAGS
                    found.append(
                        (f"{doc.name}: {line.strip()}", ["train", *words[words.index("modlm.training") + 1 :]])
                    )
    return found


COMMAND_LINES = _command_lines()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _benchmark_parser(name: str, monkeypatch) -> ArgumentParser:
    """The parser of ``modlm bench NAME`` (caught as it prints --help)."""
    import importlib

    caught = []
    monkeypatch.setattr(ArgumentParser, "print_help", lambda self, file=None: caught.append(self))
    with pytest.raises(SystemExit):
        importlib.import_module(f"modlm.bench.{BENCHMARKS[name][0]}").parse_args(["--help"])
    return caught[0]


def test_the_readme_shows_every_main_command():
    shown = {argv[0] for _, argv in COMMAND_LINES if argv and not argv[0].startswith("-")}
    assert {"train", "generate", "convert", "adapt", "flops", "bench", "isoflop", "reproduce"} <= shown


@pytest.mark.parametrize("where, argv", COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_command_lines_name_real_commands_and_flags(where, argv, monkeypatch):
    parsers = _subparsers()
    if not argv or argv[0].startswith("-"):
        parser, flags = build_parser(), argv
    else:
        assert argv[0] in parsers, f"{where}: no subcommand {argv[0]!r}"
        parser, flags = parsers[argv[0]], argv[1:]
        if argv[0] == "bench":
            assert argv[1] in BENCHMARKS, f"{where}: no benchmark {argv[1]!r}"
            parser, flags = _benchmark_parser(argv[1], monkeypatch), argv[2:]
    known = parser._option_string_actions
    for word in flags:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{where}: {parser.prog} has no {word.split('=')[0]}"


# ---------------------------------------------------------------------------------------- links
def _links() -> list[tuple[Path, str]]:
    out = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked offline
                out.append((doc, target))
    return out


LINKS = _links()


def test_the_readme_links_its_docs():
    targets = {t for doc, t in LINKS if doc == README}
    assert {"docs/DESIGN.md", "docs/RESULTS.md"} <= {t.split("#")[0] for t in targets}


@pytest.mark.parametrize("doc, target", LINKS, ids=[f"{d.relative_to(ROOT)} -> {t}" for d, t in LINKS])
def test_relative_links_lead_to_files_and_headings(doc, target):
    path, _, anchor = target.partition("#")
    dest = (doc.parent / path).resolve() if path else doc
    assert dest.exists(), f"{doc.relative_to(ROOT)} links to {target}: no such file"
    if anchor and dest.suffix == ".md":
        # GitHub's anchors: headings lower-cased, punctuation dropped, spaces as hyphens.
        headings = re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)
        anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        assert anchor in anchors, f"{doc.relative_to(ROOT)} links to {target}: no such heading"


# -------------------------------------------------------------------------------------- figures
def _section(text: str, heading: str) -> str:
    return re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M).group(1)


def test_the_readme_results_are_copied_from_docs_results():
    summary = _section(README.read_text(), "Results")
    figures = set(re.findall(r"\d[\d.,–e+]*\d[×%σ]?|\d[×%σ]", summary))
    assert len(figures) >= 10
    sources = (ROOT / "docs" / "RESULTS.md").read_text()
    missing = sorted(f for f in figures if f not in sources)
    assert not missing, f"README's Results quote figures docs/RESULTS.md does not hold: {missing}"
