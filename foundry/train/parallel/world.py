"""The processes a run trains in: one, or many started by torchrun, with their device mesh.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts one
process per device; each one calls `start_world`, which joins the process group (NCCL on CUDA, gloo on the
CPU) and lays the ranks out on a 2-D mesh ("dp", "tp"): tensor-parallel groups are neighbouring ranks (on one
machine, where their traffic is heaviest), data-parallel groups stride across them. Expert parallelism (ep) splits
the data-parallel ranks further into groups of ep neighbours (see expert_parallel.py); it needs no mesh dimension.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from foundry.core.errors import UserError
from foundry.hub.device import resolve_device


class DistributedFailure(UserError):
    """Another rank died or stopped answering: this rank stops too, without saving (UserError: one clear line,
    printed by every rank that meets it, since each one names what it saw)."""

    every_rank = True


@dataclass
class World:
    """This process's place in the run: its rank, the layout (dp x tp, ep within dp) and the device it trains on."""

    device: torch.device
    rank: int = 0
    size: int = 1
    dp: int = 1
    tp: int = 1
    mesh: Any = None  # torch.distributed DeviceMesh ("dp", "tp") when size > 1
    ep: int = 1  # expert-parallel degree: each MoE layer's experts split over groups of ep data-parallel ranks

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics, plots and the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica this rank belongs to (its data shard); the ranks of one TP group share it."""
        return self.rank // self.tp

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over all ranks (one all-reduce); as given in a single process."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return (tensor / self.size).tolist()

    def any(self, flag: bool) -> bool:
        """Whether any rank says so (one all-reduce): every rank stops at the same step."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def run_on_main(self, action: Any) -> Any:
        """Run `action()` on rank 0 alone and hand its result to every rank; a UserError it raises is raised on
        every rank (rank 0 with the message, the others quietly), so no rank waits for one that gave up."""
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", action())
            except UserError as exc:
                outcome = ("error", str(exc))
        outcome = self.from_main(outcome)
        if outcome[0] == "error":
            raise UserError(outcome[1]) if self.is_main else QuietExit(outcome[1])
        return outcome[1]

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class QuietExit(UserError):
    """A rank other than 0 stops because rank 0 refused the run (rank 0 prints the reason)."""


_LOST_PEER = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl",
              "socket", "connection refused", "peer")


def is_communication_error(exc: BaseException) -> bool:
    """Whether an exception from a collective means another rank is gone or silent (not a bug in this one)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in _LOST_PEER)


def first_sentence(exc: BaseException) -> str:
    """An exception's message without a source-location prefix ("[.../pair.cc:553] "), up to its first period."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip()) or type(exc).__name__
    return text.split(". ")[0].splitlines()[0][:160]


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when a launcher (torchrun) started this process, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Whether this process is rank 0 (or not launched by torchrun at all); readable before a World exists."""
    place = launched()
    return place is None or place[0] == 0


def layout(world_size: int, tp: int, dp: int) -> tuple[int, int]:
    """(dp, tp) for `world_size` processes: dp 0 means all the ranks TP leaves; refuses a layout that does not fit."""
    if tp < 1 or dp < 0:
        raise UserError(f"--tp must be at least 1 and --dp at least 0 (0: what --tp leaves), got {tp} and {dp}")
    if world_size % tp:
        raise UserError(f"--tp {tp} does not divide the {world_size} processes; give a --tp that divides "
                        f"--nproc (or torchrun's world size)")
    dp = dp or world_size // tp
    if dp * tp != world_size:
        raise UserError(f"--dp {dp} x --tp {tp} = {dp * tp} ranks, but {world_size} processes run; make them "
                        f"multiply to the world size (or leave --dp at 0)")
    return dp, tp


def check_expert_layout(ep: int, dp: int, tp: int) -> None:
    """Refuse an --ep that the (dp, tp) layout cannot hold: ep groups lie inside the data-parallel dimension."""
    if ep < 1:
        raise UserError(f"--ep must be a positive integer, got {ep}")
    if ep > 1 and tp > 1:
        raise UserError(f"--ep {ep} does not compose with --tp {tp} yet; use expert parallelism or tensor "
                        f"parallelism, not both")
    if dp % ep:
        raise UserError(f"--ep {ep} must divide the {dp} data-parallel ranks (each group of {ep} ranks shares one "
                        f"copy of the experts); pick an --ep that divides {dp}")


def _device(name: str, local_rank: int) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                            f"start as many processes per machine as it has GPUs")
        device = torch.device("cuda", local_rank)
    return device


def start_world(device: str = "auto", tp: int = 1, dp: int = 0, timeout: float = 600.0, ep: int = 1) -> World:
    """Join the run's process group when torchrun started this process (else a world of one).

    timeout: seconds a collective may wait for the other ranks before this rank gives up (a rank that died
    or hangs then brings the job down instead of leaving it waiting forever). ep: the expert-parallel degree,
    which must divide the data-parallel ranks."""
    place = launched()
    if place is None or place[1] == 1:
        if tp > 1 or dp > 1:
            raise UserError(f"--tp {tp} / --dp {dp} need as many processes: start the run with --nproc N "
                            f"(or under torchrun)")
        if ep > 1:
            raise UserError(f"--ep {ep} splits the experts over {ep} processes: start the run with --nproc N "
                            f"(a multiple of {ep}) or under torchrun, or give --ep 1 to train in one process")
        check_expert_layout(ep, 1, 1)
        return World(_device(device, 0))
    rank, size, local_rank = place
    dp, tp = layout(size, tp, dp)
    check_expert_layout(ep, dp, tp)
    where = _device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(where.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return World(where, rank, size, dp, tp, mesh, ep)


__all__ = ["World", "DistributedFailure", "QuietExit", "start_world", "launched", "is_main_process", "layout",
           "check_expert_layout", "is_communication_error", "first_sentence"]
