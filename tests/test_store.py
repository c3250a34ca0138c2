"""A store that never reuses a wrong result (issue 22): provenance in every key, integrity on every read, real
folders as users have them, and every argument checked before anything trains or a kernel starts."""
import fcntl
import json
import re
import shutil
import threading
import time
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from lib import experiments, models, notebooks, runner
from lib.data import folders, load_benchmark
from lib.data.imageset import ImageSet
from test_runner import count_trainings  # the tests folder is not a package

GRID = {"methods": ["zeroshot"], "seeds": [0], "budget": "smoke", "train_domains": ["photo"], "n_test_per_class": 1}
ROWS = 4 * 2  # ShapeWorld's domains x the base and new groups


def never_train(monkeypatch):
    monkeypatch.setattr(experiments, "finetune", lambda *a, **k: pytest.fail("trained before checking"))


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    """A results folder holding one intact run of GRID, and its table."""
    folder = tmp_path_factory.mktemp("store")
    return folder, runner.run_grid(GRID, folder, progress=False)


def _cut_at_row(content):
    return content[:content.rstrip(b"\n").rfind(b"\n") + 1]  # the last row gone, the file still well formed


DAMAGES = {
    "cut at a row boundary": ("results", _cut_at_row),
    "cut mid-row": ("results", lambda content: content[:len(content) // 2]),
    "garbage": ("results", lambda content: bytes(range(256)) * 4),
    "empty": ("results", lambda content: b""),
    "json without its CSV": ("results", None),
    "CSV without its json": ("json", None),
    "change CSV cut": ("change", _cut_at_row),
}


def test_a_damaged_result_is_never_read_and_is_trained_again_with_one_line(monkeypatch, tmp_path, capsys):
    """Every kind of damage at once, one run (seed) each: each is treated as missing, said in one line, trained
    again, and the table read afterwards is the one an undamaged store gives."""
    grid = {**GRID, "seeds": list(range(len(DAMAGES)))}
    table = runner.run_grid(grid, tmp_path, progress=False)
    runs = runner.expand(grid)
    keys = [runner.run_key(run) for run in runs]
    for run, key, (part, change) in zip(runs, keys, DAMAGES.values()):
        path = runner._paths(tmp_path, key)[part]
        if change is None:
            path.unlink()
        else:
            path.write_bytes(change(path.read_bytes()))
        assert runner.stored(tmp_path, key)[0] is False
        with pytest.raises(FileNotFoundError, match="trains it again"):  # read directly: an error, never a table
            runner.load_results([run], tmp_path)
    capsys.readouterr()
    trained = count_trainings(monkeypatch)
    again = runner.run_grid(grid, tmp_path, progress=False)
    assert trained == [("zeroshot", seed) for seed in grid["seeds"]]
    lines = [line for line in capsys.readouterr().err.splitlines() if "treated as missing" in line]
    assert len(lines) == len(keys) and all(key in line for key, line in zip(keys, lines))  # one line per run
    assert again.equals(table) and len(again) == len(DAMAGES) * ROWS
    assert all(runner.stored(tmp_path, key) == (True, None) for key in keys)


def test_the_json_records_what_produced_a_run(stored_run):
    folder, table = stored_run
    run = runner.expand(GRID)[0]
    sidecar = json.loads((folder / f"{runner.run_key(run)}.json").read_text())
    assert sidecar["run"] == run and sidecar["key"] == runner.run_key(run)
    assert sidecar["hparams"]["lr"] == 3e-4 and sidecar["hparams"]["templates"] == list(models.SHAPEWORLD_TEMPLATES)
    assert sidecar["provenance"]["code"] == runner.code_fingerprint()
    assert sidecar["provenance"]["checkpoint"] == "sha256 " + runner._file_hash(
        str(models.MINI_CHECKPOINT.resolve()), models.MINI_CHECKPOINT.stat().st_size,
        models.MINI_CHECKPOINT.stat().st_mtime_ns)
    assert torch.__version__.startswith(sidecar["versions"]["torch"])
    assert {"pandas", "numpy", "open_clip_torch"} <= set(sidecar["versions"]) and sidecar["time"][:2] == "20"
    assert sidecar["device"] == "cpu" and sidecar["results"]["rows"] == len(table) == ROWS


def test_the_code_fingerprint_follows_behaviour_not_comments_or_docstrings(tmp_path):
    module = tmp_path / "methods.py"
    module.write_text('"""Methods."""\nLR = 3e-4\n\n\ndef lr():\n    return LR\n')
    before = runner.source_fingerprint(tmp_path)
    module.write_text('"""Methods, reworded."""\n# the default rate\nLR = 3e-4  # why\n\n\ndef lr():\n'
                      '    """The rate."""\n    return LR\n')
    assert runner.source_fingerprint(tmp_path) == before
    module.write_text('"""Methods."""\nLR = 1e-4\n\n\ndef lr():\n    return LR\n')  # the default lr changed
    assert runner.source_fingerprint(tmp_path) != before
    (tmp_path / "plots.py").write_text("COLOR = 'red'\n")  # a module that cannot change a stored number
    after = runner.source_fingerprint(tmp_path)
    (tmp_path / "plots.py").write_text("COLOR = 'blue'\n")
    assert runner.source_fingerprint(tmp_path) == after


def test_a_re_pretrained_default_checkpoint_changes_the_key(monkeypatch, tmp_path):
    checkpoint = tmp_path / "mini_clip.pt"
    shutil.copy(models.MINI_CHECKPOINT, checkpoint)
    monkeypatch.setattr(models, "MINI_CHECKPOINT", checkpoint)
    run = runner.expand(GRID)[0]
    before = runner.run_key(run)
    assert run["pretrained"] is None
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"] = {k: v + 1 for k, v in state["state_dict"].items()}
    torch.save(state, checkpoint)
    assert runner.run_key(run) != before


def _toy(root, classes=("cat", "dog", "horse", "zebra"), domains=("art", "photo"), n=3):
    for d in domains:
        for c in classes:
            (root / "Toy" / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 80, 0)).save(root / "Toy" / d / c / f"{i}.png")
    return root


FOLDER = {"methods": ["zeroshot"], "datasets": ["Toy"], "train_domains": ["photo"], "budget": "smoke"}


def test_changed_files_and_another_working_folder_never_reuse_a_result(monkeypatch, tmp_path):
    results = tmp_path / "results"
    _toy(tmp_path / "a" / "data")
    _toy(tmp_path / "b" / "data", classes=("ant", "bee", "cow", "yak"))
    trained = count_trainings(monkeypatch)
    monkeypatch.chdir(tmp_path / "a")
    first = runner.run_grid({**FOLDER, "data_root": "data"}, results, progress=False)
    monkeypatch.chdir(tmp_path / "b")  # the same command in another folder: other files, other classes
    other = runner.run_grid({**FOLDER, "data_root": "data"}, results, progress=False)
    assert len(trained) == 2 and set(first.n) and not other.equals(first)
    image = tmp_path / "b" / "data" / "Toy" / "photo" / "ant" / "0.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(image)  # a file replaced
    runner.run_grid({**FOLDER, "data_root": "data"}, results, progress=False)
    assert len(trained) == 3
    runner.run_grid({**FOLDER, "data_root": "data"}, results, progress=False)
    assert len(trained) == 3  # nothing changed: the stored run is read


def test_hidden_and_system_entries_are_skipped_at_every_level_and_named(tmp_path):
    root = _toy(tmp_path)
    for domain in ("art", "photo"):
        for junk in (".thumbs", "@eaDir"):  # NAS and thumbnailer folders beside the classes
            (root / "Toy" / domain / junk).mkdir()
            Image.new("RGB", (8, 8)).save(root / "Toy" / domain / junk / "thumb.png")
        (root / "Toy" / domain / "cat" / "._0.png").write_bytes(b"\0\5\26\7 a resource fork")
    (root / "Toy" / ".ipynb_checkpoints").mkdir()  # at the domain level
    (root / "Toy" / "__MACOSX").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = folders.load_domainbed(root, "Toy")
    assert data.classnames == ["cat", "dog", "horse", "zebra"] and sorted(set(data.domains)) == ["art", "photo"]
    assert len(data) == 2 * 4 * 3 and not any("/." in p or "@" in p for p in data.images)
    said = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(said) == 1
    for name in (".thumbs", "@eaDir", ".ipynb_checkpoints", "__MACOSX", "._0.png"):
        assert name in said[0]
    with pytest.warns(UserWarning, match="skipped 8 hidden or system entries"):
        bench = load_benchmark("Toy", root, ["photo"], 2, 1, progress=False)
    assert bench.base_classes == ["cat", "dog"] and bench.new_classes == ["horse", "zebra"]
    with pytest.raises(FileNotFoundError, match=r"no folder for the train domain\(s\) \['.ipynb_checkpoints'\]"):
        runner.validate(runner.expand({**FOLDER, "data_root": str(root), "train_domains": [".ipynb_checkpoints"]}))


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", np.array([[0, 257, 32896, 65535]], dtype="<u2"), [0, 1, 128, 255]),
    ("I;16B", np.array([[0, 514, 65535, 1000]], dtype=">u2"), [0, 2, 255, 4]),
    ("I", np.array([[0, 65535, 12850, 300]], dtype=np.int32), [0, 255, 50, 1]),
    ("F", np.array([[0.0, 1.0, 0.5, 0.2]], dtype=np.float32), [0, 255, 128, 51]),
])
def test_16_bit_and_float_images_are_rescaled_to_8_bit(tmp_path, mode, values, expected):
    path = tmp_path / "image.tif"
    Image.frombytes(mode, (4, 1), values.tobytes()).save(path)  # TIFF keeps every one of these modes
    rgb = np.asarray(ImageSet([str(path)], torch.tensor([0]), ["x"], ["d"]).load(0))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == expected and (rgb[..., 1] == rgb[..., 0]).all()


