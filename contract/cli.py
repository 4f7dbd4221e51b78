"""argparse as hff-train, hff-export and hff-serve use it: one-line errors, useful defaults."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; we print one line that says what was wrong."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it says something: not for None (the help says what
    happens then) nor for on/off switches."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)
