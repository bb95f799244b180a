"""Every command the README and examples/ show runs, through the real CLI, offline, without a traceback,
and writes what the README says it writes (issue 29). How commands are found, shrunk and mapped to offline
stand-ins is in tests/_documented.py; the README is parsed here, so a changed code block is tested as it
is. Two quick commands run in the default suite; the rest, which train and tune, with -m slow."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from _documented import (
    ALIASES,
    ANGLE,
    FAST,
    FIXTURE_FILES,
    HUB,
    NETWORK,
    OFFLINE_HUB,
    ROOT,
    SHRINK,
    STDIN,
    Command,
    Outcome,
    Session,
    config_value,
    documented_commands,
    example_commands,
    make_work_dir,
    mapped_args,
    option,
    positional,
    readme_commands,
    readme_space,
    required_entries,
)

from dstune.config import load_config

COMMANDS = documented_commands()
RUN_DIR = "### The run directory"
STUDY_DIR = "What a study directory holds:"


def _params():
    return [pytest.param(c, id=c.id, marks=[] if c.text in FAST else [pytest.mark.slow]) for c in COMMANDS]


# --------------------------------------------------------------------------- parsing and mapping (fast)


def test_parser_joins_continued_lines_drops_prompts_and_comments_and_skips_other_blocks():
    text = "\n".join([
        "```bash", "dstune train a.yaml \\", "  --set optim.lr=1e-3   # a comment", "pip install x", "```",
        "```console", "$ dstune inspect tiny:deepseek-v3", "layers 2", "```",
        "```yaml", "dstune: not a command", "```",
        "```", "dstune train never.yaml", "```",
        "```sh", ".venv/bin/dstune demo", 'dstune generate runs/x --prompt "Who are you?"', "```"])
    found = readme_commands(text, source="t.md")
    assert [c.args for c in found] == [["train", "a.yaml", "--set", "optim.lr=1e-3"],
                                       ["inspect", "tiny:deepseek-v3"], ["demo"],
                                       ["generate", "runs/x", "--prompt", "Who are you?"]]
    assert [c.line for c in found] == [2, 7, 17, 18]
    assert [c.subcommand for c in found] == ["train", "inspect", "demo", "generate"]


def test_readme_and_examples_give_the_commands_of_every_end_of_run_path():
    readme = readme_commands()
    subcommands = {c.subcommand for c in readme}
    assert {"train", "tune", "generate", "chat", "merge", "eval", "report", "data prepare", "inspect",
            "demo"} <= subcommands, subcommands
    assert FAST <= {c.text for c in readme}, "a FAST command is no longer in the README: update FAST"
    examples = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "examples").glob("*.y*ml"))]
    assert examples and all(any(c.args[1:2] == [e] for c in example_commands()) for e in examples)


def test_every_command_is_shrunk_and_needs_no_network_or_unknown_file(tmp_path):
    """A new README command with an unmapped hub id, placeholder or subcommand fails here, in seconds,
    naming what to add to tests/_documented.py."""
    work = make_work_dir(tmp_path)
    session = Session(work, COMMANDS)
    for cmd in COMMANDS:
        assert cmd.subcommand in SHRINK, f"{cmd.id}: add '{cmd.subcommand}' to SHRINK ({cmd.text})"
        args = mapped_args(cmd, work)
        if cmd.subcommand not in OFFLINE_HUB:
            assert not [a for a in args if a.startswith("deepseek-ai/")], f"{cmd.id}: map the hub id in HUB"
        assert not [a for a in args if "://" in a and not a.startswith("sqlite:")], f"{cmd.id}: map it in NETWORK"
        assert not [a for a in args if a.startswith("<")], f"{cmd.id}: map the placeholder in ANGLE"
        for a in args:  # a file or run the command reads: shipped, a fixture, or written by another command
            if re.search(r"\.(json|jsonl|csv|parquet|txt|ya?ml)$", a) and not a.startswith("-"):
                produced = any(a.startswith(p + "/") for p in session.owners)
                assert produced or (work / a).exists(), f"{cmd.id}: {a} exists nowhere (add it to FIXTURE_FILES)"
        if cmd.text in FAST:
            assert not session.needs(cmd), f"{cmd.id} reads another command's output: it cannot be FAST"
        if "--resume" in cmd.args or cmd.subcommand in ("eval", "merge", "export", "report", "generate", "chat", "serve"):
            assert session.needs(cmd), f"{cmd.id}: no command writes what it reads"
    assert all(k in readme_space() for k in ("optim.lr", "type"))
    assert HUB and NETWORK and ALIASES and ANGLE and STDIN and FIXTURE_FILES


def test_every_example_config_loads_validates_and_names_data_that_exists():
    """What a reader runs from the checkout: the config validates and its data files are where it says."""
    from dstune.tune.space import parse_space

    for path in sorted((ROOT / "examples").glob("*.y*ml")):
        cfg = load_config(path)
        files = [cfg.data.train, cfg.data.validation] + [m.path for m in cfg.data.mix]
        for f in filter(None, files):
            assert (ROOT / f).exists(), f"{path.name}: {f} does not exist relative to the checkout"
        if "tune" in yaml.safe_load(path.read_text(encoding="utf-8")):
            assert parse_space(cfg.tune.space, cfg.tune.preset), path.name


def test_readme_directory_listings_parse():
    run_files = required_entries(RUN_DIR)
    assert {"config.yaml", "summary.json", "final/", "metrics.jsonl"} <= set(run_files), run_files
    assert "labels.json" not in run_files  # classification only
    study = required_entries(STUDY_DIR)
    assert {"base.yaml", "best.yaml", "trials.csv"} <= set(study) and "best-retrained/" not in study, study


# --------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return Session(make_work_dir(tmp_path_factory.mktemp("documented")), COMMANDS)


def _missing(directory: Path, entries: list[str]) -> list[str]:
    out = []
    for entry in entries:
        pattern = re.sub(r"-N\b|-0000\b", "-*", entry.rstrip("/"))
        if not [p for p in directory.glob(pattern) if p.is_dir() or not entry.endswith("/")]:
            out.append(entry)
    return out


def _run_dir_problems(run: Path, output: str) -> list[str]:
    problems = [f"{run} lacks {m}" for m in _missing(run, required_entries(RUN_DIR))]
    saved = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}) \
        if (run / "config.yaml").is_file() else {}
    task, objective = saved.get("task"), saved.get("objective")
    line = next((ln for ln in output.splitlines() if ln.startswith("done: ")), "")
    if not line:
        problems.append("no 'done: ...' summary line")
    elif task == "classification" and not ("accuracy" in line and "F1 macro" in line):
        problems.append(f"a classification run's summary line lacks accuracy and F1: {line}")
    elif objective == "grpo" and "val loss" in line and "(reward " not in line:
        problems.append(f"a GRPO run's summary line lacks the mean reward: {line}")
    elif objective not in (None, "sft", "grpo", "distill") and "val loss" in line and "reward accuracy" not in line:
        problems.append(f"a preference run's summary line lacks the reward accuracy: {line}")
    elif task != "classification" and objective in (None, "sft", "distill") and "val loss" in line and "ppl" not in line:
        problems.append(f"a language-model run's summary line lacks ppl: {line}")
    if task == "classification" and not (run / "labels.json").is_file():
        problems.append(f"{run} lacks labels.json")
    return problems


def _study_problems(study: Path, args: list[str]) -> list[str]:
    entries = required_entries(STUDY_DIR) + ([] if option(args, "--storage") else ["study.db"])
    problems = [f"{study} lacks {m}" for m in _missing(study, entries)]
    if "--retrain" in args:
        problems += [f"{study}/best-retrained lacks {m}" for m in _missing(study / "best-retrained",
                                                                            required_entries(RUN_DIR))]
    return problems


def _vllm_missing_for(args: list[str], work: Path) -> bool:
    """A config that samples with vLLM (grpo.generation: vllm), where vLLM is not installed."""
    config = positional(args)
    wants = bool(config) and config_value(work / config, ("grpo", "generation")) == "vllm"
    return wants and importlib.util.find_spec("vllm") is None


def _problems(cmd: Command, outcome: Outcome, work: Path) -> list[str]:
    """What the README promises for this command that its run did not deliver."""
    args, out, sub = outcome.args, outcome.output, cmd.subcommand
    if sub == "train" and _vllm_missing_for(args, work):  # examples/grpo-vllm.yaml where vLLM is absent
        refused = outcome.returncode != 0 and "grpo.generation=vllm: the vllm package is not installed" in out
        return [] if refused else [f"no clear refusal without vLLM (exit status {outcome.returncode})"]
    if outcome.returncode != 0:
        return [f"exit status {outcome.returncode}"]
    problems = ["a traceback"] if "Traceback" in out else []
    written = {"data prepare": ["train.jsonl", "val.jsonl", "test.jsonl", "report.json", "report.md"],
               "merge": ["config.json", "*.safetensors", "tokenizer_config.json"],
               "demo": ["final/", "loss.png", "metrics.jsonl", "tb/", "summary.json"]}
    if sub == "train":
        problems += _run_dir_problems(work / (option(args, "--output", "-o") or outcome.wrote), out)
    elif sub == "tune" and "--dashboard" not in args:
        problems += _study_problems(outcome.wrote, args)
    elif sub in written:
        problems += [f"{outcome.wrote} lacks {m}" for m in _missing(outcome.wrote, written[sub])]
    elif sub == "eval":
        run = work / positional(args)
        problems += [f"no {m} in the run" for m in _missing(run, ["eval.json", "eval.md", "plots/"])]
    elif sub == "report":
        report = work / (option(args, "--out", "-o") or "runs/report")
        problems += [f"{report} lacks {m}" for m in _missing(report, ["report.md", "compare.png"])]
    elif sub == "generate":
        problems += [] if f"> {option(args, '--prompt', '-p')}" in out else ["no answer printed"]
    elif sub == "chat":
        problems += [] if ("assistant>" in out or "label>" in out) else ["no reply printed"]
    elif sub == "inspect":
        problems += [] if "layers" in out else ["no architecture printed"]
    elif sub == "serve":  # run_server checked that /v1/models answered 200
        problems += [] if "serving " in out else ["no 'serving' line printed"]
    elif sub == "explain":  # the files it printed, which README's listing names
        paths = [ln.strip() for ln in out.splitlines() if re.fullmatch(r"  \S+\.(png|html|json)", ln)]
        problems += [f"{p} was not written" for p in paths if not (work / p).is_file()]
        names = {re.sub(r"\d+", "N", Path(p).name) for p in paths}
        problems += [f"no {n}" for n in ("attribution.html", "attribution.png", "lens.json", "lens_N.png",
                                          "attention_layerN.png") if n not in names]
    return problems


@pytest.mark.parametrize("cmd", _params())
def test_documented_command_runs(session, cmd):
    outcome = session.run(cmd)
    problems = _problems(cmd, outcome, session.work)
    assert not problems, (f"{cmd.id}: {cmd.text}\nran: dstune {' '.join(outcome.args)}\n" + "; ".join(problems)
                          + "\n" + outcome.output[-4000:])
