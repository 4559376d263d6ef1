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


def test_a_rerun_with_more_steps_redoes_the_snippets_and_the_region_generator(tiny_demo, tmp_path):
    """Rerunning the demo over its folder after more alignment steps: the snippets come from the new model (not
    a refusal, "made with other settings"), and the region generator trains again on them instead of resuming
    the finished run that learnt from the old ones."""
    import shutil

    from dsalign.cli import main
    from dsalign.hashing import file_sha256

    out = tmp_path / "demo"
    shutil.copytree(tiny_demo[0], out)
    # The copy stands for the original folder: its snippet records name the copy's features (a moved feature
    # folder is another setting, redone whatever the model), so that only the model differs on the rerun.
    for record in [*(out / "snippets").rglob("*.stats.json"), out / "snippets" / "manifest.json"]:
        data = json.loads(record.read_text())
        data["settings"]["features"] = str((out / "features").resolve())
        record.write_text(json.dumps(data))
    assert main(["demo", "--out", str(out), "--n-train", "120", "--n-val", "20", "--n-test", "20",
                 "--steps", "12", "--caption-steps", "10", "--report-images", "3", "--quiet"]) == 0
    snippets = json.loads((out / "snippets" / "manifest.json").read_text())
    assert snippets["settings"]["model"] == file_sha256(out / "model" / "alignment" / "weights.safetensors")
    assert snippets["resumed_shards"] == 0
    made = (out / "snippets" / "manifest.json").stat().st_mtime_ns
    checkpoints = list((out / "caption_region" / "checkpoints").rglob("*"))
    assert checkpoints and all(path.stat().st_mtime_ns > made for path in checkpoints)
