"""Data-parallel full training with torch.distributed (gloo, CPU).

Every worker holds a full replica of the model. Pass 1 (vocabularies,
catalogue, frequencies) is deterministic and runs on every worker, so the
replicas start identical; pass 2 splits the shuffle shards between
workers. Each worker scales its loss by its share of the global batch; after the
backward pass ``Collective.sum_gradients`` sums the gradients of all
workers, so every worker applies the same update and the replicas stay
identical:

- dense layers: one all-reduce;
- embedding tables: their sparse row gradients are all-gathered (sizes
  first, then padded rows) and summed row by row; a dense all-reduce of a
  million-row table per step would cost more than the step.

In-batch negatives span the global batch: ``gather_rows`` all-gathers the
positives' item vectors (with autograd, so gradients return to the worker
that computed them), as a single process would see them.

``launch`` starts the workers on 127.0.0.1 with ``torch.multiprocessing``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from freshtower.core.ports import free_port


@dataclass(frozen=True)
class Collective:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def all_reduce_sum(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def check_identical(self, parameters, what: str) -> None:
        """Raise on every worker unless all replicas hold the same weights."""
        checksum = torch.stack([p.detach().double().sum() for p in parameters])
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"{what}: data-parallel replicas diverged; nothing was written")

    def barrier(self) -> None:
        dist.barrier()

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every worker's ``rows`` (B_r, ...) stacked, each padded to the
        largest B: (world * B_max, ...), a mask of the real rows, and where
        this worker's rows start. Gradients flow back to their worker."""
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([rows.shape[0]], dtype=torch.int64))
        longest = max(int(s.item()) for s in sizes)
        padding = [0, 0] * (rows.dim() - 1) + [0, longest - rows.shape[0]]
        padded = torch.nn.functional.pad(rows, padding)
        if rows.requires_grad:
            gathered = _AllGather.apply(padded)
        else:
            parts = [torch.zeros_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
            gathered = torch.cat(parts)
        mask = torch.cat([torch.arange(longest) < int(s.item()) for s in sizes])
        return gathered, mask, self.rank * longest

    def sum_gradients(self, dense: list[torch.nn.Parameter], tables: list[torch.nn.Parameter]) -> None:
        """Replace every gradient by the sum over workers (each worker scaled
        its loss by its share of the global batch before backward)."""
        flat = torch.cat([_dense_grad(p).reshape(-1) for p in dense]) if dense else torch.zeros(0)
        dist.all_reduce(flat)
        offset = 0
        for p in dense:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        for table in tables:
            table.grad = _gather_sparse(table)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward returns to each worker the summed gradient
    of its own slice (every worker's loss may use every slice)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.slice = (dist.get_rank() * rows.shape[0], (dist.get_rank() + 1) * rows.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start, stop = ctx.slice
        return grad[start:stop]


def _dense_grad(param: torch.nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(param) if param.grad is None else param.grad


def _gather_sparse(table: torch.nn.Parameter) -> torch.Tensor:
    """Sum of every worker's row-sparse gradient of ``table``, coalesced."""
    dim = table.shape[1]
    grad = table.grad
    if grad is None:
        rows, values = torch.zeros(0, dtype=torch.int64), torch.zeros((0, dim))
    else:
        grad = grad.coalesce() if grad.is_sparse else grad.to_sparse(1).coalesce()
        rows, values = grad.indices()[0], grad.values()
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(rows)], dtype=torch.int64))
    longest = max(int(s.item()) for s in sizes)
    padded_rows = torch.zeros(longest, dtype=torch.int64)
    padded_values = torch.zeros((longest, dim), dtype=values.dtype)
    padded_rows[: len(rows)] = rows
    padded_values[: len(rows)] = values
    all_rows = [torch.zeros_like(padded_rows) for _ in range(world)]
    all_values = [torch.zeros_like(padded_values) for _ in range(world)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_values, padded_values)
    kept_rows = torch.cat([r[: int(s.item())] for r, s in zip(all_rows, sizes)])
    kept_values = torch.cat([v[: int(s.item())] for v, s in zip(all_values, sizes)])
    return torch.sparse_coo_tensor(kept_rows.unsqueeze(0), kept_values, table.shape, check_invariants=False).coalesce()


def _worker(rank: int, world: int, port: int, target, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target(Collective(rank, world), *args)
    finally:
        dist.destroy_process_group()


def launch(world: int, target, *args) -> None:
    """Run ``target(collective, *args)`` in ``world`` processes; raises if one fails."""
    mp.spawn(_worker, args=(world, free_port(), target, args), nprocs=world, join=True)
