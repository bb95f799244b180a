"""The commands the documentation shows, parsed and made runnable offline (tests/test_documented.py).

Sources: every ``dstune ...`` line of a ```bash / ```sh / ```console / ```shell block of README.md (a line
ending in a backslash continues on the next; ``$ `` prompts are dropped; ``.venv/bin/dstune`` is dstune),
every file in examples/ (``dstune train FILE``, or ``dstune tune FILE`` when it has a ``tune:`` section),
and the ``#   dstune ...`` comment lines of those files. Nothing here lists the commands themselves: a
changed code block is a changed test.

A command runs as written, in a work directory laid out like the checkout (``examples/``, ``src/`` and
``../shared/data`` resolve), through ``dstune.cli.main()`` in a process of its own (forked from a server
that imported torch, transformers and peft once, see ``run_cli``), with:

- ``SHRINK``: flags appended per subcommand, so a run is 2 steps on 64 rows (later flags win);
- ``FIXTURE_FILES``: the files a command names as the reader's own (``my.jsonl``, ``run.yaml``), written
  into the work directory from the real data in ../shared/data;
- ``HUB``: hub ids that would download a model, replaced by the tiny preset of the same architecture
  (``dstune inspect`` reads hub ids from its own tables, offline, and keeps them);
- ``NETWORK``: tokens that reach a server (a PostgreSQL URL), replaced by a local equivalent;
- ``ALIASES`` and ``ANGLE``: placeholder run directories and ``<...>`` placeholders, mapped to paths;
- ``STDIN``: what interactive commands read (``dstune chat``); ``--dashboard`` and ``dstune serve`` start a
  server, which is checked to answer on a free port and then stopped.

Every path a command reads that another command writes (a run directory, a study, a prepared data set)
is produced first by the first command that writes it ("owner"); a later command writing the same
place gets its own ``--output``/``--out`` instead, so no command finds its output taken.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
DSTUNE = re.compile(r"^(?:\S*/)?dstune(?:\s+|$)")

# grpo.*: a GRPO run's completions must fit data.max_length, and 2 per prompt show it works as 8 do (other
# objectives ignore the grpo section)
_SETS = ["data.max_samples=64", "data.max_length=64", "train.eval_batches=2", "train.progress=false",
         "grpo.max_new_tokens=16", "grpo.num_generations=2"]
SHRINK: dict[str, list[str]] = {
    # one micro-batch per step: the recipes' accumulation (16 in the low-resource one) made their two steps
    # 32 passes; accumulation itself is tested where it matters (test_train, test_sharded)
    "train": ["--max-steps", "2", *[a for s in _SETS + ["train.grad_accum=1"] for a in ("--set", s)]],
    "tune": ["--trials", "2", "--max-steps", "2",
             *[a for s in _SETS + ["train.eval_every=1", "tune.startup_trials=1"] for a in ("--set", s)]],
    "demo": ["--max-steps", "2"],
    "generate": ["--max-new-tokens", "4"],
    "chat": ["--max-new-tokens", "4", "--temperature", "0"],
    "eval": ["--max-samples", "4", "--max-new-tokens", "4"],
    "data prepare": ["--max-samples", "200"],
    "data inspect": ["--examples", "1"],
    "data augment": [], "data pseudo-label": ["--max-rows", "64"],
    "lr-find": ["--steps", "4", *[a for s in _SETS for a in ("--set", s)]],
    "explain": ["--new-tokens", "2"],
    "merge": [], "report": [], "inspect": [], "export": [], "serve": [], "plan": [],
}
HUB = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "tiny:r1-distill-qwen",
       # the recipes' models (examples/recipe-*.yaml name them in the config, see config_args)
       "deepseek-ai/deepseek-llm-7b-base": "tiny:deepseek-llm",
       "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": "tiny:r1-distill-qwen",
       "deepseek-ai/DeepSeek-V2-Lite": "tiny:deepseek-v2",
       "deepseek-ai/DeepSeek-V3": "tiny:deepseek-v3"}
OFFLINE_HUB = {"inspect", "plan"}  # subcommands that read a hub id's architecture from dstune's tables
NETWORK = {"postgresql://user:pass@db-host/studies": "sqlite:///{work}/shared-study.db"}
ALIASES = {"runs/lora-r8": "runs/my-run", "runs/lora-r16": "runs/lora-deepseek-v3-tiny"}
ANGLE = {"<a held-out csv/jsonl with text and label>": "held-out.csv"}
STDIN = {"chat": "Who are you?\n/exit\n"}
# The commands of the default suite: quick and needing no other command's output (checked).
FAST = {
    "dstune train --model tiny:deepseek-llm --data ../shared/data/chnsenticorp_htl.csv --set task=classification "
    "--set classify.class_weights=balanced",
    "dstune inspect deepseek-ai/DeepSeek-V3",
}


@dataclass
class Command:
    """One documented command: where it is written and its arguments after ``dstune``."""

    source: str
    line: int
    text: str
    args: list[str]
    subcommand: str = field(init=False)

    def __post_init__(self) -> None:
        two = " ".join(self.args[:2])
        self.subcommand = two if two in SHRINK else (self.args[0] if self.args else "")

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}:{self.subcommand.replace(' ', '-')}"


# --------------------------------------------------------------------------- parsing


def _split(text: str) -> list[str]:
    for placeholder, name in ANGLE.items():
        text = text.replace(placeholder, name)
    return shlex.split(text, comments=True)


def _command(source: str, line: int, text: str) -> Command | None:
    text = text.strip()
    if text.startswith("$ "):
        text = text[2:].strip()
    if not DSTUNE.match(text):
        return None
    args = _split(text)[1:]
    return Command(source, line, "dstune " + " ".join(shlex.quote(a) for a in args), args) if args else None


def readme_commands(text: str | None = None, source: str = "README.md") -> list[Command]:
    """The ``dstune`` commands of the shell code blocks of a markdown text (README.md by default)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    out, lang, pending, start = [], None, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            lang = line.strip()[3:].strip().lower() if lang is None else None
            pending = ""
            continue
        if lang not in SHELL_LANGS:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        cmd = _command(source, start, pending + line)
        pending = ""
        if cmd is not None:
            out.append(cmd)
    return out


