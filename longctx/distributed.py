"""Joining the process group: one home for train, eval and the benchmarks.

A launcher (deepspeed, torchrun, srun through launch/slurm.sbatch) sets RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT; `init_distributed` joins that group through DeepSpeed (NCCL on GPUs, gloo on CPUs). Started without a
launcher, training makes a 1-rank group of its own (the DeepSpeed engine needs one) and evaluation runs without one.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from longctx.errors import UserError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the joined group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(*, single_process_group: bool = True) -> None:
    """Join the launcher's process group; without a launcher, make a 1-rank group when `single_process_group`."""
    # Said, not guessed: DeepSpeed otherwise warns on every rank of a CPU run that it fell back to the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # no launcher
        if not single_process_group:
            return
        with socket.socket() as s:  # a free port for the 1-rank rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import deepspeed

    address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    # DeepSpeed prints a line each time it loads its CPU communication op: shown with --debug only.
    chatter = contextlib.nullcontext() if os.environ.get("LONGCTX_DEBUG") else contextlib.redirect_stdout(io.StringIO())
    try:
        with chatter:
            deepspeed.init_distributed(
                dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                timeout=datetime.timedelta(seconds=int(os.environ.get("LONGCTX_RENDEZVOUS_TIMEOUT_S", 1800))),
            )
    except (RuntimeError, dist.DistError) as e:  # the store's timeout or refusal: say which address it tried
        raise UserError(
            f"rendezvous with rank 0 at MASTER_ADDR:MASTER_PORT={address} failed ({str(e).splitlines()[0]}): "
            "check that this address is reachable from every node and the port is free"
        ) from None
    _unlink_shared_memory_buffer()


def shared_memory_buffer() -> Path:
    """This rank's buffer of DeepSpeed's shared-memory allreduce on CPU (ops/csrc/cpu/comm/shm.cpp names it)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def _unlink_shared_memory_buffer() -> None:
    """Remove this rank's /dev/shm file once every rank has mapped it (the mappings outlive the name).

    DeepSpeed's CPU allreduce creates a 66 MB file in /dev/shm per rank and never removes it: every CPU run with
    several ranks on one machine would leave them behind, in memory, until the machine restarts. Each rank opens the
    other ranks' files before its init returns, so after a barrier no rank needs a name any more.
    """
    if torch.cuda.is_available() or dist.get_world_size() == 1:
        return
    dist.barrier()
    with contextlib.suppress(OSError):
        shared_memory_buffer().unlink(missing_ok=True)
