"""The README's Python API examples run, as written, against the tiny demo's model (`demo_out` points at it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _api_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b for b in blocks if "dsalign.load" in b or "draw_regions" in b]


def test_readme_api_examples_run(tiny_demo, tmp_path, monkeypatch):
    out, status, _ = tiny_demo
    assert status == 0
    (tmp_path / "demo_out").symlink_to(out, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    blocks = _api_blocks()
    assert len(blocks) == 2, "the README should hold the API block and the pictures block"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert os.path.getsize("regions.png") > 1000 and os.path.getsize("heatmap.png") > 1000
