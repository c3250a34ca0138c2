"""Runs spread over worker processes (lib.parallel): the same results in the same order, each run once."""
import os
import signal
from concurrent.futures.process import BrokenProcessPool

import pandas as pd
import pytest
import torch

from lib import parallel, runner


def process_threads_and_product(factor, item):
    if item < 0:
        raise ValueError(f"negative item {item}")
    return os.getpid(), torch.get_num_threads(), factor * item


def interrupted(item):
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C or a notebook kernel's shutdown sends the process group


def test_an_interrupted_worker_ends_without_a_traceback_and_the_caller_hears_of_it(capfd):
    with pytest.raises(BrokenProcessPool):
        parallel.map_runs(interrupted, [1, 2], workers=2, progress=False)
    assert "KeyboardInterrupt" not in capfd.readouterr().err
    assert parallel.map_runs(process_threads_and_product, [1, 2], (3,), workers=2, progress=False)[1][2] == 6


def test_workers_return_every_result_in_order_with_the_cpus_split_between_them():
    results = parallel.map_runs(process_threads_and_product, [1, 2, 3, 4, 5], (10,), workers=2, progress=False)
    assert [product for _, _, product in results] == [10, 20, 30, 40, 50]
    assert os.getpid() not in {pid for pid, _, _ in results}
    assert {threads for _, threads, _ in results} == {max(1, parallel.cpus() // 2)}


def test_an_error_in_a_worker_is_raised_in_the_caller():
    with pytest.raises(ValueError, match="negative item -1"):
        parallel.map_runs(process_threads_and_product, [1, -1, 2], (10,), workers=2, progress=False)
    assert parallel.map_runs(process_threads_and_product, [3], (2,), workers=2, progress=False)[0][2] == 6


def test_workers_only_for_enough_runs_of_enough_steps_on_a_cpu(monkeypatch):
    monkeypatch.delenv("LAB_WORKERS", raising=False)
    monkeypatch.setattr(parallel, "cpus", lambda: 2)
    assert parallel.default_workers(30, 150, "cpu") == 2
    assert parallel.default_workers(30, parallel.MIN_STEPS - 1, "cpu") == 1  # the smoke budget: start-up dominates
    assert parallel.default_workers(parallel.MIN_RUNS_PER_WORKER * 2 - 1, 150, "cpu") == 1
    monkeypatch.setattr(parallel, "_pools", {2: None})  # two workers started by an earlier call: free to use
    assert parallel.default_workers(3, 150, "cpu") == 2 and parallel.default_workers(1, 150, "cpu") == 1
    monkeypatch.setattr(parallel, "_pools", {})
    monkeypatch.setattr(parallel, "cpus", lambda: 64)
    assert parallel.default_workers(1000, 150, "cpu") == parallel.MAX_WORKERS
    monkeypatch.setenv("LAB_WORKERS", "3")
    assert parallel.default_workers(1, 1, "cpu") == 3
    monkeypatch.setenv("LAB_WORKERS", "two")
    with pytest.raises(ValueError, match="whole number"):
        parallel.default_workers(30, 150, "cpu")


def test_a_grid_trained_by_two_workers_stores_every_run_once_with_the_results_of_one_process(tmp_path):
    grid = {"methods": ["ft", "clipood"], "seeds": [0, 1], "budget": "smoke", "train_domains": ["photo"]}
    runs, todo, benchmarks = runner.prepare(grid, tmp_path / "two", progress=False)
    two = runner.execute(runs, todo, benchmarks, tmp_path / "two", progress=False, workers=2)
    one = runner.run_grid(grid, tmp_path / "one", progress=False)
    assert len(list((tmp_path / "two").glob("*.json"))) == len(runs) == 4
    assert not list((tmp_path / "two").glob("*.lock"))
    # The same batches and steps; only the order of float sums may differ with the threads.
    pd.testing.assert_series_equal(two.accuracy, one.accuracy)
    assert (two.ece - one.ece).abs().max() < 1e-4
