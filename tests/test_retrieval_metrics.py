"""Retrieval and classification metric math on hand-made matrices with known answers."""

from __future__ import annotations

import pytest
import torch

from contrast.evaluate.metrics import (
    classification_metrics,
    image_text_ranks,
    mask_from_lists,
    positive_mask,
    rank_summary,
    recall_at_k,
    rerank,
    retrieval_ranks,
    shortlist,
)
from contrast.models import Model

# 3 images, 5 captions; captions 0, 1 describe image 0, caption 2 image 1, captions 3, 4 image 2.
SIM = torch.tensor(
    [
        [0.1, 0.9, 0.8, 0.2, 0.3],
        [0.7, 0.6, 0.5, 0.4, 0.8],
        [0.3, 0.3, 0.1, 0.3, 0.2],
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def brute_force_rank(scores: list[float], positives: set[int]) -> int:
    """Sort candidates by score (descending), negatives before positives on ties; position of the first positive."""
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], c in positives))
    return next(i for i, c in enumerate(order) if c in positives)


def test_image_to_text_several_captions_per_image():
    i2t, _ = image_text_ranks(SIM, TEXT_TO_IMAGE)
    # image 0: best positive caption 1 (0.9) beats every negative -> 0
    # image 1: its caption scores 0.5; negatives 0.7, 0.6, 0.8 are higher -> 3
    # image 2: best positive 0.3 ties with negatives 0 and 1 (0.3 each) -> both counted against it -> 2
    assert i2t.tolist() == [0, 3, 2]
    assert recall_at_k(i2t, (1, 3, 4)) == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 4: 1.0}


def test_text_to_image_several_captions_per_image():
    _, t2i = image_text_ranks(SIM, TEXT_TO_IMAGE)
    # caption 0 -> image 0 scores 0.1, images 1, 2 score 0.7, 0.3 -> 2
    # caption 1 -> 0.9 is the column maximum -> 0
    # caption 2 -> image 1 scores 0.5, image 0 scores 0.8 -> 1
    # caption 3 -> image 2 scores 0.3, image 1 scores 0.4 -> 1
    # caption 4 -> image 2 scores 0.2, images 0 and 1 score 0.3, 0.8 -> 2
    assert t2i.tolist() == [2, 0, 1, 1, 2]
    summary = rank_summary(t2i, ks=(1, 2))
    assert summary["R@1"] == pytest.approx(0.2)
    assert summary["R@2"] == pytest.approx(0.6)
    assert summary["mean_rank"] == pytest.approx(1 + 6 / 5)
    assert summary["median_rank"] == 2.0


def test_any_positive_in_top_k_counts():
    # one query, four candidates, positives 1 and 3; candidate 3 is second best, candidate 1 last
    scores = torch.tensor([[0.9, 0.0, 0.1, 0.5]])
    ranks = retrieval_ranks(scores, mask_from_lists([[1, 3]], 4))
    assert ranks.tolist() == [1]
    assert recall_at_k(ranks, (1, 2)) == {1: 0.0, 2: 1.0}


def test_tie_counts_against_the_query():
    # positive tied with two negatives and beaten by one: pessimistic rank 3 (the optimistic one would be 1)
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])
    pos = mask_from_lists([[2]], 5)
    assert retrieval_ranks(scores, pos).tolist() == [3]
    assert recall_at_k(retrieval_ranks(scores, pos), (1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}
    # tied positives do not push each other down
    pos2 = mask_from_lists([[0, 2]], 5)
    assert retrieval_ranks(scores, pos2).tolist() == [2]
    # an all-equal row: every negative ties the positive
    flat = torch.zeros(1, 4)
    assert retrieval_ranks(flat, mask_from_lists([[0]], 4)).tolist() == [3]


def test_ranks_match_brute_force_with_many_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40, 12), generator=g).float()  # few distinct values: many ties
    pos = torch.rand(40, 12, generator=g) < 0.2
    pos[torch.arange(40), torch.randint(0, 12, (40,), generator=g)] = True  # at least one positive each
    want = [brute_force_rank(scores[q].tolist(), set(pos[q].nonzero().flatten().tolist())) for q in range(40)]
    assert retrieval_ranks(scores, pos).tolist() == want


