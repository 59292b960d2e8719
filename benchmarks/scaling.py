"""Data-parallel scaling on this machine: `foundry pretrain --nproc N` with DDP and FSDP vs one process.

    python benchmarks/scaling.py [--data DATA_DIR] [--model mini] [--seq-len 256] [--batch-size 8] [--steps 20]
                                 [--skip-steps 4] [--nproc 2] [--json OUT.json]

Runs the same pretraining job (same data, same global batch: --batch-size is over all data-parallel ranks) as
real `python -m foundry pretrain ... --nproc N --device cpu` subprocesses, one after another:

  1 process using every core (OMP_NUM_THREADS = cores), the reference a user would otherwise run;
  1 process with T = cores // N threads, the reference for one of the N processes;
  N processes, DDP, T threads each;  N processes, FSDP, T threads each.

Columns: speed-up = tokens/s over the 1-process-all-cores run's: the same cores either way, so above 1.0 the
processes beat threads, below it threads win (this is also the efficiency "vs 1 process using all cores").
Scaling efficiency = tokens/s / (N x tokens/s of 1 process with T threads): how close N processes come to N
independent copies of one (1.0 = perfect, the rest is communication, contention for memory bandwidth and
cache, and the gloo threads competing with compute).

Warm-up: the summary's tokens/s covers every step of the invocation, the first ones included (allocator
growth, oneDNN primitive creation, gloo's first connections, DDP's bucket rebuild after its first step,
FSDP's lazy init). A second `--resume` invocation would not skip those: it is a fresh process that pays the
same warm-up again. So each run logs every step (--log-every 1) and the headline tokens/s is the steady
state taken from rank 0's metrics.jsonl, whose `elapsed` is stamped after each step: the tokens of steps
--skip-steps+1 .. --steps over the time between step --skip-steps and the last one (with --eval-every 0
and --save-every 0 nothing but training runs between them). The summary's all-steps figure is shown beside
it, parsed from the run's stdout, as a check. With warm-up cut out exactly, 20 steps (16 timed) suffice.

Communication share: benchmarks/scaling_worker.py under torchrun (N processes, T threads each) times
forward+backward with gradient synchronisation on and off (DDP no_sync; FSDP2 set_requires_gradient_sync,
where the all-gathers remain) and reports share = 1 - t_off / t_on per layout; its docstring says exactly
what is timed.

Every figure is printed beside the CPU it was measured on: torch's detected dispatch level and bf16/AMX
flags, the core count this process may use, and each run's measured fp32 matmul peak at its thread count
(from the run's own MFU line), with the machine's load average as each run started (work of others on the
same cores shows there, not in the figures' labels). A default run takes 2-3 minutes on two idle cores.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from foundry.core.errors import UserError
from foundry.infer.device import cpu_capability
from foundry.train.metrics import read_metrics

WORKER = Path(__file__).with_name("scaling_worker.py")
TOKENS_RE = re.compile(r"training steps ran at ([\d,.]+) tokens/s")
MFU_RE = re.compile(r"MFU\s+([\d.]+)% of a ([\d.]+) ([A-Z]?)FLOP/s peak \((.*)\)")
SCALE = {"": 1.0, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
THREADS_RE = re.compile(r"on CPU, (\d+) threads?")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_data_dir(tmp: Path, vocab_size: int = 2048) -> Path:
    """Token shards of the stdlib's json, email and asyncio packages with a BPE trained on them (10% held out)."""
    from foundry.data.shards import prepare
    from foundry.tokenizer import Tokenizer

    files = [f for package in (json, email, asyncio) for f in sorted(Path(package.__file__).parent.glob("*.py"))]
    texts = [f.read_text(encoding="utf-8") for f in files]
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"doc{i:03d}.py").write_text(text, encoding="utf-8")
    out = tmp / "data"
    prepare([str(corpus)], Tokenizer.train(texts, vocab_size), out, val_fraction=0.1)
    return out


