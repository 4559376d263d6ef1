"""The command line: help for every subcommand, the shapes data set end to end, one-line errors."""

import json
import subprocess
import sys

import pytest
from data_factory import write_karpathy

from dsalign.cli import build_parser, main
from dsalign.data.shards import iter_tar_samples, shard_paths


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"prepare", "info"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 200


def test_prepare_shapes_writes_ground_truth_through_the_common_path(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["prepare", "shapes", "--out", str(out), "--n-train", "40", "--n-val", "8", "--n-test", "8",
                 "--shard-size", "16", "--quiet"]) == 0
    assert "train: 40 images, 200 captions, 3 shards" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "shapes" and manifest["vocab_size"] > 30
    key, members = next(iter_tar_samples(shard_paths(out, "train")[0]))
    meta = json.loads(members["json"])
    assert "png" in members and meta["boxes"] and len(meta["box_labels"]) == len(meta["boxes"])
    for caption in meta["captions"]:
        for start, end, box in caption["spans"]:
            assert 0 <= start < end <= len(caption["tokens"]) and 0 <= box < len(meta["boxes"])
    assert main(["info", str(out), "--verify"]) == 0
    assert "40 readable samples, skipped 0 samples" in capsys.readouterr().out


def test_prepare_karpathy_and_info(tmp_path, capsys):
    path, images = write_karpathy(tmp_path / "src", n_images=6)
    out = tmp_path / "out"
    assert main(["prepare", "karpathy", "--captions", str(path), "--images", str(images), "--out", str(out),
                 "--min-count", "1", "--quiet"]) == 0
    assert main(["info", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["splits"]["val"]["images"] == 2


@pytest.mark.parametrize("argv, message", [
    (["prepare", "karpathy", "--captions", "/nonexistent.json", "--images", "/tmp", "--out", "X"],
     "file not found: /nonexistent.json"),
    (["prepare", "karpathy", "--captions", "c.json", "--images", "/nonexistent_dir", "--out", "X"],
     "image folder not found"),
    (["prepare", "coco", "--captions", "a.json", "--images", "/tmp", "--out", "X"], "one --split per"),
    (["info", "/nonexistent_dir"], "not a prepared data set"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_invalid_flag_values_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "shapes", "--out", "x", "--shard-size", "-3"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1, got '-3'" in capsys.readouterr().err


def test_console_script_entry_point_runs_without_importing_torchvision():
    """Every command builds the whole parser; torchvision (with torch._dynamo) would add a second to each, and
    to each rank of a launched run, so only the commands that pool regions or run detectors import it."""
    code = "import sys; from dsalign.cli import build_parser; build_parser(); print('torchvision' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"
    result = subprocess.run([sys.executable, "-m", "dsalign.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("dsalign ")


@pytest.mark.parametrize("argv", [
    ["eval", "--bundle", "b", "--features", "f", "--length-penalty", "nan"],
    ["eval", "--bundle", "b", "--features", "f", "--length-penalty", "inf"],
    ["features", "d", "--out", "o", "--min-side", "nan"],
    ["align", "--bundle", "b", "--beta", "nan"],
])
def test_numeric_flags_reject_nan_and_infinity(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and f"got '{argv[-1]}'" in capsys.readouterr().err


def test_unreadable_backbone_weights_are_one_line(tmp_path, capsys):
    from dsalign.features.backbones import load_state_dict_file

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not a state dict")
    assert main(["prepare", "shapes", "--out", str(tmp_path / "sh"), "--n-train", "2", "--n-val", "0",
                 "--n-test", "0", "--quiet"]) == 0
    assert main(["features", str(tmp_path / "sh"), "--out", str(tmp_path / "f"), "--backbone", "resnet18",
                 "--backbone-weights", str(garbage), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"cannot read weights {garbage}: not a PyTorch/safetensors state dict (corrupt or "
                        "truncated?)") and len(err.splitlines()) == 1
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert load_state_dict_file(tmp_path / "w.safetensors")["w"].tolist() == [1.0, 1.0]
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")  # the common mistake: the module, not its weights
    with pytest.raises(ValueError, match=r"holds a pickled model object, not a state dict \(save model.state_dict"):
        load_state_dict_file(tmp_path / "model.pt")
