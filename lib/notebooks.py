"""Run a notebook with other parameters into another folder: `python -m lib.notebooks [run] NOTEBOOK [OUT_DIR] -p ...`.

    python -m lib.notebooks notebooks/01_clipood.ipynb runs/ -p model_name ViT-B-16 -p pretrained openai \\
        -p dataset PACS -p data_root /data/domainbed -p train_domains '["photo"]' -p budget gpu

Unlike papermill, which only warns, a parameter the notebook's `parameters` cell does not define is an error,
and nothing is written inside notebooks/ (the committed notebooks). Both are checked before the kernel starts.
"""
import argparse
import ast
import json
import sys
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def parse_value(text):
    """A value given on the command line (a notebook's -p, the runner's --hparam): JSON when it is JSON, else a
    Python literal when it is one (None, True, tuples, single quotes), else the string itself (quote it, '"0"', to
    keep a number a string)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(run(args.notebook, args.out_dir, parameters, args.name, progress=True))


if __name__ == "__main__":
    main()