@dataclass
class RunSpec:
    """One pretraining invocation of the comparison."""

    name: str
    nproc: int
    parallel: str | None  # None: one process, nothing to lay out
    threads: int  # OMP_NUM_THREADS given to each process


@dataclass
class RunResult:
    """What one invocation measured."""

    name: str
    nproc: int
    parallel: str
    threads: int  # detected: the thread count the run's own matmul peak was measured with
    tokens_per_second: float  # steady state, after the skipped steps (metrics.jsonl)
    summary_tokens_per_second: float  # the end-of-run summary: every step of the invocation
    timed_steps: int
    peak_flops: float | None  # the run's measured fp32 matmul peak per process, as its MFU line says
    mfu_percent: float | None
    wall_seconds: float
    load_before: float  # this machine's 1-minute load average as the run started (others' work shares the cores)


def pretrain_argv(spec: RunSpec, args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    """`python -m foundry pretrain ...` for one run of the comparison."""
    argv = [sys.executable, "-m", "foundry", "pretrain", "--model", args.model, "--data", str(data),
            "--out", str(out), "--overwrite", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--eval-every", "0", "--final-eval-batches", "1", "--save-every", "0",
            "--log-every", "1", "--device", "cpu", "--nproc", str(spec.nproc)]
    return argv + (["--parallel", spec.parallel] if spec.parallel else [])


def child_env(threads: int) -> dict[str, str]:
    """The environment of a child: its intra-op thread count fixed, offline, no tokenizer threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(argv: list[str], threads: int, what: str) -> tuple[str, float]:
    """Run a child to completion; (stdout, wall seconds). A failed child stops the benchmark with its output."""
    began = time.perf_counter()
    proc = subprocess.run(argv, check=False, cwd=ROOT, env=child_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail}")
    return proc.stdout, time.perf_counter() - began


def steady_tokens_per_second(metrics: Path, skip: int) -> tuple[float, int]:
    """(tokens/s, steps timed) over the steps after the first `skip`, from a run's per-step metrics.jsonl."""
    rows = {r["step"]: r for r in read_metrics(metrics) if "loss" in r and "elapsed" in r}
    last = max(rows)
    if skip not in rows or last <= skip:
        raise UserError(f"{metrics} has no steps logged after step {skip}; give --steps above --skip-steps")
    seconds = rows[last]["elapsed"] - rows[skip]["elapsed"]
    return (rows[last]["tokens"] - rows[skip]["tokens"]) / seconds, last - skip


def run_pretrain(spec: RunSpec, args: argparse.Namespace, data: Path, runs: Path) -> RunResult:
    """One `foundry pretrain` invocation; its steady-state and summary tokens/s, and the CPU it measured."""
    out = runs / spec.name.replace(" ", "-").replace(",", "")
    load = os.getloadavg()[0]
    stdout, wall = run_child(pretrain_argv(spec, args, data, out), spec.threads, f"pretrain ({spec.name})")
    summary = TOKENS_RE.search(stdout)
    if summary is None:
        raise RuntimeError(f"pretrain ({spec.name}) printed no tokens/s summary line:\n{stdout[-2000:]}")
    mfu = MFU_RE.search(stdout)
    threads = THREADS_RE.search(mfu.group(4)) if mfu else None
    tokens_per_second, timed = steady_tokens_per_second(out / "metrics.jsonl", args.skip_steps)
    return RunResult(spec.name, spec.nproc, spec.parallel or "none",
                     int(threads.group(1)) if threads else -1, tokens_per_second,
                     float(summary.group(1).replace(",", "")), timed,
                     float(mfu.group(2)) * SCALE[mfu.group(3)] if mfu else None, float(mfu.group(1)) if mfu else None,
                     wall, load)


def communication_share(args: argparse.Namespace, data: Path, threads: int, tmp: Path) -> dict[str, Any]:
    """benchmarks/scaling_worker.py under torchrun: per layout, the step time with and without gradient sync."""
    out = tmp / "comm.json"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
            str(WORKER), "--data", str(data), "--model", args.model, "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--rounds", str(args.comm_rounds), "--steps", str(args.comm_steps),
            "--json", str(out)]
    run_child(argv, threads, "scaling_worker.py")
    return json.loads(out.read_text())


