"""Independent runs spread over worker processes on the CPU: `map_runs(function, items, shared, workers)`.

On a CPU, one small model per process uses the cores better than one process whose operations are split over
them: on the 2-core machine the lab is tested on, 40 `ft` steps of the default budget take 5.5 s in one process
with two threads, and 7.8 s in each of two one-thread processes run side by side, 1.4 times the throughput
(`benchmarks/bench_workers.py` measures it). A worker costs its start (importing torch and open_clip, loading the
model and data: 10-20 s), so it pays only for enough runs of enough steps: `default_workers` decides. The workers
are kept for the rest of the session (a notebook trains many grids), and each keeps what its runs loaded.
A run's numbers can differ in the last digits with the number of threads (torch sums in another order).
"""
import atexit
import concurrent.futures
import multiprocessing
import os
import signal
import tempfile

import torch
from tqdm.auto import tqdm

MAX_WORKERS = 4
MIN_RUNS_PER_WORKER = 2  # so that a worker's start is a small part of its work
MIN_STEPS = 20  # shorter runs (the smoke budget, the tests) take less time than a worker's start

_pools = {}


def cpus():
    """The CPUs this process may use (the affinity mask, which cgroup-limited containers and taskset set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(num_runs, num_steps, device="auto"):
    """How many processes should train `num_runs` runs of `num_steps` steps: LAB_WORKERS when set; else 1 on a GPU,
    under torch.distributed, for short runs or few of them; else min(cpus, MAX_WORKERS, num_runs //
    MIN_RUNS_PER_WORKER), or as many of the workers already started as there are runs (their start is paid)."""
    if os.environ.get("LAB_WORKERS"):
        value = os.environ["LAB_WORKERS"]
        if not value.isdigit():
            raise ValueError(f"LAB_WORKERS={value!r}: set it to a whole number of processes (1: train in this one).")
        return max(1, int(value))
    import torch.distributed as dist
    # lib.models.pick_device's rule for "auto", without importing lib.models (which imports this module)
    on_cpu = not torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cpu"
    if not on_cpu or dist.is_initialized() or (num_steps or 0) < MIN_STEPS:
        return 1
    started = min(max(_pools, default=0), num_runs) if num_runs > 1 else 0
    return max(1, min(cpus(), MAX_WORKERS, max(num_runs // MIN_RUNS_PER_WORKER, started)))


def map_runs(function, items, shared=(), workers=1, desc=None, progress=True):
    """[function(*shared, item) for item in items], in order. With workers > 1 the calls run in that many worker
    processes (started with "spawn", each with cpus() // workers torch threads); `function` must be a module-level
    function and `shared` and the items picklable. An error in a call is raised here, after the running calls end."""
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
    shared_file = None
    try:
        if workers <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(function(*shared, item))
                bar.update()
            return results
        pool = _pool(workers)
        # `shared` (a model, a benchmark: tens of MB) goes to a file once, and each worker reads it once per call,
        # instead of being pickled with every item.
        shared_file = tempfile.NamedTemporaryFile(prefix="lab-shared-", suffix=".pt", delete=False)
        with shared_file:
            torch.save(shared, shared_file)
        futures = [pool.submit(_call, function, shared_file.name, item) for item in items]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()  # the first error, at once
                bar.update()
        except BaseException:  # an error or Ctrl-C: cancel what has not started; the workers are started afresh
            for future in futures:
                future.cancel()
            _close(workers)
            raise
        return [future.result() for future in futures]
    finally:
        bar.close()
        if shared_file is not None:
            os.unlink(shared_file.name)


def _pool(workers):
    if workers not in _pools:
        _pools[workers] = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(max(1, cpus() // workers),))
    return _pools[workers]


def _close(workers):
    pool = _pools.pop(workers, None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _close_all():
    for workers in list(_pools):
        _close(workers)


def _start_worker(threads):
    torch.set_num_threads(threads)
    os.environ["TQDM_DISABLE"] = "1"  # the parent's bar counts the runs
    # Ctrl-C (or a kernel's shutdown) reaches the whole process group: the parent reports it, a worker just ends
    # (a run it leaves unfinished stores nothing, and its claim ends with the process).
    signal.signal(signal.SIGINT, _end_quietly)


def _end_quietly(signum, frame):
    os._exit(128 + signum)


_shared = {}  # in a worker: the file of the current call -> its shared arguments


def _call(function, shared_file, item):
    if shared_file not in _shared:
        _shared.clear()
        _shared[shared_file] = torch.load(shared_file, weights_only=False)
    return function(*_shared[shared_file], item)
