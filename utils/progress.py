"""Progress bars that show only on a terminal: written to a log file (a SLURM job, CI) a
bar's carriage-return redraws would fill it, so there it is off."""
import sys

from tqdm import tqdm


def progress_bar(iterable=None, enabled=True, **kwargs):
    """tqdm(iterable, **kwargs), disabled unless `enabled` and stderr is a terminal."""
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), **kwargs)
