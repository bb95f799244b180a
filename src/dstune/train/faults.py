"""Fault injection for tests of crash safety: kill the process, or raise out-of-memory, at a named point.

``DSTUNE_FAULTS`` is a comma-separated list of ``KIND@POINT:N``:
- ``kill@step:N``   SIGKILL right after optimizer step N (between steps)
- ``kill@micro:N``  SIGKILL after the N-th micro-batch's backward pass (inside an accumulation window)
- ``kill@save:N``   SIGKILL while writing the checkpoint of step N (files written, not yet renamed)
- ``oom@step:N``    raise ``torch.OutOfMemoryError`` in the first forward pass of step N (once)
- ``oom@eval:N``    raise it in the first evaluation forward pass after step N (once)
``@rankR`` after any of them limits it to the process of rank R (``oom@step:2@rank1``): one rank failing
while the others go on, as a real fault on one device does.
Real faults (a killed node, an exhausted GPU) cannot be produced on demand in CI; each hook leaves the
process in exactly the state such a fault would, at the point where it matters.
"""

from __future__ import annotations

import os
import signal

import torch

from dstune.errors import UsageError


class Faults:
    """The faults requested for this process; each fires at most once."""

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("DSTUNE_FAULTS", "") if spec is None else spec
        self.pending: set[tuple[str, str, int]] = set()
        rank = int(os.environ.get("RANK", 0))
        for item in filter(None, (x.strip() for x in spec.split(","))):
            try:
                kind, rest, *only = item.split("@")
                point, n = rest.split(":")
                if len(only) > 1 or (only and not only[0].startswith("rank")):
                    raise ValueError(item)
                if not only or int(only[0].removeprefix("rank")) == rank:
                    self.pending.add((kind, point, int(n)))
            except ValueError:
                raise UsageError(
                    f"DSTUNE_FAULTS: cannot parse '{item}'; expected KIND@POINT:N or KIND@POINT:N@rankR, "
                    f"e.g. kill@step:3 or oom@step:2@rank1"
                ) from None

    def _take(self, kind: str, point: str, n: int) -> bool:
        key = (kind, point, n)
        if key in self.pending:
            self.pending.discard(key)
            return True
        return False

    def kill(self, point: str, n: int) -> None:
        """SIGKILLs this process if ``kill@point:n`` was requested: no handler, no cleanup, like a crash."""
        if self._take("kill", point, n):
            os.kill(os.getpid(), signal.SIGKILL)

    def oom(self, point: str, n: int) -> None:
        """Raises out-of-memory if ``oom@point:n`` was requested."""
        if self._take("oom", point, n):
            raise torch.OutOfMemoryError(f"injected out-of-memory at {point} {n} (DSTUNE_FAULTS)")
