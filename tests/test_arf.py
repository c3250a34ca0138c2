"""ARF and FLYP (lib.methods.ContrastiveFineTune and its anchor variants) and the candidate corpus."""
import pytest
import torch

from lib import anchors, methods, models
from lib.data import shapeworld as sw
from lib.losses import contrastive_loss
from lib.train import finetune, set_seed

ONE_TEMPLATE = ("{}",)  # the prompt of a class is its name, so a test can write the texts FLYP pairs with


@pytest.fixture(scope="module")
def setup(random_mini_setup):
    return random_mini_setup


def batch_loss(method, model, tokenizer, train, indices):
    """The method's loss on the training items `indices`, after its setup, with a fixed seed."""
    method.setup(model, tokenizer, train, num_steps=1, seed=0)
    images = torch.stack([train[i][0] for i in indices])
    labels = train.labels[indices]
    set_seed(0)
    return method.loss(model, images, labels, torch.as_tensor(indices)), images, labels


def test_flyp_is_the_clip_loss_between_images_and_class_prompts(setup):
    model, tokenizer, train = setup
    indices = [0, 5, 9, 14, 23]
    loss, images, labels = batch_loss(methods.get_method("flyp", templates=ONE_TEMPLATE), model, tokenizer, train,
                                      indices)
    texts = [train.classnames[y] for y in labels]
    expected = contrastive_loss(model.encode_image(images, normalize=True),
                                model.encode_text(tokenizer(texts), normalize=True), model.logit_scale.exp())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("weight", [0.5, 1.0, 2.0])
def test_caption_anchors_reduce_to_the_clip_loss_when_captions_are_the_class_prompts(setup, weight):
    model, tokenizer, train = setup
    indices = [1, 6, 11, 20]
    flyp, _, _ = batch_loss(methods.get_method("flyp", templates=ONE_TEMPLATE), model, tokenizer, train, indices)
    method = methods.get_method("arf-cap", templates=ONE_TEMPLATE, cap_weight=weight)
    method.setup(model, tokenizer, train, num_steps=1, seed=0)
    method.setup = lambda *args, **kwargs: None  # keep the captions set below
    method.captions = [train.classnames[y] for y in train.labels]
    anchored, _, _ = batch_loss(method, model, tokenizer, train, indices)
    torch.testing.assert_close(anchored, (1 + weight) * flyp)


@pytest.mark.parametrize("anchor_fraction, count", [(1.0, 4), (0.5, 2)])
def test_retrieved_anchors_reduce_to_the_clip_loss_when_each_anchor_is_the_image_itself(setup, anchor_fraction,
                                                                                      count):
    model, tokenizer, train = setup
    indices = [2, 7, 13, 19]
    flyp, images, labels = batch_loss(methods.get_method("flyp", templates=ONE_TEMPLATE), model, tokenizer, train,
                                      indices)
    method = methods.get_method("arf-ret", templates=ONE_TEMPLATE, ret_weight=2.0, num_candidates=50, k=1,
                                anchor_fraction=anchor_fraction)
    method.setup(model, tokenizer, train, num_steps=1, seed=0)
    method.setup = lambda *args, **kwargs: None
    method.neighbours = torch.arange(len(train))[:, None]
    method.anchor_set = sw.make_split("unit-train", domains=["photo"], classes=sw.BASE_CLASSES, n_per_class=4) \
        .with_transform(models.mini_preprocess)
    method.anchor_set.captions = [train.classnames[y] for y in train.labels]
    anchored, _, _ = batch_loss(method, model, tokenizer, train, indices)
    # The first `count` images of the batch bring themselves with their class name as the retrieved pair.
    texts = [train.classnames[y] for y in labels[:count]]
    retrieved = contrastive_loss(model.encode_image(images[:count], normalize=True),
                                 model.encode_text(tokenizer(texts), normalize=True), model.logit_scale.exp())
    torch.testing.assert_close(anchored, flyp + 2.0 * retrieved)
    if count == len(indices):
        torch.testing.assert_close(anchored, 3.0 * flyp)


def test_retrieved_anchors_are_the_exact_nearest_captions_of_the_frozen_model(setup):
    model, tokenizer, train = setup
    corpus = anchors.CandidateCorpus.shapeworld(300)
    method = methods.get_method("arf-ret", candidates=corpus, k=3)
    method.setup(model, tokenizer, train, num_steps=1, seed=0)
    with torch.no_grad():
        text = model.encode_text(tokenizer(corpus.captions), normalize=True)
        image = models.encode_images(model, train)
    expected = (image @ text.T).topk(3, dim=1).indices
    found = [[method.anchor_set.captions[j] for j in row] for row in method.neighbours.tolist()]
    assert found == [[corpus.captions[j] for j in row] for row in expected.tolist()]


