"""Sweeps beyond one process: `python -m lib.runner ... --launcher slurm|local` submits one job per run of the grid
through submitit (Slurm, or its local executor on this machine), instead of training the runs one after another.

Each job runs `python -m lib.runner` on a grid of its one run (lib.runner.grid_of), so it trains and stores the run
exactly as the runner does: the store, the flock claims and the atomic writes are unchanged, so a job that is killed
leaves nothing half-written, and running the same command again submits only the runs that have no result. On Slurm
a job that is preempted or reaches its time limit is requeued by submitit (RunJob.checkpoint) and trains its run
again from the start (no checkpoint within a run). A job with several GPUs (--gpus-per-node N > 1) runs
`torchrun --standalone --nproc_per_node=N -m lib.runner` on its node (lib.train.finetune is data-parallel there); a
job spans one node. Everything the runner checks before training is checked once, before anything is submitted.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# submitit is imported where it is used, so that the runner's --help and its runs without a launcher never need it.


def add_arguments(parser):
    """The runner's launcher flags."""
    group = parser.add_argument_group("launcher (lib.launch): one job per run through submitit")
    group.add_argument("--launcher", choices=["slurm", "local"],
                       help="submit one job per run to Slurm, or run the same jobs on this machine (submitit's "
                            "LocalExecutor); without it the runs train here, one after another")
    group.add_argument("--partition", help="the Slurm partition")
    group.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per job (default 1 on Slurm, 0 locally); more than 1 runs torchrun in the job")
    group.add_argument("--cpus-per-task", type=int, default=None,
                       help="CPUs per job (default 8 per GPU: the loader workers of lib.models.default_num_workers)")
    group.add_argument("--timeout", type=int, default=240, metavar="MINUTES", help="a job's time limit")
    group.add_argument("--log-dir", type=Path, help="submitit's logs and pickles (default: RESULTS_DIR/jobs)")


class RunJob:
    """What one job does: `python -m lib.runner GRID_FILE` for a grid of one run, under `torchrun --standalone` when
    the job has several GPUs. Its `checkpoint` (submitit.helpers.Checkpointable's) makes submitit requeue it, with
    the same arguments, when Slurm preempts it or its time runs out."""

    def __call__(self, grid_file, results_dir, device, processes):
        command = ["-m", "lib.runner", grid_file, "--results-dir", results_dir, "--device", device]
        if processes > 1:
            command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *command]
        subprocess.run([sys.executable, *command], check=True, preexec_fn=_ends_with(os.getpid()))

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _ends_with(parent):
    """The runner's preexec_fn: on Linux, the runner is killed when the job's task (`parent`) ends, however it ends
    (a local job killed or cancelled: submitit stops the task, and an orphaned runner would train and store its run
    anyway). A task that dies between the fork and the prctl has orphaned the runner already, so it never gets the
    signal: the runner checks its parent after the prctl and exits. Slurm ends a job's processes itself."""
    if sys.platform != "linux":
        return None
    import ctypes
    import signal
    prctl = ctypes.CDLL(None).prctl  # looked up before the fork: the child does as little as it can

    def end_with_parent():
        prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return end_with_parent


def executor(launcher, folder, gpus_per_node, partition=None, cpus_per_task=None, timeout_min=240):
    """A submitit executor for `launcher` ("slurm" or "local"), one task per job on one node."""
    import submitit
    if launcher not in ("slurm", "local"):
        raise ValueError(f"Unknown launcher {launcher!r}; choose 'slurm' or 'local'.")
    if cpus_per_task is None:
        cpus_per_task = 8 * max(1, gpus_per_node)
    chosen = submitit.AutoExecutor(folder=folder, cluster=launcher)
    chosen.update_parameters(name="lab-run", nodes=1, tasks_per_node=1, gpus_per_node=gpus_per_node,
                             cpus_per_task=cpus_per_task, timeout_min=timeout_min,
                             **({"slurm_partition": partition} if partition and launcher == "slurm" else {}))
    return chosen


def submit(grids, results_dir, launcher, device="auto", gpus_per_node=None, folder=None, **options):
    """Submit one job per grid of `grids` ({run key: a grid of that one run}, lib.runner.grid_of); returns the jobs.
    gpus_per_node: None is 1 on Slurm and 0 locally; folder: submitit's logs and the grid files (default
    results_dir/jobs); options: executor's partition, cpus_per_task, timeout_min."""
    if gpus_per_node is None:
        gpus_per_node = 1 if launcher == "slurm" else 0
    folder = Path(folder or Path(results_dir) / "jobs")
    chosen = executor(launcher, folder, gpus_per_node, **options)
    files = []
    for key, grid in grids.items():
        files.append(folder / "grids" / f"{key}.json")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_text(json.dumps(grid, default=str))
    if not files:
        return []
    with chosen.batch():  # on Slurm, one job array
        jobs = [chosen.submit(RunJob(), str(file), str(results_dir), device, max(1, gpus_per_node)) for file in files]
    return jobs


def wait(jobs, poll_s=1.0):
    """Wait until every job has ended, whichever way (lib.runner then asks its store which runs are done)."""
    while not all(job.done() for job in jobs):
        time.sleep(poll_s)


def main(args, grids, results_dir):
    """The runner's --launcher path: submit a job per grid and wait for them all."""
    jobs = submit(grids, results_dir, args.launcher, args.device, args.gpus_per_node, args.log_dir,
                  partition=args.partition, cpus_per_task=args.cpus_per_task, timeout_min=args.timeout)
    print(f"{len(jobs)} job(s) submitted; logs in {jobs[0].paths.folder if jobs else args.log_dir}", file=sys.stderr)
    wait(jobs)
