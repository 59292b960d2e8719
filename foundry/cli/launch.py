"""`--nproc N`: start a verb as a torchrun job of N processes on this machine, and report how it ended.

`foundry pretrain --nproc 2 ...` is `torchrun --standalone --nproc-per-node 2 -m foundry pretrain ...` run here,
in this process (torch's own elastic agent starts, watches and restarts the workers). When a worker fails, the
agent stops the others; this prints one line per failed rank instead of the agent's traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from foundry.core.errors import UserError


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    """--nproc and --max-restarts, for the verbs that train."""
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N processes on this machine (torchrun --standalone; one per GPU on CUDA) "
                        "and train across them; under torchrun already, leave it out")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="with --nproc: restart the whole job up to N times after a worker fails; each "
                        "restart resumes from the newest complete checkpoint (default 0)")


def _without_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if arg.startswith(("--nproc=", "--max-restarts=")):
            continue
        out.append(arg)
    return out


def _failure_line(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"rank {rank} {how}"


def wants_launch(args: argparse.Namespace) -> bool:
    """Whether this invocation should start the processes (--nproc given, and not already a torchrun worker)."""
    if args.nproc is None:
        return False
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must not be negative, got {args.max_restarts}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UserError("--nproc starts its own torchrun job, but this process already is a torchrun worker; "
                        "leave --nproc out under torchrun")
    return True


def launch(verb: str, argv: list[str], nproc: int, max_restarts: int, out: str | None) -> int:
    """Run `foundry VERB ARGV` (without the launch flags) as `nproc` torchrun workers; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # the cores this job may use, shared
    # A restarted round must not read the previous round's addresses from a store shared with the rendezvous
    # (pytorch/pytorch#135712: the restarted ranks then fail to connect): give the process group its own store.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    torchrun = ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                "--module", "foundry", verb, *_without_launch_flags(argv)]
    try:
        run(get_args_parser().parse_args(torchrun))
    except ChildFailedError as exc:
        first_rank, first = exc.get_first_failure()
        if first.exitcode == 2 and first_rank == 0:  # rank 0 refused the run and said why: nothing to add
            return 2
        lines = [_failure_line(rank, failure.exitcode) for rank, failure in sorted(exc.failures.items())]
        where = ""
        if out:
            from foundry.hub import latest_checkpoint

            newest = latest_checkpoint(Path(out))
            where = (f"; {newest} is the newest complete checkpoint: continue with --resume" if newest
                     else "; no checkpoint was saved")
        print(f"foundry {verb}: error: the {nproc}-process job failed ({', '.join(lines)}){where}", file=sys.stderr)
        codes = [failure.exitcode for failure in exc.failures.values()]
        return 2 if all(code == 2 for code in codes) else 1
    return 0


__all__ = ["add_launch_flags", "wants_launch", "launch"]
