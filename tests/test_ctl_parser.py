"""orchctl's parser: the global options (--json, --yes, --socket) mean the same before and
after the subcommand, for every subcommand the parser has (walked, so new ones are in)."""

from __future__ import annotations

import argparse

import pytest

from ctl.cli import _parser, subcommand_parsers

GLOBAL = ["--json", "--yes", "--socket", "/tmp/hands-elsewhere.sock"]


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) of every subcommand that takes no further subcommand."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _leaves(sub, (*path, name))
    return out or [(path, parser)]


def _value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    return ["1"]  # parses as an int, a float, a Path and a name alike


def _minimal_args(parser: argparse.ArgumentParser) -> list[str]:
    """The arguments a subcommand needs to parse: its positionals and required options, and
    one option of each required group."""
    argv: list[str] = []
    grouped = {a for g in parser._mutually_exclusive_groups for a in g._group_actions}
    for g in parser._mutually_exclusive_groups:
        if g.required:
            first = g._group_actions[0]
            argv += [first.option_strings[0], *_value(first)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action in grouped:
            continue
        if not action.option_strings:
            argv += _value(action)
        elif action.required:
            argv += [action.option_strings[0], *_value(action)]
    return argv


LEAVES = _leaves(_parser())


def test_the_walk_finds_every_command() -> None:
    """The walk reaches the nested commands too (so the test below covers them)."""
    paths = {" ".join(p) for p, _ in LEAVES}
    assert {"status", "skip", "ws rollback", "worker shutdown", "state validate"} <= paths
    assert len(paths) == len(LEAVES) > 30


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_global_options_before_or_after_give_the_same_result(path: tuple[str, ...]) -> None:
    """Each global option, and all of them, parse to the same namespace whether given
    before the subcommand or after its arguments; given nowhere, they keep the defaults."""
    parser = _parser()
    leaf = dict(_leaves(parser))[path]
    rest = _minimal_args(leaf)
    plain = parser.parse_args([*path, *rest])
    assert plain.json is False and plain.yes is False and plain.socket
    for opts in (["--json"], ["--yes"], GLOBAL[2:], GLOBAL):
        before = parser.parse_args([*opts, *path, *rest])
        after = parser.parse_args([*path, *rest, *opts])
        assert vars(before) == vars(after), (opts, path)
        assert vars(before) != vars(plain)


def test_every_subparser_has_the_global_options() -> None:
    """Intermediate parsers (`ws`, `worker`, …) take them too: `orchctl ws --json list`."""
    for sp in subcommand_parsers(_parser()):
        assert {"--json", "--yes", "--socket"} <= set(sp._option_string_actions)


def test_skip_with_yes_after_its_arguments() -> None:
    """`orchctl skip compile --reason x --yes` parses as typed (it was a usage error)."""
    args = _parser().parse_args(["skip", "compile", "--reason", "x", "--yes"])
    assert (args.cmd, args.task, args.reason, args.yes) == ("skip", "compile", "x", True)