def test_recall_matches_torchmetrics_hit_rate_without_ties():
    from torchmetrics.retrieval import RetrievalHitRate

    g = torch.Generator().manual_seed(1)
    q, c = 30, 20
    scores = torch.randn(q, c, generator=g)  # continuous: no ties
    groups = torch.randint(0, 8, (c,), generator=g)
    qgroups = groups[torch.randint(0, c, (q,), generator=g)]
    pos = positive_mask(qgroups, groups)
    ranks = retrieval_ranks(scores, pos)
    indexes = torch.arange(q).repeat_interleave(c)
    for k in (1, 5, 10):
        ref = RetrievalHitRate(top_k=k)(scores.reshape(-1), pos.reshape(-1), indexes=indexes)
        assert recall_at_k(ranks, (k,))[k] == pytest.approx(float(ref), abs=1e-6)


def test_chunked_ranks_equal_unchunked():
    g = torch.Generator().manual_seed(2)
    sim = torch.randint(0, 5, (7, 15), generator=g).float()
    t2img = torch.randint(0, 7, (15,), generator=g)
    t2img[:7] = torch.arange(7)  # every image has a caption
    a = image_text_ranks(sim, t2img, chunk=2)
    b = image_text_ranks(sim, t2img, chunk=1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no positive"):
        retrieval_ranks(torch.zeros(2, 3), mask_from_lists([[0]], 3).expand(2, 3).clone() & torch.tensor([[True], [False]]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="does not match"):
        retrieval_ranks(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------- re-ranking


def test_shortlist_breaks_ties_pessimistically():
    scores = torch.tensor([[0.2, 0.5, 0.5, 0.9]])
    pos = mask_from_lists([[1]], 4)
    assert shortlist(scores, 2, pos).tolist() == [[3, 2]]  # the tied negative 2 takes the last place
    assert shortlist(scores, 3, pos).tolist() == [[3, 2, 1]]


def test_rerank_with_a_known_scorer():
    # 2 queries x 5 candidates; query 0's positive is 2 (3rd by similarity), query 1's is 4 (last)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0], [0.9, 0.8, 0.7, 0.6, 0.5]])
    pos = mask_from_lists([[2], [4]], 5)
    calls = []

    def oracle(qi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:  # knows the answer: 1 for a match, else 0
        calls.extend(zip(qi.tolist(), ci.tolist()))
        return pos[qi, ci].float()

    out = rerank(scores, 3, oracle, pos, batch_size=4)
    # only shortlisted pairs are scored: the top 3 of each query
    assert sorted(calls) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    ranks = retrieval_ranks(out, pos)
    assert ranks.tolist() == [0, 4]  # query 0 moves to the top; query 1's positive, outside the shortlist, stays last
    # the shortlist sits above the rest and the rest keep their original order
    assert out[0, [0, 1, 2]].min() > out[0, [3, 4]].max()
    assert out[1, 3] > out[1, 4]
    # the ITM order inside the shortlist: the positive first, then the two negatives tied by the oracle
    assert torch.argmax(out[0]).item() == 2


def test_rerank_by_a_scorer_that_reverses_order():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    pos = mask_from_lists([[0]], 4)

    def reverse(qi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
        return -scores[qi, ci]

    out = rerank(scores, 3, reverse, pos)
    assert torch.argsort(out[0], descending=True).tolist() == [2, 1, 0, 3]
    assert retrieval_ranks(out, pos).tolist() == [2]


# --------------------------------------------------------------------------------------------------- classification


def test_classification_metrics_hand_made():
    # 6 samples, 3 classes; labels 0,0,0,1,1,2
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 2])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(4 / 6)
    assert "top5" not in m  # 3 classes: top-5 is meaningless
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["per_class_recall"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_classification_metrics_against_torchmetrics_and_ranks():
    from torchmetrics.classification import MulticlassRecall

    g = torch.Generator().manual_seed(3)
    n, c = 200, 8
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    m = classification_metrics(logits, labels)
    ref = MulticlassRecall(num_classes=c, average=None)(logits, labels)
    assert m["per_class_recall"] == pytest.approx(ref.tolist(), abs=1e-6)
    assert m["mean_per_class_recall"] == pytest.approx(float(ref.mean()), abs=1e-6)
    # top-k agrees with the retrieval rank rule on tie-free logits (a class is a candidate, the label the positive)
    ranks = retrieval_ranks(logits, torch.nn.functional.one_hot(labels, c).bool())
    assert m["top1"] == pytest.approx(recall_at_k(ranks, (1,))[1])
    assert m["top5"] == pytest.approx(recall_at_k(ranks, (5,))[5])


def test_mean_per_class_recall_skips_absent_classes():
    labels = torch.tensor([0, 0, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).float()  # class 2 predicted, never true
    m = classification_metrics(logits, labels)
    assert m["per_class_recall"] == [0.5, 1.0, None]
    assert m["mean_per_class_recall"] == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------------- with a model

WORDS = ["red", "yellow", "green", "blue", "crimson"]
S2 = 2**-0.5
TEXT_VEC = torch.tensor([[1, 0, 0], [S2, S2, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
# the true (image colour index, word index) pairs: red image <-> red, yellow; green <-> green; blue <-> blue, crimson
TRUE_PAIRS = {(0, 0), (0, 1), (1, 2), (2, 3), (2, 4)}
RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[WORDS.index(t)] for t in texts])  # (B, 1)


def _preprocess(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)


class ColourModel(Model):
    """Image embedding = mean colour; text embedding = a fixed vector per word (see TEXT_VEC)."""

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.normalize(pixels.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return TEXT_VEC[ids[:, 0]]


class OracleItmModel(ColourModel):
    """An ITM head that knows the true pairs: logit 1 for a true pair, 0 otherwise."""

    capabilities = frozenset({"embed", "itm"})

    def itm_score(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        colour = pixels.mean(dim=(2, 3)).argmax(dim=1)
        return torch.tensor([float((int(c), int(w)) in TRUE_PAIRS) for c, w in zip(colour, input_ids[:, 0])])


def _images():
    from PIL import Image

    return [Image.new("RGB", (4, 4), c) for c in RGB]


def _layouts(tmp_path):
    """The same 3 images / 5 captions in the three supported layouts."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    red, green, blue = _images()
    lists = Dataset.from_dict({"image": [red, green, blue], "caption": [["red", "yellow"], ["green"], ["blue", "crimson"]]})
    ids = Dataset.from_dict(
        {"image": [red, red, green, blue, blue], "caption": ["red", "yellow", "green", "blue", "crimson"],
         "image_id": [7, 7, 3, 5, 5]}
    )
    paths = []
    for name, img in zip("rgb", (red, green, blue)):
        paths.append(str(tmp_path / f"{name}.png"))
        img.save(paths[-1])
    by_path = Dataset.from_dict(
        {"image": [paths[0], paths[0], paths[1], paths[2], paths[2]],
         "caption": ["red", "yellow", "green", "blue", "crimson"]}
    ).cast_column("image", ImageFeature())
    return {"caption lists": lists, "column 'image_id'": ids, "image (same file or same bytes)": by_path}


def test_evaluate_retrieval_groups_captions_in_every_layout(tmp_path):
    from datasets import Dataset

    from contrast.evaluate.retrieval import evaluate_retrieval

    # by hand (see the vectors above): image->text ranks [1, 0, 0] (the red image ties its own "red" with the blue
    # image's "crimson"); text->image ranks [0, 1, 0, 0, 2] ("yellow" ties red and green; "crimson" ranks the blue
    # image below the red one and ties the green one)
    for how, ds in _layouts(tmp_path).items():
        r = evaluate_retrieval(ColourModel(), _preprocess, _tokenize, ds, ks=(1, 2, 3))
        assert r["captions_grouped_by"] == how
        assert (r["num_images"], r["num_texts"]) == (3, 5)
        assert r["image_to_text"]["R@1"] == pytest.approx(2 / 3), how
        assert r["image_to_text"]["R@2"] == 1.0
        assert r["text_to_image"]["R@1"] == pytest.approx(3 / 5), how
        assert r["text_to_image"]["R@2"] == pytest.approx(4 / 5)
        assert r["text_to_image"]["R@3"] == 1.0
        assert r["text_to_image"]["mean_rank"] == pytest.approx(1 + 3 / 5)
        assert "any of its positives" in r["definition"]
    # rows holding identical stored bytes (no id column, no file) are one image too
    red, green, blue = _images()
    same_bytes = Dataset.from_dict({"image": [red, red, green, blue, blue],
                                    "caption": ["red", "yellow", "green", "blue", "crimson"]})
    r = evaluate_retrieval(ColourModel(), _preprocess, _tokenize, same_bytes, ks=(1, 2, 3))
    assert (r["num_images"], r["image_to_text"]["R@1"]) == (3, pytest.approx(2 / 3))
    assert r["text_to_image"]["mean_rank"] == pytest.approx(1 + 3 / 5)


def test_one_caption_per_row_without_grouping():
    from datasets import Dataset

    from contrast.evaluate.retrieval import evaluate_retrieval

    ds = Dataset.from_dict({"image": _images(), "caption": ["crimson", "green", "blue"]})
    r = evaluate_retrieval(ColourModel(), _preprocess, _tokenize, ds, ks=(1,))
    assert r["captions_grouped_by"].startswith("image") and r["num_images"] == 3  # three distinct images
    # "crimson" embeds as red, and is the red image's caption here: every query is found at rank 0
    assert r["image_to_text"]["R@1"] == 1.0 and r["text_to_image"]["R@1"] == 1.0


def test_itm_reranking_with_an_oracle(tmp_path):
    from contrast.evaluate.retrieval import evaluate_retrieval

    ds = _layouts(tmp_path)["column 'image_id'"]
    full = evaluate_retrieval(OracleItmModel(), _preprocess, _tokenize, ds, ks=(1, 2), rerank_itm=3)
    # a perfect ITM over a shortlist holding every positive finds every query first
    assert full["itm_reranked"]["image_to_text"]["R@1"] == 1.0
    assert full["itm_reranked"]["text_to_image"]["R@1"] == 1.0
    assert full["text_to_image"]["R@1"] == pytest.approx(3 / 5)  # the embedding-only figures are reported too
    # a shortlist of 1 cannot change any order
    one = evaluate_retrieval(OracleItmModel(), _preprocess, _tokenize, ds, ks=(1, 2), rerank_itm=1)
    assert one["itm_reranked"]["image_to_text"] == one["image_to_text"]
    assert one["itm_reranked"]["text_to_image"] == one["text_to_image"]
    # shortlist of 2: "crimson"'s image is third (below red, tied with green, and the tie goes against it), so it
    # stays out and keeps rank 2; "yellow" moves from rank 1 to 0; every image query is found first
    two = evaluate_retrieval(OracleItmModel(), _preprocess, _tokenize, ds, ks=(1, 2), rerank_itm=2)
    assert two["itm_reranked"]["text_to_image"]["R@1"] == pytest.approx(4 / 5)
    assert two["itm_reranked"]["text_to_image"]["R@2"] == pytest.approx(4 / 5)
    assert two["itm_reranked"]["image_to_text"]["R@1"] == 1.0


def test_rerank_needs_an_itm_head(tmp_path):
    from contrast.evaluate.retrieval import evaluate_retrieval

    ds = _layouts(tmp_path)["caption lists"]
    with pytest.raises(ValueError, match="itm_score"):
        evaluate_retrieval(ColourModel(), _preprocess, _tokenize, ds, rerank_itm=5)


def test_missing_column_is_named(tmp_path):
    from contrast.evaluate.retrieval import evaluate_retrieval

    ds = _layouts(tmp_path)["caption lists"]
    with pytest.raises(ValueError, match="no column 'text'"):
        evaluate_retrieval(ColourModel(), _preprocess, _tokenize, ds, caption_column="text")
    with pytest.raises(ValueError, match="group-by column 'album'"):
        evaluate_retrieval(ColourModel(), _preprocess, _tokenize, _layouts(tmp_path)["image (same file or same bytes)"], group_by="album")


def test_multi_query_similarity_takes_the_best_query():
    from contrast.objectives import similarity

    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two query embeddings
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    assert similarity(img, txt).tolist() == [[1.0, pytest.approx(0.8), 0.0]]
    assert similarity(img[:, 0], txt).tolist() == [[1.0, pytest.approx(0.6), -1.0]]


def test_blip_itm_reranking_matches_a_brute_force_reorder():
    """A real BLIP model: the re-ranked ranks equal sorting each query's top-3 by the model's own ITM scores."""
    from datasets import Dataset
    from PIL import Image

    from contrast.config import from_dict
    from contrast.evaluate.retrieval import evaluate_retrieval
    from contrast.models import build_model
    from contrast.tokenizer import ClipTokenizer

    tiny = {"kind": "blip", "embed_dim": 32,
            "image": {"name": "vit_tiny_patch16_224", "image_size": 16,
                      "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
            "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}
    torch.manual_seed(0)
    model = build_model(from_dict({"model": tiny}).model).eval()
    tok = ClipTokenizer(16)
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(6)]
    caps = [f"a {c} {s}" for c, s in zip(["red", "blue", "green", "white", "purple", "yellow"],
                                          ["circle", "square", "star", "cross", "diamond", "triangle"])]
    ds = Dataset.from_dict({"image": imgs, "caption": caps})
    r = evaluate_retrieval(model, _preprocess, tok, ds, ks=(1, 2), rerank_itm=3)

    with torch.no_grad():
        pixels = torch.stack([_preprocess(i) for i in imgs])
        ids = tok(caps)
        sim = model.encode_image(pixels) @ model.encode_text(ids).T  # (6, 6), no ties
        itm = torch.stack([model.itm_score(pixels[i].expand(6, -1, -1, -1), ids) for i in range(6)])  # (img, txt)

    def reranked_rank(scores: torch.Tensor, itm_row: torch.Tensor, positive: int) -> int:
        order = torch.argsort(scores, descending=True).tolist()
        top = sorted(order[:3], key=lambda c: -float(itm_row[c]))
        return (top + order[3:]).index(positive)

    i2t = [reranked_rank(sim[i], itm[i], i) for i in range(6)]
    t2i = [reranked_rank(sim[:, t], itm[:, t], t) for t in range(6)]
    for k in (1, 2):
        assert r["itm_reranked"]["image_to_text"][f"R@{k}"] == pytest.approx(sum(x < k for x in i2t) / 6)
        assert r["itm_reranked"]["text_to_image"][f"R@{k}"] == pytest.approx(sum(x < k for x in t2i) / 6)
    assert r["itm_reranked"]["image_to_text"]["mean_rank"] == pytest.approx(1 + sum(i2t) / 6)
    assert r["itm_reranked"]["text_to_image"]["mean_rank"] == pytest.approx(1 + sum(t2i) / 6)