def check_args(args: argparse.Namespace, cores: int) -> None:
    """Refuse settings the comparison cannot run with (one line each)."""
    if args.nproc < 2:
        raise UserError(f"--nproc {args.nproc}: the comparison needs at least 2 processes")
    if args.batch_size % args.nproc:
        raise UserError(f"--batch-size {args.batch_size} must divide by --nproc {args.nproc} (it is over all ranks)")
    if not 1 <= args.skip_steps < args.steps - 1:
        raise UserError(f"--skip-steps {args.skip_steps} must be at least 1 (step 1's timestamp is the first to start "
                        f"from) and leave at least 2 of the {args.steps} --steps to time")
    if args.nproc > cores:
        raise UserError(f"--nproc {args.nproc} exceeds the {cores} cores this process may use; lower --nproc")
    if args.data is not None and not (args.data / "meta.json").is_file():
        raise UserError(f"--data {args.data} is not a token-shard directory (no meta.json); make one with "
                        f"`foundry prepare` or leave --data out")


def print_table(results: list[RunResult], all_cores: RunResult, per_process: RunResult, nproc: int,
                cpu: str, cores: int) -> list[dict[str, Any]]:
    """The scaling table; returns its rows (with the derived ratios) for the JSON output."""
    print(f"\nCPU {cpu}, {cores} usable cores; tokens/s are steady state (steps after the skipped warm-up)")
    head = (f"{'layout':<22}{'procs':>6}{'threads':>8}{'fp32 peak/proc':>16}{'load':>6}{'tokens/s':>10}"
            f"{'(all steps)':>12}{'speed-up':>10}{'efficiency':>12}")
    print(head)
    print("-" * len(head))
    rows = []
    for r in results:
        speed_up = r.tokens_per_second / all_cores.tokens_per_second
        efficiency = r.tokens_per_second / (r.nproc * per_process.tokens_per_second)
        threads = str(r.threads) if r.threads > 0 else "?"
        peak = f"{r.peak_flops / 1e9:.3g} GFLOP/s" if r.peak_flops else "unknown"
        print(f"{r.name:<22}{r.nproc:>6}{threads:>8}{peak:>16}{r.load_before:>6.1f}{r.tokens_per_second:>10,.0f}"
              f"{r.summary_tokens_per_second:>12,.0f}{speed_up:>9.2f}x{efficiency:>12.2f}")
        rows.append({**asdict(r), "speed_up_vs_1_process_all_cores": speed_up,
                     "efficiency_vs_n_x_1_process_same_threads": efficiency})
    print(f"speed-up: tokens/s / tokens/s of 1 process with all {all_cores.threads} threads (same cores: the "
          f"efficiency vs 1 process using all cores). efficiency: tokens/s / (processes x tokens/s of 1 process "
          f"with {per_process.threads} thread{'s' if per_process.threads != 1 else ''}), 1.00 = {nproc} "
          f"independent copies. fp32 peak: the run's own matmul measurement at its thread count; load: the "
          f"machine's 1-minute load average as the run started.")
    note = threads_note(all_cores, per_process)
    if note:
        print(f"note: {note}")
    return rows


def threads_note(all_cores: RunResult, per_process: RunResult) -> str:
    """A warning when more threads did not even speed up a bare matmul: the cores were busy or are shared."""
    if not (all_cores.peak_flops and per_process.peak_flops) or all_cores.threads <= per_process.threads:
        return ""
    gain = all_cores.peak_flops / per_process.peak_flops
    if gain >= 1.2:
        return ""
    return (f"{all_cores.threads} threads measured {gain:.2f}x the matmul peak of {per_process.threads}: the cores "
            f"were busy with other work (see load) or are not independent, so the all-cores row understates what "
            f"threads give on an idle machine")


