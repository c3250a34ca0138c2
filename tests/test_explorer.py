"""The trade-off explorer: knob values are runner runs (a value seen before trains nothing), defaults are the
runs notebook 05 stores, and the figure draws what it is given."""
from lib import experiments, explorer, plots
from lib.methods import get_method

GRID = {"seeds": [0], "budget": "smoke", "train_domains": ["photo"]}


def test_every_knob_offers_its_registry_default_and_a_default_is_the_run_as_shipped():
    assert set(explorer.defaults()) == set(explorer.KNOBS)
    for knob, (method, name, values) in explorer.KNOBS.items():
        assert get_method(method).hparams[name] in values, knob
        default = get_method(method).hparams[name]
        assert explorer.knob_grid(GRID, knob, default)["hparams"] == {}
        other = next(v for v in values if v != default)
        assert explorer.knob_grid(GRID, knob, other) == {**GRID, "methods": [method], "hparams": {name: other}}


def test_a_knob_value_trains_once_and_is_read_back_afterwards(monkeypatch, tmp_path):
    trained = []
    real = experiments.finetune
    monkeypatch.setattr(experiments, "finetune", lambda model, methods, *a, **k: trained.extend(m.name for m in methods)
                        or real(model, methods, *a, **k))
    knob = "bma_beta"
    assert explorer.stored(GRID, tmp_path).empty
    first = explorer.frontier(GRID, {knob: 2.0}, tmp_path)
    assert len(trained) == 1 and first.method.tolist() == ["clipood"] and first.value.tolist() == [2.0]
    again = explorer.frontier(GRID, {knob: 2.0}, tmp_path)
    assert len(trained) == 1 and again.equals(first)
    seen = explorer.stored(GRID, tmp_path)
    assert seen[["knob", "value"]].values.tolist() == [[knob, 2.0]] and len(trained) == 1
    metrics = first[["id", "domain_shift", "new", "hm"]]
    assert metrics.notna().all(axis=None) and ((metrics >= 0) & (metrics <= 1)).all(axis=None)
    fig = explorer.explore(GRID, {knob: 2.0}, results_dir=tmp_path)
    assert len(trained) == 1  # the figure reads the stored run
    assert [ax.get_xlabel().split(" (")[0] for ax in fig.axes] == ["domain shift", "new classes"]
    assert "bma_beta = 2" in [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    plots.plt.close(fig)


def test_interact_shows_one_figure_per_move_and_a_note_without_a_kernel(monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt
    import ipywidgets
    from IPython import display as ipython_display
    matplotlib.use("Agg")
    plt.close("all")  # figures other tests left open would be counted
    shown, drawn = [], []
    monkeypatch.setattr(ipython_display, "display", lambda bundle, raw=False: shown.append(bundle))
    monkeypatch.setattr(plt, "show", lambda: drawn.append(len(plt.get_fignums())) or plt.close("all"))
    result = explorer.interact(lambda beta: plt.subplots()[0], "a note", beta=ipywidgets.SelectionSlider(
        options=[0.1, 0.5, 2.0], value=0.5))
    assert result is None  # a returned widget would be shown twice
    assert len(shown) == 1 and shown[0]["text/plain"] == "a note"
    assert "application/vnd.jupyter.widget-view+json" in shown[0]
    assert drawn == [1]  # drawn once when built, one figure
    plt.close("all")


def test_missing_runs_counts_what_a_first_use_trains(monkeypatch, tmp_path):
    assert explorer.missing_runs(GRID, {"bma_beta": 2.0, "saft_alpha": 0.01}, tmp_path) == 2
    assert explorer.missing_runs({**GRID, "seeds": [0, 1]}, {"bma_beta": 2.0}, tmp_path) == 2
    sweep = {"bma_beta": [0.1, 2.0], "saft_alpha": [0.01]}
    assert explorer.missing_runs(GRID, sweep, tmp_path) == 3
    trainings = []
    real = experiments.finetune
    monkeypatch.setattr(experiments, "finetune", lambda model, methods, *a, **k: trainings.append(len(methods))
                        or real(model, methods, *a, **k))
    explorer.train(GRID, sweep, tmp_path)
    assert sorted(trainings) == [1, 2]  # the two betas average one trajectory of mms
    assert explorer.missing_runs(GRID, sweep, tmp_path) == 0
    assert explorer.frontier(GRID, {"bma_beta": 0.1}, tmp_path).value.tolist() == [0.1] and len(trainings) == 2
