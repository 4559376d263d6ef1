"""The Python inference API (`dsalign.load`) and its commands, on the tiny demo's barely trained model folder.

Quality is measured elsewhere (docs/results.md); here: every method's contract and the odd inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dsalign
from dsalign.api import DEFAULT_BETA, MAX_WORDS, InputError, Region, Snippet
from dsalign.bundle import BundleError
from dsalign.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_demo):
    out, status, _ = tiny_demo
    assert status == 0
    return out / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return dsalign.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def scene(tiny_demo):
    """A test image of the demo (PIL) and its boxes, plus the PNG the demo saved of it."""
    from dsalign.demo import report_items

    out = tiny_demo[0]
    item = report_items(out / "shards", "test", 1)[0]
    return item.image, list(item.boxes), out / "examples" / f"{item.name}.png"


def _odd_images(image: Image.Image) -> list:
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    return [image.convert("L"), rgba, image.convert("P"), image.convert("CMYK"), np.asarray(image.convert("L")),
            np.asarray(rgba), image.resize((17, 300)), image.resize((900, 40))]


def test_load_recognises_each_bundle(model, model_dir):
    assert model.alignment is not None and model.caption_full is not None and model.caption_region is not None
    assert "alignment" in repr(model) and "regions" in repr(model)
    only = dsalign.load(model_dir / "alignment", device="cpu")
    assert only.caption_full is None
    with pytest.raises(BundleError, match="no full-image caption bundle"):
        only.caption(["x.png"])
    with pytest.raises(BundleError, match="no such bundle"):
        dsalign.load(model_dir / "missing")


def test_caption_any_image_mode_and_size(model, scene):
    image, _, path = scene
    inputs = [path, str(path), image, *_odd_images(image)]
    captions = model.caption(inputs, beam_size=2)
    assert len(captions) == len(inputs) and all(isinstance(c, str) for c in captions)
    assert captions[0] == captions[1] == captions[2]  # path, str path and PIL image are the same picture
    assert model.caption(image, beam_size=2) == [captions[2]]  # one image, not a list
    assert model.caption([]) == []


def test_bad_images_are_one_line_errors(model, tmp_path):
    with pytest.raises(InputError, match="no such image file"):
        model.caption([tmp_path / "missing.jpg"])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        model.caption([text])
    with pytest.raises(InputError, match="shape"):
        model.caption([np.zeros((4, 4, 7), dtype=np.uint8)])
    with pytest.raises(InputError, match="a path, a PIL image or an array"):
        model.caption([42])


def test_describe_regions(model, scene):
    image, boxes, _ = scene
    regions = model.describe_regions(image, top_k=3, beam_size=2)
    assert 1 <= len(regions) <= 3 and all(isinstance(r, Region) for r in regions)
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)
    assert all(0 <= r.score <= 1 and all(0 <= x <= 1 for x in r.box) for r in regions)
    given = model.describe_regions(image, top_k=None, beam_size=2, boxes=boxes)
    assert sorted(r.box for r in given) == sorted(tuple(map(float, b)) for b in boxes)


def test_align_covers_the_sentence_with_snippets(model, scene):
    image, boxes, _ = scene
    sentence = "A big red star next to a small blue circle"
    snippets = model.align(image, sentence, beta=0.0, boxes=boxes)
    assert all(isinstance(s, Snippet) for s in snippets)
    assert snippets[0].start == 0 and snippets[-1].end == 10
    assert all(a.end == b.start for a, b in zip(snippets, snippets[1:]))
    assert " ".join(s.text for s in snippets) == "a big red star next to a small blue circle"
    assert all(0 <= s.region <= len(boxes) for s in snippets)
    one_region = model.align(image, sentence, beta=1e6, boxes=boxes)
    assert len(one_region) == 1 and one_region[0].text == "a big red star next to a small blue circle"
    with pytest.raises(InputError, match="beta"):
        model.align(image, sentence, beta=-1)
    # β is in score units: the demo's cosine model gets the cosine default unless told otherwise.
    assert model.alignment.model.config.similarity == "cosine" and model.default_beta == DEFAULT_BETA["cosine"]
    assert model.align(image, sentence, boxes=boxes) == model.align(image, sentence, beta=0.2, boxes=boxes)


def test_odd_sentences_have_defined_results(model, scene):
    image = scene[0]
    assert model.align(image, "") == [] and model.align(image, "?!  ...") == []
    unknown = model.align(image, "zzyzx qwfp")
    assert unknown[-1].end == 2
    long = model.align(image, " ".join(["star"] * 1000))
    assert long[-1].end == MAX_WORDS
    ranked = dict(model.rank_sentences(image, ["a red star", "", "zzyzx"]))
    assert ranked[1] == 0.0 and sorted(ranked) == [0, 1, 2]
    with pytest.raises(InputError, match="string"):
        model.rank_sentences(image, [None])


def test_ranking_is_the_papers_score_of_the_embeddings(model, scene):
    """Plain S (bank=False); the bank-normalised default is checked in test_bank_norm.py."""
    image, _, path = scene
    sentences = ["a red star", "two blue circles on a gray background", "nothing"]
    ranked = model.rank_sentences(image, sentences, bank=False)
    assert sorted(i for i, _ in ranked) == [0, 1, 2]
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    v = model.embed_images([image])[0]
    for index, score in ranked:
        s = model.embed_sentences([sentences[index]])[0]
        assert score == pytest.approx(float((s @ v.T).max(1).values.sum()), rel=1e-4, abs=1e-4)
    images = model.rank_images("a red star", [image, image.convert("L"), path])
    assert sorted(i for i, _ in images) == [0, 1, 2]
    assert model.embed_sentences([""])[0].shape[0] == 0
    assert model.embed_sentences([]) == [] and model.embed_images([]) == []
    assert model.rank_images("x", []) == [] and model.rank_sentences(image, []) == []


def _run(*argv: str, capsys) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_commands(model_dir, scene, tmp_path, capsys):
    _, _, path = scene
    status, out, _ = _run("caption", str(path), str(path), "--bundle", str(model_dir), "--beam-size", "2",
                          "--device", "cpu", capsys=capsys)
    assert status == 0 and out.count(str(path)) == 2
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg")
    status, out, err = _run("caption", str(path), str(garbage), "--bundle", str(model_dir), "--beam-size", "2",
                            "--device", "cpu", "--json", capsys=capsys)
    results = json.loads(out)  # the readable image keeps its caption; the other is named, and the status says so
    assert status == 2 and "garbage.jpg: not a readable image" in err and len(err.strip().splitlines()) == 1
    assert "caption" in results[0] and "not a readable image" in results[1]["error"]
    status, out, _ = _run("describe", str(path), "--bundle", str(model_dir), "--out", str(tmp_path / "d.png"),
                          "--json", "--top-k", "2", "--device", "cpu", capsys=capsys)
    assert status == 0 and len(json.loads(out.split("describe:")[0])) <= 2
    assert Image.open(tmp_path / "d.png").size[0] >= 128
    status, out, _ = _run("align", str(path), "a red star", "--bundle", str(model_dir), "--out",
                          str(tmp_path / "a.png"), "--heatmap", str(tmp_path / "h.png"), "--device", "cpu",
                          capsys=capsys)
    assert status == 0 and (tmp_path / "a.png").is_file() and (tmp_path / "h.png").is_file()
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(path).save(folder / "one.png")
    Image.open(path).convert("L").save(folder / "two.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    status, out, _ = _run("report", "--bundle", str(model_dir), "--images", str(folder), "--out",
                          str(tmp_path / "r.html"), "--beam-size", "2", "--device", "cpu", capsys=capsys)
    assert status == 0 and "skipped broken.png" in out and "2 images" in out
    html = (tmp_path / "r.html").read_text()
    assert "one.png" in html and "two.jpg" in html


@pytest.mark.parametrize("argv, message", [
    (["caption", "missing.jpg"], "no such image file"),
    (["describe", "{image}", "--bundle", "nowhere"], "no such bundle"),
    (["align", "{image}", "--bundle", "{model}"], "give IMG and SENTENCE"),
    (["report", "--images", "nowhere", "--out", "r.html"], "no such folder"),
])
def test_command_errors_are_one_line(model_dir, scene, argv, message, capsys):
    argv = [a.format(image=scene[2], model=model_dir) for a in argv]
    if "--bundle" not in argv:
        argv += ["--bundle", str(model_dir)]
    status, _, err = _run(*argv, capsys=capsys)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_eval_command_scores_the_predictions_it_writes(model_dir, tiny_demo, tmp_path, capsys):
    from dsalign.eval.captions import score_captions
    from dsalign.evaluate import training_captions

    features = tiny_demo[0] / "features"
    status, _, _ = _run("eval", "--bundle", str(model_dir), "--features", str(features), "--beam-size", "2",
                        "--metrics", "BLEU,CIDEr", "--out", str(tmp_path / "m.json"), "--predictions",
                        str(tmp_path / "new" / "p.json"), capsys=capsys)
    assert status == 0
    result = json.loads((tmp_path / "m.json").read_text())
    predictions = json.loads((tmp_path / "new" / "p.json").read_text())  # its folder is made
    assert result["retrieval"]["images"] == 20 and result["regions"]["regions"] > 20
    assert len(predictions["captions"]) == 20 and set(result["settings"]) >= {"beam_size", "metrics"}
    references: dict[str, list[str]] = {}
    from dsalign.data.shards import iter_tar_samples, shard_paths

    for url in shard_paths(features, "test"):
        for _, members in iter_tar_samples(url):
            meta = json.loads(members["json"])
            references[meta["image_id"]] = [c["raw"] for c in meta["captions"]]
    direct = score_captions(predictions["captions"], references, ("BLEU", "CIDEr"))
    for key in ("BLEU-1", "BLEU-4", "CIDEr"):
        assert result["captions"][key] == pytest.approx(direct[key])
    assert len(training_captions(features)) == 600  # 120 training scenes x 5


def test_retrieval_without_enough_captions_names_the_split(model_dir, tiny_demo):
    from dsalign.bundle import load_alignment_bundle
    from dsalign.evaluate import retrieval_on_split

    bundle = load_alignment_bundle(model_dir / "alignment")
    with pytest.raises(ValueError, match=r"retrieval on split 'test' of .*: no image of the split has 6 captions "
                                         r"\(the most any image has: 5\); R@K needs 6"):
        retrieval_on_split(bundle, tiny_demo[0] / "features", "test", captions_per_image=6)


def test_two_bundles_of_one_kind_are_refused(model_dir, tiny_demo, tmp_path, capsys):
    import shutil

    folder = tmp_path / "ambiguous"
    for name in ("alignment", "caption_full"):
        shutil.copytree(model_dir / name, folder / name)
    shutil.copytree(model_dir / "caption_full", folder / "caption_full_2")
    with pytest.raises(BundleError, match="more than one full bundle"):
        dsalign.load(folder, device="cpu")
    status, _, err = _run("eval", "--bundle", str(folder), "--features", str(tiny_demo[0] / "features"),
                          capsys=capsys)
    assert status == 2 and "more than one full bundle" in err and len(err.strip().splitlines()) == 1


def test_region_features_are_computed_once_per_image(model, scene, monkeypatch):
    import torch

    from dsalign.features.extract import FeatureExtractor

    image = scene[0].rotate(90)  # pixels no earlier test used
    calls: list[int] = []
    extract = FeatureExtractor.extract

    def counting(self, images, *args, **kwargs):
        calls.append(len(images))
        return extract(self, images, *args, **kwargs)

    monkeypatch.setattr(FeatureExtractor, "extract", counting)
    model.describe_regions(image, beam_size=2)
    model.align(image, "a red star")
    model.rank_sentences(image, ["a red star", "a blue circle"])
    assert calls == [1]
    whole_only = model.region_features([image], [[]])[0]
    assert len(whole_only.boxes) == 1 and calls == [1, 1]
    # caption() reads only region 0, which does not depend on the proposals
    torch.testing.assert_close(whole_only.features[0], model.region_features([image])[0].features[0],
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 14000 x 14000 PNG (196 MP, past PIL's decompression-bomb limit) of about 24 KB: 1-bit, all black."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (14000, 14000)).save(path)
    return path


def test_huge_images_are_one_line_errors(model, bomb):
    from dsalign.viz import ImageTooLarge, to_rgb

    with pytest.raises(ImageTooLarge, match=r"image too large \(196 MP\)"):
        to_rgb(bomb)
    for call in (lambda: model.caption(bomb), lambda: model.describe_regions(bomb),
                 lambda: model.align(bomb, "a red star"), lambda: model.rank_images("a red star", [bomb])):
        with pytest.raises(InputError, match=r"bomb.png: image too large \(196 MP\)"):
            call()


def test_commands_name_a_huge_image_and_report_skips_it(model_dir, scene, bomb, tmp_path, capsys):
    status, _, err = _run("caption", str(bomb), "--bundle", str(model_dir), "--device", "cpu", capsys=capsys)
    assert status == 2 and "image too large (196 MP)" in err and len(err.strip().splitlines()) == 1
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(scene[2]).save(folder / "one.png")
    (folder / "bomb.png").write_bytes(bomb.read_bytes())
    status, out, _ = _run("report", "--bundle", str(model_dir), "--images", str(folder), "--out",
                          str(tmp_path / "r.html"), "--beam-size", "1", "--top-k", "1", "--device", "cpu",
                          capsys=capsys)
    assert status == 0 and "skipped bomb.png" in out and "image too large" in out and "1 images" in out
    assert "one.png" in (tmp_path / "r.html").read_text()


def test_a_single_sentence_or_image_is_one_item(model, scene):
    image, _, path = scene
    assert len(model.rank_sentences(image, "a red star")) == 1
    assert model.rank_sentences(image, "a red star", bank=False) == model.rank_sentences(image, ["a red star"],
                                                                                           bank=False)
    (vectors,) = model.embed_sentences("a red star")
    assert vectors.shape[0] == 3
    assert len(model.rank_images("a red star", path)) == 1 and len(model.rank_images("a red star", image)) == 1
    assert len(model.embed_images(np.asarray(image))) == 1
    with pytest.raises(InputError, match="a sentence or a list of them"):
        model.embed_sentences(None)
    box = (0.1, 0.1, 0.6, 0.6)
    (lone,) = model.region_features(image, boxes=[box])  # a lone image's boxes need no extra list
    assert len(lone.boxes) == 2 and lone.boxes[1] == pytest.approx(box, abs=1e-6)
    with pytest.raises(InputError, match="boxes: 1 lists for 2 images"):
        model.region_features([image, image], boxes=[[box]])
    with pytest.raises(InputError, match="each box must be four numbers"):
        model.region_features([image], boxes=[[0.5]])


@pytest.mark.parametrize("call, message", [
    (lambda m, img: m.describe_regions(img, top_k=-1), "top_k: expected an integer >= 1, got -1"),
    (lambda m, img: m.describe_regions(img, top_k=0), "top_k"),
    (lambda m, img: m.describe_regions(img, top_k=2.5), "top_k"),
    (lambda m, img: m.describe_regions(img, max_len=0), "max_len"),
    (lambda m, img: m.caption([img], beam_size=1.5), "beam_size: expected an integer >= 1, got 1.5"),
    (lambda m, img: m.caption([img], beam_size=True), "beam_size"),
    (lambda m, img: m.caption([img], length_penalty=float("nan")), "length_penalty"),
    (lambda m, img: m.align(img, "a red star", beta=float("inf")), "beta"),
    (lambda m, img: m.caption(np.full((32, 32, 3), np.nan)), "NaN or infinite"),
    (lambda m, img: m.caption(np.full((32, 32), np.inf, dtype=np.float32)), "NaN or infinite"),
])
def test_bad_arguments_are_input_errors(model, scene, call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(model, scene[0])


def test_a_bad_device_is_named(model_dir):
    with pytest.raises(InputError, match="cannot use device 'foo'"):
        dsalign.load(model_dir, device="foo")


def test_eval_refuses_features_of_another_width(model_dir, tiny_demo, tmp_path, capsys):
    """The demo's bundles were trained on crop features with the box appended (1284-d): features made without
    --box-geometry (1280-d) are refused before any shard is read."""
    from dsalign.data.manifest import load_manifest, write_manifest

    manifest = load_manifest(tiny_demo[0] / "features")
    assert manifest["feature_dim"] == 1284 and manifest["settings"]["box_geometry"]
    settings = {k: v for k, v in manifest["settings"].items() if k != "box_geometry"}
    write_manifest(tmp_path, {**manifest, "feature_dim": 1280, "settings": {**settings, "feature_dim": 1280}})
    status, out, err = _run("eval", "--bundle", str(model_dir), "--features", str(tmp_path), capsys=capsys)
    assert status == 2 and not out and len(err.strip().splitlines()) == 1
    assert err.strip().endswith(f"features in {tmp_path} are 1280-d; the bundle was trained on 1284-d features "
                                "(box geometry)")
