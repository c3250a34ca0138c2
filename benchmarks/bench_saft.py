"""SAFT at ViT-B-16 scale: how long saft_mask takes, how much memory it needs, and how small
SparseAdamW's state is next to dense AdamW's.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_saft.py

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
import time

import open_clip
import torch

from lib.sparse import SparseAdamW, parameter_scores, saft_mask, state_bytes

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


def main():
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
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
