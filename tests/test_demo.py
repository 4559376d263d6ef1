"""`dsalign demo` (the README's main command) runs every stage end to end on a small shapes set."""

import json

from dsalign.cli import main


def test_demo_runs_every_stage_and_reports_where_things_went(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-train", "120", "--n-val", "20", "--n-test", "20",
                 "--steps", "10", "--quiet"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for key in ("shards", "features", "bundle", "snippets", "picture"):
        assert summary[key] in printed
    assert (out / "bundle" / "weights.safetensors").is_file() and (out / "alignment.png").stat().st_size > 1000
    assert summary["test_retrieval"]["images"] == 20
    assert 0 <= summary["test_alignment"]["accuracy"] <= 1 and summary["test_alignment"]["mentions"] > 20
    assert json.loads((out / "snippets" / "manifest.json").read_text())
