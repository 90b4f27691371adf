"""The command lines' argument parser: argparse's, with a usage error in one line on stderr
("<prog>: error: <problem> (--help lists the options)") and exit status 2, and a check that
an output path can be written before any work starts."""
import argparse
import sys


from .io import write_problem


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (--help lists the options)", file=sys.stderr)
        raise SystemExit(2)

    def check_writable(self, flag, path):
        """A usage error when nothing can be written at `path` (given as `flag`)."""
        problem = write_problem(path)
        if problem:
            self.error(f"{flag} {path}: cannot write there ({problem})")
