"""Caption metrics: equal to direct pycocoevalcap calls, the no-Java path, METEOR's process, novelty, bad inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap", reason="caption metrics need the eval extra (pycocoevalcap)")

from dsalign.eval import captions
from dsalign.eval.captions import (
    METRIC_KEYS,
    NO_JAVA_ENV,
    novelty,
    novelty_stats,
    ptb_tokenize,
    python_tokenize,
    score_captions,
)

FLICKR8K = Path("/work/shared/data/flickr8k/dataset_flickr8k.json")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH: the PTB tokenizer and METEOR")

# Outputs of pycocoevalcap's PTB tokenizer (Java) for these inputs, after its punctuation filter.
PTB_CASES = {
    "A man's dog can't jump (high).": "a man 's dog ca n't jump -lrb- high -rrb-",
    "Don't stop -- won't stop...": "do n't stop wo n't stop",
    'The dogs\' toys are "new"!': "the dogs toys are new",
    "It's a t-shirt; really: yes": "it 's a t-shirt really yes",
    "A boy [in red] {x}": "a boy -lsb- in red -rsb- -lcb- x -rcb-",
    "E.g. the U.S. team.": "e.g. the u.s. team",
    "I'm sure they're here, we've seen it, you'll see": "i 'm sure they 're here we 've seen it you 'll see",
    "Cannot  stop": "can not stop",
    "a dog\nruns\r\nfast": "a dog runs fast",
    "café crème": "café crème",
    "   ": "",
}


@pytest.fixture(scope="module")
def flickr_sample():
    """40 Flickr8k test images: caption 0 is the "prediction", captions 1-4 the references."""
    if not FLICKR8K.is_file():
        pytest.skip(f"{FLICKR8K} is absent (the shared Flickr8k data set)")
    images = [im for im in json.loads(FLICKR8K.read_text())["images"] if im["split"] == "test"][:40]
    preds = {im["imgid"]: im["sentences"][0]["raw"] for im in images}
    refs = {im["imgid"]: [s["raw"] for s in im["sentences"][1:]] for im in images}
    return preds, refs


def direct_pycocoevalcap(preds, refs, meteor=None):
    """The reference: pycocoevalcap's own tokenizer and scorers (``meteor``: a started ``Meteor()``, closed here)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in rs] for i, rs in refs.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in preds.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor is not None:
        out["METEOR"] = meteor.compute_score(gts, res)[0]
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait()
    return out


@pytest.fixture(scope="module")
def java_scores(flickr_sample):
    if shutil.which("java") is None:
        pytest.skip("no java on PATH")
    return score_captions(*flickr_sample, metrics=("BLEU", "ROUGE_L", "CIDEr"))


@needs_java
def test_java_path_equals_pycocoevalcap(flickr_sample, java_scores, tmp_path, monkeypatch):
    assert java_scores["tokenizer"] == "ptb" and java_scores["skipped"] == []
    assert set(java_scores) == set(METRIC_KEYS) - {"METEOR"} | {"skipped", "tokenizer"}
    ref = direct_pycocoevalcap(*flickr_sample)
    for k, v in ref.items():
        assert java_scores[k] == v, k  # exact: same tokens, same scorers
    assert 0.3 < java_scores["BLEU-1"] < 0.9 and 0.2 < java_scores["CIDEr"] < 2  # fractions, not percent

    # No file left in the CWD or in pycocoevalcap's tokenizer folder (where its own wrapper writes one).
    monkeypatch.chdir(tmp_path)
    package_dir = Path(captions._PTB_JAR).parent
    before = sorted(package_dir.iterdir())
    score_captions({1: "a dog runs"}, {1: ["a dog is running", "the dog runs"]}, metrics=["BLEU"])
    assert list(tmp_path.iterdir()) == [] and sorted(package_dir.iterdir()) == before


@needs_java
def test_ptb_tokenize_cases():
    assert ptb_tokenize(list(PTB_CASES)) == list(PTB_CASES.values())


def test_python_tokenize_known_cases():
    """The same cases without Java (the values above come from the Java tokenizer)."""
    for raw, tokens in PTB_CASES.items():
        assert python_tokenize(raw) == tokens, raw


