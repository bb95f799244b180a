"""``dstune train --nproc N`` (and ``--nnodes/--node-rank/--master-addr/--master-port``): the same command
on N processes per machine, started by torchrun (``torch.distributed.run``), the launcher torch ships.

Every rank runs ``dstune train`` with the launch flags removed; torchrun gives each its RANK, WORLD_SIZE
and rendezvous address. Rank 0 writes the run directory and prints; an error on any rank ends the run and
torchrun names the rank and its exit code.
"""

from __future__ import annotations

# torchrun waits this long for the ranks to finish their step and write the checkpoint after a SIGTERM
# or Ctrl-C before it kills them (its default, 30 s, is shorter than saving a large model's optimizer).
SHUTDOWN_TIMEOUT_S = 900

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without the launch flags and their values (``--nproc 2`` and ``--nproc=2`` forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def torchrun_args(
    args: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str | None, master_port: int
) -> list[str]:
    """torchrun's arguments that run ``dstune <args>`` on ``nproc`` ranks on each of ``nnodes`` machines."""
    cmd = [f"--nproc-per-node={nproc}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    if nnodes == 1 and master_addr is None:
        cmd.append("--standalone")  # a free local port; no rendezvous server to name
    else:
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr or '127.0.0.1'}",
            f"--master-port={master_port}",
        ]
    return cmd + ["-m", "dstune.cli", *args]


def launch(
    args: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str | None, port: int
) -> int:
    """Runs torchrun's launcher in this process and returns the run's exit code.

    This process is torchrun's agent: a SIGTERM or Ctrl-C reaches it and it passes the signal to every
    rank, which finishes its step and saves (exit 130, as in one process). A rank that fails ends the
    run; its exit code is returned (1 an error, 3 halted by the stability guard) and torchrun's report
    names the rank. The ranks print their own error messages.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parsed = get_args_parser().parse_args(torchrun_args(args, nproc, nnodes, node_rank, master_addr, port))
    try:
        run(parsed)
    except SignalException:
        return 130
    except ChildFailedError as exc:
        return root_exit_code(exc.failures.values())
    return 0


def root_exit_code(failures) -> int:
    """The exit code of the rank that ended first on its own (torchrun's "root cause").

    When one rank exits (130 after its checkpoint, 3 halted, 1 an error), torchrun sends SIGTERM to the
    ranks still running, and they are recorded as failed with a negative code (killed by a signal) a moment
    later; that is torchrun's doing, not the run's outcome. Timestamps are whole seconds: within one, an
    error wins over a stop (130). 1 when every rank was killed by a signal.
    """
    own = sorted((f for f in failures if f.exitcode > 0), key=lambda f: (f.timestamp, f.exitcode == 130))
    return own[0].exitcode if own else 1
