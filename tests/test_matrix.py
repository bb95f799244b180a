"""Every method on every tiny DeepSeek family: learns, reloads in a fresh process, generates with the
KV cache as without it, and merges exactly where merging is possible (see tests/_matrix.py).

The cells a session selects are trained once by a module fixture (so ``-k deepseek-v3-lora`` trains
one cell) and reloaded together in one fresh process. Every cell's outcome is written to
``$DSTUNE_MATRIX_RESULTS`` (JSON), from which ``benchmarks/methods_table.py`` writes docs/methods.md
and the README table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _matrix import (
    EXPECTED_UNSUPPORTED,
    FAMILIES,
    HAS_BNB,
    METHODS,
    check_trained,
    reload_in_fresh_process,
    run_cell,
    selected,
    write_data,
)

CELLS = [(f, m) for f in FAMILIES for m in METHODS]
# The default suite (kept near 15 minutes on 2 cores) runs one cell per method most at risk: LoRA on V3
# (MLA and fused MoE experts), the hand-written adapter on DeepSeek-LLM and MLA-aware prefix tuning on V2;
# every other cell runs with -m slow, which CI runs too (benchmarks/methods_table.py runs all). The whole
# matrix took 7.5 minutes for 28 cells on 2 shared cores; the twelve cells of lora/adapter/prefix on the
# four main families took 6 minutes of a 41-minute contended default run, hence three.
DEFAULT_CELLS = {("deepseek-v3", "lora"), ("deepseek-llm", "adapter"), ("deepseek-v2", "prefix")}
SLOW = set(CELLS) - DEFAULT_CELLS
PARAMS = [pytest.param(c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.slow] if c in SLOW else []) for c in CELLS]


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory):
    wanted = selected(request, "test_cell", "cell")
    root = tmp_path_factory.mktemp("matrix")
    data = write_data(root)
    rows = {}
    for family, method in wanted:
        work = root / f"{family}-{method}"
        work.mkdir()
        rows[(family, method)] = run_cell(family, method, data, work)
    reload_in_fresh_process([root / f"{f}-{m}" for (f, m), r in rows.items() if r["status"] == "trained"])
    results = Path(os.environ.get("DSTUNE_MATRIX_RESULTS", root / "results.json"))
    yield root, rows
    results.parent.mkdir(parents=True, exist_ok=True)
    # Cells of an earlier session stay unless rerun here: `pytest` then `pytest -m slow` with the same
    # $DSTUNE_MATRIX_RESULTS leave the whole matrix in one file.
    cells = {}
    if "DSTUNE_MATRIX_RESULTS" in os.environ and results.exists():
        cells = {(c["family"], c["method"]): c for c in json.loads(results.read_text(encoding="utf-8"))["cells"]}
    cells.update(rows)
    results.write_text(json.dumps({"bitsandbytes": HAS_BNB, "torch": torch.__version__,
                                   "cells": list(cells.values())}, indent=1), encoding="utf-8")


@pytest.mark.parametrize("cell", PARAMS)
def test_cell(matrix, cell):
    root, rows = matrix
    row = rows[cell]
    family, method = cell
    if cell in EXPECTED_UNSUPPORTED:
        row["result"] = "unsupported"
        assert row["status"] == "unsupported", f"{cell} was expected to refuse ({EXPECTED_UNSUPPORTED[cell]}) " \
                                               f"but {row['status']}: {row.get('reason', 'it trained')}"
        assert EXPECTED_UNSUPPORTED[cell] in row["reason"], row["reason"]
        return
    if method == "qlora" and not HAS_BNB:
        # Not a silent skip: the refusal itself is checked, and the table shows the cell as not run.
        row["result"] = "needs bitsandbytes"
        assert row["status"] == "unsupported" and "pip install 'dstune[qlora]'" in row["reason"], row
        return
    assert row["status"] == "trained", f"{cell}: {row['status']}: {row.get('reason')}"
    problems = check_trained(row, root / f"{family}-{method}")
    row["result"] = "pass" if not problems else "fail: " + "; ".join(problems)
    assert not problems, f"{cell}: " + "; ".join(problems)
