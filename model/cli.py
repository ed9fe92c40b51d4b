"""What every `python -m model.<tool>` shares: its defaults, its start (allocator, warnings)
and its end (expected errors as one line, no traceback).

A `PcamLensError` is printed as `error: <message and fix>` and becomes the exit code (2); Ctrl-C
prints what was kept and exits 130, the shell's code for SIGINT. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from model.errors import PcamLensError, one_line
from model.runtime import quiet_known_warnings, tune_allocator

# The command-line default: the 8 flips/rotations of a patch averaged. A tissue patch has no
# up or left, so the views are equally valid inputs; averaging them costs 8x the compute and
# was worth +0.010 ROC AUC on the real sample (0.9363 -> 0.9462, 1,200 validation patches).
CLI_TTA = 8


def run_cli(body: Callable[[], int | None], *, interrupted: str = "interrupted") -> int:
    """Run `body()` (returns an exit code, or None for 0) and turn expected failures into
    a message on stderr and an exit code. Tunes the allocator first (model.runtime): every
    tool allocates large tensors."""
    tune_allocator()
    quiet_known_warnings()
    try:
        return body() or 0
    except PcamLensError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