def example_commands() -> list[Command]:
    """``dstune train/tune examples/X.yaml`` for every example, then the commands its comments show."""
    out = []
    for path in sorted(EXAMPLES.glob("*.y*ml")):
        rel = path.relative_to(ROOT).as_posix()
        kind = "tune" if "tune" in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) else "train"
        out.append(Command(rel, 0, f"dstune {kind} {rel}", [kind, rel]))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            comment = line.lstrip()
            if comment.startswith("#"):
                cmd = _command(rel, n, comment.lstrip("#"))
                if cmd is not None:
                    out.append(cmd)
    return out


def documented_commands() -> list[Command]:
    """README's commands, then the examples'; a command written twice runs once (its first place)."""
    seen, out = set(), []
    for cmd in readme_commands() + example_commands():
        if tuple(cmd.args) not in seen:
            seen.add(tuple(cmd.args))
            out.append(cmd)
    return out


def tree_block(after_heading: str) -> list[tuple[str, str]]:
    """``(name, description)`` of each entry of the directory listing that follows a README heading
    (e.g. "### The run directory"); a line naming several files gives one entry per name."""
    text = README.read_text(encoding="utf-8")
    block = text.split(after_heading, 1)[1].split("```", 2)[1]
    out = []
    for line in block.splitlines()[2:]:  # the language line and the directory itself
        words = line.split()
        names = []
        while words and (re.fullmatch(r"[\w.\-/]+,?", words[0]) and ("." in words[0] or words[0].endswith("/"))):
            names.append(words.pop(0).rstrip(","))
        out += [(name, " ".join(words)) for name in names if name != "..."]
    return out


def required_entries(after_heading: str) -> list[str]:
    """The entries of a README directory listing written by every run (not "X only", "with --Y", ...)."""
    conditional = re.compile(r"\bonly\b|\bwith --|\babsent\b|\bonce\b")
    return [name for name, description in tree_block(after_heading) if not conditional.search(description)]


