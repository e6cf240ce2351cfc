"""Bad input: the one exception type the CLI turns into a single line on stderr and exit code 2, and the
argument parser every command line of the project uses (argparse's errors as that same single line)."""

import argparse


class UsageError(ValueError):
    """Bad input from the user: the message names what is wrong and how to fix it."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit code 2 (argparse prints the usage too)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
