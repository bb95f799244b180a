"""The ``dstune`` command: each subcommand parses options and calls one library function.

Errors a user can fix (``DstuneError``) are printed as one line; anything else is a bug and keeps its
traceback. Library progress bars and deprecation warnings are off unless ``--verbose`` is given.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from dstune.clikit import console
from dstune.clikit import fail as _fail
from dstune.config import METHODS, RunConfig, load_config
from dstune.data_cli import data_app
from dstune.errors import DstuneError
from dstune.explain.cli import explain_command
from dstune.export.cli import export_command
from dstune.plan.cli import plan_command
from dstune.serve.cli import serve_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune DeepSeek models, and tune the fine-tuning itself.",
)


class Interrupted(BaseException):
    """Ctrl-C outside a training loop (which saves and stops on its own); typer would exit silently."""


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="show the libraries' progress bars and warnings too"
    ),
) -> None:
    from dstune.quiet import quiet_libraries

    quiet_libraries(not verbose)


def _model_option():
    return typer.Option(None, "--model", help="hub id, local dir, .gguf file, smollm2, or tiny:<family>")


def _data_option():
    return typer.Option(None, "--data", help="training data file (json, jsonl, csv, parquet, txt)")


def _method_option():
    return typer.Option(None, "--method", help=" | ".join(METHODS))


def _set_option():
    return typer.Option([], "--set", help="override any config field: --set optim.lr=2e-4 (repeatable)")


def run_config(
    config: Optional[Path],
    overrides: list[str],
    model: Optional[str] = None,
    data: Optional[str] = None,
    method: Optional[str] = None,
    **values,
) -> RunConfig:
    """The one way ``train``, ``lr-find`` and ``tune`` build a config: the YAML file (optional), then the
    flags, then ``--set``. ``values`` are further dotted keys from flags (None: not given)."""
    values = {"model.name": model, "data.train": data, "method": method, **values}
    return load_config(config, overrides=overrides, values=values)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML run config; flags and --set override it"),
    model: Optional[str] = _model_option(),
    data: Optional[str] = _data_option(),
    method: Optional[str] = _method_option(),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="run directory"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps (overrides --epochs)"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="passes over the training data"),
    set_: list[str] = _set_option(),
    resume: bool = typer.Option(
        False, "--resume", help="continue the run in --output from its newest checkpoint"
    ),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="load pickled .bin/.pt weights of a model without safetensors (runs code!)",
    ),
    allow_config_change: bool = typer.Option(
        False,
        "--allow-config-change",
        help="resume even though lr, batch size, seed or data changed (recorded)",
    ),
    auto_fit: bool = typer.Option(
        False,
        "--auto-fit",
        help="lower the micro-batch / turn on checkpointing until dstune plan says it "
        "fits the device (train.memory_budget)",
    ),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="processes (GPUs) per machine: runs this command on each under torchrun"
    ),
    nnodes: int = typer.Option(
        1, "--nnodes", min=1, help="machines, each running this command (with --nproc)"
    ),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="this machine's number, 0 .. nnodes-1"),
    master_addr: Optional[str] = typer.Option(
        None, "--master-addr", help="address of the machine with node rank 0"
    ),
    master_port: int = typer.Option(29500, "--master-port", help="a free TCP port on that machine"),
) -> None:
    """Fine-tune a model; writes a run directory with checkpoints, metrics, plots and the adapter.

    With --nproc N the run has N processes on this machine (N x --nnodes in all); train.distributed
    says how they share the model: auto (replicated, DDP), fsdp2, zero2 or zero3 (sharded; the README's
    "Several GPUs or machines")."""
    if nproc is not None and "TORCHELASTIC_RUN_ID" not in os.environ:  # set in the ranks torchrun starts
        raise typer.Exit(_launch(nproc, nnodes, node_rank, master_addr, master_port))
    from dstune.rundir import RunDir
    from dstune.train.loop import train as run_train
    from dstune.train.signals import TrainingInterrupted

    values = {
        "output": output,
        "train.max_steps": max_steps,
        "train.epochs": epochs,
        "model.allow_pickle": allow_pickle or None,
        "train.auto_fit": auto_fit or None,
    }
    try:
        if resume and config is None and output:  # the run's own config, with the flags on top
            config = RunDir(output).config
        cfg = run_config(config, set_, model, data, method, **values)
        result = run_train(cfg, resume=resume, allow_config_change=allow_config_change, console=console)
    except TrainingInterrupted as exc:
        console.print(f"[bold yellow]{exc}[/]", highlight=False)
        raise typer.Exit(130) from None
    except DstuneError as exc:
        _fail(str(exc))
    halt = (result.summary.get("stability") or {}).get("halt")
    if result.final_dir is not None:  # None: another process of a distributed run, which prints nothing
        _print_result(result, cfg, halt)
    if halt:  # the weights of the last good step were saved; a script must still see the run failed
        raise typer.Exit(3)


def _launch(nproc: int, nnodes: int, node_rank: int, master_addr: str | None, master_port: int) -> int:
    """``train --nproc``: this command on every rank, under torchrun; returns the run's exit code."""
    from dstune.launch import launch, strip_launch_flags

    if node_rank >= nnodes:
        _fail(f"--node-rank {node_rank}: the machines are numbered 0 .. {nnodes - 1} (--nnodes {nnodes})")
    if nnodes > 1 and master_addr is None:
        _fail("--nnodes > 1 needs --master-addr: the address of the machine with --node-rank 0")
    return launch(strip_launch_flags(sys.argv[1:]), nproc, nnodes, node_rank, master_addr, master_port)