def test_shapeworld_candidate_embeddings_are_embedded_once_for_every_process(setup, tmp_path, monkeypatch):
    model, tokenizer, train = setup
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    runs = [methods.get_method("arf-ret", num_candidates=60, k=2, candidate_classes=classes)
            for classes in ("all", "train", "all")]
    runs[0].setup(model, tokenizer, train, num_steps=1, seed=0)
    runs[1].setup(model, tokenizer, train, num_steps=1, seed=0)
    assert len(list(tmp_path.glob("shapeworld-candidates-60-*.pt"))) == 2  # the control has its own file
    anchors._RECENT_EMBEDDINGS.clear()  # a new process: only the files are left
    monkeypatch.setattr(anchors, "encode_text", lambda *a, **k: pytest.fail("embedded the corpus again"))
    runs[2].setup(model, tokenizer, train, num_steps=1, seed=0)
    assert torch.equal(runs[2].neighbours, runs[0].neighbours)


def test_candidate_pairs_are_the_web_corpus_items():
    corpus = anchors.CandidateCorpus.shapeworld(40, seed=2)
    whole = sw.web_corpus(40, seed=2, stream="candidates")
    pairs = corpus.pairs([31, 4])
    assert torch.equal(pairs.images, whole.images[[31, 4]])
    assert pairs.captions == [whole.captions[31], whole.captions[4]] == [corpus.captions[31], corpus.captions[4]]
    assert corpus.pairs([31, 4]) is pairs  # kept for the same indices, and made anew for others
    assert torch.equal(corpus.pairs([4, 31, 7]).images, whole.images[[4, 31, 7]])


def test_a_sweep_builds_the_shapeworld_corpus_and_renders_the_pairs_it_finds_once_per_process(setup, monkeypatch):
    model, tokenizer, train = setup
    rendered, render = [], sw.render_corpus
    monkeypatch.setattr(sw, "render_corpus", lambda *args: rendered.append(len(args[1])) or render(*args))
    runs = [methods.get_method("arf-ret", num_candidates=70, k=2) for _ in range(3)]
    for seed, run in enumerate(runs):
        run.setup(model, tokenizer, train, num_steps=1, seed=seed)
    assert anchors.CandidateCorpus.shapeworld(70) is anchors.CandidateCorpus.shapeworld(70)
    assert anchors.CandidateCorpus.shapeworld(70) is not anchors.CandidateCorpus.shapeworld(70, classes=["star"])
    assert len(rendered) == 1  # the seeds retrieve the same pairs with the frozen model
    whole = sw.web_corpus(70, stream="candidates")
    for image, caption in zip(runs[2].anchor_set.images, runs[2].anchor_set.captions):  # (captions can repeat)
        assert any(torch.equal(image, whole.images[j]) for j, text in enumerate(whole.captions) if text == caption)


def test_arf_tokenizes_each_text_once_per_run_and_encodes_the_tokenizers_rows(setup, monkeypatch):
    from lib.methods import arf
    model, tokenizer, train = setup
    method = methods.get_method("arf-cap")
    method.setup(model, tokenizer, train, num_steps=1, seed=0)
    tokenized, encoded = [], []
    method.tokenizer = lambda texts: tokenized.append(list(texts)) or tokenizer(texts)
    monkeypatch.setattr(arf, "encode_text", lambda model, tokens: encoded.append(tokens))
    method._text(model, ["a red star", "a blue ring", "a red star"])
    method._text(model, ["a green cross", "a red star"])
    assert tokenized == [["a red star", "a blue ring"], ["a green cross"]]
    assert torch.equal(encoded[0], tokenizer(["a red star", "a blue ring", "a red star"]))
    assert torch.equal(encoded[1], tokenizer(["a green cross", "a red star"]))


def test_candidates_of_some_classes_keep_exactly_the_pairs_whose_every_object_is_of_them():
    classes = list(sw.CLASSES[:6])
    whole = sw.web_corpus(200, seed=0, stream="candidates")
    kept = [i for i in range(200) if whole.scenes["shape"][i] < 6 and (whole.scenes["distractor_shape"][i] < 6).all()]
    corpus = anchors.CandidateCorpus.shapeworld(200, classes=classes)
    assert 0 < len(corpus) == len(kept) < 200
    assert corpus.captions == [whole.captions[i] for i in kept]
    assert torch.equal(corpus.pairs([0, len(kept) - 1]).images, whole.images[[kept[0], kept[-1]]])


def test_arf_control_retrieves_only_pictures_of_the_training_classes(setup):
    model, tokenizer, train = setup
    method = methods.get_method("arf-ret", num_candidates=300, k=3, candidate_classes="train")
    method.setup(model, tokenizer, train, num_steps=1, seed=0)
    shown = {sw.CLASSES[c] for c in method.anchor_set.scenes["shape"]}
    shown |= {sw.CLASSES[c] for c in method.anchor_set.scenes["distractor_shape"].flatten() if c >= 0}
    assert shown and shown <= set(train.classnames) and len(train.classnames) < len(sw.CLASSES)
    with pytest.raises(ValueError, match="candidate_classes"):
        methods.get_method("arf-ret", candidate_classes="base").setup(model, tokenizer, train, num_steps=1, seed=0)