# --------------------------------------------------------------------------- running


def option(args: list[str], *names: str) -> str | None:
    """The value of the last of ``names`` in ``args`` (the one the CLI uses), or None."""
    value = None
    for i, a in enumerate(args[:-1]):
        if a in names:
            value = args[i + 1]
    return value


def positional(args: list[str]) -> str | None:
    """The first argument after the subcommand that is not an option (the config or run directory)."""
    rest = args[2:] if " ".join(args[:2]) in SHRINK else args[1:]
    return rest[0] if rest and not rest[0].startswith("-") else None


def config_value(config: Path, key: tuple[str, ...]) -> str | None:
    if not config.is_file():
        return None
    value = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    for k in key:
        value = value.get(k) if isinstance(value, dict) else None
    return value


def writes(cmd: Command, args: list[str], work: Path) -> str | None:
    """The directory the command writes (relative to ``work``), or None."""
    if cmd.subcommand == "train" and "--resume" not in args:
        config = positional(args)
        if option(args, "--output", "-o") or not config:
            return option(args, "--output", "-o") or "runs/run"
        # None while the config is still to be written (studies/study/best.yaml): its output is unknown
        return (config_value(work / config, ("output",)) or "runs/run") if (work / config).is_file() else None
    if cmd.subcommand == "tune" and "--dashboard" not in args:
        config = positional(args)
        return (option(args, "--output", "-o") or (config and config_value(work / config, ("tune", "output")))
                or "studies/study")
    if cmd.subcommand in ("data prepare", "merge", "export"):
        return option(args, "--out", "-o")
    if cmd.subcommand == "demo":
        return option(args, "--output", "-o") or "runs/demo"
    return None


def mapped_args(cmd: Command, work: Path) -> list[str]:
    """The command's arguments with hub ids, network addresses and placeholder runs replaced."""
    args = []
    for a in cmd.args:
        if a in HUB and cmd.subcommand not in OFFLINE_HUB:
            a = HUB[a]
        a = NETWORK.get(a, a).replace("{work}", str(work))
        args.append(ALIASES.get(a.rstrip("/"), a))
    return args


def reads(cmd: Command, args: list[str], owners: dict[str, "Command"], work: Path) -> list[str]:
    """The owned paths (written by another command) that ``args`` name, or that ``tune --dashboard`` shows."""
    out = []
    if cmd.subcommand == "tune" and "--dashboard" in args:
        args = args + [writes(cmd, [a for a in args if a != "--dashboard"], work) or ""]
    for a in args:
        a = a.rstrip("/")
        for path in owners:
            if a == path or a.startswith(path + "/"):
                out.append(path)
    return out


@dataclass
class Outcome:
    """A command as run: the arguments, exit status, output, the directory it wrote (absolute)."""

    args: list[str]
    returncode: int
    output: str
    wrote: Path | None


