"""What every `python -m model.<tool>` shares: its defaults, its start (allocator, warnings)
and its end (expected errors as one line, no traceback).

A `PcamLensError` is printed as `error: <message and fix>` and becomes the exit code (2); Ctrl-C
prints what was kept and exits 130, the shell's code for SIGINT. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from model.core.errors import PcamLensError, one_line
from model.core.runtime import AUTO_ONNX_MIN, BACKENDS, quiet_known_warnings, tune_allocator

# The command-line default: the 8 flips/rotations of a patch averaged. A tissue patch has no
# up or left, so the views are equally valid inputs; averaging them costs 8x the compute and
# was worth +0.010 ROC AUC on the real sample (0.9363 -> 0.9462, 1,200 validation patches).
CLI_TTA = 8


def add_inference_options(p) -> None:
    """The options `model.predict` and `model.evaluate` share: how the model is run."""
    g = p.add_argument_group("inference")
    g.add_argument("--tta", type=int, default=CLI_TTA,
                   help="dihedral TTA views averaged, 1..8 (default %(default)s: every flip "
                        "and 90-degree rotation; 1 is 8x faster)")
    g.add_argument("--checkpoint", choices=["best", "last"], default="best")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model first: 15-30 s, then ~1.8x faster on a CPU; "
                        "for large sets (tens of thousands of patches)")
    add_backend_option(g)


def add_backend_option(p, what: str = "forward passes") -> None:
    """--backend, as every inference tool has it (model.evaluation.engine chooses)."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help=f"how the network runs: auto (default: onnx for a CPU fp32 job of "
                        f"{AUTO_ONNX_MIN:,}+ {what} or once the run's export exists, else "
                        "eager), eager PyTorch, torch.compile (= --compile), or onnx: ONNX "
                        "Runtime on the CPU, fp32 (exported once per run, ~15 s); falls back "
                        "to eager with a note where it cannot run")


def run_cli(body: Callable[[], int | None], *, interrupted: str = "interrupted") -> int:
    """Run `body()` (returns an exit code, or None for 0) and turn expected failures into
    a message on stderr and an exit code. Tunes the allocator first (model.core.runtime): every
    tool allocates large tensors."""
    tune_allocator()
    try:
        return body() or 0
    except PcamLensError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130


# At import, not in run_cli: the entry modules import this module first, before the libraries
# whose import raises the warnings (fastai, through the training and network modules).
quiet_known_warnings()
