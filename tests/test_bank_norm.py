"""Bank-normalised retrieval: a generic sentence stops winning image queries, a hub image stops winning text
queries, each correction leaves the other direction alone, and `dsalign eval --bank-images` reports it."""

from __future__ import annotations

import json

import pytest
import torch

from dsalign.eval.bank_norm import BankScores, bank_metrics, bank_normalize, choose_temperatures
from dsalign.eval.retrieval import recall_at_k

I2T = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr")
T2I = ("t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr")


def _pick(metrics: dict, keys: tuple[str, ...]) -> dict:
    return {k: metrics[k] for k in keys}


def test_generic_sentence_and_hub_image_lose_their_lead() -> None:
    # one sentence per image; sentence 2 fits every image ("a ring"), image 3 fits every sentence
    sims = torch.tensor([[2.0, 0.0, 3.0, 0.0],
                         [0.0, 2.0, 3.0, 0.0],
                         [0.0, 0.0, 5.0, 0.0],
                         [3.0, 3.0, 3.0, 4.0]])
    plain = recall_at_k(sims, captions_per_image=1)
    assert plain["i2t_r1"] == 50.0 and plain["t2i_r1"] == 50.0  # images 0, 1 pick sentence 2; 0, 1 pick image 3
    bank_images = torch.tensor([[0.0, 0.0, 3.0, 0.0]]).repeat(4, 1)  # training images: only sentence 2 fits
    bank_sentences = torch.tensor([[0.0], [0.0], [0.0], [3.0]]).repeat(1, 4)  # training sentences: only image 3
    fixed = recall_at_k(bank_normalize(BankScores(sims, bank_images, bank_sentences), 1.0, 1.0), 1)
    assert fixed["i2t_r1"] == 100.0 and fixed["t2i_r1"] == 100.0


def test_each_shift_leaves_the_other_direction_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(12, 60, generator=g)
    scores = BankScores(sims, torch.randn(30, 60, generator=g) * 3, torch.randn(12, 90, generator=g) * 3)
    both = recall_at_k(bank_normalize(scores, 0.7, 2.0))
    only_sentences = recall_at_k(bank_normalize(scores, 0.7, 2.0) + torch.logsumexp(
        scores.bank_sentences.double() / 2.0, dim=1, keepdim=True) * 2.0)
    assert _pick(both, T2I) != _pick(recall_at_k(sims), T2I) or _pick(both, I2T) != _pick(recall_at_k(sims), I2T)
    assert _pick(both, I2T) == _pick(only_sentences, I2T)  # the image prior does not move image->text ranks
    assert _pick(only_sentences, T2I) == _pick(recall_at_k(sims), T2I)  # nor the sentence prior text->image


def test_temperatures_are_chosen_per_direction_from_the_grid() -> None:
    g = torch.Generator().manual_seed(1)
    sims = torch.randn(20, 100, generator=g) * 4
    scores = BankScores(sims, torch.randn(50, 100, generator=g) * 4, torch.randn(20, 250, generator=g) * 4)
    grid = (0.5, 2.0, 8.0)
    chosen = choose_temperatures(scores, temperatures=grid)
    assert set(chosen) == {"i2t", "t2i"} and set(chosen.values()) <= set(grid)
    for direction in ("i2t", "t2i"):
        def total(tau: float, d: str = direction) -> float:
            m = recall_at_k(bank_normalize(scores, tau, tau))
            return m[f"{d}_r1"] + m[f"{d}_r5"] + m[f"{d}_r10"]
        assert total(chosen[direction]) == max(total(tau) for tau in grid)
    report = bank_metrics(scores, chosen["i2t"], chosen["t2i"])
    assert report["bank_images"] == 50 and report["bank_sentences"] == 250


