"""Caption metrics (paper Table 2) through pycocoevalcap 1.2, and the novelty of generated captions.

With Java, :func:`score_captions` gives the official COCO-caption numbers: captions are tokenised by the Stanford
PTB tokenizer that pycocoevalcap ships (same command-line flags, same punctuation filter) and scored by its
``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()``. Only the Java processes are run by this module instead of
by pycocoevalcap, because pycocoevalcap's own wrappers
- write the tokenizer's input to a temporary file inside the installed package (fails on a read-only install;
  left behind if Java cannot start) and ignore the tokenizer's exit status (a failed run silently drops captions);
- keep METEOR's JVM until garbage collection, never drain its stderr, and hang in ``__del__`` after a failed
  ``compute_score`` (the lock stays taken).
Here the tokenizer reads stdin (no file at all), its output must have one line per caption, and METEOR is closed
when scoring ends, also on error. Both JVMs run with ``-XX:-UsePerfData`` (no ``/tmp/hsperfdata_*`` file), crash
logs go to the system temp folder (not the CWD), and, where Linux allows an unprivileged network namespace
(``unshare --net --map-root-user``), with no network at all. Neither tool needs one: METEOR reads its paraphrase
table from the package. The scores do not depend on any of this.

Without Java (no ``java`` on PATH, or ``DSALIGN_NO_JAVA=1``), BLEU, ROUGE-L and CIDEr are still computed by the
same Python scorers, on :func:`python_tokenize` output (a close imitation of the PTB tokenizer); METEOR is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

try:
    import pycocoevalcap
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
except ImportError as err:  # an optional dependency: retrieval metrics work without it
    raise ImportError("caption metrics need pycocoevalcap 1.2: pip install 'dsalign[eval]'") from err

from dsalign.text import tokenize as paper_tokenize

log = logging.getLogger(__name__)

NO_JAVA_ENV = "DSALIGN_NO_JAVA"
SCORERS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")  # what ``metrics`` may name; BLEU gives BLEU-1..BLEU-4
METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")

_PACKAGE = Path(pycocoevalcap.__path__[0])
_PTB_JAR = _PACKAGE / "tokenizer" / "stanford-corenlp-3.4.1.jar"
_METEOR_JAR = _PACKAGE / "meteor" / "meteor-1.5.jar"
_PUNCTUATIONS = frozenset(PUNCTUATIONS)
_JAVA_TIMEOUT_S = 600


def java_available() -> bool:
    """True when the Java path runs: ``java`` is on PATH and ``DSALIGN_NO_JAVA`` is unset, empty or ``0``."""
    return os.environ.get(NO_JAVA_ENV, "") in ("", "0") and shutil.which("java") is not None


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Iterable[str] = SCORERS,
) -> dict[str, Any]:
    """Score one generated caption per id against that id's reference captions, as pycocoevalcap does.

    Returns the scores as pycocoevalcap computes them, as fractions (BLEU-4 0.16 is the paper's 16.0; CIDEr 0.318
    is its 31.8), under ``METRIC_KEYS`` names, plus ``skipped`` (requested metrics not computed: METEOR without
    Java) and ``tokenizer`` (``"ptb"``, the official numbers, or ``"python"``, close but not official).

    Only the ids of ``predictions`` are scored; references of other ids are ignored (CIDEr's document frequencies
    then come from the scored ids' references only, as in pycocoevalcap). An empty prediction string is scored as
    an empty caption (0 on every per-caption score, and it shortens BLEU's hypothesis length); a model that stops
    at once should get low scores, not a crash. ``metrics`` chooses among ``SCORERS``: METEOR costs a JVM start
    that loads a 60 MB paraphrase table (about 10 s of CPU).
    """
    wanted = _check_metrics(metrics)
    ids = _check_inputs(predictions, references)
    preds = [predictions[i] for i in ids]
    refs = [list(references[i]) for i in ids]
    flat = preds + [r for rs in refs for r in rs]

    use_java = java_available()
    tokenised = ptb_tokenize(flat) if use_java else [python_tokenize(c) for c in flat]
    res = {i: [tokenised[n]] for n, i in enumerate(ids)}
    gts, pos = {}, len(ids)
    for i, rs in zip(ids, refs):
        gts[i] = tokenised[pos : pos + len(rs)]
        pos += len(rs)
        if not any(gts[i]):  # e.g. only "...": the scorers would fail on an empty reference set
            raise ValueError(f"references of {i!r}: none has a word after tokenisation (got {rs!r})")
    empty = sum(not r[0] for r in res.values())
    if empty:
        log.warning("%d of %d predictions are empty after tokenisation; scored as empty captions", empty, len(ids))

    out: dict[str, Any] = {}
    skipped: list[str] = []
    if "BLEU" in wanted:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "METEOR" in wanted:
        if use_java:
            out["METEOR"] = _meteor(gts, res)
        else:
            skipped.append("METEOR")
            log.warning("METEOR skipped: it needs Java (%s)", _why_no_java())
    if "ROUGE_L" in wanted:
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if not use_java:
        log.warning(
            "captions tokenised in Python (%s): scores are close to, not exactly, the official ones", _why_no_java()
        )
    out["skipped"] = skipped
    out["tokenizer"] = "ptb" if use_java else "python"
    return out


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's tokenisation: Stanford PTBTokenizer ``-preserveLines -lowerCase``, punctuation tokens dropped.

    Line breaks inside a caption become spaces (pycocoevalcap only replaces ``\\n``; the tokenizer also breaks lines
    at ``\\r``, form feeds and Unicode separators, which would shift every later caption).
    """
    text = "".join(" ".join(c.splitlines()) + "\n" for c in captions)
    cmd = _java_command("-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase")
    proc = subprocess.run(
        cmd, input=text.encode(), capture_output=True, cwd=_PTB_JAR.parent, timeout=_JAVA_TIMEOUT_S, check=False
    )
    lines = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(lines) != len(captions) + 1:
        raise RuntimeError(
            f"PTB tokenizer failed (exit {proc.returncode}, {len(lines) - 1} lines for {len(captions)} captions): "
            f"{proc.stderr.decode(errors='replace')[-2000:]}"
        )
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS) for line in lines[:-1]]


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_CLITIC_RE = re.compile(r"(?:(?<=\w)n't|'(?:s|re|ve|ll|d|m))$")
_LONE_CLITIC_RE = re.compile(r"'(?:s|re|ve|ll|d|m)|n't")
_EDGE = "\"'`.,;:!?-"  # stripped from both ends of a word; the PTB tokenizer splits these off and the filter drops them
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "co", "ltd", "mt", "ave"})
_INITIALS_RE = re.compile(r"[a-z](?:\.[a-z])*")  # "u", "r.v", "d.c": PTB keeps their final period