def _print_result(result, cfg: RunConfig, halt: dict | None) -> None:
    """What ``train`` prints at the end: the metrics, the memory line, hints and where everything is."""
    from dstune.plan.autofit import memory_line
    from dstune.report.summary import padding_hint, summary_line
    from dstune.rundir import RunDir

    console.print("\n" + summary_line(result), highlight=False)  # the metrics the run's task has
    if line := memory_line(result.summary.get("memory") or {}):
        console.print(line, highlight=False)
    if hint := padding_hint(result.summary, cfg.train.packing):
        console.print(hint, style="yellow", highlight=False)
    run_dir = RunDir(result.run_dir)
    console.print(
        f"run directory: {run_dir}\n  model/adapter: {result.final_dir}\n"
        f"  metrics: {run_dir.metrics}\n  loss curve: {run_dir.loss_plot}",
        highlight=False,
    )
    if halt:
        console.print(f"[bold red]halted by the stability guard[/]: {halt['message']}", highlight=False)


@app.command()
def inspect(
    model: str = typer.Argument(
        ..., help="hub id, release name (e.g. deepseek-v3), local dir, or tiny:<family>"
    ),
) -> None:
    """Print a model's architecture and parameter counts from its config alone (no weights loaded)."""
    from dstune.models.inspect import inspect_model, render_report

    try:
        report = inspect_model(model)
    except DstuneError as exc:
        _fail(str(exc))
    console.print(render_report(report), markup=False, highlight=False)


@app.command()
def generate(
    target: str = typer.Argument(..., help="run directory, or a model spec"),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="user message (repeat for several prompts)"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 decodes greedily"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass"),
) -> None:
    """Answer prompts with a model or a trained run, using its chat template."""
    from dstune.generate import check_generates, generate_reply, load_for_inference

    try:
        loaded = load_for_inference(target)
        check_generates(loaded, target)  # a classifier predicts labels: refused, saying what to use
    except DstuneError as exc:
        _fail(str(exc))
    for p in prompt:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p}
        ]
        reply = generate_reply(
            loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
        )
        console.print(f"[bold]> {p}[/]\n{reply}\n", highlight=False)


@app.command()
def demo(
    output: str = typer.Option("runs/demo", "--output", "-o", help="run directory"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="override the demo's step count"),
) -> None:
    """Offline end to end: LoRA-tune SmolLM2-135M on a new identity, show answers before and after."""
    from dstune.demo import run_demo

    try:
        run_demo(output, console=console, max_steps=max_steps)
    except DstuneError as exc:
        _fail(str(exc))


# --------------------------------------------------------------------------- data (issue 5)

app.add_typer(data_app, name="data")  # these in their own modules: this file stays under 600 lines
app.command("export")(export_command)
app.command("serve")(serve_command)
app.command("plan")(plan_command)
app.command("explain")(explain_command)