def test_bad_banks_and_temperatures_are_clear_errors() -> None:
    sims = torch.zeros(3, 15)
    with pytest.raises(ValueError, match="do not cover the 15 sentences"):
        BankScores(sims, torch.zeros(4, 10), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="do not cover the 3 images"):
        BankScores(sims, torch.zeros(4, 15), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        bank_normalize(BankScores(sims, torch.zeros(4, 15), torch.zeros(3, 5)), 0.0, 1.0)


def test_eval_command_reports_bank_metrics_from_training_images(tiny_demo, tmp_path, capsys) -> None:
    from dsalign.bundle import load_alignment_bundle
    from dsalign.cli import main
    from dsalign.evaluate import _feature_loader
    from dsalign.train.align import embed_split, split_scores

    out = tiny_demo[0]
    features = out / "features"
    assert main(["eval", "--bundle", str(out / "model" / "alignment"), "--features", str(features),
                 "--bank-images", "30", "--out", str(tmp_path / "m.json")]) == 0
    retrieval = json.loads((tmp_path / "m.json").read_text())["retrieval"]
    bank = retrieval["bank"]
    assert bank["bank_images"] == 30 and bank["bank_sentences"] == 150 and bank["temperatures_from"] == "val"
    # the same numbers from the embeddings directly: test pairs against the first 30 training images
    model = load_alignment_bundle(out / "model" / "alignment").model
    cpu = torch.device("cpu")
    test = embed_split(model, _feature_loader(features, "test"), 5, cpu)
    train = embed_split(model, _feature_loader(features, "train"), 5, cpu, max_images=30)
    scores = BankScores(split_scores(test), split_scores(test, images=train), split_scores(train, images=test))
    direct = recall_at_k(bank_normalize(scores, bank["temperature_i2t"], bank["temperature_t2i"]))
    assert {k: bank[k] for k in direct} == pytest.approx(direct)
    assert _pick(retrieval, I2T + T2I) == pytest.approx(_pick(recall_at_k(scores.sims), I2T + T2I))


def _manual_scores(regions: torch.Tensor, region_mask: torch.Tensor, words: list[torch.Tensor]) -> torch.Tensor:
    """S[b, j] = sum_t max_(real i) v_bi . s_jt, one pair at a time in float64."""
    out = torch.zeros(len(regions), len(words), dtype=torch.float64)
    for b in range(len(regions)):
        v = regions[b][region_mask[b]].double()
        for j, s in enumerate(words):
            out[b, j] = (s.double() @ v.T).max(1).values.sum() if len(s) else 0.0
    return out


def test_api_ranks_with_the_bank_saved_beside_the_bundle(tiny_demo) -> None:
    """The demo saves its bank; rank_sentences / rank_images subtract the sentence / image prior computed from
    it (checked by hand), bank=False gives plain S, and the saved vectors are the training images'."""
    import dsalign
    from dsalign.evaluate import _feature_loader
    from dsalign.train.align import embed_split

    out = tiny_demo[0]
    model = dsalign.load(out / "model", device="cpu")
    bank = model.bank
    assert bank is not None and bank.regions.shape[0] == 120 and bank.tokens.shape[0] == 600  # all 120 scenes
    train = embed_split(model.alignment.model, _feature_loader(out / "features", "train"), 5, torch.device("cpu"))
    assert torch.allclose(bank.regions, train.regions, atol=2e-3) and torch.equal(bank.tokens, train.tokens)

    image = next((out / "examples").iterdir())
    sentences = ["a red star", "a big blue circle next to a green square", "shape", ""]
    plain = dict(model.rank_sentences(image, sentences, bank=False))
    ranked = model.rank_sentences(image, sentences)
    words = model.embed_sentences(sentences)
    prior = bank.tau_i2t * torch.logsumexp(_manual_scores(bank.regions, bank.region_mask, words) / bank.tau_i2t, 0)
    expected = {i: plain[i] - (float(prior[i]) if words[i].shape[0] else 0.0) for i in range(len(sentences))}
    assert dict(ranked) == pytest.approx(expected, abs=1e-4) and dict(ranked)[3] == 0.0
    assert [i for i, _ in ranked] == sorted(expected, key=lambda i: -expected[i])

    images = sorted((out / "examples").iterdir())
    plain_images = dict(model.rank_images("a red star", images, bank=False))
    bank_words = [s[m] for s, m in zip(model.alignment.model.encode_sentences(bank.tokens, bank.token_mask).detach(),
                                       bank.token_mask)]
    vectors = model.embed_images(images)
    image_prior = [bank.tau_t2i * torch.logsumexp(
        _manual_scores(v[None], torch.ones(1, len(v), dtype=torch.bool), bank_words)[0] / bank.tau_t2i, 0)
        for v in vectors]
    assert dict(model.rank_images("a red star", images)) == pytest.approx(
        {k: plain_images[k] - float(image_prior[k]) for k in plain_images}, abs=1e-4)


def test_a_stale_or_altered_bank_is_refused(tiny_demo, tmp_path, capsys) -> None:
    import shutil

    import dsalign
    from dsalign.bundle import BundleError
    from dsalign.cli import main

    out = tiny_demo[0]
    bundle = tmp_path / "alignment"
    shutil.copytree(out / "model" / "alignment", bundle)
    meta = json.loads((bundle / "bank.json").read_text())
    (bundle / "bank.json").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    with pytest.raises(BundleError, match="other weights"):
        dsalign.load(bundle, device="cpu")
    (bundle / "bank.json").write_text(json.dumps(meta))
    data = (bundle / "bank.safetensors").read_bytes()
    (bundle / "bank.safetensors").write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))
    with pytest.raises(BundleError, match="SHA-256"):
        dsalign.load(bundle, device="cpu")
    (bundle / "bank.json").unlink()
    assert dsalign.load(bundle, device="cpu").bank is None  # no bank: plain scores
    assert main(["eval", "--bundle", str(bundle), "--features", str(out / "features"), "--save-bank"]) == 2
    assert "needs bank images" in capsys.readouterr().err
