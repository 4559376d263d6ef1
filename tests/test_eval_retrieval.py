"""Retrieval metrics: hand-made ranks, perfect and collapsed matrices, a sort-based loop reference, COCO folds."""

import numpy as np
import pytest
import torch

from dsalign.eval.retrieval import KEYS, coco_1k, coco_5k, recall_at_k


def loop_reference(sims: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    """VSE++-style ranks from a full sort per query (valid for untied scores)."""
    n_images, n_sentences = sims.shape
    i2t = []
    for i in range(n_images):
        order = list(np.argsort(-sims[i], kind="stable"))
        i2t.append(min(order.index(j) for j in range(n_sentences) if owner[j] == i))
    t2i = []
    for j in range(n_sentences):
        order = list(np.argsort(-sims[:, j], kind="stable"))
        t2i.append(order.index(owner[j]))
    out = {}
    for name, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
    return out


def test_hand_made_ranks():
    # 3 images x 2 captions; sentence j belongs to image j // 2.
    sims = np.array(
        [
            [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],  # image 0: its sentence 0 is top          -> rank 0
            [0.8, 0.7, 0.1, 0.6, 0.9, 0.2],  # image 1: best true is 3 (0.6), 3 above  -> rank 3
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.45],  # image 2: best true is 4 (0.5) top       -> rank 0
        ]
    )
    # t2i 0-based ranks per sentence: s0 0, s1 2, s2 2, s3 0, s4 1, s5 0
    m = recall_at_k(sims, captions_per_image=2)
    assert m["i2t_r1"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == 100.0
    assert m["i2t_medr"] == 1.0  # ranks 0, 3, 0 -> median 0
    assert m["t2i_r1"] == 50.0
    assert m["t2i_r5"] == m["t2i_r10"] == 100.0
    assert m["t2i_medr"] == 1.0  # ranks 0,0,0,1,2,2 -> median 0.5 -> floor 0 -> 1
    assert m["rsum"] == pytest.approx(sum(m[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")))
    assert set(m) == set(KEYS)


def test_median_rank_floors_the_numpy_median():
    # 4 images, 1 caption each; a diagonal entry of -1 puts that sentence's image last (rank 3) among zeros.
    sims = np.eye(4)
    sims[1, 1] = -1.0
    m = recall_at_k(sims, captions_per_image=1)
    assert m["t2i_medr"] == 1.0  # ranks 0, 3, 0, 0 -> median 0
    sims[2, 2] = -1.0  # ranks 0, 3, 3, 0 -> median 1.5 -> floor 1 -> 2
    assert recall_at_k(sims, captions_per_image=1)["t2i_medr"] == 2.0


def test_perfect_matrix():
    n, c = 7, 5
    sims = torch.zeros(n, n * c)
    for i in range(n):
        sims[i, i * c : (i + 1) * c] = 1.0
    m = recall_at_k(sims, captions_per_image=c)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert m[k] == 100.0
    assert m["i2t_medr"] == m["t2i_medr"] == 1.0
    assert m["rsum"] == 600.0


@pytest.mark.parametrize("seed", [0, 1])
def test_random_matrix_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n, c = 37, 5
    sims = rng.standard_normal((n, n * c))
    sims[np.arange(n * c) // c, np.arange(n * c)] += 1.5  # some signal, so that recalls are not all tiny
    ref = loop_reference(sims, np.arange(n * c) // c)
    for ties in ("pessimistic", "optimistic"):  # no ties in continuous scores: both equal the sort
        got = recall_at_k(torch.from_numpy(sims).float(), captions_per_image=c, ties=ties)
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, abs=1e-9), (k, ties)


def test_variable_captions_per_image_matches_loop_reference():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 8, size=20)
    owner = np.repeat(np.arange(20), counts)
    owner = owner[rng.permutation(owner.size)]  # sentences need not be grouped by image
    sims = rng.standard_normal((20, owner.size))
    got = recall_at_k(sims, sentence_to_image=owner)
    ref = loop_reference(sims, owner)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k


def test_equal_captions_per_image_via_index_array_equals_default():
    rng = np.random.default_rng(4)
    sims = rng.standard_normal((10, 30))
    assert recall_at_k(sims, sentence_to_image=np.arange(30) // 3) == recall_at_k(sims, captions_per_image=3)


def test_ties_pessimistic_and_optimistic():
    # Collapsed model: every score equal. Pessimistic: every wrong item ranks above the truth.
    n, c = 6, 5
    flat = np.zeros((n, n * c))
    pes = recall_at_k(flat, captions_per_image=c)
    assert pes["i2t_r1"] == pes["i2t_r10"] == pes["t2i_r1"] == 0.0
    assert pes["i2t_medr"] == n * c - c + 1  # all 25 wrong sentences ahead
    assert pes["t2i_medr"] == n  # all 5 wrong images ahead
    opt = recall_at_k(flat, captions_per_image=c, ties="optimistic")
    assert opt["rsum"] == 600.0 and opt["i2t_medr"] == opt["t2i_medr"] == 1.0

    # One wrong item tied with the truth: rank 1 (pessimistic) vs 0 (optimistic).
    sims = np.eye(3)
    sims[0, 1] = 1.0  # image 0 scores sentence 1 as high as its own sentence 0
    pes = recall_at_k(sims, captions_per_image=1)
    opt = recall_at_k(sims, captions_per_image=1, ties="optimistic")
    assert pes["i2t_r1"] == pytest.approx(200 / 3) and opt["i2t_r1"] == 100.0
    assert pes["t2i_r1"] == pytest.approx(200 / 3) and opt["t2i_r1"] == 100.0  # sentence 1: image 0 ties image 1

    # True sentences tied with each other are not wrong items: still rank 0 when nothing wrong is as high.
    sims = np.array([[2.0, 2.0, 1.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    assert recall_at_k(sims, captions_per_image=2)["i2t_r1"] == 100.0


def test_coco_1k_is_the_mean_over_folds():
    rng = np.random.default_rng(5)
    n_folds, fold, c = 5, 12, 5
    sims = rng.standard_normal((n_folds * fold, n_folds * fold * c))
    sims[np.arange(sims.shape[1]) // c, np.arange(sims.shape[1])] += np.repeat(np.linspace(0, 3, n_folds), fold * c)
    got = coco_1k(sims, captions_per_image=c, fold_size=fold)
    per_fold = [
        recall_at_k(sims[f * fold : (f + 1) * fold, f * fold * c : (f + 1) * fold * c], captions_per_image=c)
        for f in range(n_folds)
    ]
    for k in KEYS:
        assert got[k] == pytest.approx(np.mean([m[k] for m in per_fold])), k
    # Folds only see their own images: with rising signal the folds differ, so this is not the whole-matrix value.
    assert got["i2t_r1"] != pytest.approx(recall_at_k(sims, captions_per_image=c)["i2t_r1"])


def test_coco_5k_shape_and_value():
    sims = torch.zeros(1, 1).expand(5000, 25000)  # stride-0 view: the full COCO 5K shape without the memory
    m = coco_5k(sims)
    assert m["i2t_r10"] == 0.0 and m["i2t_medr"] == 24996.0 and m["t2i_medr"] == 5000.0
    with pytest.raises(ValueError, match="5,000 test images"):
        coco_5k(np.zeros((1000, 5000)))


@pytest.mark.parametrize(
    ("sims", "kwargs", "match"),
    [
        (np.zeros((3, 10)), {}, r"needs \(3, 15\)"),
        (np.zeros(15), {}, "matrix"),
        (np.zeros((0, 0)), {}, "matrix"),
        (np.zeros((3, 15)), {"captions_per_image": 0}, "positive int"),
        (np.array([[1.0, np.nan]]), {"captions_per_image": 2}, "NaN"),
        (np.zeros((2, 4), dtype=bool), {"captions_per_image": 2}, "real scores"),
        (np.zeros((2, 4)), {"sentence_to_image": [0, 0, 1]}, "4 entries"),
        (np.zeros((2, 4)), {"sentence_to_image": [0, 0, 1, 2]}, "outside"),
        (np.zeros((3, 4)), {"sentence_to_image": [0, 0, 1, 1]}, "no sentence"),
        (np.zeros((2, 4)), {"sentence_to_image": [0.0, 0, 1, 1]}, "integer"),
        (np.zeros((2, 4)), {"captions_per_image": 2, "ties": "random"}, "ties"),
    ],
)
def test_bad_inputs(sims, kwargs, match):
    with pytest.raises(ValueError, match=match):
        recall_at_k(sims, **kwargs)


def test_coco_1k_rejects_uneven_folds():
    with pytest.raises(ValueError, match="folds of 4"):
        coco_1k(np.zeros((10, 50)), fold_size=4)


def test_dtypes_agree():
    # Integer-valued scores are exact in every dtype, ties included, so all inputs must give the same metrics.
    rng = np.random.default_rng(6)
    ints = rng.integers(-20, 20, size=(15, 45))
    ref = recall_at_k(ints, captions_per_image=3)
    for sims in (torch.from_numpy(ints).bfloat16(), torch.from_numpy(ints).half(), ints.astype(np.float32)):
        assert recall_at_k(sims, captions_per_image=3) == ref
