"""User-facing errors: one line naming the file or flag, the value and the fix, exit 2."""
from __future__ import annotations

import functools
import sys


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a config value).

    Command-line entry points print it as one line and exit with status 2,
    never as a traceback.
    """


def cli_entry(main):
    """Wrap a ``main(argv=None) -> int`` so that a UsageError becomes ``error: ...`` and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
