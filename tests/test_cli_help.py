"""Every command's and benchmark's ``--help`` runs and shows each option's default."""

import argparse

import pytest

from modlm.bench import BENCHMARKS
from modlm.cli import build_parser, main
from modlm.errors import ArgumentParser, shown_default
from modlm.training.trainer import main as training_main


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


COMMANDS = [[]] + [[name] for name in _subcommands()] + [["bench", name] for name in BENCHMARKS]


def _help(entry, argv, monkeypatch, capsys) -> tuple[ArgumentParser, str]:
    """Run ``entry(argv + ["--help"])``; return the parser that printed its help, and the help."""
    printed = []
    print_help = ArgumentParser.print_help

    def recording(self, file=None):
        printed.append(self)
        print_help(self, file)

    monkeypatch.setattr(ArgumentParser, "print_help", recording)
    with pytest.raises(SystemExit) as e:
        entry([*argv, "--help"])
    assert e.value.code == 0
    assert len(printed) == 1
    return printed[0], capsys.readouterr().out


def _action_help(parser: ArgumentParser, action: argparse.Action) -> str:
    # The lines --help prints for this one option (argparse formats each action this way).
    return " ".join(parser._get_formatter()._format_action(action).split())


def _check_defaults(parser: ArgumentParser, out: str) -> None:
    options = [a for a in parser._actions if a.help is not argparse.SUPPRESS and a.option_strings]
    assert options
    for action in options:
        text = _action_help(parser, action)
        assert text.split()[0] in out  # the option is listed where its help is
        assert "(default: None)" not in text, text
        assert text.count("(default: ") <= 1, f"{action.option_strings[0]} states its default twice: {text}"
        if shown_default(action):  # "(default: X)", or the help's own words naming the default and X
            shows = "default" in text.lower() and str(action.default) in text
            assert shows, f"{action.option_strings[0]} hides its default: {text}"


def test_the_commands_are_all_here():
    assert {"train", "generate", "flops", "bench", "convert"} <= set(_subcommands())
    assert len(COMMANDS) == 1 + len(_subcommands()) + len(BENCHMARKS)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(["modlm", *argv]))
def test_help_runs_and_shows_defaults(argv, monkeypatch, capsys):
    parser, out = _help(main, argv, monkeypatch, capsys)
    assert out.startswith("usage: ")
    _check_defaults(parser, out)


def test_python_m_modlm_training_help_shows_defaults(monkeypatch, capsys):
    parser, out = _help(training_main, [], monkeypatch, capsys)
    assert parser.prog == "python -m modlm.training"
    _check_defaults(parser, out)


def _parser(formatter_class=argparse.HelpFormatter) -> ArgumentParser:
    p = ArgumentParser(prog="x", formatter_class=formatter_class)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to write")
    p.add_argument("--tags", action="append", default=[], help="repeatable")
    p.add_argument("--fast", action="store_true", help="go fast")
    return p


@pytest.mark.parametrize(
    "formatter_class",
    [argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter],
)
def test_defaults_are_shown_once_and_never_as_noise(formatter_class):
    text = " ".join(_parser(formatter_class).format_help().split())
    assert "optimizer steps (default: 10)" in text
    assert "learning rate (default: 0.0003)" in text  # %(default)s stays the only statement
    assert "(default 1: the machine is shared)" in text and "(default: 1)" not in text  # stated in words
    assert "--seed SEED default: 0" in text  # no help text: the default alone
    assert "where to write --tags" in text  # None: nothing
    assert "repeatable --fast" in text  # an empty list: nothing
    assert "go fast" in text and "default: False" not in text  # a flag's absence is its default
    assert text.count("default") == 4


def test_raw_description_keeps_its_layout():
    p = ArgumentParser(
        prog="x", description="line one\n  indented", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=2, help="count")
    text = p.format_help()
    assert "line one\n  indented" in text
    assert "(default: 2)" in text
