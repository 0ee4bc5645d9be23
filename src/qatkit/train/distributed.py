"""Data-parallel training over processes (torchrun / DistributedDataParallel), on CPUs (gloo) or GPUs (nccl).

Every process runs the same program. `fit` wraps the model in DistributedDataParallel when a process group is
initialised: each rank computes the gradient of its share of the batch, the gradients are averaged, and every
rank takes the same optimizer step, so the weights and the learned scales stay equal on all ranks. Only rank 0
writes checkpoints and prints progress; the epoch's loss and accuracy are summed over the ranks.

    torchrun --nproc_per_node 2 -m qatkit train --dataset mnist --data DIR --out runs/m8

What stays per rank, as in any DDP run without SyncBatchNorm: BatchNorm's batch statistics in training (each rank
normalises its own share). Each rank's running statistics follow its own batches and are averaged over the ranks at
the end of every epoch, so every rank evaluates and rank 0 saves the same model. Ranges must be calibrated before a
distributed fit (an activation quantizer initialised from its first training batch would get a different range on
each rank): `qatkit run` / `train` calibrate; with the API call `qatkit.calibrate` first.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from qatkit.devices import HostBuffers, check_available
from qatkit.errors import ConfigError

WAIT_SECONDS = 3 * 3600  # how long a rank waits for the others at a collective before the run fails


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Inside: this process in the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...), nccl for a CUDA device, gloo for the CPU; left on exit. Nothing outside torchrun or when
    the caller has joined one already."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; allowed: a torch with "
                          "distributed support. Fix: run without torchrun, or install a torch build that has it")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # rank 0 alone evaluates, exports and verifies between trainings while the others wait at the next one
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=WAIT_SECONDS))
    try:
        yield
        # the ranks leave together: one that tears the group down while rank 0 still writes its last files could
        # abort in gloo's teardown (seen once in CI: SIGABRT, "terminate called without an active exception").
        # Skipped on an error: torchrun then stops the other ranks itself.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def local_device(device: str | torch.device) -> torch.device:
    """The device of this rank: "cuda" means the GPU torchrun's LOCAL_RANK names; anything else as given."""
    device = torch.device(device)
    if is_distributed() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    check_available(device)
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel (rank 0's weights and buffers are broadcast to every rank here).
    The flags HostBuffers keeps on the CPU are left out of DDP's buffer broadcast: nccl moves GPU tensors
    only, and they are equal on every rank anyway (set by calibration and the schedule, not by batches)."""
    ddp = nn.parallel.DistributedDataParallel
    host = [f"{name}.{b}" if name else b for name, m in model.named_modules() if isinstance(m, HostBuffers)
            for b in m.host_buffers if m._buffers.get(b) is not None]
    ddp._set_params_and_buffers_to_ignore_for_model(model, host)
    ids = [device.index] if device.type == "cuda" else None
    # buffers synced once here, not before every forward (average_bn_statistics merges BN's per epoch); torch
    # 2.13 renamed the switch
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=ids, **no_sync)


@torch.no_grad()
def average_bn_statistics(model: nn.Module) -> None:
    """BatchNorm running means and variances averaged over the ranks, in place. Each is an exponential moving
    average from the same start, so the average is the moving average of the ranks' mean batch statistics."""
    if not is_distributed():
        return
    stats = {id(t): t for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             for t in (m.running_mean, m.running_var) if t is not None}
    for t in stats.values():
        dist.all_reduce(t)
        t.div_(world_size())


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks (float64), or the values themselves in a single process."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()