def subprocess_env() -> dict[str, str]:
    """This interpreter's environment with the dstune under test first on the path, and no network."""
    import dstune

    src = str(Path(dstune.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else src
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200", TQDM_DISABLE="1")
    return env


# A command-line process spends ~9 s of a 2-core CI machine importing torch, transformers and peft before
# it does anything, and the documented commands are 60+ processes. The fork server imports them once and
# runs each command in a fresh process forked from it: its own memory, cwd, stdin, stdout, signal handlers
# and exit status, ``dstune.cli.main()`` as ``python -m dstune.cli`` runs it, atexit handlers included. It
# never runs a tensor operation itself, so no thread pool exists to be broken by fork.
_FORK_SERVER = r"""
import json, os, sys, time, traceback
import peft, torch, transformers  # noqa: F401  the imports every command pays, paid once
import dstune.cli, dstune.train.loop  # noqa: F401
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()  # its own process group: a timeout kills what the command started too
        os.chdir(req["cwd"])
        for fd, path, flags in ((0, req["stdin"], os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_APPEND),
                                (2, req["out"], os.O_WRONLY | os.O_APPEND)):
            os.dup2(os.open(path, flags), fd)
        sys.stdin, sys.stdout, sys.stderr = (open(0, closefd=False), open(1, "w", buffering=1, closefd=False),
                                             open(2, "w", buffering=1, closefd=False))
        sys.argv = ["dstune", *req["args"]]
        try:
            dstune.cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        raise SystemExit(code)  # a normal interpreter exit, as after python -m dstune.cli
    deadline = time.monotonic() + req["timeout"]
    while not (status := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    if not status[0]:
        os.killpg(pid, 9)
        status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status[1])}), flush=True)
"""


class _ForkServer:
    """One fork server for the session (started on first use, stopped at exit)."""

    proc: subprocess.Popen | None = None

    @classmethod
    def run(cls, args: list[str], cwd: Path, stdin: str, timeout: float) -> tuple[int, str]:
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=subprocess_env())
            atexit.register(cls.proc.kill)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "in").write_text(stdin, encoding="utf-8")
            (Path(tmp) / "out").write_text("", encoding="utf-8")
            request = {"args": args, "cwd": str(cwd), "stdin": str(Path(tmp) / "in"),
                       "out": str(Path(tmp) / "out"), "timeout": timeout}
            cls.proc.stdin.write(json.dumps(request) + "\n")
            cls.proc.stdin.flush()
            reply = cls.proc.stdout.readline()
            if not reply:
                raise RuntimeError(f"the fork server died running dstune {' '.join(args)}")
            return json.loads(reply)["code"], (Path(tmp) / "out").read_text(encoding="utf-8", errors="replace")


