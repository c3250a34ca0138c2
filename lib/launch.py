"""Sweeps beyond one process: `python -m lib.runner ... --launcher slurm|local` submits one job per run of the grid
through submitit (Slurm, or its local executor on this machine), instead of training the runs one after another.

Each job trains and stores its run exactly as `python -m lib.runner` would, through lib.runner.run_grid on a grid of
that one run: the store, the flock claims and the atomic writes are unchanged, so a job that is killed leaves nothing
half-written, and running the same command again submits only the runs that have no result. On Slurm a job that is
preempted or reaches its time limit is requeued by submitit (Checkpointable) and trains its run again from the start
(runs are short; no checkpoint within a run). A job with several GPUs (--gpus-per-node N > 1) runs
`torchrun --standalone --nproc_per_node=N -m lib.runner` on its node (lib.train.finetune is data-parallel there); a
job spans one node. Everything the runner checks before training is checked once, before anything is submitted.
"""
import json
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


def grid_of(run):
    """The grid whose only run is `run` (lib.runner.expand(grid_of(run)) == [run]): every swept value as a list of
    one, so that a value that is itself a list stays one value."""
    from .runner import SIZES
    grid = {key: value for key, value in run.items() if key not in ("method", "seed", "dataset", "hparams")}
    grid.update(methods=[run["method"]], seeds=[run["seed"]], datasets=[run["dataset"]],
                hparams={name: [value] for name, value in run["hparams"].items()})
    grid.update({name: [run[name]] for name in SIZES if name in run})
    return grid


class RunJob:
    """What one job does: train and store one run. Its `checkpoint` (submitit.helpers.Checkpointable's) makes
    submitit requeue it, with the same arguments, when Slurm preempts it or its time runs out."""

    def __call__(self, run, results_dir, device, processes):
        from .runner import run_grid, run_key
        if processes > 1:
            grid_file = Path(results_dir) / "jobs" / "grids" / f"{run_key(run)}.json"
            grid_file.parent.mkdir(parents=True, exist_ok=True)
            grid_file.write_text(json.dumps(grid_of(run), default=str))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={processes}", "-m", "lib.runner", str(grid_file),
                            "--results-dir", str(results_dir), "--device", device], check=True)
        else:
            run_grid(grid_of(run), results_dir, device, progress=False)

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


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


def submit(todo, results_dir, launcher, device="auto", gpus_per_node=None, folder=None, **options):
    """Submit one job per run of `todo` (lib.runner.prepare's runs without a result); returns [(run, job)].
    gpus_per_node: None is 1 on Slurm and 0 locally; folder: submitit's logs (default results_dir/jobs); options:
    executor's partition, cpus_per_task, timeout_min."""
    if gpus_per_node is None:
        gpus_per_node = 1 if launcher == "slurm" else 0
    chosen = executor(launcher, folder or Path(results_dir) / "jobs", gpus_per_node, **options)
    with chosen.batch():  # on Slurm, one job array
        jobs = [chosen.submit(RunJob(), run, str(results_dir), device, max(1, gpus_per_node)) for run in todo]
    return list(zip(todo, jobs))


def wait(submitted, results_dir, poll_s=1.0):
    """Wait for every job to end; returns the runs that have no stored result then (their job failed or was killed;
    running the command again submits them, and only them, again). The store says whether a run is done, as it
    does for the runner, not the job's state."""
    from .runner import run_key
    while not all(job.done() for _, job in submitted):
        time.sleep(poll_s)
    failed = [(run, job) for run, job in submitted if not (Path(results_dir) / f"{run_key(run)}.csv").exists()]
    for run, job in failed:
        print(f"job {job.job_id} ({run['method']}, seed {run['seed']}) ended without storing its run; its log: "
              f"{job.paths.stderr}", file=sys.stderr)
    return [run for run, _ in failed]


def main(args, runs, todo, results_dir):
    """The runner's --launcher path: submit the runs still to do, wait for them, and return the runs that failed."""
    submitted = submit(todo, results_dir, args.launcher, args.device, partition=args.partition,
                       gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, timeout_min=args.timeout,
                       folder=args.log_dir)
    print(f"{len(submitted)} job(s) submitted ({len(runs) - len(todo)} of {len(runs)} runs stored before); "
          f"logs in {args.log_dir or Path(results_dir) / 'jobs'}", file=sys.stderr)
    return wait(submitted, results_dir)