def test_candidate_csv_loads_images_relative_to_the_file(tmp_path):
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    (tmp_path / "pairs.csv").write_text("path,caption\nimg/a.png,a red square\n")
    corpus = anchors.CandidateCorpus.from_csv(tmp_path / "pairs.csv")
    pairs = corpus.pairs([0])
    assert corpus.captions == ["a red square"] and pairs.load(0).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(FileNotFoundError, match="path,caption"):
        anchors.CandidateCorpus.from_csv(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("file,text\nimg/a.png,x\n")
    with pytest.raises(ValueError, match="columns 'path' and 'caption'"):
        anchors.CandidateCorpus.from_csv(tmp_path / "bad.csv")


@pytest.mark.parametrize("name, hparams", [("arf", dict(cap_weight=-1.0)), ("flyp", dict(ret_weight="1"))])
def test_anchor_weights_must_be_non_negative_numbers(name, hparams):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        methods.get_method(name, **hparams)


def test_arf_trains_both_encoders_and_keeps_the_scale_clamped(setup):
    model, tokenizer, train = setup
    trained = finetune(model, methods.get_method("arf", num_steps=3, batch_size=8, lr=1e-3, warmup_steps=1,
                                                   num_candidates=200),
                       train, tokenizer, progress=False)
    before, after = model.state_dict(), trained.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"visual", "transformer"} <= changed
    assert 0 <= trained.model.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6


def test_wise_ft_curves_end_at_the_zero_shot_and_the_fine_tuned_model(setup):
    from lib import experiments
    from lib.data import load_benchmark
    from lib.evaluate import evaluate, summarize
    _, tokenizer, _ = setup
    model = models.load_clip("mini", device="cpu")[0]  # pre-trained, so that fine-tuning changes accuracy
    bench = load_benchmark("shapeworld", None, ["photo"], 4, 2).with_transform(models.mini_preprocess)
    tuned = finetune(model, methods.get_method("ft", num_steps=3, batch_size=8, lr=1e-2),
                     bench.train, tokenizer, progress=False).model
    curves = experiments.wise_ft_curves(model, tokenizer, bench, {"ft": tuned}, [0.0, 0.5, 1.0],
                                        models.SHAPEWORLD_TEMPLATES)
    assert list(curves.alpha) == [0.0, 0.5, 1.0] and set(curves.method) == {"ft"}
    for alpha, endpoint in ((0.0, model), (1.0, tuned)):
        expected = summarize(evaluate(endpoint, tokenizer, bench.test, groups=bench.groups).assign(method="x"),
                             bench.train_domains).iloc[0]
        row = curves[curves.alpha == alpha].iloc[0]
        assert all(row[m] == pytest.approx(expected[m]) for m in ("id", "domain_shift", "new"))
    assert not (curves[curves.alpha == 0.0][["id", "new"]].to_numpy() ==
                curves[curves.alpha == 1.0][["id", "new"]].to_numpy()).all()


def test_anchor_examples_show_each_training_image_with_its_neighbours(setup):
    import matplotlib.pyplot as plt
    from lib import plots
    _, _, train = setup
    neighbours = torch.tensor([[3, 1, 2]] * len(train))
    fig = plots.anchor_examples(train, train.captions, neighbours, train, rows=2, shown=3)
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert len(fig.axes) == 8 and labels[1].startswith("retrieved #1") and "\n" in labels[0]
    assert labels[1].replace("\n", " ").endswith(train.captions[3])
    plt.close(fig)


def test_wise_ft_selected_takes_the_alpha_best_on_validation_and_reports_its_test_numbers(setup):
    from lib import experiments
    from lib.data import load_benchmark
    from lib.evaluate import evaluate
    _, tokenizer, _ = setup
    model = models.load_clip("mini", device="cpu")[0]
    bench = load_benchmark("shapeworld", None, ["photo"], 4, 3).with_transform(models.mini_preprocess)
    tuned = {seed: finetune(model, methods.get_method("ft", num_steps=3, batch_size=8, lr=1e-2), bench.train,
                            tokenizer, seed=seed, progress=False).model for seed in (0, 1)}
    selected, curves = experiments.wise_ft_selected(model, tokenizer, bench, tuned, [0.0, 0.5, 1.0])
    assert list(selected.seed) == [0, 1] and set(selected.method) == {"wise-ft"}
    for row in selected.itertuples():
        scores = curves[curves.seed == row.seed].set_index("alpha")
        best = scores.validation.max()
        assert row.alpha == min(a for a in scores.index if scores.validation[a] == best)  # ties: smallest alpha
        assert row.id == pytest.approx(scores.id[row.alpha]) and row.hm == pytest.approx(scores.hm[row.alpha])
    zero = evaluate(model, tokenizer, bench.validation, groups={"base": bench.base_classes})
    assert curves[curves.alpha == 0.0].validation.tolist() == pytest.approx([zero.accuracy.mean()] * 2)
    bench.validation = None
    with pytest.raises(ValueError, match="needs ID validation images"):
        experiments.wise_ft_selected(model, tokenizer, bench, tuned, [0.0, 1.0])
