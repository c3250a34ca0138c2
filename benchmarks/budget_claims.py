"""What the default budget's steps buy: the main claims of notebooks 00-05 decided at other numbers of steps and
batch sizes.

The walkthrough's time is nearly all training (a run of 150 steps: about 19 s of training and 2 s of evaluation on
a 2-core CPU), so a cheaper default budget means fewer steps or smaller batches: it went from 150 to 100 steps on
this benchmark's evidence. A batch of 32 at 100 steps (`100x32`) was measured too and rejected: it took 420 s for
these 45 runs against 641 s at 100x64, and left two claims that 100x64 decides undecided, ARF against FLYP under
domain shift (+2.0 [-0.8, +4.9] against +4.1 [+2.4, +5.8]) and SAFT against ce under domain shift; 150x32 (579 s)
kept the first but not the second.
This trains the methods below at each size asked (5 seeds by default), through the runner's store (runs
already stored, e.g. by the walkthrough, are read, not trained), and prints the paired effect of each claim with
its 95 % interval and its verdict (lib.verdicts), one column per size, then the time each size took. A size is a
step count (at the budget's batch) or STEPSxBATCH.

    PYTHONPATH=. python benchmarks/budget_claims.py 50 150 100x32    # beside the default budget's own size
"""
import argparse
import time

import pandas as pd

from lib import runner, verdicts
from lib.evaluate import summarize

METHODS = ["zeroshot", "ft", "mms", "bma", "clipood", "flyp", "arf", "saft", "ce"]
CLAIMS = [("ft gains ID over zero-shot", "ft", "zeroshot", "id"),
          ("ft loses new classes against zero-shot", "zeroshot", "ft", "new"),
          ("clipood beats ft on H", "clipood", "ft", "hm"),
          ("clipood beats ft under domain shift", "clipood", "ft", "domain_shift"),
          ("mms alone helps new classes", "mms", "ft", "new"),
          ("bma alone helps new classes", "bma", "ft", "new"),
          ("arf beats flyp under domain shift", "arf", "flyp", "domain_shift"),
          ("arf beats flyp on new classes", "arf", "flyp", "new"),
          ("saft beats ce on new classes", "saft", "ce", "new"),
          ("saft beats ce under domain shift", "saft", "ce", "domain_shift"),
          ("clipood beats zeroshot on H", "clipood", "zeroshot", "hm"),
          ("arf beats zeroshot on H", "arf", "zeroshot", "hm"),
          ("saft beats zeroshot on H", "saft", "zeroshot", "hm")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", help="sizes beside the budget's: STEPS or STEPSxBATCH, e.g. 50 100x32")
    parser.add_argument("--results-dir", default="results", help="the runner's store (the walkthrough's: results)")
    parser.add_argument("--train-domains", nargs="+", default=["cartoon"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", default="default", help="whose sizes the step counts replace")
    args = parser.parse_args(argv)
    claims = [dict(claim=c, method=m, baseline=b, metric=metric) for c, m, b, metric in CLAIMS]
    tables, seconds = [], {}
    for size in [None, *args.sizes]:
        grid = dict(methods=METHODS, seeds=args.seeds, budget=args.budget, train_domains=args.train_domains)
        if size:
            steps, _, batch = size.partition("x")
            grid.update(num_steps=[int(steps)], **({"batch_size": [int(batch)]} if batch else {}))
        own = runner.run_size(runner.expand(grid)[0])
        label = f"{own['num_steps']}x{own['batch_size']}"
        start = time.perf_counter()
        results = runner.run_grid(grid, args.results_dir, progress=False)
        seconds[label] = time.perf_counter() - start
        tables.append(verdicts.verdicts(summarize(results, args.train_domains), claims).assign(size=label))
    table = pd.concat(tables)
    table["effect"] = table.apply(lambda r: f"{r.effect:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]", axis=1)
    for column in ("effect", "verdict"):
        print(table.pivot(index="claim", columns="size", values=column).loc[[c for c, *_ in CLAIMS]].to_string())
        print()
    print("seconds (0 for runs read from the store):", {k: round(v) for k, v in seconds.items()})


if __name__ == "__main__":
    main()
