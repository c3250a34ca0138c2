"""lib.launch: one submitit job per run of a grid, through the store and its claims (local executor here)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib import launch, runner

ROOT = Path(__file__).resolve().parent.parent
GRID = dict(methods=["ft"], seeds=[0, 1], budget="smoke", train_domains=["photo"], num_steps=2, batch_size=8,
            n_train_per_class=4, n_test_per_class=2)


def test_the_grid_of_a_run_expands_to_that_run_alone():
    runs = runner.expand({**GRID, "hparams": {"lr": [1e-4, 1e-3], "templates": [["a {}."]]},
                          "dataset_options": {"partial": True}})
    assert len(runs) == 4
    for run in runs:
        assert runner.expand(runner.grid_of(run)) == [run]


def kill(job):
    """SIGKILL a local job's controller and the task it started, as a lost node ends them. submitit's local cancel
    is a SIGINT to the controller, which forwards it and sends SIGKILL a second later; under a loaded CI machine a
    cancelled task still stored its run."""
    controller = int(job.job_id)
    tasks = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    for pid in [controller, *map(int, tasks)]:
        os.kill(pid, signal.SIGKILL)


def test_a_killed_job_is_submitted_again_and_every_run_is_stored_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = tmp_path / "results"
    runs, todo, _ = runner.prepare(GRID, results)
    grids = {runner.run_key(run): runner.grid_of(run) for run in todo}
    jobs = launch.submit(grids, results, "local", device="cpu", timeout_min=5)
    assert len(jobs) == 2
    # Kill the job once its task has written its first log line: the task has started, and is importing torch
    # (seconds), far from storing its run.
    log, deadline = jobs[1].paths.stdout, time.monotonic() + 120
    while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill(jobs[1])
    launch.wait(jobs, poll_s=0.2)
    keys = list(grids)
    assert {p.stem for p in results.glob("*.csv")} == {keys[0]}

    _, todo, _ = runner.prepare(GRID, results)
    assert [runner.run_key(run) for run in todo] == [keys[1]]  # what is stored is never submitted again
    runner.main(["--methods", "ft", "--seeds", "0", "1", "--budget", "smoke", "--train-domains", "photo",
                 "--num-steps", "2", "--batch-size", "8", "--n-train-per-class", "4", "--n-test-per-class", "2",
                 "--results-dir", str(results), "--device", "cpu", "--launcher", "local", "--timeout", "5"])
    printed = capsys.readouterr()
    assert "1 job(s) submitted" in printed.err
    assert printed.out.count("domain_shift") == 1  # the summary table of the stored runs
    assert sorted(p.stem for p in results.glob("*.csv")) == sorted(keys)  # each once, under its own key
    assert sorted(p.stem for p in results.glob("*.json")) == sorted(keys)
    assert not list(results.glob("*.tmp")) and not list(results.glob("*.lock"))
    table = runner.load_results(runs, results)
    assert sorted(table.seed.unique()) == [0, 1] and table.accuracy.notna().any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_runner_whose_task_died_before_its_prctl_exits_at_once():
    """The race that once stored a killed job's run: the task dies between the fork and the prctl, so the runner is
    orphaned before it asks to die with its parent. Here its parent is some other process from the start."""
    started = subprocess.run([sys.executable, "-c", "print('trained')"], capture_output=True, text=True,
                             preexec_fn=launch._ends_with(os.getpid()))
    assert (started.returncode, started.stdout) == (0, "trained\n")
    orphaned = subprocess.run([sys.executable, "-c", "print('trained')"], capture_output=True, text=True,
                              preexec_fn=launch._ends_with(os.getppid()))
    assert (orphaned.returncode, orphaned.stdout) == (1, "")


def test_slurm_jobs_take_the_flags_as_submitit_parameters(tmp_path, monkeypatch):
    import submitit
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # as if srun were there
    chosen = launch.executor("slurm", tmp_path, gpus_per_node=4, partition="gpu", timeout_min=90)
    parameters = chosen._executor.parameters  # what goes into the sbatch script; nothing is submitted
    assert (parameters["partition"], parameters["gpus_per_node"], parameters["time"]) == ("gpu", 4, 90)
    assert parameters["cpus_per_task"] == 32 and parameters["nodes"] == 1 and parameters["ntasks_per_node"] == 1
    with pytest.raises(ValueError, match="Unknown launcher 'pbs'; choose 'slurm' or 'local'"):
        launch.executor("pbs", tmp_path, gpus_per_node=1)
