"""Data-parallel fine-tuning (lib.train.finetune under torch.distributed): two gloo processes on the CPU take
the same steps as one process on the same global batches."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib import models
from lib.data import shapeworld as sw
from lib.train import finetune

STEPS = dict(num_steps=3, batch_size=8, warmup_steps=1, lr=1e-3)


def tiny_run(method):
    torch.set_num_threads(1)
    model, _, tokenizer = models.load_clip("mini", device="cpu")
    train = sw.make_split("ddp-train", domains=["photo"], classes=sw.BASE_CLASSES, n_per_class=4)
    return finetune(model, method, train.with_transform(models.mini_preprocess), tokenizer, seed=0, progress=False,
                    **STEPS)


def worker(rank, world, port, method, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trained = tiny_run(method)
        if rank == 0:
            torch.save({"state": trained.model.state_dict(), "history": trained.history}, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["ft", "mms+bma"])
def test_two_gloo_processes_match_one_process(tmp_path, method):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, free_port(), method, out), nprocs=2, join=True)
    parallel = torch.load(out, weights_only=True)
    single = tiny_run(method)
    assert parallel["history"] == pytest.approx(single.history, rel=1e-5)
    state = single.model.state_dict()
    changed = [k for k, v in state.items() if not torch.equal(v, models.load_clip("mini", device="cpu")[0]
                                                               .state_dict()[k])]
    assert changed  # the comparison is about trained weights, not an untouched copy
    # Adam divides by sqrt(v): on entries with near-zero gradients, rounding differences of the all-reduce grow to
    # about 1e-5 here. One percent of the largest possible total update (lr per step) bounds them.
    tolerance = 0.01 * STEPS["lr"] * STEPS["num_steps"]
    for name, value in state.items():
        torch.testing.assert_close(parallel["state"][name], value, rtol=0, atol=tolerance, msg=name)


def test_a_batch_that_does_not_split_over_the_processes_is_an_error(monkeypatch):
    from lib import train as train_module
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train_module.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train_module.dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="batch size 7 does not split over 2 processes"):
        tiny_run_with(batch_size=7)


def tiny_run_with(**overrides):
    model, _, tokenizer = models.load_clip("mini", device="cpu")
    train = sw.make_split("ddp-train", domains=["photo"], classes=sw.BASE_CLASSES, n_per_class=4)
    return finetune(model, "ft", train.with_transform(models.mini_preprocess), tokenizer, seed=0, progress=False,
                    **{**STEPS, **overrides})
