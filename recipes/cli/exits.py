"""The one place where an exception becomes an exit code and one line on stderr.

``DeepfeatError`` (what was wrong, what was received, the fix) -> ``deepfeat: error: ...`` and exit code 2; a
checkpoint refused by torch's ``weights_only`` loader -> the same, naming what it held; Ctrl+C -> exit code 130.
``--debug`` re-raises, so the full stack trace is shown.
"""

from __future__ import annotations

import pickle
import re
import sys
from collections.abc import Callable

from deepfeat.finetune.errors import DeepfeatError

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "error_line", "run_guarded"]

#: A user error (bad input, refused operation): the same code argparse uses for a bad argument.
EXIT_USAGE = 2
#: Interrupted by Ctrl+C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def error_line(message: str) -> None:
    """Print ``deepfeat: error: MESSAGE`` on stderr, as one line."""
    print(f"deepfeat: error: {' '.join(str(message).split())}", file=sys.stderr)


def _unpickling_message(exc: pickle.UnpicklingError) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"a pickled {found.group(1)!r}" if found else "pickled Python objects"
    return (f"refused to load the checkpoint: it holds {what}, and deepfeat loads checkpoints with "
            f"weights_only=True (no code runs from a file); resume only from a checkpoint written by 'deepfeat fit'")


def run_guarded(call: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``call`` and turn what it raises into an exit code (``--debug``: re-raise instead).

    Returns:
        ``call``'s exit code; 2 after a :class:`DeepfeatError` or a refused pickled checkpoint; 130 on Ctrl+C.
    """
    try:
        return call()
    except DeepfeatError as exc:
        if debug:
            raise
        error_line(str(exc))
        return EXIT_USAGE
    except pickle.UnpicklingError as exc:  # --ckpt_path: Lightning loads with torch's weights_only=True
        if debug:
            raise
        error_line(_unpickling_message(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print("deepfeat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
