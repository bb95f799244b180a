"""``dstune tune --dashboard``: optuna-dashboard on a study's storage, in place of this process."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from rich.console import Console

from dstune.config import RunConfig
from dstune.errors import DstuneError, MissingExtra
from dstune.tune.study import _storage_url


def open_dashboard(cfg: RunConfig, port: int, console: Console) -> None:
    """Replaces this process with optuna-dashboard on the study of ``cfg`` (no child is left behind when
    dstune is sent SIGTERM), listening on 127.0.0.1 only.

    Raises:
        MissingExtra: optuna-dashboard is not installed.
        DstuneError: the study directory holds no study yet and no ``tune.storage`` is set.
    """
    # The script beside this interpreter first: the extra installs it into the same environment.
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which(
        "optuna-dashboard"
    )
    if exe is None:
        raise MissingExtra("optuna-dashboard is not installed: pip install 'dstune[dashboard]'")
    study_dir = Path(cfg.tune.output)
    if cfg.tune.storage is None and not (study_dir / "study.db").is_file():
        raise DstuneError(
            f"{study_dir} holds no study yet (no study.db): run dstune tune first, or pass --storage"
        )
    url = _storage_url(cfg.tune, study_dir)
    console.print(f"optuna-dashboard for {url} at http://127.0.0.1:{port} (Ctrl-C to stop)", highlight=False)
    sys.stdout.flush()
    os.execv(exe, [exe, url, "--host", "127.0.0.1", "--port", str(port)])