@app.command("lr-find")
def lr_find(
    config: Optional[Path] = typer.Argument(
        None, help="YAML run config (the model, data, method and optim settings)"
    ),
    model: Optional[str] = _model_option(),
    data: Optional[str] = _data_option(),
    method: Optional[str] = _method_option(),
    set_: list[str] = _set_option(),
    steps: int = typer.Option(100, "--steps", help="sweep steps K"),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="first learning rate of the sweep"),
    end_lr: float = typer.Option(1.0, "--end-lr", help="last learning rate of the sweep"),
    plot: Path = typer.Option(Path("lr_find.png"), "--plot", help="PNG of loss against learning rate"),
) -> None:
    """Learning-rate range test: an exponential lr sweep over K steps; prints a suggested optim.lr.
    Writes only the PNG: the run directory in the config is not touched."""
    from dstune.rundir import RunDir
    from dstune.train.lr_find import lr_find as run_lr_find

    try:
        cfg = run_config(config, set_, model, data, method)
        result = run_lr_find(cfg, steps=steps, start_lr=start_lr, end_lr=end_lr, plot=plot)
    except DstuneError as exc:
        _fail(str(exc))
    console.print(
        f"swept {len(result.lrs)} steps, lr {result.lrs[0]:.2e} .. {result.lrs[-1]:.2e}"
        + (" (stopped: loss diverged)" if result.stopped_early else "")
        + f"\nplot: {result.plot}",
        highlight=False,
    )
    if not result.descended:
        console.print(
            f"[yellow]the loss did not fall anywhere in the sweep[/] (lowest at its start, "
            f"{result.lrs[0]:.2e}): no lr to suggest. Widen the range (--start-lr, --end-lr) or sweep "
            f"more --steps",
            highlight=False,
        )
        raise typer.Exit(1)
    lr = f"{result.suggestion:.2e}"
    base = (
        str(config)
        if config
        else " ".join(
            f"{flag} {v}" for flag, v in (("--model", model), ("--data", data), ("--method", method)) if v
        )
    )
    again = " ".join(f"--set {item}" for item in set_ if not item.startswith(("optim.lr=", "output=")))
    # The config's own output may hold a run already: the suggested command trains into a new directory.
    out = f" --output {cfg.output}-lr{lr}" if RunDir(cfg.output).is_run() or config is None else ""
    console.print(
        f"suggested lr: [bold]{lr}[/] ({result.rule}); steepest descent at {result.steepest:.2e}\n"
        f"use it: dstune train {base} {again} --set optim.lr={lr}{out}".replace("  ", " "),
        highlight=False,
    )