def python_tokenize(caption: str) -> str:
    """Imitate ``ptb_tokenize`` without Java: lowercase, split off clitics, drop edge punctuation.

    PTB behaviour copied: clitics are tokens ("man's" -> "man 's", "can't" -> "ca n't", "cannot" -> "can not");
    brackets become "-lrb-" etc. and are kept (pycocoevalcap's filter lists them upper-case, but ``-lowerCase``
    has already lowered them); hyphens, periods and commas inside words stay ("t-shirt", "3.5", "1,000"); the
    period of "mr."-style abbreviations and initials ("u.", "d.c.") stays. Differs on rarer forms ("at&t" stays
    whole, PTB gives "at & t"; "?!" stays one token in PTB). 5 of the 40,000 Flickr8k sentences tokenise differently.
    """
    text = _BRACKET_RE.sub(lambda m: f" {_BRACKETS[m.group()]} ", caption.lower())
    words: list[str] = []
    for chunk in text.split():
        if chunk in _BRACKETS.values():
            words.append(chunk)
            continue
        word = chunk.lstrip('"`')
        if not _LONE_CLITIC_RE.fullmatch(word):
            word = word.lstrip(_EDGE)
        end = len(word)
        while end and word[end - 1] in _EDGE:
            stem = word[: end - 1]
            if word[end - 1] == "." and (stem in _ABBREVIATIONS or _INITIALS_RE.fullmatch(stem)):
                break
            end -= 1
        word = word[:end]
        if word == "cannot":
            words += ["can", "not"]
            continue
        clitic = _CLITIC_RE.search(word)
        if clitic and clitic.start() > 0:
            words += [word[: clitic.start()], word[clitic.start() :]]
        elif word:
            words.append(word)
    return " ".join(words)


def novelty_stats(
    predictions: Mapping[Hashable, str] | Iterable[str], training_captions: Iterable[str]
) -> dict[str, float]:
    """How many generated captions are new: ``novel_fraction`` + ``copied_fraction`` = 1 (fractions, not percent).

    A caption is *copied* when its tokens (``dsalign.text.tokenize``: the paper's lowercase alphanumeric words,
    the form the model generates) equal those of some training caption, and *novel* otherwise. Duplicated
    generated captions count once each. ``predictions`` is a mapping id -> caption or any iterable of captions.
    """
    generated = list(predictions.values() if isinstance(predictions, Mapping) else predictions)
    if not generated:
        raise ValueError("no predictions to measure")
    seen = {tuple(paper_tokenize(c)) for c in training_captions}
    if not seen:
        raise ValueError("no training captions to compare with")
    copied = sum(tuple(paper_tokenize(c)) in seen for c in generated)
    return {
        "novel_fraction": 1.0 - copied / len(generated),
        "copied_fraction": copied / len(generated),
        "n_predictions": len(generated),
    }