def print_comm(comm: dict[str, Any], cpu: str) -> None:
    """The communication share of a step, per layout."""
    threads = comm["threads_per_process"]
    print(f"\ncommunication share of a step ({comm['world_size']} processes x {threads} thread"
          f"{'s' if threads != 1 else ''}, CPU {cpu}); seconds are the slowest rank's, median")
    by_layout = {row["layout"]: row for row in comm["layouts"]}
    local = by_layout.get("none")
    if local:
        print(f"  no communication (unwrapped model per rank): step {local['step_s']:.3f} s")
    what = {"ddp": "the gradient all-reduce", "fsdp": "the gradient reduce-scatter; its all-gathers remain"}
    for name in ("ddp", "fsdp"):
        row = by_layout.get(name)
        if row is None:
            continue
        line = (f"  {name.upper():<5} step {row['step_s']:.3f} s synced, {row['step_unsynced_s']:.3f} s unsynced: "
                f"share {row['share'] * 100:4.1f}% = {what[name]}")
        if local:
            row["share_vs_no_communication"] = 1 - local["step_s"] / row["step_s"]
            line += f"; all communication (vs unwrapped) {row['share_vs_no_communication'] * 100:.1f}%"
        print(line)


def gap_words(run: RunResult, per_process: RunResult, comm: dict[str, Any]) -> str:
    """Where a layout's shortfall from N independent processes goes, by the worker's step times."""
    by_layout = {row["layout"]: row for row in comm["layouts"]}
    bare, wrapped = by_layout.get("none"), by_layout.get(run.parallel)
    if not (bare and wrapped):
        return ""
    ideal = run.nproc * per_process.tokens_per_second
    bare_rate, wrapped_rate = comm["tokens_per_step"] / bare["step_s"], comm["tokens_per_step"] / wrapped["step_s"]
    def points(rate: float, less: float) -> str:
        return f"{(rate - less) / ideal * 100:.0f}"

    return (f"Of {run.parallel.upper()}'s {points(ideal, run.tokens_per_second)}% shortfall from "
            f"{run.nproc} independent processes, {points(ideal, bare_rate)} points are the processes "
            f"sharing the machine with 1/{run.nproc} of the batch each (unwrapped models, no communication: "
            f"{bare_rate:,.0f} tokens/s), {points(bare_rate, wrapped_rate)} the layout's communication "
            f"and wrapping ({wrapped_rate:,.0f} tokens/s) and {points(wrapped_rate, run.tokens_per_second)} "
            f"the training loop's work around forward, backward and the optimizer step (gradient clipping, the "
            f"per-step loss and stop-signal all-reduces, data, metrics).")