# fmt: off
@app.command()
def tune(
    config: Optional[Path] = typer.Argument(None, help="base run config (YAML); its tune: section holds the "
                                            "search settings"),
    model: Optional[str] = _model_option(),
    data: Optional[str] = _data_option(),
    method: Optional[str] = _method_option(),
    trials: Optional[int] = typer.Option(None, "--trials", help="trials in the study, all workers together "
                                         "(default: tune.trials, 20)"),
    space: Optional[str] = typer.Option(None, "--space", help="built-in space (lora-default, full-default, "
                                        "method, lr) or a YAML file of dotted key -> domain"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="tpe | random | grid | gp | cmaes "
                                          "(default: tpe)"),
    pruner: Optional[str] = typer.Option(None, "--pruner", help="none | median | asha | hyperband "
                                         "(default: asha)"),
    objective: Optional[str] = typer.Option(None, "--objective", help="validation metric to optimise "
                                            "(default: loss)"),
    direction: Optional[str] = typer.Option(None, "--direction", help="minimize | maximize (default: "
                                            "minimize loss and ppl, maximize others)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="optuna storage URL, e.g. "
                                          "postgresql://u:p@host/db (default: SQLite in the study "
                                          "directory)"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="study directory "
                                         "(default: studies/study)"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="no new trial starts after this many "
                                           "seconds"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps per trial"),
    retrain: bool = typer.Option(False, "--retrain", help="retrain the best configuration on train+val at "
                                 "the end"),
    set_: list[str] = _set_option(),
    dashboard: bool = typer.Option(False, "--dashboard", help="open optuna-dashboard on the study (extra: "
                                   "dashboard)"),
    dashboard_port: int = typer.Option(8080, "--dashboard-port", help="port of --dashboard, on 127.0.0.1"),
) -> None:
    """Search hyperparameters: every trial is a normal run; workers sharing --storage share one study."""
    from dstune.train.signals import TrainingInterrupted
    from dstune.tune.study import run_tune

    values = {"tune.trials": trials, "tune.sampler": sampler, "tune.pruner": pruner,
              "tune.objective": objective, "tune.direction": direction, "tune.storage": storage,
              "tune.output": output, "tune.timeout": timeout, "tune.max_steps": max_steps,
              "tune.retrain": retrain or None}
    try:
        if space and Path(space).is_file():
            import yaml

            values["tune.space"] = yaml.safe_load(Path(space).read_text(encoding="utf-8"))
        elif space:
            values["tune.preset"] = space
        cfg = run_config(config, set_, model, data, method, **values)
        if dashboard:
            from dstune.tune.dashboard import open_dashboard

            open_dashboard(cfg, dashboard_port, console)
            return
        run_tune(cfg, console=console)
    except TrainingInterrupted:
        console.print(
            "[bold yellow]search interrupted[/]: finished trials are kept; run the same command "
            "again to continue the study",
            highlight=False,
        )
        raise typer.Exit(130) from None
    except DstuneError as exc:
        _fail(str(exc))

# fmt: on


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="run directory written by dstune train"),
    data: Path = typer.Option(..., "--data", help="data file to evaluate on (any format dstune reads)"),
    max_samples: Optional[int] = typer.Option(
        None,
        "--max-samples",
        help="use only the first N rows for every metric, loss included (default: all rows)",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="tokens generated per answer (greedy)"),
    batch_size: int = typer.Option(4, "--batch-size", help="rows per forward pass for the loss"),
    positive_label: Optional[str] = typer.Option(
        None, "--positive-label", help="binary tasks: the positive class (default: last label sorted)"
    ),
    target_recall: float = typer.Option(
        0.9, "--target-recall", help="binary tasks: recall the second tuned threshold must reach"
    ),
    text_column: Optional[str] = typer.Option(
        None, "--text-column", help="classification text column (default: the run's)"
    ),
    label_column: Optional[str] = typer.Option(
        None, "--label-column", help="classification label column (default: the run's)"
    ),
    task: Optional[str] = typer.Option(
        None,
        "--task",
        help="a run with a head per task (classify.heads): the task whose head classifies the file "
        "(default: the one whose labels hold the file's)",
    ),
) -> None:
    """Perplexity, BLEU/ROUGE/exact match or accuracy/F1 of a run; writes eval.json, eval.md and plots."""
    from dstune.evaluate.run import evaluate_run
    from dstune.rundir import RunDir

    try:
        result = evaluate_run(
            run,
            data,
            max_samples=max_samples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            positive_label=positive_label,
            target_recall=target_recall,
            text_column=text_column,
            label_column=label_column,
            task=task,
        )
    except DstuneError as exc:
        _fail(str(exc))
    rd = RunDir(run)
    console.print(rd.eval_md.read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"wrote {rd.eval_json}, {rd.eval_md} and {rd.plots}/ ({result['task']})", highlight=False)


@app.command("report")
def report(
    runs: list[Path] = typer.Argument(
        ..., help="run directories to compare, or study directories (their trials)"
    ),
    out: Path = typer.Option(
        Path("runs/report"), "--out", "-o", help="directory for report.md and compare.png"
    ),
) -> None:
    """Compare runs side by side: one table (losses, eval metrics) and one plot of their loss curves."""
    from dstune.report.compare import compare_runs, console_tables

    try:
        result = compare_runs(runs, out)
    except DstuneError as exc:
        _fail(str(exc))
    for part in console_tables(result, console):  # split to the terminal's width: no cell cut short
        console.print(part, highlight=False)
    console.print(
        f"wrote {result['markdown']}" + (f" and {result['plot']}" if result["plot"] else ""), highlight=False
    )