def novelty(predictions: Mapping[Hashable, str] | Iterable[str], training_captions: Iterable[str]) -> float:
    """The fraction (0..1) of generated captions that are novel, i.e. not a training caption; see novelty_stats."""
    return novelty_stats(predictions, training_captions)["novel_fraction"]


def _check_metrics(metrics: Iterable[str]) -> set[str]:
    wanted = set(metrics if not isinstance(metrics, str) else [metrics])
    unknown = wanted - set(SCORERS)
    if unknown or not wanted:
        raise ValueError(f"metrics must be a non-empty subset of {SCORERS}, got {sorted(wanted)}")
    return wanted


def _check_inputs(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list[Hashable]:
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [i for i in predictions if i not in references]
    if missing:
        raise ValueError(f"{len(missing)} prediction ids have no references, e.g. {missing[:3]}")
    for i, caption in predictions.items():
        if not isinstance(caption, str):
            raise ValueError(f"prediction {i!r} must be one string, got {type(caption).__name__}")
        refs = references[i]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references of {i!r} must be a non-empty list of strings")
        if not all(isinstance(r, str) and r.strip() for r in refs):
            raise ValueError(f"references of {i!r} hold an empty or non-string caption")
    return list(predictions)


class _MeteorProcess(Meteor):
    """pycocoevalcap's METEOR scoring (``compute_score`` unchanged) on a JVM that this class starts and closes.

    ``Meteor.__init__`` is not called: it would start its own JVM (stderr piped and never read).
    """

    def __init__(self, stderr: IO[bytes]) -> None:
        self.lock = threading.Lock()
        self.meteor_p = subprocess.Popen(
            _meteor_command(), cwd=_METEOR_JAR.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )

    def close(self) -> None:
        """End the JVM: EOF on stdin makes METEOR exit; kill it if it has not within 5 s."""
        proc = self.meteor_p
        with contextlib.suppress(OSError):  # a dead JVM: the pipe is broken
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __del__(self) -> None:
        """Replace ``Meteor.__del__``, which blocks forever on the lock a failed ``compute_score`` left taken."""


def _meteor(gts: dict, res: dict) -> float:
    """Corpus METEOR on a fresh JVM that is closed before returning, also on error."""
    with tempfile.TemporaryFile() as stderr:  # unlinked at once; read back only to explain a failure
        meteor = _MeteorProcess(stderr)
        try:
            return float(meteor.compute_score(gts, res)[0])
        except (ValueError, OSError) as err:  # a dead JVM: readline() gives b"" and float() fails, or a broken pipe
            meteor.close()
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"METEOR failed (exit {meteor.meteor_p.returncode}): {tail}") from err
        finally:
            meteor.close()


def _meteor_command() -> list[str]:
    """pycocoevalcap's METEOR command line, run by path and with the options of ``_java_command``."""
    return _java_command("-Xmx2G", "-jar", str(_METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm")


def _java_command(*args: str) -> list[str]:
    # SerialGC: no GC threads to fight over a small machine's cores, and METEOR then peaks at ~0.6 GB, not ~1.1 GB.
    error_file = Path(tempfile.gettempdir()) / "dsalign_java_error_%p.log"
    jvm = ["java", "-XX:-UsePerfData", "-XX:+UseSerialGC", f"-XX:ErrorFile={error_file}"]
    return [*_no_network_prefix(), *jvm, *args]


@functools.cache
def _no_network_prefix() -> tuple[str, ...]:
    """``unshare --net --map-root-user`` where a JVM starts under it (Linux with user namespaces), else nothing."""
    cmd = ("unshare", "--net", "--map-root-user")
    if shutil.which("unshare"):
        probe = [*cmd, "java", "-XX:-UsePerfData", "-version"]
        if subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0:
            return cmd
    log.info("no network namespace available: Java runs with the network (its tools never use it)")
    return ()


def _why_no_java() -> str:
    return f"{NO_JAVA_ENV} is set" if os.environ.get(NO_JAVA_ENV, "") not in ("", "0") else "no java on PATH"
