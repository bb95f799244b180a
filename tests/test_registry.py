"""A method is registered in one place (config.METHODS); the prepare functions, ``--help`` and the
README's method table are checked against it, so none can drift."""

import re
from pathlib import Path

from typer.testing import CliRunner

from dstune import methods
from dstune.cli import app
from dstune.config import METHODS, TASK_METRICS, RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _method_table() -> dict[str, list[str]]:
    """The rows of README's '### Methods' table: method -> its cells."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Methods"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if m := re.fullmatch(r"`(\w+)`", cells[0]):
            rows[m.group(1)] = cells
    return rows


def test_every_method_has_a_prepare_function_and_a_config_choice():
    assert set(methods.METHODS) == set(METHODS)
    for name in METHODS:
        assert RunConfig.model_validate({"method": name}).method == name
        for section in METHODS[name].sections:
            assert section in RunConfig.model_fields, (name, section)
    assert methods.MERGEABLE == {m for m, spec in METHODS.items() if spec.merges}


def test_readme_method_table_matches_the_registry():
    rows = _method_table()
    assert list(rows) == list(METHODS)
    for name, cells in rows.items():
        merges = cells[-1]
        assert merges.startswith(("yes", "(is one)")) == METHODS[name].merges, (name, merges)


def test_train_help_lists_every_method_and_task():
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output
    assert " | ".join(METHODS) in out
    assert set(TASK_METRICS) == {"lm", "classification"}