def test_a_16_bit_png_on_disk_decodes_to_its_values_and_an_unknown_scale_is_rejected_with_its_path(tmp_path):
    root = _toy(tmp_path)
    path = root / "Toy" / "photo" / "cat" / "0.png"
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1028  # 0 .. 64764: 8-bit values 0, 4, ..., 252
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    data = folders.load_domainbed(root, "Toy", domains=["photo"], classes=["cat"])
    decoded = np.asarray(data.load(data.images.index(str(path))))
    assert (decoded[..., 0] == np.round(values / 257)).all() and decoded.max() == 252  # old: 99 % saturated at 255
    bad = root / "Toy" / "photo" / "dog" / "1.tif"
    Image.fromarray(np.full((8, 8), 7.5, dtype=np.float32)).save(bad)  # float outside [0, 1]: scale unknown
    with pytest.raises(OSError, match=f"(?s)1 of .* images cannot be read.*{bad}: a F image .* outside"):
        load_benchmark("Toy", root, ["photo"], None, None, progress=False)


def test_a_class_group_with_fewer_than_two_classes_is_rejected_before_training(monkeypatch, tmp_path):
    never_train(monkeypatch)
    _toy(tmp_path, classes=("cat", "dog", "zebra"))  # base cat, dog; new zebra alone
    with pytest.raises(ValueError, match=r"class group\(s\) \{'new': \['zebra'\]\} have fewer than two classes"):
        runner.run_grid({**FOLDER, "data_root": str(tmp_path)}, tmp_path / "results", progress=False)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "1", "-1"], r"seed must be an integer in \[0, 4294967296\).*got -1"),
    (["--seeds", str(2**32)], "seed must be an integer"),
    (["--device", "tpu"], "Unknown device 'tpu'; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (["--device", "cuda:7"], r"Device 'cuda:7' is not available: this machine has \d+ CUDA GPU"),
    (["--hparam", 'templates=["a photo of a thing."]'], r"exactly one \{\} where the class name goes"),
    (["--hparam", "templates=['a {} of a {}.']"], r"exactly one \{\}"),
    (["--hparam", 'templates="a photo of a {}."'], "templates must be a non-empty list of strings"),
    (["--model-name", "ViT-B-32", "--pretrained", "opeanai"], r"tags are \['openai', 'laion400m_e31'"),
])
def test_bad_arguments_are_usage_errors_before_anything_loads_or_trains(monkeypatch, tmp_path, capsys, argv,
                                                                        message):
    never_train(monkeypatch)
    monkeypatch.setattr(experiments, "benchmark", lambda *a, **k: pytest.fail("loaded data before checking"))
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--methods", "ft", "--budget", "smoke", "--datasets", "Toy", "--data-root", str(tmp_path),
                     "--train-domains", "photo", "--results-dir", str(tmp_path / "results"), *argv])
    assert exit_info.value.code == 2
    assert len(re.findall(message, capsys.readouterr().err)) == 1
    assert not (tmp_path / "results").exists()