def run_cli(args: list[str], cwd: Path, *, stdin: str | None = None, timeout: float = 900) -> tuple[int, str]:
    """Runs ``dstune ARGS`` as ``python -m dstune.cli`` would, in a process of its own forked from the
    fork server (above); returns the exit status and stdout + stderr."""
    return _ForkServer.run(args, cwd, stdin or "", timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(args: list[str], cwd: Path, timeout: float = 120, port_flag: str = "--dashboard-port",
               path: str = "/") -> tuple[int, str]:
    """Starts a serving command (``tune --dashboard``, ``serve``) on a free port, waits until ``path``
    answers HTTP, stops it.

    Returns:
        0 and the output when the server answered with status 200; else the exit status (or 1) and output.
    """
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dstune.cli", *args, port_flag, str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    answered, deadline = False, time.monotonic() + timeout
    try:
        while not answered and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    answered = response.status == 200
            except OSError:  # not listening yet
                time.sleep(1)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    if answered:
        return 0, output
    return (proc.returncode or 1), output + f"\n(no HTTP answer on 127.0.0.1:{port} within {timeout:.0f} s)"


class Session:
    """Runs documented commands in one work directory, each once, producers before their readers."""

    def __init__(self, work: Path, commands: list[Command]):
        self.work, self.commands, self.done = work, commands, {}
        self.owners: dict[str, Command] = {}
        for cmd in commands:  # the first command that writes a place owns it
            wrote = writes(cmd, mapped_args(cmd, work), work)
            if wrote:
                self.owners.setdefault(wrote.rstrip("/"), cmd)

    def needs(self, cmd: Command) -> list[Command]:
        """The commands whose output ``cmd`` reads."""
        out = []
        for path in reads(cmd, mapped_args(cmd, self.work), self.owners, self.work):
            if self.owners[path].id != cmd.id and self.owners[path] not in out:
                out.append(self.owners[path])
        return out

    def run(self, cmd: Command) -> Outcome:
        if cmd.id in self.done:
            return self.done[cmd.id]
        for producer in self.needs(cmd):
            first = self.run(producer)
            if first.returncode != 0:
                raise AssertionError(f"{cmd.id} reads what {producer.id} writes, which failed:\n{first.output[-3000:]}")
        args = mapped_args(cmd, self.work) + SHRINK.get(cmd.subcommand, []) + config_args(cmd, self.work)
        wrote = writes(cmd, args, self.work)
        owner = self.owners.get(wrote.rstrip("/")) if wrote else None
        if wrote and (owner.id != cmd.id if owner else (self.work / wrote).exists()):  # taken: a place of its own
            wrote = f"{wrote.rstrip('/')}-{re.sub(r'[^a-z0-9]+', '-', cmd.id.lower())}"
            args += ["--out" if cmd.subcommand in ("data prepare", "merge", "export") else "--output", wrote]
        if "--dashboard" in args:
            code, output = run_server(args, self.work)
        elif cmd.subcommand == "serve":  # the later --port wins
            code, output = run_server(args, self.work, port_flag="--port", path="/v1/models")
        else:
            code, output = run_cli(args, self.work, stdin=STDIN.get(cmd.subcommand))
        self.done[cmd.id] = Outcome(args, code, output, self.work / wrote if wrote else None)
        return self.done[cmd.id]


def config_args(cmd: Command, work: Path) -> list[str]:
    """Flags a run of a config file needs here. A GRPO config keeps its own data.max_length: it bounds the
    prompt plus the completion, and the shrunk 64 tokens would drop every prompt of examples/grpo.yaml (a
    system prompt and a question). A config naming a hub model trains the tiny preset of its architecture."""
    config = work / cmd.args[1] if cmd.subcommand in ("train", "tune") and len(cmd.args) > 1 else None
    if config is None or config.suffix not in (".yaml", ".yml") or not config.is_file():
        return []
    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    keep = (data.get("data") or {}).get("max_length")
    out = ["--set", f"data.max_length={keep}"] if data.get("objective") == "grpo" and keep else []
    model = (data.get("model") or {}).get("name")
    return out + (["--model", HUB[model]] if model in HUB else [])


# --------------------------------------------------------------------------- the reader's own files


def _rows(name: str, n: int, start: int = 0) -> list[dict]:
    return json.loads((shared_data() / name).read_text(encoding="utf-8"))[start:start + n]


def shared_data() -> Path:
    from conftest import SHARED_DATA

    return SHARED_DATA


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def readme_space() -> str:
    """The space file README shows (the ```yaml block after "A space file:")."""
    text = README.read_text(encoding="utf-8")
    return text.split("A space file:", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]


def _run_yaml() -> str:
    """A run config to tune: LoRA on tiny DeepSeek-LLM with a categorical space (the grid sampler takes it)."""
    return yaml.safe_dump({
        "model": {"name": "tiny:deepseek-llm"}, "method": "lora",
        "data": {"train": "../shared/data/alpaca_en_demo.json", "max_samples": 64, "max_length": 64},
        "train": {"micro_batch_size": 4, "max_steps": 2, "eval_every": 1, "eval_batches": 2, "progress": False},
        "tune": {"space": {"lora.r": {"type": "categorical", "choices": [4, 8]}}},
        "output": "runs/run-yaml"})


def _held_out_csv() -> str:
    lines = (shared_data() / "chnsenticorp_htl.csv").read_text(encoding="utf-8").splitlines()
    return "\n".join([lines[0], *lines[-24:]]) + "\n"  # the last reviews: the runs read the first rows


FIXTURE_FILES = {
    "my.jsonl": lambda: _jsonl(_rows("alpaca_en_demo.json", 64)),
    "run.yaml": _run_yaml,
    "my-space.yaml": readme_space,
    "a.jsonl": lambda: _jsonl(_rows("alpaca_en_demo.json", 60)),
    "b.json": lambda: json.dumps(_rows("alpaca_en_demo.json", 60, 40), ensure_ascii=False),  # overlaps a.jsonl
    "bench.jsonl": lambda: _jsonl(_rows("alpaca_en_demo.json", 10, 200)),
    "test.jsonl": lambda: _jsonl(_rows("alpaca_en_demo.json", 8, 300)),
    "held-out.csv": _held_out_csv,
}


def make_work_dir(root: Path) -> Path:
    """``root/work`` laid out like the checkout: examples/ and src/ linked, ../shared/data beside it."""
    work = root / "work"
    work.mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(shared_data(), target_is_directory=True)
    for name in ("examples", "src"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    for name, make in FIXTURE_FILES.items():
        (work / name).write_text(make(), encoding="utf-8")
    return work
