"""Bad input: the one exception type the CLI turns into a single line on stderr and exit code 2, and the
argument parser every command line of the project uses (argparse's errors as that same single line)."""

import argparse
import signal


class UsageError(ValueError):
    """Bad input from the user: the message names what is wrong and how to fix it."""


class WeightsFileError(ValueError):
    """A weights file that cannot be used (unreadable, corrupted, of another model), with one line saying why:
    bad input like :class:`UsageError`, wherever it is raised."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit code 2 (argparse prints the usage too)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped a run at the end of a step; ``checkpoint`` holds that step (resumable). The CLI
    exits 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int, step: int, checkpoint):
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved {str(checkpoint)!r}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