def test_no_java_path_is_close_and_skips_meteor(flickr_sample, java_scores, monkeypatch, caplog):
    monkeypatch.setenv(NO_JAVA_ENV, "1")
    started = []
    monkeypatch.setattr(captions, "_meteor", lambda *a: started.append(a))  # must not be reached
    got = score_captions(*flickr_sample)
    assert got["skipped"] == ["METEOR"] and "METEOR" not in got and got["tokenizer"] == "python"
    assert not started
    assert "METEOR skipped" in caplog.text
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"):
        assert got[k] == pytest.approx(java_scores[k], rel=1e-3), k  # identical on this sample, in fact


def test_no_java_when_java_is_not_on_path(monkeypatch):
    monkeypatch.delenv(NO_JAVA_ENV, raising=False)
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    got = score_captions({1: "a dog runs ."}, {1: ["A dog runs.", "a dog is running"]}, metrics=["BLEU", "METEOR"])
    assert got["skipped"] == ["METEOR"] and got["BLEU-1"] == pytest.approx(1.0)


FAKE_METEOR = textwrap.dedent(
    """
    import sys, time
    for line in sys.stdin:
        if line.startswith("SCORE"):
            print("1 2 3", flush=True)
        else:  # EVAL ||| s1 ||| s2 ...: one score per segment, then the corpus score
            for _ in range(line.count("|||") + 1):
                print("0.25", flush=True)
    time.sleep({linger})  # a JVM that ignores EOF: close() must kill it
    """
)


def fake_meteor(monkeypatch, tmp_path, script: str) -> list:
    """Replace the METEOR command by a Python script; return the list of started METEOR wrappers."""
    path = tmp_path / "fake_meteor.py"
    path.write_text(script)
    monkeypatch.setattr(captions, "_meteor_command", lambda: [sys.executable, str(path)])
    monkeypatch.setattr(captions, "java_available", lambda: True)
    monkeypatch.setattr(captions, "ptb_tokenize", lambda caps: [python_tokenize(c) for c in caps])
    started = []
    init = captions._MeteorProcess.__init__

    def record(self, stderr):
        init(self, stderr)
        started.append(self)

    monkeypatch.setattr(captions._MeteorProcess, "__init__", record)
    return started


def test_meteor_process_is_closed_even_if_it_ignores_eof(monkeypatch, tmp_path):
    started = fake_meteor(monkeypatch, tmp_path, FAKE_METEOR.replace("{linger}", "60"))
    monkeypatch.setattr(captions.subprocess.Popen, "wait", _short_wait(captions.subprocess.Popen.wait))
    got = score_captions({1: "a dog", 2: "a cat"}, {1: ["a dog runs"], 2: ["a cat sits"]}, metrics=["METEOR"])
    assert got["METEOR"] == 0.25
    (meteor,) = started
    assert meteor.meteor_p.returncode == -signal.SIGKILL  # killed after the (shortened) grace period
    assert meteor.meteor_p.stdout.closed and meteor.meteor_p.stdin.closed


def _short_wait(wait):
    """Popen.wait with at most 0.5 s instead of close()'s 5 s grace period, to keep the test fast."""

    def short(self, timeout=None):
        return wait(self, timeout=None if timeout is None else min(timeout, 0.5))

    return short


def test_meteor_failure_is_reported_and_closed(monkeypatch, tmp_path):
    script = "import sys\nsys.stdin.readline()\nsys.stderr.write('heap space')\nsys.exit(3)\n"
    started = fake_meteor(monkeypatch, tmp_path, script)
    with pytest.raises(RuntimeError, match=r"METEOR failed \(exit 3\): heap space"):
        score_captions({1: "a dog"}, {1: ["a dog runs"]}, metrics=["METEOR"])
    assert started[0].meteor_p.returncode == 3 and started[0].meteor_p.stdout.closed


@needs_java
@pytest.mark.slow  # two METEOR JVMs (ours and pycocoevalcap's), ~10 s of CPU each for the paraphrase table
def test_meteor_equals_pycocoevalcap_and_leaves_no_process(flickr_sample):
    from pycocoevalcap.meteor.meteor import Meteor

    direct_meteor = Meteor()  # its JVM loads the paraphrase table while ours does, on the other core
    children = _child_pids()
    got = score_captions(*flickr_sample)
    assert _child_pids() == children  # our METEOR JVM is gone
    ref = direct_pycocoevalcap(*flickr_sample, meteor=direct_meteor)
    assert got["METEOR"] == ref["METEOR"] and 0.1 < got["METEOR"] < 0.5
    for k, v in ref.items():
        assert got[k] == v, k


