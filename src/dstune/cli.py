"""The ``dstune`` command: each subcommand parses options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dstune.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune DeepSeek models, and tune the fine-tuning itself.")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(2)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML run config; flags and --set override it"),
    model: Optional[str] = typer.Option(None, "--model", help="hub id, local dir, .gguf file, smollm2, or tiny:<family>"),
    data: Optional[str] = typer.Option(None, "--data", help="training data file (json, jsonl, csv, parquet, txt)"),
    method: Optional[str] = typer.Option(None, "--method", help="full | freeze | lora"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="run directory"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps (overrides --epochs)"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="passes over the training data"),
    set_: list[str] = typer.Option([], "--set", help="override any config field: --set optim.lr=2e-4 (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output from its newest checkpoint"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="load pickled .bin/.pt weights of a model without safetensors (runs code!)"),
    allow_config_change: bool = typer.Option(False, "--allow-config-change",
                                             help="resume even though lr, batch size, seed or data changed (recorded)"),
) -> None:
    """Fine-tune a model; writes a run directory with checkpoints, metrics, plots and the adapter."""
    from dstune.train.checkpoint import CheckpointError
    from dstune.train.loop import RunDirError, TrainingInterrupted
    from dstune.train.loop import train as run_train

    values = {"model.name": model, "data.train": data, "method": method, "output": output,
              "train.max_steps": max_steps, "train.epochs": epochs, "model.allow_pickle": allow_pickle or None}
    try:
        cfg = load_config(config, overrides=set_, values=values)
        if resume and config is None and output:
            cfg = load_config(Path(output) / "config.yaml", overrides=set_, values=values)
        if cfg.data.train is None:
            _fail("no training data: pass --data FILE or set data.train in the config")
        result = run_train(cfg, resume=resume, allow_config_change=allow_config_change, console=console)
    except TrainingInterrupted as exc:
        console.print(f"[bold yellow]{exc}[/]", highlight=False)
        raise typer.Exit(130) from None
    except (ConfigError, RunDirError, CheckpointError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"\n[bold green]done[/]: {result.steps} steps, final train loss {result.final_loss:.4f}"
                  + (f", val loss {result.val['loss']:.4f} (ppl {result.val['ppl']:.2f})" if result.val else ""))
    console.print(f"run directory: {result.run_dir}\n  model/adapter: {result.final_dir}\n"
                  f"  metrics: {result.run_dir / 'metrics.jsonl'}\n  loss curve: {result.run_dir / 'loss.png'}")


@app.command()
def inspect(model: str = typer.Argument(..., help="hub id, release name (e.g. deepseek-v3), local dir, or tiny:<family>")) -> None:
    """Print a model's architecture and parameter counts from its config alone (no weights loaded)."""
    from dstune.models.inspect import inspect_model, render_report
    from dstune.models.load import ModelSpecError

    try:
        report = inspect_model(model)
    except (ModelSpecError, ValueError, FileNotFoundError) as exc:
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
    from dstune.generate import generate_reply, load_for_inference

    try:
        loaded = load_for_inference(target)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    for p in prompt:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        reply = generate_reply(loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
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
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


def main() -> None:
    """Entry point of the ``dstune`` script."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
