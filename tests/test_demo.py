"""`dsalign demo` (the README's main command) runs every stage end to end on a small shapes set."""

import json


def test_demo_runs_every_stage_and_reports_where_things_went(tiny_demo):
    out, status, printed = tiny_demo
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("shards", "features", "model", "snippets", "picture", "regions_picture", "examples", "report",
                "metrics_table"):
        assert summary[key] in printed
    for bundle in ("alignment", "caption_full", "caption_region"):
        assert (out / "model" / bundle / "weights.safetensors").is_file()
    assert (out / "alignment.png").stat().st_size > 1000 and (out / "regions.png").stat().st_size > 1000
    assert len(list((out / "examples").glob("*.png"))) == 3
    assert summary["test_retrieval"]["images"] == 20
    assert summary["test_retrieval"]["bank"]["bank_images"] == 120  # every training scene (fewer than 1,000)
    assert 0 <= summary["test_alignment"]["accuracy"] <= 1 and summary["test_alignment"]["mentions"] > 20
    # the snippets name the model that made them (a --resume with another bundle is then refused)
    from dsalign.hashing import file_sha256

    snippet_settings = json.loads((out / "snippets" / "manifest.json").read_text())["settings"]
    assert snippet_settings["model"] == file_sha256(out / "model" / "alignment" / "weights.safetensors")
    captions, regions = summary["test_captions"], summary["test_region_descriptions"]
    assert captions["images"] == 20 and captions["CIDEr"] >= 0 and 0 <= captions["novel_fraction"] <= 1
    assert regions["regions"] > 20 and 0 <= regions["exact_match"] <= regions["attribute_match"] <= 1
    assert len(summary["example_captions"]) == 5


def test_demo_writes_a_report_and_a_metrics_table(tiny_demo):
    out, _, _ = tiny_demo
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 3 and "shapes-test-000000" in html
    table = (out / "metrics.md").read_text()
    for metric in ("R@1", "bank-normalised image->text", "word->object accuracy", "CIDEr", "exact phrase match"):
        assert metric in table
