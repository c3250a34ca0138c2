"""The lab's data loading (lib.train.GlobalBatches and _batches, lib.models.data_loader and encode_images): the
batches of the loop the committed results came from, whatever the number of workers; each rank reads only its
share; worker counts from the CPUs."""
import pytest
import torch

from lib import models
from lib.data import shapeworld as sw
from lib.train import GlobalBatches, _batches


class Numbers(torch.utils.data.Dataset):
    """Item i is (a tensor holding i, label i), so a batch names the items it holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2,), float(i)), i


def reference_batches(n, batch_size, seed, count):
    """The loop the committed results came from: one DataLoader, re-iterated epoch after epoch, no workers."""
    loader = torch.utils.data.DataLoader(Numbers(n), batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    batches = []
    while len(batches) < count:
        batches += [labels.tolist() for _, labels in loader]
    return batches[:count]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4)])  # a partial last batch dropped, and none
def test_the_batches_are_the_reference_dataloaders_over_several_epochs(n, batch_size, num_workers):
    count = 4 * (n // batch_size) + 1  # four epochs and the first batch of a fifth
    stream = _batches(Numbers(n), batch_size, seed=7, num_workers=num_workers, num_batches=count)
    batches = [next(stream) for _ in range(count)]
    assert [indices.tolist() for _, _, indices in batches] == reference_batches(n, batch_size, 7, count)
    for images, labels, indices in batches:  # the items are those the indices name
        assert torch.equal(images[:, 0].long(), indices) and torch.equal(labels, indices)


def test_each_rank_reads_only_its_share_of_the_global_batch():
    class Counted(Numbers):
        def __init__(self, n):
            super().__init__(n)
            self.read = []

        def __getitem__(self, i):
            self.read.append(i)
            return super().__getitem__(i)

    n, batch_size, steps, world = 14, 6, 5, 2
    reference = reference_batches(n, batch_size, 3, steps)
    shares = []
    for rank in range(world):
        data = Counted(n)
        stream = _batches(data, batch_size, seed=3, num_workers=0, rank=rank, world=world)
        shares.append([next(stream)[2].tolist() for _ in range(steps)])
        assert len(data.read) == steps * batch_size // world  # its share, not the whole batch
        assert data.read == sum(shares[-1], [])
    for step, batch in enumerate(reference):
        assert shares[0][step] == batch[0::2] and shares[1][step] == batch[1::2]


def test_a_batch_larger_than_the_data_is_an_error():
    with pytest.raises(ValueError, match="batch size 5 is larger than the 4 training images"):
        GlobalBatches(4, 5, seed=0)


def test_worker_counts_follow_the_cpus_and_the_batches(monkeypatch):
    monkeypatch.setattr(models.os, "sched_getaffinity", lambda pid: set(range(6)))
    files = sw.make_split("load", domains=["photo"], classes=sw.BASE_CLASSES[:1], n_per_class=2)
    files.images = ["a.jpg", "b.jpg"]  # decoded from files: workers help
    assert models.default_num_workers(files) == 5  # one CPU left to the loop
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert models.default_num_workers(files) == 2  # three CPUs per rank
    tensors = sw.make_split("load", domains=["photo"], classes=sw.BASE_CLASSES[:1], n_per_class=2)
    assert models.default_num_workers(tensors) == 0  # already decoded, in memory
    assert models.data_loader(Numbers(4), "cpu", 4, num_batches=1, batch_size=4).num_workers == 0
    assert models.data_loader(Numbers(4), "cpu", 4, num_batches=3, batch_size=2).num_workers == 3
    loader = models.data_loader(Numbers(4), "cpu", 2, num_batches=2, batch_size=2)
    assert loader.persistent_workers and not loader.pin_memory  # pinned memory on CUDA only


def test_image_features_are_the_same_with_and_without_workers(random_mini_setup, one_intra_op_thread):
    model, _, train = random_mini_setup
    alone = models.encode_images(model, train, batch_size=5, num_workers=0)
    with_workers = models.encode_images(model, train, batch_size=5, num_workers=2)
    assert alone.shape == (len(train), model.visual.output_dim)
    torch.testing.assert_close(with_workers, alone, rtol=0, atol=0)


def test_fine_tuning_takes_the_same_steps_with_and_without_workers(random_mini_setup, one_intra_op_thread):
    from lib.methods import get_method
    from lib.train import finetune
    model, tokenizer, train = random_mini_setup
    runs = [finetune(model, get_method("ft", num_steps=4, batch_size=8, lr=1e-3), train, tokenizer, seed=1,
                     progress=False, num_workers=workers) for workers in (0, 2)]
    assert runs[0].history == runs[1].history
    for name, value in runs[0].model.state_dict().items():
        assert torch.equal(runs[1].model.state_dict()[name], value), name


def test_the_throughput_benchmark_ends_with_its_ratio_line(capsys, one_intra_op_thread):
    import importlib.util
    import re
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", "mini", "--batch-size", "2", "--steps", "2", "--repeats", "1", "--loader-batches", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio lab/bare \d+\.\d{3} loader 2-workers/0-workers \d+\.\d{3}", last), last


@pytest.fixture
def jpeg_files(tmp_path):
    """Six small JPEGs of random pixels (odd sizes) as an ImageSet with open_clip's transform (24 px)."""
    import numpy as np
    from PIL import Image
    from lib.data.imageset import ImageSet
    paths = []
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(pixels).save(paths[-1])
    preprocess = models._TensorFriendly(models.open_clip.image_transform(24, is_train=False))
    return ImageSet(paths, torch.arange(6), ["a"] * 6, ["photo"] * 6).with_transform(preprocess)


def test_the_transform_in_two_halves_gives_the_transforms_values(jpeg_files):
    from PIL import Image
    preprocess = jpeg_files.transform
    whole = torch.stack([preprocess(Image.open(path)) for path in jpeg_files.images])
    halves = preprocess.finish(torch.stack([preprocess.decoded(Image.open(path)) for path in jpeg_files.images]))
    assert preprocess.splits and whole.dtype == halves.dtype and torch.equal(whole, halves)


def test_images_cross_the_loader_as_bytes_for_an_accelerator_and_as_model_inputs_on_the_cpu(jpeg_files):
    for_gpu = models.data_loader(jpeg_files, "cuda", 0, num_batches=3, batch_size=2)  # built, never iterated here
    assert isinstance(for_gpu, models._Finished) and for_gpu.loader.dataset[0][0].dtype == torch.uint8
    on_cpu = models.data_loader(jpeg_files, "cpu", 0, num_batches=3, batch_size=2)
    assert isinstance(on_cpu, torch.utils.data.DataLoader) and on_cpu.dataset[0][0].dtype == torch.float32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loaded_images_are_the_transforms_with_and_without_workers(jpeg_files, num_workers):
    from PIL import Image
    loader = models.data_loader(jpeg_files, "cpu", num_workers, num_batches=3, batch_size=2)
    images = torch.cat([batch for batch, _ in loader])
    assert torch.equal(images, torch.stack([jpeg_files.transform(Image.open(p)) for p in jpeg_files.images]))