def _child_pids() -> set[str]:
    tasks = Path(f"/proc/{os.getpid()}/task")
    if not tasks.is_dir():
        pytest.skip("no /proc to list child processes")
    return {pid for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


def test_empty_prediction_scores_zero_not_crash(monkeypatch, caplog):
    monkeypatch.setenv(NO_JAVA_ENV, "1")
    refs = {1: ["a dog runs on grass", "a brown dog"], 2: ["two men play chess", "men playing a game"]}
    got = score_captions({1: "", 2: "two men play a game"}, refs)
    full = score_captions({1: "a brown dog", 2: "two men play a game"}, refs)
    assert got["CIDEr"] < full["CIDEr"] and got["ROUGE_L"] < full["ROUGE_L"]
    assert "1 of 2 predictions are empty" in caplog.text


@pytest.mark.parametrize(
    ("preds", "refs", "kwargs", "match"),
    [
        ({}, {1: ["a"]}, {}, "no predictions"),
        ({1: "a dog", 2: "a cat"}, {1: ["a dog"]}, {}, r"1 prediction ids have no references, e.g. \[2\]"),
        ({1: ["a dog"]}, {1: ["a dog"]}, {}, "must be one string"),
        ({1: "a dog"}, {1: []}, {}, "non-empty list"),
        ({1: "a dog"}, {1: "a dog"}, {}, "non-empty list"),
        ({1: "a dog"}, {1: ["a dog", " "]}, {}, "empty or non-string"),
        ({1: "a dog"}, {1: ["...", "!"]}, {}, "none has a word after tokenisation"),
        ({1: "a dog"}, {1: ["a dog"]}, {"metrics": ["SPICE"]}, "subset"),
        ({1: "a dog"}, {1: ["a dog"]}, {"metrics": []}, "subset"),
    ],
)
def test_bad_inputs(preds, refs, kwargs, match, monkeypatch):
    monkeypatch.setenv(NO_JAVA_ENV, "1")
    with pytest.raises(ValueError, match=match):
        score_captions(preds, refs, **kwargs)


def test_extra_reference_ids_are_ignored(monkeypatch):
    monkeypatch.setenv(NO_JAVA_ENV, "1")
    refs = {1: ["a dog runs"], 2: ["a cat sits"], 3: ["a bird flies"]}
    assert score_captions({1: "a dog runs"}, refs, metrics=["BLEU"])["BLEU-1"] == pytest.approx(1.0)


def test_novelty():
    train = ["A dog runs on the grass.", "Two men play chess", "a cat sits"]
    preds = {1: "a dog runs on the grass", 2: "A CAT, sits!", 3: "a dog plays chess", 4: "two men play"}
    stats = novelty_stats(preds, train)
    assert stats == {"novel_fraction": 0.5, "copied_fraction": 0.5, "n_predictions": 4}
    assert novelty(preds, train) == 0.5
    assert novelty(["a cat sits", "a cat sits"], train) == 0.0  # duplicates count once each
    assert novelty(iter(["a horse"]), iter(train)) == 1.0
    with pytest.raises(ValueError, match="no predictions"):
        novelty({}, train)
    with pytest.raises(ValueError, match="no training captions"):
        novelty(preds, [])


@needs_java
def test_java_runs_without_network():
    prefix = captions._no_network_prefix()
    if not prefix:
        pytest.skip("no unprivileged network namespace here: Java runs with the network")
    assert captions._java_command("-version")[: len(prefix)] == list(prefix)
    interfaces = subprocess.run([*prefix, "cat", "/proc/net/dev"], capture_output=True, text=True, check=True).stdout
    assert [line.split(":")[0].strip() for line in interfaces.splitlines()[2:]] == ["lo"]  # loopback only


def test_broken_java_raises_instead_of_falling_back(monkeypatch, tmp_path):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'Error: broken JRE' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.delenv(NO_JAVA_ENV, raising=False)
    monkeypatch.setattr(captions, "_no_network_prefix", lambda: ())  # keep the cached probe of the real JRE
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match=r"PTB tokenizer failed \(exit 1.*broken JRE"):
        score_captions({1: "a dog"}, {1: ["a dog runs"]}, metrics=["BLEU"])