@app.command("merge")
def merge(
    run: Path = typer.Argument(..., help="run directory written by dstune train"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the merged checkpoint (must be empty)"),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="safetensors shard size"),
    dtype: str = typer.Option(
        "fp32", "--dtype", help="fp32 | bf16: dtype of the written weights (the merge is fp32)"
    ),
    mode: str = typer.Option(
        "auto",
        "--mode",
        help="shards: LoRA folded tensor by tensor, the model never loaded whole (FP8 V3/R1 bases "
        "de-quantised); memory: the whole model loaded; auto: shards where the run allows it",
    ),
) -> None:
    """Fold a run's adapter into its base model (fp32) and write one checkpoint plain transformers loads."""
    from dstune.merge import merge_run

    if dtype not in ("fp32", "bf16"):
        _fail(f"--dtype must be fp32 or bf16, got {dtype!r}")
    try:
        result = merge_run(run, out, max_shard_size=max_shard_size, dtype=dtype, mode=mode)
    except DstuneError as exc:
        _fail(str(exc))
    if result.mode == "shards":
        console.print("merged shard by shard (one tensor at a time)", highlight=False)
    elif result.why_memory:
        console.print(f"merged in memory: {result.why_memory}", highlight=False)
    auto = "AutoModelForSequenceClassification" if result.labels else "AutoModelForCausalLM"
    console.print(
        f"merged {result.method} run into {result.out_dir} (safetensors, tokenizer, chat template); "
        f"load it with {auto}.from_pretrained('{result.out_dir}')",
        highlight=False,
    )


@app.command("dequantize")
def dequantize(
    model: str = typer.Argument(
        ..., help="an FP8 checkpoint: a local directory or hub id (DeepSeek-V3/R1/V3.2)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the plain checkpoint"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 | fp32: dtype of the written weights"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="safetensors shard size"),
) -> None:
    """Rewrite FP8 weights as plain bf16/fp32, one tensor at a time (no GPU, one tensor in memory).

    Needed before training a V3/R1 checkpoint with train.distributed=zero3: DeepSpeed partitions a plain
    checkpoint while it loads, while transformers loads an FP8 one whole in every process.
    """
    from dstune.merge_shards import dequantize_checkpoint
    from dstune.models.load import resolve_model_dir

    if dtype not in ("fp32", "bf16"):
        _fail(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if out.exists() and any(out.iterdir()):
        _fail(f"--out {out} is not empty: give a new directory")
    try:
        count = dequantize_checkpoint(
            resolve_model_dir(model).path, out, dtype=dtype, max_shard_size=max_shard_size
        )
    except DstuneError as exc:  # NotShardable among them: not an FP8 checkpoint
        _fail(str(exc))
    console.print(f"de-quantised {count} FP8 weights into {out} ({dtype}); train from it with --model {out}",
                  highlight=False)  # fmt: skip


@app.command("chat")
def chat(
    target: str = typer.Argument(
        ..., help="run directory, or a model spec (hub id, local dir, .gguf, tiny:<family>)"
    ),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    temperature: float = typer.Option(0.7, "--temperature", help="0 decodes greedily"),
    top_p: float = typer.Option(0.95, "--top-p", help="nucleus sampling mass"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="longest reply in tokens"),
    show_thinking: bool = typer.Option(
        False, "--show-thinking/--hide-thinking", help="show R1-style <think> reasoning before the answer"
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed, for reproducible replies"),
) -> None:
    """Talk to a model or a trained run: multi-turn, streamed; /reset forgets, /exit ends."""
    from dstune.chat import chat as run_chat
    from dstune.generate import load_for_inference

    try:
        loaded = load_for_inference(target)
    except DstuneError as exc:
        _fail(str(exc))
    run_chat(
        loaded,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        show_thinking=show_thinking,
        seed=seed,
        console=console,
    )


def _interrupt(signum, frame) -> None:
    raise Interrupted()


def main() -> None:
    """Entry point of the ``dstune`` script."""
    # Ctrl-C while a model loads or a command runs outside the training loop (which saves a checkpoint
    # first); typer would turn a KeyboardInterrupt into a silent exit 130.
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except Interrupted:
        console.print(
            "\n[bold yellow]interrupted[/] (Ctrl-C); a training run saves a checkpoint only once its "
            "loop has started: run the same command again",
            highlight=False,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
