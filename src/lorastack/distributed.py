"""Data-parallel training in one replica: ranks, who writes, agreeing on when to save and stop, launching.

``lorastack train --nproc N`` (or ``--nproc auto``: one process per visible GPU, which is what the training
image does) re-runs itself under torchrun; every process then trains on its shard of each global batch
(DDP through the transformers Trainer: NCCL on GPUs, gloo on CPU). The rules that keep the store sane:

- only rank 0 writes status.json, results.csv, checkpoint markers and the published adapter
  (:func:`is_main`, :class:`SilentReporter`); checkpoints are marked COMPLETE only after every rank has
  written its part (:func:`barrier`);
- a SIGTERM reaches every rank at a slightly different moment, and the time budget is measured by every
  rank's own clock: so at each step end the ranks agree (an all-reduce of a few flags,
  :func:`agree_flags`) and all of them save and stop at the same step;
- a checkpoint carries the optimizer state once (rank 0) and one RNG file per rank, so resuming with a
  different world size works (a missing RNG file only costs bit-for-bit reproducibility).

Outside torchrun every function here is the single-process identity (rank 0 of 1), so the trainer calls
them unconditionally. torch is imported only inside functions.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def world_size() -> int:
    """Processes in the job (WORLD_SIZE from torchrun; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    """This process's global rank (RANK from torchrun; 0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    """This process's rank on its node: the GPU index it uses (LOCAL_RANK from torchrun; 0 otherwise)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Whether this process writes to the store (rank 0, or the only process)."""
    return rank() == 0


def device_map() -> Any:
    """The ``device_map`` for loading the base model: this rank's GPU, or "cpu" without CUDA."""
    import torch

    return {"": local_rank()} if torch.cuda.is_available() else "cpu"


def backend() -> str:
    """The torch.distributed backend: NCCL between GPUs, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _group_ready() -> bool:
    import torch.distributed as dist

    return is_distributed() and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process or before the process group exists)."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def agree_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag is True on every rank if it is True on any rank (an all-reduce MAX); identity alone.

    Called at every step end with (signal seen, time budget nearly spent, save due): a few bytes per step.
    """
    if not _group_ready():
        return tuple(bool(f) for f in flags)
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def agree_stop(stop_reason: str | None, save: bool, stop: bool) -> tuple[str | None, bool, bool]:
    """The step-end decision every rank takes: (stop reason, save now, stop now), the same on all ranks.

    A signal seen by any rank wins over the time budget; a save due on any rank is a save on all.
    """
    signal_seen, budget, save, stop = agree_flags(stop_reason == "signal", stop_reason == "time_budget", save, stop)
    reason = "signal" if signal_seen else "time_budget" if budget else None
    return reason, save or reason is not None, stop or reason is not None


def sum_across_ranks(value: int) -> int:
    """``value`` summed over every rank (e.g. tokens trained); the value itself in a single process."""
    if not _group_ready():
        return int(value)
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


class SilentReporter:
    """What ranks other than 0 report through: every RunReporter method, doing nothing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def reporter_for(store: Any, run_id: str) -> Any:
    """The run's RunReporter on rank 0; on the other ranks a SilentReporter, and only warnings in the log
    (every rank would print the same progress lines)."""
    import logging

    from lorastack.progress import RunReporter

    if is_main():
        return RunReporter(store, run_id)
    logging.getLogger("lorastack.trainer").setLevel(logging.WARNING)
    return SilentReporter()


# -- launching ---------------------------------------------------------------------------------------


def resolve_nproc(value: str | int | None) -> int:
    """Processes to start for ``--nproc``: a number, or "auto" = one per visible GPU (1 without GPUs).

    Raises ValueError with what is accepted.
    """
    if value in (None, "", 1, "1"):
        return 1
    if value == "auto":
        try:
            import torch

            return max(1, torch.cuda.device_count())
        except ImportError:
            return 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--nproc must be a positive number or 'auto', not {value!r}") from None
    if n < 1:
        raise ValueError(f"--nproc must be a positive number or 'auto', not {value!r}")
    return n


def torchrun_command(nproc: int, argv: list[str], *, master_port: int | None = None) -> list[str]:
    """The command that runs ``lorastack <argv>`` in ``nproc`` processes on this node under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if master_port is not None:  # --standalone picks a free port itself; tests may pin one
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={master_port}"]
    return [*cmd, "-m", "lorastack", *argv]


def launch(nproc: int, argv: list[str], *, env: dict[str, str] | None = None, master_port: int | None = None) -> int:
    """Run ``lorastack <argv>`` under torchrun with ``nproc`` processes; returns torchrun's exit code.

    SIGTERM/SIGINT sent to this process go on to torchrun, which passes them to every worker; their
    trainers agree on a stop step and checkpoint.
    """
    import signal
    import subprocess

    env = {**os.environ, **(env or {})}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too; set here so it does not warn
    proc = subprocess.Popen(torchrun_command(nproc, argv, master_port=master_port), env=env)

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    previous = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[s] = signal.signal(s, forward)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# The exit code of a run, from the phase rank 0 recorded (torchrun reports any failed worker as 1).
_PHASE_EXIT = {"succeeded": 0, "stopped": 3, "preempted": 143}


def maybe_launch(nproc_arg: str | int | None, store: Any, run_id: str) -> int | None:
    """``lorastack train``: the exit code of the run trained under torchrun, or None to train in this process.

    ``nproc_arg`` is ``--nproc`` (default $LORASTACK_NPROC, else "auto": one process per visible GPU).
    Inside torchrun (or with one process) it returns None. The exit code comes from the phase that rank 0
    wrote to status.json: 0 succeeded, 3 stopped by the time budget, 143 preempted, 1 failed.
    """
    if is_distributed():
        return None
    try:
        nproc = resolve_nproc(nproc_arg or os.environ.get("LORASTACK_NPROC") or "auto")
    except ValueError as exc:
        print(f"lorastack train: {exc}", file=sys.stderr)
        return 2
    if nproc == 1:
        return None
    print(f"lorastack train: {nproc} processes ({'NCCL' if backend() == 'nccl' else 'gloo'})", file=sys.stderr)
    # The run id goes by env: torchrun's own parser would take `--run` for its `--run-path`.
    code = launch(nproc, ["train", "--store", str(store.root)], env={"LORASTACK_RUN_ID": run_id})
    try:
        phase = (store.read_status(run_id) or {}).get("phase")
    except Exception:  # noqa: BLE001 - no status: the workers never started
        phase = None
    return _PHASE_EXIT.get(phase, 1 if code == 0 else code) if phase else (code or 1)
