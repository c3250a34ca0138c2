"""SAFT at ViT-B-16 scale: how long saft_mask takes, how much memory it needs, and how small
SparseAdamW's state is next to dense AdamW's; and on mini-CLIP, the per-step training time of the `saft`
method as a ratio to `ft` and to `ce` (its dense equivalent: same loss, same trainable parameters).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_saft.py            # everything
    PYTHONPATH=. .venv/bin/python benchmarks/bench_saft.py steps      # only the mini-CLIP step times

Step times: every method runs the real loop (lib.train.finetune) for STEP_RUN steps per repeat, the methods
interleaved within each repeat so that load changes on a shared machine hit them alike; a step is the time
between two consecutive after_step calls (batch, forward, backward, masking, clipping, optimizer step), and
the reported figure is the median over all steps of all repeats (the first two steps of each run dropped).

Scores are random, shaped like ViT-B-16's 149.6M parameters (the selection cost does not depend on
where the scores come from). The mask is timed in a fresh process so that its peak resident set is
measured against a baseline holding just the scores; the extra peak is reported as a ratio to the
scores' size. Timings are given with torch's default thread count and with one thread, since on a
small machine shared with other jobs a second intra-op thread often waits for a core.
"""

import logging
import multiprocessing
import os
import resource
import sys
import time

import open_clip
import torch

from lib.sparse import SparseAdamW, parameter_scores, saft_mask, state_bytes

STEP_METHODS = ("ft", "ce", "saft", "ft+saft")
STEP_REPEATS = 5
STEP_RUN = 22

ALPHA = 0.001
REPEATS = 3
MIB = 2 ** 20


def vit_b16_shapes() -> dict[str, tuple[int, ...]]:
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def time_mask_in_fresh_process(shapes, num_threads):
    """Runs in a child process: seconds per saft_mask call, extra peak RSS, sizes of scores and mask."""
    torch.set_num_threads(num_threads)
    generator = torch.Generator().manual_seed(0)
    scores = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    baseline = peak_resident_bytes()  # the scores were the last and largest allocation: peak == now
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        mask = saft_mask(scores, ALPHA)
        seconds.append(time.perf_counter() - start)
        n_selected = sum(int(m.count_nonzero()) for m in mask.values())
        mask_bytes = sum(m.numel() * m.element_size() for m in mask.values())
        del mask
    scores_bytes = sum(s.numel() * s.element_size() for s in scores.values())
    return seconds, peak_resident_bytes() - baseline, scores_bytes, mask_bytes, n_selected


def report_mask(shapes, num_threads, context):
    with context.Pool(1) as pool:
        seconds, extra, scores_bytes, mask_bytes, n_selected = pool.apply(
            time_mask_in_fresh_process, (shapes, num_threads))
    print(f"saft_mask, {num_threads} thread(s): {', '.join(f'{s:.2f}' for s in seconds)} s "
          f"(best {min(seconds):.2f} s); selected {n_selected:,}")
    print(f"  peak extra memory {extra / MIB:.0f} MiB = {extra / scores_bytes:.2f} x the scores "
          f"({scores_bytes / MIB:.0f} MiB); of which the returned bool mask is {mask_bytes / MIB:.0f} MiB, "
          f"the rest {(extra - mask_bytes) / scores_bytes:.2f} x the scores")


def report_optimizer_state():
    """One step of dense AdamW and of SparseAdamW (alpha 0.1 %) on ViT-B-16 with fake gradients."""
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3

    dense = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    dense.step()
    dense_bytes = state_bytes(dense)
    del dense

    mask = saft_mask(parameter_scores(model, None, [], strategy="random"), ALPHA)
    sparse = SparseAdamW(model.named_parameters(), mask, lr=1e-5, weight_decay=0.1)
    start = time.perf_counter()
    sparse.step()
    sparse_seconds = time.perf_counter() - start
    sparse_bytes = state_bytes(sparse)
    print(f"optimizer state after one step: dense AdamW {dense_bytes / MIB:.1f} MiB, "
          f"SparseAdamW(alpha={ALPHA}) {sparse_bytes / MIB:.2f} MiB (indices included); "
          f"ratio {sparse_bytes / dense_bytes:.4f} = {100 * sparse_bytes / dense_bytes:.2f} %")
    print(f"  SparseAdamW step: {sparse_seconds:.2f} s over {len(sparse.selected_indices)} parameters with "
          f"selected entries")


def report_step_times(repeats=STEP_REPEATS):
    """Median per-step time of each of STEP_METHODS on mini-CLIP (default budget's batch), interleaved."""
    import statistics

    from lib import experiments, methods, models
    from lib.data import load_benchmark
    from lib.train import finetune

    model, preprocess, tokenizer = models.load_clip("mini", device="cpu")
    settings = experiments.BUDGETS["default"]
    bench = load_benchmark("shapeworld", None, ["photo"], settings["n_train_per_class"],
                           settings["n_test_per_class"]).with_transform(preprocess)
    steps = {name: [] for name in STEP_METHODS}
    for _ in range(repeats):
        for name in STEP_METHODS:
            method = methods.get_method(name, batch_size=settings["batch_size"])
            stamps = []
            after_step = method.after_step
            method.after_step = lambda model, step, after_step=after_step: (after_step(model, step),
                                                                            stamps.append(time.perf_counter()))
            finetune(model, method, bench.train, tokenizer, num_steps=STEP_RUN, device="cpu", progress=False)
            steps[name] += [b - a for a, b in zip(stamps[1:], stamps[2:])]
    median = {name: statistics.median(times) for name, times in steps.items()}
    print(f"mini-CLIP per-step time (median of {len(steps['ft'])} steps over {repeats} interleaved repeats, "
          f"batch {settings['batch_size']}, {torch.get_num_threads()} threads):")
    for name in STEP_METHODS:
        print(f"  {name:8s} {1000 * median[name]:7.1f} ms")
    print(f"  saft / ce (its dense equivalent) = {median['saft'] / median['ce']:.3f}x; "
          f"saft / ft = {median['saft'] / median['ft']:.3f}x; ft+saft / ft = {median['ft+saft'] / median['ft']:.3f}x")
    return median


def main():
    if sys.argv[1:] == ["steps"]:
        report_step_times()
        return
    # open_clip warns that pretrained=None gives random weights, which is all this needs.
    logging.disable(logging.WARNING)
    shapes = vit_b16_shapes()
    total = sum(torch.Size(shape).numel() for shape in shapes.values())
    print(f"ViT-B-16: {len(shapes)} parameter tensors, {total:,} entries; alpha = {ALPHA}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads by default")
    context = multiprocessing.get_context("spawn")
    report_mask(shapes, torch.get_num_threads(), context)
    report_mask(shapes, 1, context)
    report_optimizer_state()
    report_step_times()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
