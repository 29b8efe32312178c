"""Process plumbing of the multi-process tests (tests/distributed/test_distributed.py, tests/loss/test_stats_group.py).

Spawned CPU Gloo processes on loopback; rendezvous through a FileStore in a fresh temporary directory
rather than a "free" TCP port (a port found free can be taken by another process before rank 0 binds
it, which turns into a hang instead of an error); a timeout on ``init_process_group`` and a wall-clock
bound on each launch. A child's assertion error travels back to pytest with its traceback.
"""

import datetime
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAUNCH_TIMEOUT_S = 150  # whole launch (spawn + work + join)
PG_TIMEOUT_S = 60  # collectives / rendezvous inside a child


def launch(fn, world: int, *args, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, init_method, *args)`` in ``world`` spawned processes, bounded in time."""
    with tempfile.TemporaryDirectory(prefix="fusedrl-dist-") as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        ctx = mp.start_processes(fn, args=(world, init_method) + args, nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.05, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{fn.__name__} with {world} processes did not finish in {timeout} s")
        finally:
            for p in ctx.processes:  # our own children only
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)


def init(rank: int, world: int, init_method: str) -> None:
    """Join the Gloo group of a launch (in the child)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)  # 2-3 processes share 2 cores
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S)
    )


def finish() -> None:
    """End a child whose checks all passed: leave the group once every rank is done with it, then exit at
    once. A rank that tears its Gloo sockets down while a peer still finishes a collective can abort the
    peer, and torch's C++ teardown at interpreter exit now and then aborts with "terminate called without
    an active exception" (seen about once in three full-suite runs, never in isolation, after every
    assertion had passed); os._exit skips that teardown. Only for spawned children: never in pytest's
    own process."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
