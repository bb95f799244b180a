"""Quiet by default: library output a dstune user cannot act on stays off unless ``--verbose``.

transformers prints a "Loading weights" bar for every model it loads (several per command), a GGUF
conversion bar, and warns that ``is_gradient_checkpointing`` is deprecated from inside its own code; none
of it is the user's to fix.
dstune's own progress bars and warnings are unaffected.
"""

from __future__ import annotations

import os
import sys
import warnings

from rich.console import Console


def quiet_libraries(quiet: bool = True) -> None:
    """Turns library progress bars, info logs and deprecation warnings off (``quiet``) or back on."""
    # Before tqdm is imported: it reads TQDM_* then (transformers' GGUF conversion bar).
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    else:  # --verbose: also undo what a quiet call in this process (or its parent) set
        for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.pop(name, None)
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    else:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
        warnings.filterwarnings("default", category=FutureWarning)


def output_console(**kwargs) -> Console:
    """The console dstune prints to. On a terminal, rich wraps lines to its width; into a file or a pipe
    (a CI log, ``| tee``) lines are not wrapped, so a printed path or a suggested command stays one line a
    user can copy and grep, whatever rich guesses the width to be; unless ``COLUMNS`` asks for a width."""
    kwargs.setdefault("soft_wrap", not sys.stdout.isatty() and not os.environ.get("COLUMNS"))
    return Console(**kwargs)