def test_a_list_of_templates_is_one_value_and_a_list_of_lists_a_sweep(monkeypatch):
    class Planned(Exception):
        pass
    monkeypatch.setattr(runner, "prepare", lambda grid, *a, **k: (_ for _ in ()).throw(Planned(runner.expand(grid))))
    with pytest.raises(Planned) as planned:  # the README's example
        runner.main(["--methods", "ft", "--hparam", 'templates=["a photo of a {}."]'])
    assert [run["hparams"] for run in planned.value.args[0]] == [{"templates": ["a photo of a {}."]}]
    runs = runner.expand({"methods": ["ft"], "hparams": {"templates": [["a {}."], ["the {}.", "a {}."]]}})
    assert [run["hparams"]["templates"] for run in runs] == [["a {}."], ["the {}.", "a {}."]]
    runner.validate(runs)


@pytest.mark.parametrize("parameters, message", [
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": [0, 2**32]}, "seed must be an integer"),
    ({"budget": "huge"}, "Unknown budget 'huge'"),
    ({"device": "tpu"}, "Unknown device 'tpu'"),
    ({"methods": ["ft", "sgd-magic"]}, "Unknown method 'sgd-magic'"),
    ({"train_domains": ["x-ray"]}, r"train_domains \['x-ray'\] are not ShapeWorld domains"),
    ({"model_name": "ViT-Q-99"}, "Unknown model name"),
    ({"dataset": "PACS", "data_root": "/nonexistent-root"}, "No dataset folder"),
])
def test_notebook_parameter_values_are_checked_before_a_kernel_starts(monkeypatch, tmp_path, capsys, parameters,
                                                                       message):
    import papermill
    monkeypatch.delenv("LAB_BUDGET", raising=False)  # the parameter's budget is the one checked
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a kernel started"))
    argv = ["notebooks/01_clipood.ipynb", str(tmp_path)]
    for name, value in parameters.items():
        argv += ["-p", name, json.dumps(value)]
    with pytest.raises(SystemExit) as exit_info:
        notebooks.main(argv)
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_pretrained_weights_not_in_the_cache_fail_at_once_and_name_where_open_clip_looks(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"not in the Hugging Face hub cache.*{tmp_path}/models--timm--"
                                                f"vit_base_patch32_clip_224.openai.*create_model_and_transforms"):
        models.check_model("ViT-B-32", "openai")
    assert time.monotonic() - start < 5  # no retries of an unreachable hub
    snapshot = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    (tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("0")
    models.check_model("ViT-B-32", "openai")  # in the cache: accepted


def test_a_checkpoint_of_another_architecture_or_a_foreign_file_is_one_clear_error(tmp_path):
    with torch.device("meta"):
        shapes = open_clip.create_model("ViT-B-32", device="meta").state_dict()
    vit_b_32 = tmp_path / "vit_b_32.pt"  # ViT-B-32's tensors, each one stored value broadcast (a tiny file)
    torch.save({name: torch.zeros(()).expand(tensor.shape) for name, tensor in shapes.items()}, vit_b_32)
    with pytest.raises(ValueError, match=r"another architecture than 'ViT-B-16' \(e.g. visual.*\[768, 3, 32, 32\] "
                                         r"there and \[768, 3, 16, 16\]"):
        models.check_model("ViT-B-16", str(vit_b_32))
    models.check_model("ViT-B-32", str(vit_b_32))
    wrapped = tmp_path / "wrapped.pt"  # lib.pretrain's format, another model's tensors
    torch.save({"state_dict": torch.load(vit_b_32, weights_only=True)}, wrapped)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match=r"is not a mini-CLIP checkpoint .*\['weights'\]"):
        models.check_model("mini", str(foreign))
    with pytest.raises(ValueError, match="another architecture than 'mini'"):
        models.check_model("mini", str(wrapped))


