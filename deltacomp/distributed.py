"""compress-many on Ray (``--ray``, ``--ray-address``): the per-tensor encoding as Ray tasks.

The driver (this process) reads each base tensor once, puts it in Ray's object store once
(``ray.put``), and submits one task per (fine-tune, tensor) that pairs it, all of them reading that one
object; the fine-tune tensor travels as the task's argument. The tasks run api.encode_param, the step
``compress`` runs, with the driver's torch thread count (``threads``), so every file is byte-identical to a
single compress here: some codecs' float sums round differently when torch splits them over another number
of threads. Each task reserves that many of Ray's CPUs (at most a node's), so threads are not
oversubscribed; a smaller ``threads`` runs more tasks per node, and then matches a compress run with
that many torch threads (``OMP_NUM_THREADS``). The driver writes each result into its fine-tune's file in
order; at most ``window`` tasks are in flight (2 per CPU of the cluster), so memory stays a few tensors
per worker. A task whose worker
dies (killed, out of memory, node lost) is re-run up to ``retries`` times (Ray's ``max_retries``); an
error of the input (a NaN, a bad dtype) is not retried and is raised here as the one-line error it is.

Only the driver reads checkpoints and writes outputs: the workers need deltacomp installed (the same
version), not the model files. This module is the only one that imports ray.
"""
from __future__ import annotations

import torch

from .api import EncodedParam, encode_param
from .errors import DeltacompError, SettingsError, WorkerError
from .pairing import PairKind, Pairing

_INSTALL = "pip install 'deltacomp[ray]' (ray is pinned in pyproject.toml)"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SettingsError(f"--ray needs the ray package; {_INSTALL}") from None
    return ray


def _encode_task(plan, p: Pairing, ft: torch.Tensor, ft_path: str, base, shared: dict, device: torch.device,
                 allow_nonfinite: bool, threads: int) -> EncodedParam:
    """One (fine-tune, tensor): encode_param in a Ray worker, with the driver's thread count (float sums
    split over threads differently round differently; the file must not depend on the worker)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return encode_param(plan, p, ft, ft_path, base, shared, device, allow_nonfinite)


def check_options(cpus: int | None, retries: int, threads: int | None) -> None:
    """The Ray settings' ranges, checked before any work (compress_many calls this up front)."""
    for flag, value, least in (("--ray-cpus", cpus, 1), ("--ray-retries", retries, 0), ("--ray-threads", threads, 1)):
        if value is None and flag != "--ray-retries":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SettingsError(f"{flag} must be an integer, {least} or more, got {value!r}")


class RayRunner:
    """Submits each DELTA pair's encoding as a Ray task (others, which need no work, run here)."""

    def __init__(self, address: str | None, cpus: int | None, retries: int, device: torch.device,
                 allow_nonfinite: bool, threads: int | None = None):
        if device.type != "cpu":
            raise SettingsError(f"--device {device} with Ray: the tasks ask Ray for CPUs only; use --device cpu")
        check_options(cpus, retries, threads)
        ray = self.ray = _import_ray()
        self.started = not ray.is_initialized()
        if self.started:
            if address is None:
                ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
            else:
                try:
                    ray.init(address=address, logging_level="WARNING")
                except ConnectionError as exc:
                    raise SettingsError(f"--ray-address {address}: cannot join a Ray cluster there ({exc}); start "
                                        "one with `ray start --head` and give the address it prints") from None
        self.window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.retries = retries
        self.device, self.allow_nonfinite = device, allow_nonfinite
        self.threads = threads or torch.get_num_threads()
        node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
        self._task = ray.remote(_encode_task).options(max_retries=retries, retry_exceptions=False,
                                                      num_cpus=max(1, min(self.threads, int(node_cpus))))
        self._jobs: dict[str, tuple] = {}
        self._base: tuple = (None, None)

    def _base_ref(self, base):
        """One object per base tensor, however many fine-tunes' tasks read it."""
        if self._base[0] is not base:
            _ = base.digest, base.nonfinite  # computed once here, not in every task
            self._base = (base, self.ray.put(base))
        return self._base[1]

    def submit(self, job, p: Pairing, ft: torch.Tensor, base):
        if p.kind != PairKind.DELTA:  # stored whole or tied: nothing to compute
            return encode_param(job.plan, p, ft, job.fck.path, base, job.shared, self.device, self.allow_nonfinite)
        if job.name not in self._jobs:
            self._jobs[job.name] = (self.ray.put(job.plan), self.ray.put(job.shared))
        plan_ref, shared_ref = self._jobs[job.name]
        return self._task.remote(plan_ref, p, ft, str(job.fck.path), self._base_ref(base), shared_ref, self.device,
                                 self.allow_nonfinite, self.threads)

    def result(self, job, p: Pairing, handle) -> EncodedParam:
        if isinstance(handle, EncodedParam):
            return handle
        ray = self.ray
        try:
            return ray.get(handle)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, DeltacompError):
                raise exc.cause from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                ray.exceptions.NodeDiedError) as exc:
            raise WorkerError(f"{job.fck.path}: {p.name}: the Ray task encoding it failed {self.retries + 1} "
                              f"time(s) ({type(exc).__name__}); check the workers' memory, or raise --ray-retries") from None

    def close(self) -> None:
        self._base, self._jobs = (None, None), {}
        if self.started:
            self.ray.shutdown()