def reading(results: list[RunResult], all_cores: RunResult, per_process: RunResult, comm: dict[str, Any] | None,
            cpu: str, cores: int) -> str:
    """One plain paragraph saying what the numbers mean."""
    parallel = [r for r in results if r.nproc > 1]
    best = max(parallel, key=lambda r: r.tokens_per_second)
    ratio = best.tokens_per_second / all_cores.tokens_per_second
    verdict = ("faster than" if ratio > 1.03 else "slower than" if ratio < 0.97 else "about as fast as")
    threads_gain = all_cores.tokens_per_second / per_process.tokens_per_second
    note = threads_note(all_cores, per_process)
    parts = [(f"On this {cpu} CPU with {cores} usable cores, one process ran the job at "
              f"{all_cores.tokens_per_second:,.0f} tokens/s with {all_cores.threads} threads and "
              f"{per_process.tokens_per_second:,.0f} with {per_process.threads} (threads gave {threads_gain:.2f}x)."
              + (f" But {note}." if note else ""))]
    parts.append(" ".join(f"{r.parallel.upper()} over {r.nproc} processes reached {r.tokens_per_second:,.0f} "
                          f"tokens/s ({r.tokens_per_second / all_cores.tokens_per_second:.2f}x the all-cores process, "
                          f"{r.tokens_per_second / (r.nproc * per_process.tokens_per_second):.2f} of {r.nproc} "
                          f"independent processes)." for r in parallel))
    if ratio <= 1.03:
        parts.append(f"So the best data-parallel layout, {best.parallel.upper()}, is {verdict} one process given "
                     f"every core: splitting the batch over processes gains nothing the thread pool does not already "
                     f"get from the same cores, and adds gradient traffic.")
    else:
        parts.append(f"So {best.parallel.upper()} beats one process given every core: here the thread pool scales "
                     f"worse than independent processes do"
                     + (" (on cores this busy, more a sign of the load than of threads)." if note else "."))
    if comm:
        shares = {row["layout"]: row for row in comm["layouts"] if "share" in row}
        words = [f"{name.upper()} {row['share'] * 100:.0f}%" for name, row in shares.items()]
        if words:
            parts.append(f"Turning gradient synchronisation off saves {' and '.join(words)} of a step (FSDP's "
                         f"all-gathers still run then).")
        parts.extend(filter(None, (gap_words(r, per_process, comm) for r in parallel)))
    if ratio <= 1.03:
        parts.append("Multi-process data parallelism pays off where each process has a device of its own; on one "
                     "CPU it checks that the distributed layouts train, it does not make training faster.")
    return " ".join(parts)


def main() -> int:
    """Run the comparison and print (and optionally write) its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="token-shard directory (default: made from stdlib)")
    parser.add_argument("--model", default="mini", help="a preset or model config, as for foundry pretrain")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step over all processes")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--skip-steps", type=int, default=4, help="warm-up steps left out of the steady-state tokens/s")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel runs")
    parser.add_argument("--comm-rounds", type=int, default=3, help="communication share: alternating on/off rounds")
    parser.add_argument("--comm-steps", type=int, default=2, help="communication share: timed steps per mode per round")
    parser.add_argument("--no-comm", action="store_true", help="skip the communication-share measurement")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    cores, cpu = usable_cores(), cpu_capability()
    try:
        check_args(args, cores)
    except UserError as exc:
        print(f"scaling.py: error: {exc}", file=sys.stderr)
        return 2
    threads = max(1, cores // args.nproc)
    specs = [RunSpec("1 process, all cores", 1, None, cores),
             RunSpec(f"1 process, {threads} thread{'s' if threads > 1 else ''}", 1, None, threads),
             RunSpec(f"DDP, {args.nproc} processes", args.nproc, "ddp", threads),
             RunSpec(f"FSDP, {args.nproc} processes", args.nproc, "fsdp", threads)]
    print(f"CPU {cpu}, {cores} usable cores, torch {torch.__version__}; {args.model}, batch {args.batch_size} x "
          f"{args.seq_len} over all processes, {args.steps} steps ({args.skip_steps} skipped as warm-up)", flush=True)
    with tempfile.TemporaryDirectory(prefix="foundry-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        data = args.data or make_data_dir(tmp)
        results = []
        for spec in specs:
            results.append(run_pretrain(spec, args, data, tmp / "runs"))
            r = results[-1]
            plural = "s" if r.threads != 1 else ""
            print(f"  {r.name}: {r.tokens_per_second:,.0f} tokens/s steady, {r.summary_tokens_per_second:,.0f} over "
                  f"all steps ({r.wall_seconds:.0f} s wall; CPU {cpu}, {r.threads} thread{plural} per process)",
                  flush=True)
        comm = None if args.no_comm else communication_share(args, data, threads, tmp)
    all_cores, per_process = results[0], results[1]
    rows = print_table(results, all_cores, per_process, args.nproc, cpu, cores)
    if comm:
        print_comm(comm, cpu)
    text = reading(results, all_cores, per_process, comm, cpu, cores)
    print(f"\n{text}")
    if args.json:
        report = {"cpu": cpu, "usable_cores": cores, "torch": torch.__version__,
                  "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "runs": rows, "communication": comm, "reading": text}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