def test_ctrl_c_prints_one_line_with_the_command_that_resumes(monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "execute", interrupted)
    argv = ["--methods", "zeroshot", "--budget", "smoke", "--results-dir", str(tmp_path)]
    try:
        runner.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a traceback")
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 130 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "0 of 1 runs are stored" in err and err.endswith(f"-m lib.runner {' '.join(argv)}")


def test_a_runner_waiting_for_another_runners_claim_says_what_it_waits_for(monkeypatch, tmp_path, capsys):
    key = runner.run_key(runner.expand(GRID)[0])
    tmp_path.mkdir(exist_ok=True)
    other = open(tmp_path / f"{key}.lock", "w")  # another runner's claim, released (it died) a moment later
    fcntl.flock(other, fcntl.LOCK_EX)
    threading.Timer(1.0, other.close).start()
    trained = count_trainings(monkeypatch)
    runner.run_grid(GRID, tmp_path, progress=True)
    assert trained == [("zeroshot", 0)]
    assert f"waiting for another runner training zeroshot seed 0 (it holds {tmp_path / key}.lock)" in \
        capsys.readouterr().err


def test_stored_models_are_the_very_runs_whose_results_are_stored(monkeypatch, tmp_path):
    from lib.evaluate import evaluate
    grid = {**GRID, "methods": ["ft", "flyp"], "seeds": [0, 1]}  # flyp: both towers and the scale train
    trained = count_trainings(monkeypatch)
    results = runner.stored_compare(grid, results_dir=tmp_path, progress=False, keep_weights=[1])
    assert len(trained) == 4 and len(list((tmp_path / "weights").glob("*.pt"))) == 2  # seed 1's only
    tuned = runner.stored_models({**grid, "seeds": [1]}, results_dir=tmp_path, progress=False)
    assert len(trained) == 4 and set(tuned) == {("ft", 1), ("flyp", 1)}  # read, not trained again
    model, tokenizer, bench, _ = experiments.setup(train_domains=["photo"], budget="smoke", device="cpu",
                                                   sizes={"n_test_per_class": 1}, progress=False)
    for (method, seed), fine_tuned in tuned.items():
        stored = results[(results.method == method) & (results.seed == seed)].reset_index(drop=True)
        again = evaluate(fine_tuned, tokenizer, bench.test, groups=bench.groups, templates=bench.templates)
        assert np.array_equal(again.accuracy, stored.accuracy)
    kept = sorted(len(torch.load(path)) for path in (tmp_path / "weights").glob("*.pt"))
    assert 0 < kept[0] < kept[1] == len(model.state_dict())  # what each changed: ft the image tower, flyp all
    assert not torch.equal(tuned["flyp", 1].token_embedding.weight, model.token_embedding.weight)


def test_stored_models_fine_tune_a_run_stored_without_weights_once_and_leave_its_results(monkeypatch, tmp_path):
    grid = {**GRID, "methods": ["ft"], "seeds": [0]}
    runner.stored_compare(grid, results_dir=tmp_path, progress=False)
    files = {path: path.read_bytes() for path in tmp_path.rglob("*.*")}
    trained = count_trainings(monkeypatch)
    first = runner.stored_models({**grid, "methods": ["ft", "mms"]}, results_dir=tmp_path, progress=False)
    assert sorted(trained) == [("ft", 0), ("mms", 0)]  # ft for its weights, mms trained and stored
    assert all(path.read_bytes() == content for path, content in files.items())  # ft's results untouched
    again = runner.stored_models({**grid, "methods": ["ft", "mms"]}, results_dir=tmp_path, progress=False)
    assert len(trained) == 2
    assert all(torch.equal(a, b) for key in first for a, b in zip(first[key].state_dict().values(),
                                                                   again[key].state_dict().values()))
    with pytest.raises(ValueError, match="lp classifies with a head of its own"):
        runner.stored_models({**grid, "methods": ["lp"]}, results_dir=tmp_path, progress=False)
