"""FLYP (Goyal et al., CVPR 2023) and ARF (Han et al., CVPR 2024): contrastive fine-tuning, and the same with
caption anchors and retrieved anchors, L = L_CL + L_Cap + L_Ret.

Notebook: 03_arf_anchors. Methods: `flyp`, `arf`, and the ablation arms `arf-cap` (L_CL + L_Cap) and `arf-ret`
(L_CL + L_Ret). Primitives: lib.losses.contrastive_loss, lib.anchors (ShapeWorldCaptioner and FileCaptioner,
CandidateCorpus, retrieve and retrieve_anchors, anchor_pairs).
"""
import torch
import torch.distributed as dist
from open_clip.loss import gather_features

from .. import anchors
from ..checks import Number
from ..losses import contrastive_loss
from ..models import encode_images, encode_text
from ..train import clamp_logit_scale
from .base import Method, register


@register
class ContrastiveFineTune(Method):
    """FLYP (Goyal et al., 2023): fine-tune as CLIP was pretrained. Each training image is paired with a prompt
    of its class name (one of the templates, drawn per example) and the symmetric InfoNCE of the batch, at the
    model's own logit_scale, trains both encoders (and the scale). Two images of one class in a batch make their
    prompts duplicates that count as negatives: FLYP's choice, kept.

    ARF (Han et al., CVPR 2024) adds two contrastive anchor terms to the same batch, L = L_CL + cap_weight * L_Cap
    + ret_weight * L_Ret; `flyp` is ARF with both weights 0. ARF has no public code; our choices:
    - L_Cap (text-compensated anchors): the batch's own images against rich captions from a captioner
      (lib.anchors.ShapeWorldCaptioner(caption_noise) on ShapeWorld; the `captions` CSV through
      lib.anchors.FileCaptioner for real data), sharing the image features of L_CL.
    - L_Ret (retrieved anchors): before training, the frozen model embeds the candidate corpus's captions and each
      training image's k nearest captions are found by exact kNN (lib.anchors.retrieve); at every step each
      image among the first anchor_fraction of the batch brings one of its k neighbours, drawn at random, so a
      batch of B images has round(anchor_fraction * B) retrieved pairs. Default 0.5: on ShapeWorld, 0.5 and 1.0
      gave the same accuracy (one seed) and 0.5 makes a step about 30 % cheaper.
      `candidates` is a lib.anchors.CandidateCorpus, a CSV path, webdataset shards (a folder of .tar files, e.g.
      CC3M as img2dataset writes it; its caption embeddings are cached on disk once), or None for ShapeWorld's
      candidate stream of `num_candidates` pairs.
      `candidate_classes="train"` keeps only the candidates whose every object is of a training class: our
      control for how much of L_Ret's effect comes from pictures of classes the training set lacks.
    """
    name = "flyp"
    HPARAMS = dict(cap_weight=0.0, ret_weight=0.0, caption_noise=0.0, captions=None, candidates=None,
                   num_candidates=20_000, k=8, anchor_fraction=0.5, candidate_classes="all")
    RANGES = dict(cap_weight=Number(0, why="the weight of the caption-anchor loss"),
                  ret_weight=Number(0, why="the weight of the retrieved-anchor loss"),
                  caption_noise=Number(0, 1, why="the chance of a wrong attribute word"),
                  num_candidates=Number(1, integer=True), k=Number(1, integer=True),
                  anchor_fraction=Number(0, 1, low_open=True, why="the share of a batch's images that bring a "
                                                                  "retrieved pair"))

    def check_dataset(self, dataset):
        """ShapeWorld brings its own captioner and candidate corpus; a folder dataset needs them as files."""
        if dataset == "shapeworld":
            return
        if self.hparams["cap_weight"] and not self.hparams["captions"]:
            raise ValueError(f"{self.name} on {dataset!r} needs a caption for every training image (its caption "
                             f"anchors): give --hparam captions=PATH.csv (columns path,caption; python -m "
                             f"lib.captions writes it), or set cap_weight=0 (e.g. the method 'arf-ret').")
        if self.hparams["ret_weight"] and self.hparams["candidates"] is None:
            raise ValueError(f"{self.name} on {dataset!r} needs a web-like candidate corpus to retrieve anchors "
                             f"from (ShapeWorld's would be silently wrong here): give --hparam "
                             f"candidates=PATH.csv (columns path,caption) or a folder of webdataset .tar "
                             f"shards, or set ret_weight=0 (e.g. 'arf-cap').")

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        self.check_dataset("shapeworld" if train_set.scenes is not None else "a folder dataset")
        device = next(model.parameters()).device
        self.tokenizer, self.device, self.token_rows = tokenizer, device, {}
        templates = self.prompt_templates(train_set)
        self.prompts = [[t.format(c) for t in templates] for c in train_set.classnames]
        self.generator = torch.Generator().manual_seed(seed + 20_000)
        if self.hparams["cap_weight"]:
            captioner = (anchors.FileCaptioner(self.hparams["captions"]) if self.hparams["captions"]
                         else anchors.ShapeWorldCaptioner(self.hparams["caption_noise"], seed=seed))
            self.captions = captioner(train_set)
        if self.hparams["ret_weight"]:
            corpus = self.hparams["candidates"]
            if self.hparams["candidate_classes"] not in ("all", "train"):
                raise ValueError(f"candidate_classes must be 'all' or 'train' (ShapeWorld's candidates of the "
                                 f"training classes only); got {self.hparams['candidate_classes']!r}.")
            if corpus is None:  # "train": a control whose anchors show no class the training set lacks
                corpus = anchors.CandidateCorpus.shapeworld(
                    self.hparams["num_candidates"],
                    classes=train_set.classnames if self.hparams["candidate_classes"] == "train" else None)
            elif not isinstance(corpus, anchors.CandidateCorpus):
                corpus = anchors.CandidateCorpus.from_path(corpus)
            text_features = anchors.cached_text_embeddings(model, tokenizer, corpus.captions,
                                                           cache_path=corpus.cache_path, device=device)
            neighbours = anchors.retrieve_anchors(encode_images(model, train_set), text_features,
                                                  min(self.hparams["k"], len(corpus)))
            # Render or load only the pairs that were found; neighbours index into that subset.
            found, self.neighbours = neighbours.unique(return_inverse=True)
            self.anchor_set = corpus.pairs(found.numpy()).with_transform(train_set.transform)

    def trainable_parameters(self, model):
        return list(model.named_parameters())

    def _text(self, model, texts):
        # A run's texts repeat from step to step (prompts, the training images' captions, the anchors' captions),
        # and open_clip's tokenizer (text cleaning and BPE in Python) cost a tenth of an ARF step on mini-CLIP: each
        # text is tokenized once per run. A text's tokens do not depend on the others tokenized with it.
        new = [text for text in dict.fromkeys(texts) if text not in self.token_rows]
        if new:
            self.token_rows.update(zip(new, self.tokenizer(new)))
        return encode_text(model, torch.stack([self.token_rows[text] for text in texts]).to(self.device))

    def loss(self, model, images, labels, indices):
        scale = model.logit_scale.exp()
        image_features = model.encode_image(images, normalize=True)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # Draws are made for the global batch and sliced like it (lib.train gives rank r the items r::world), so that
        # N processes draw what one process draws.
        choice = torch.randint(len(self.hparams["templates"]), (len(labels) * world,), generator=self.generator)
        choice = choice[rank::world]
        prompts = [self.prompts[y][t] for y, t in zip(labels.tolist(), choice.tolist())]
        # A batch repeats few distinct prompts (classes x templates): encode each once, then index.
        distinct = sorted(set(prompts))
        rows = torch.tensor([distinct.index(p) for p in prompts], device=self.device)
        loss = _global_contrastive_loss(image_features, self._text(model, distinct)[rows], scale)
        if self.hparams["cap_weight"]:
            captions = [self.captions[i] for i in indices.tolist()]
            loss = loss + self.hparams["cap_weight"] * _global_contrastive_loss(
                image_features, self._text(model, captions), scale)
        if self.hparams["ret_weight"]:
            # The first `count` images of the global batch bring a pair; under N processes count is rounded up to a
            # multiple of N, so that every rank gathers as many pairs as the others.
            count = max(1, round(self.hparams["anchor_fraction"] * len(indices) * world))
            count = -(-count // world) * world
            columns = torch.randint(self.neighbours.shape[1], (count,), generator=self.generator)[rank::world]
            pairs = anchors.anchor_pairs(indices[:count // world], self.neighbours, self.anchor_set,
                                         columns=columns)
            anchor_features = model.encode_image(pairs.images.to(self.device), normalize=True)
            loss = loss + self.hparams["ret_weight"] * _global_contrastive_loss(
                anchor_features, self._text(model, pairs.captions), scale)
        return loss

    def after_step(self, model, step):
        clamp_logit_scale(model)  # the scale trains here, as in pretraining


def _global_contrastive_loss(image_features, text_features, scale):
    """contrastive_loss over the whole global batch under torch.distributed: open_clip's gather_features (with
    gradients, as its ClipLoss does) brings every rank's features, so each rank's negatives are the global batch's.
    Every rank then computes the same loss, and the gathered gradient of each rank's own features is world times
    its share; lib.train divides the all-reduced sum by world, so a step is the one-process step."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        image_features, text_features = gather_features(image_features, text_features, gather_with_grad=True,
                                                        rank=dist.get_rank(), world_size=dist.get_world_size())
    return contrastive_loss(image_features, text_features, scale)


@register
class AnchorRobustFineTune(ContrastiveFineTune):
    """ARF: FLYP plus caption anchors and retrieved anchors (L_CL + L_Cap + L_Ret)."""
    name = "arf"
    HPARAMS = dict(cap_weight=1.0, ret_weight=1.0)


@register
class CaptionAnchors(ContrastiveFineTune):
    """The ablation FLYP + caption anchors only (L_CL + L_Cap)."""
    name = "arf-cap"
    HPARAMS = dict(cap_weight=1.0)


@register
class RetrievedAnchors(ContrastiveFineTune):
    """The ablation FLYP + retrieved anchors only (L_CL + L_Ret)."""
    name = "arf-ret"
    HPARAMS = dict(ret_weight=1.0)
