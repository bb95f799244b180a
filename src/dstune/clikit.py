"""What every ``dstune`` subcommand module shares: the console and the one-line error exit.

Kept apart from ``dstune.cli`` so that subcommands living in their own packages (``export``, ``serve``)
print the same way without importing the CLI module that registers them (no import cycle).
"""

from __future__ import annotations

import typer

from dstune.quiet import output_console

console = output_console()


def fail(message: str) -> None:
    """Prints a user-fixable error as one line and exits with status 2."""
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(2)
