"""The alignment model (Eqs. 1-6), the ranking loss (Eq. 9), word-vector init and portable bundles."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from dsalign.bundle import BundleError, export_bundle, load_alignment_bundle
from dsalign.models.alignment import AlignmentConfig, AlignmentModel, init_word_embeddings
from dsalign.models.losses import ranking_loss
from dsalign.text import Vocabulary


def _model(**overrides) -> AlignmentModel:
    torch.manual_seed(0)
    config = dict(vocab_size=30, feature_dim=12, embed_dim=8, word_dim=6, hidden_dim=5, dropout=0.0)
    return AlignmentModel(AlignmentConfig(**{**config, **overrides})).double()


def _brnn_reference(model: AlignmentModel, words: list[int], output=F.relu) -> torch.Tensor:
    """Eqs. 2-6 literally, one unpadded sentence at a time (``output``: f of Eq. 6)."""
    b = model.brnn
    x = [b.embedding.weight[w] for w in words]
    e = [F.relu(b.w_e.weight @ xt + b.w_e.bias) for xt in x]
    n, h = len(words), b.w_f.weight.shape[0]
    hf, hb = [None] * n, [None] * n
    prev = torch.zeros(h, dtype=torch.float64)
    for t in range(n):
        prev = hf[t] = F.relu(e[t] + b.w_f.weight @ prev + b.w_f.bias)
    prev = torch.zeros(h, dtype=torch.float64)
    for t in reversed(range(n)):
        prev = hb[t] = F.relu(e[t] + b.w_b.weight @ prev + b.w_b.bias)
    return torch.stack([output(b.w_d.weight @ (hf[t] + hb[t]) + b.w_d.bias) for t in range(n)])


@pytest.mark.parametrize("word_output", ["relu", "linear"])
def test_brnn_matches_equations_and_ignores_padding(word_output: str) -> None:
    model = _model(word_output=word_output).eval()
    output = F.relu if word_output == "relu" else (lambda x: x)
    sentences = [[5, 7, 9, 11, 4], [6], [8, 8, 3]]
    for pad_to in (5, 9):
        tokens = torch.zeros(len(sentences), pad_to, dtype=torch.long)
        mask = torch.zeros(len(sentences), pad_to, dtype=torch.bool)
        for i, words in enumerate(sentences):
            tokens[i, : len(words)] = torch.tensor(words)
            mask[i, : len(words)] = True
        tokens[~mask] = 13  # garbage in the padding must not matter
        s = model.encode_sentences(tokens, mask)
        assert s.shape == (3, pad_to, 8)
        for i, words in enumerate(sentences):
            torch.testing.assert_close(s[i, : len(words)], _brnn_reference(model, words, output))
            assert (s[i, len(words):] == 0).all()
        assert (s.min() < 0) == (word_output == "linear")  # a linear output keeps negative components


def test_unknown_word_output_is_rejected() -> None:
    with pytest.raises(ValueError, match="word_output"):
        _model(word_output="tanh")


def test_cosine_similarity_scores_unit_vectors() -> None:
    from dsalign.ops.score import score

    dot, cosine = _model(), _model(similarity="cosine")  # same seed: same weights
    regions = torch.randn(2, 3, 12, dtype=torch.float64)
    region_mask = torch.tensor([[True, True, False], [True, True, True]])
    tokens = torch.tensor([[4, 5, 6], [7, 8, 0]])
    token_mask = torch.tensor([[True, True, True], [True, True, False]])
    v, s = cosine.encode_images(regions, region_mask), cosine.encode_sentences(tokens, token_mask)
    torch.testing.assert_close(v, F.normalize(dot.encode_images(regions, region_mask), dim=-1)
                               * region_mask[..., None])
    assert torch.allclose(s[token_mask].norm(dim=-1), torch.ones(5, dtype=torch.float64))
    assert (v[0, 2] == 0).all() and (s[1, 2] == 0).all()
    # Eq. 8 on cosines, by hand for image 1 / sentence 0
    cos = F.cosine_similarity(v[1][:, None], s[0][None], dim=-1)  # [R, T]
    S = score(v, region_mask, s, token_mask)
    assert float(S[1, 0].detach()) == pytest.approx(float(cos.max(0).values.sum().detach()))
    with pytest.raises(ValueError, match="similarity"):
        _model(similarity="l2")


def test_cosine_vectors_keep_the_autocast_dtype(monkeypatch) -> None:
    """CUDA autocast computes F.normalize's norm in fp32 and returned fp32 unit vectors, so a bf16 training run
    scored them on the fp32 path instead of the bf16 Triton kernel. Simulated here: a normalize that answers in
    fp32, as it does under CUDA autocast."""
    model = _model(similarity="cosine").to(torch.bfloat16)
    upcasting = F.normalize
    monkeypatch.setattr(F, "normalize", lambda x, **kw: upcasting(x.float(), **kw))
    v = model.encode_images(torch.randn(2, 3, 12, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bool))
    s = model.encode_sentences(torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.bool))
    assert v.dtype == s.dtype == torch.bfloat16


def test_padding_anywhere_is_skipped_without_a_right_padding_check() -> None:
    """Left-padded or gapped masks read the real words in order (the model used to refuse them, with a host sync
    per forward to find out): the vectors of right padding at the real words, bit for bit, zero elsewhere, and
    the same gradients."""
    model = _model().eval()
    words = [5, 7, 9, 11]

    def encode(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.full(mask.shape, 13)  # garbage in the padding must not matter
        tokens[mask] = torch.tensor(words)
        s = model.encode_sentences(tokens, mask)
        return s, torch.autograd.grad(s.sum(), model.brnn.w_f.weight)[0]

    s_right, grad_right = encode(torch.tensor([[True] * 4 + [False] * 3]))
    torch.testing.assert_close(s_right[0, :4], _brnn_reference(model, words))
    for pattern in ("0001111", "0110101"):
        mask = torch.tensor([[c == "1" for c in pattern]])
        s, grad = encode(mask)
        assert torch.equal(s[mask], s_right[0, :4]) and (s[~mask] == 0).all()
        torch.testing.assert_close(grad, grad_right)


def test_region_projection_and_frozen_embeddings() -> None:
    model = _model(freeze_word_embeddings=True)
    regions = torch.randn(2, 4, 12, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    v = model.encode_images(regions, mask)
    torch.testing.assert_close(v[0, :2], regions[0, :2] @ model.region_proj.weight.T + model.region_proj.bias)
    assert (v[0, 2:] == 0).all()
    assert not model.brnn.embedding.weight.requires_grad


def _loss_reference(s: torch.Tensor, margin: float, hardest: bool) -> float:
    n, total = s.shape[0], 0.0
    for k in range(n):
        rows = [max(0.0, float(s[k, j] - s[k, k] + margin)) for j in range(n) if j != k]
        cols = [max(0.0, float(s[j, k] - s[k, k] + margin)) for j in range(n) if j != k]
        total += (max(rows) + max(cols)) if hardest else (sum(rows) + sum(cols))
    return total


@pytest.mark.parametrize("hardest", [False, True])
def test_ranking_loss_matches_eq9(hardest: bool) -> None:
    torch.manual_seed(1)
    s = torch.randn(6, 6, dtype=torch.float64) * 2
    assert float(ranking_loss(s, 0.7, hardest)) == pytest.approx(_loss_reference(s, 0.7, hardest))
    mean = ranking_loss(s, 0.7, hardest, reduction="mean")
    assert float(mean) == pytest.approx(_loss_reference(s, 0.7, hardest) / 6)
    with pytest.raises(ValueError, match="margin"):
        ranking_loss(s, -1.0)


def test_word_vectors_init_reports_coverage(tmp_path) -> None:
    vocab = Vocabulary(["red", "circle", "square"])
    path = tmp_path / "vectors.txt"
    path.write_text("3 6\nred 1 2 3 4 5 6\nunknownword 0 0 0 0 0 0\ncircle 6 5 4 3 2 1\n")
    model = _model(vocab_size=len(vocab))
    before = model.brnn.embedding.weight.detach().clone()
    coverage = init_word_embeddings(model, path, vocab)
    assert coverage == {"found": 2, "words": 3, "coverage": pytest.approx(2 / 3)}
    weight = model.brnn.embedding.weight.detach()
    assert weight[vocab.stoi["red"]].tolist() == [1, 2, 3, 4, 5, 6]
    assert torch.equal(weight[vocab.stoi["square"]], before[vocab.stoi["square"]])
    path.write_text("red 1 2 3\n")
    with pytest.raises(ValueError, match="3-d vectors"):
        init_word_embeddings(model, path, vocab)


def test_bundle_round_trip_and_tampering(tmp_path) -> None:
    vocab = Vocabulary([f"w{i}" for i in range(26)])
    model = _model().float()
    out = export_bundle(model, vocab, tmp_path / "bundle", {"backbone": "x"}, {"step": 3})
    loaded = load_alignment_bundle(out)
    assert loaded.config == model.config and loaded.features == {"backbone": "x"} and loaded.info == {"step": 3}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    assert not list(tmp_path.glob(".tmp-*"))

    weights = out / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or altered"):
        load_alignment_bundle(out)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match="SHA-256"):
        load_alignment_bundle(out)
    weights.write_bytes(data)
    config = json.loads((out / "config.json").read_text())
    config["model"]["embed_dim"] = 9
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="shape"):
        load_alignment_bundle(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        load_alignment_bundle(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a dsalign bundle"):
        load_alignment_bundle(tmp_path / "empty")
    with pytest.raises(BundleError, match="no such bundle"):
        load_alignment_bundle(tmp_path / "missing")
