"""Run a notebook with other parameters into another folder: `python -m lib.notebooks [run] NOTEBOOK [OUT_DIR] -p ...`.

    python -m lib.notebooks notebooks/01_clipood.ipynb runs/ -p model_name ViT-B-16 -p pretrained openai \\
        -p dataset PACS -p data_root /data/domainbed -p train_domains '["photo"]' -p budget gpu

Unlike papermill, which only warns, a parameter the notebook's `parameters` cell does not define is an error,
and nothing is written inside notebooks/ (the committed notebooks). Both are checked before the kernel starts, and
so are the values, with the runner's checks (check_values): seeds, budget, device, methods, templates, model and
checkpoint, dataset folder and train domains.
"""
import argparse
import ast
import contextlib
import sys
from pathlib import Path

from .checks import parse_value

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def known_parameters(notebook):
    """{name: papermill's description} of the variables in the notebook's cell tagged `parameters`."""
    import papermill
    return papermill.inspect_notebook(str(notebook))


def check(notebook, output, parameters):
    """Raise ValueError for an output inside notebooks/ or a parameter the notebook does not define."""
    if NOTEBOOKS_DIR in Path(output).resolve().parents:
        raise ValueError(f"{output} is inside {NOTEBOOKS_DIR}, the committed notebooks; choose an output folder "
                         f"outside notebooks/ (e.g. runs/).")
    known = known_parameters(notebook)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for {Path(notebook).name}; its parameters cell defines "
                         f"{sorted(known)}.")
    defaults = {}
    for name, spec in known.items():
        with contextlib.suppress(ValueError, SyntaxError):  # a default that is an expression is left to the kernel
            defaults[name] = ast.literal_eval(spec["default"])
    check_values({**defaults, **parameters}, Path(notebook).parent)


def check_values(values, folder="."):
    """Raise ValueError (or FileNotFoundError) for a notebook parameter value the run would fail on, with the
    runner's checks: every `*seeds` a non-empty list of seeds and every `*seed` a seed, budget, device, method names,
    templates, model_name with pretrained, and dataset with data_root and train_domains (or test_domain) (paths
    relative to `folder`, where the notebook runs)."""
    from . import runner
    from .checks import SEED, check_number, check_seeds, check_templates
    from .methods import get_method
    from .models import pick_device
    for name, value in values.items():
        if name.endswith("seeds"):
            check_seeds(f"notebook parameter {name}", value)
        elif name.endswith("seed"):
            check_number("notebook parameter", name, value, SEED)
    if "templates" in values and values["templates"] is not None:
        check_templates("notebook parameter", values["templates"])
    if "device" in values:
        pick_device(values["device"])
    for method in values.get("methods", []):  # by name: what a method needs from the data is the notebook's to give
        get_method(method)
    grid = {"methods": ["zeroshot"], "seeds": [0]}
    for name, key in (("model_name", "model_name"), ("budget", "budget"), ("test_domain", "train_domains"),
                      ("train_domains", "train_domains"), ("dataset", "datasets")):
        if name in values:
            grid[key] = [values[name]] if key == "datasets" or name == "test_domain" else values[name]
    for name in ("pretrained", "data_root"):
        if values.get(name) is not None:
            grid[name] = str(Path(folder) / values[name]) if (Path(folder) / values[name]).exists() else values[name]
    runner.validate(runner.expand(grid))


def run(notebook, out_dir="runs", parameters=None, name=None, progress=False):
    """Execute `notebook` with `parameters` into out_dir/<name or the notebook's name>; returns the output path."""
    import papermill
    notebook, parameters = Path(notebook), dict(parameters or {})
    output = Path(out_dir) / (name or notebook.name)
    check(notebook, output, parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                               progress_bar=progress)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("runs"))
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--name", help="output file name (default: the notebook's)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # `python -m lib.notebooks run NOTEBOOK ...` works too
        argv = argv[1:]
    args = parser.parse_args(argv)
    parameters = {name: parse_value(value) for name, value in args.parameter}
    try:
        check(args.notebook, args.out_dir / (args.name or args.notebook.name), parameters)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(run(args.notebook, args.out_dir, parameters, args.name, progress=True))


if __name__ == "__main__":
    main()
