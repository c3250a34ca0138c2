"""Data-parallel fine-tuning (lib.train.finetune under torch.distributed): two gloo processes on the CPU take
the same steps as one process on the same global batches, each reading only its share of them; evaluation
sharded over the processes gives the one-process table; and `torchrun -m lib.runner` writes rank 0's results."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib import models, runner
from lib.data import shapeworld as sw
from lib.evaluate import BIN_COLUMNS, evaluate
from lib.methods import get_method
from lib.train import finetune

# Per-example mean losses (ft, mms, ce under saft) and modifiers whose hooks must see the averaged gradients:
# saft masks them in before_clip, bma averages the weights after each step; and the batch-coupled contrastive losses
# of flyp and arf (captions and retrieved anchors), whose features are gathered across ranks.
METHODS = {"ft": {}, "mms": {}, "mms+bma": {}, "saft": {}, "flyp": {}, "arf": dict(num_candidates=64, k=2)}
STEPS = dict(num_steps=3, batch_size=8, warmup_steps=1, lr=1e-3)
ROOT = Path(__file__).resolve().parent.parent


def tiny_run(method, **overrides):
    model, _, tokenizer = models.load_clip("mini", device="cpu")
    train = sw.make_split("ddp-train", domains=["photo"], classes=sw.BASE_CLASSES, n_per_class=4)
    return finetune(model, get_method(method, **{**STEPS, **overrides}), train.with_transform(models.mini_preprocess),
                    tokenizer, seed=0, progress=False)


class CountedTransform:
    """mini-CLIP's transform, counting the images it is applied to: the images this process reads."""

    def __init__(self):
        self.count = 0

    def __call__(self, image):
        self.count += 1
        return models.mini_preprocess(image)


def tiny_test_set():
    return sw.make_split("ddp-test", domains=["photo", "sketch"], classes=sw.CLASSES, n_per_class=1) \
        .subset(range(len(sw.CLASSES) * 2 - 1)).with_transform(models.mini_preprocess)  # an odd number of images


def tiny_evaluation():
    model, _, tokenizer = models.load_clip("mini", device="cpu")
    return evaluate(model, tokenizer, tiny_test_set(), groups={"base": sw.BASE_CLASSES, "new": sw.NEW_CLASSES},
                    reliability=True)


def worker(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = {method: tiny_run(method, **hparams) for method, hparams in METHODS.items()}
        counted = CountedTransform()  # ft reads no image outside its steps
        model, _, tokenizer = models.load_clip("mini", device="cpu")
        train = sw.make_split("ddp-train", domains=["photo"], classes=sw.BASE_CLASSES, n_per_class=4)
        finetune(model, get_method("ft", **STEPS), train.with_transform(counted), tokenizer, progress=False,
                 num_workers=0)
        reads = [None] * world
        dist.all_gather_object(reads, counted.count)
        table = tiny_evaluation()
        if rank == 0:
            torch.save({"runs": {m: {"state": r.model.state_dict(), "history": r.history} for m, r in runs.items()},
                        "reads": reads, "table": table.to_dict("list")}, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What rank 0 of two gloo processes saved (one spawn for every test of the module)."""
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def test_each_process_reads_only_its_share_of_the_global_batches(two_processes):
    assert two_processes["reads"] == [STEPS["num_steps"] * STEPS["batch_size"] // 2] * 2


def test_evaluation_sharded_over_two_processes_is_the_one_process_table(two_processes, one_intra_op_thread):
    single = tiny_evaluation()
    sharded = pd.DataFrame(two_processes["table"])
    assert len(single) == 2 * 2 and single.n.sum() == len(tiny_test_set())  # every image of every domain counted
    pd.testing.assert_frame_equal(sharded.drop(columns=list(BIN_COLUMNS)), single.drop(columns=list(BIN_COLUMNS)),
                                  rtol=1e-5)
    for column in BIN_COLUMNS:
        np.testing.assert_allclose(np.array(sharded[column].map(json.loads).tolist()),
                                   np.array(single[column].map(json.loads).tolist()), atol=1e-5)


def test_two_gloo_processes_take_the_steps_of_one_process(two_processes, one_intra_op_thread):
    parallel = two_processes["runs"]
    pretrained = models.load_clip("mini", device="cpu")[0].state_dict()
    # Adam divides by sqrt(v): on entries with near-zero gradients, rounding differences of the all-reduce grow, to
    # about 4e-5 on mini-CLIP 2's ViT under flyp. Two percent of the largest possible total update (lr per step)
    # bounds them; a wrong gather or average moves entries by a sizeable part of the whole update.
    tolerance = 0.02 * STEPS["lr"] * STEPS["num_steps"]
    for method, hparams in METHODS.items():
        single = tiny_run(method, **hparams)
        assert parallel[method]["history"] == pytest.approx(single.history, rel=1e-5), method
        state = single.model.state_dict()
        assert any(not torch.equal(v, pretrained[k]) for k, v in state.items()), method  # it trained
        for name, value in state.items():
            other = parallel[method]["state"][name]
            if name.endswith("attn.in_proj_bias"):
                # The key bias has no true gradient (softmax ignores a shift shared by a row of logits): Adam turns
                # its rounding noise into lr-sized steps of either sign, so only the query and value parts compare.
                width = value.shape[0] // 3
                value, other = (torch.cat([t[:width], t[2 * width:]]) for t in (value, other))
            torch.testing.assert_close(other, value, rtol=0, atol=tolerance, msg=f"{method}: {name}")


def test_a_batch_that_does_not_split_over_the_processes_is_an_error(monkeypatch, one_intra_op_thread):
    from lib import train as train_module
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train_module.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train_module.dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="batch size 7 does not split over 2 processes: set batch_size to a "
                                         "multiple of 2"):
        tiny_run("ft", batch_size=7)


def test_torchrun_runs_the_runner_data_parallel_and_rank_0_writes(tmp_path):
    argv = ["--methods", "ft", "--seeds", "0", "--budget", "smoke", "--train-domains", "photo",
            "--n-test-per-class", "2", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", "-m", "lib.runner"]
    done = subprocess.run([*launch, *argv, "--results-dir", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("domain_shift") == 1  # one summary: rank 0's
    assert len(list((tmp_path / "ddp").glob("*.csv"))) == 1 and not list((tmp_path / "ddp").glob("*.tmp"))
    grid = dict(methods=["ft"], seeds=[0], budget="smoke", train_domains=["photo"], n_test_per_class=2)
    single = runner.run_grid(grid, tmp_path / "single", device="cpu", progress=False)
    parallel = runner.load_results(runner.expand(grid), tmp_path / "ddp")
    # Reliability bins are sums of float32 confidences, stored as JSON text: compare them as numbers (the order in
    # which the ranks' logits are summed moves the 6th decimal); the temperature is an LBFGS fit of those logits.
    bins = list(BIN_COLUMNS)
    pd.testing.assert_frame_equal(parallel.drop(columns=bins), single.drop(columns=bins), rtol=1e-4)
    for column in bins:
        np.testing.assert_allclose(np.array(parallel[column].map(json.loads).tolist()),
                                   np.array(single[column].map(json.loads).tolist()), atol=1e-4)
