"""Fuzzed shards through the image and the feature pipelines: every bad sample is skipped and counted under
its reason, every good one around it comes through, the counts are exact and a pass never aborts."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_factory import (
    FUZZ,
    WORDS,
    NonFile,
    jpeg_bytes,
    meta_bytes,
    npy_bytes,
    png_bytes,
    png_header,
    shaped,
    write_shard,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dsalign.data.feature_pipeline import FeatureSampleDecoder, collate_features
from dsalign.data.images import decode_rgb
from dsalign.data.pipeline import ImageSampleDecoder, ShardLoader, ShardStream, collate_images
from dsalign.text import Vocabulary

VOCAB = Vocabulary(WORDS)
MAX_LEN = 16
DIM = 8
GOOD_META = meta_bytes("a dog runs on the grass", "the red ball")
JPEG = jpeg_bytes(0)
HUGE_CAPTION = " ".join(WORDS[i % len(WORDS)] for i in range(250_000))  # 1 MB, 250k tokens
# Pillow's TIFF plugin raises TypeError on this file (a fuzzed 17x9 TIFF, one byte changed, cut at 148 bytes).
CORRUPT_TIFF = bytes.fromhex(
    "49492a00080000000a0000010400010000001100000001010400010000000900000002010300030000008600000003010300010000"
    "000100000006010300010000000200000011010500010000008c000000150103000100000003000000160104000100000009000000"
    "1701040001000000cb0100001c0103000100000001000000000000000800080008000364c80364c80364")

Case = tuple[dict, str | None]  # the sample's members, the reason it is skipped for (None: it comes through)


def _boxes(*boxes: list) -> bytes:
    return meta_bytes("a dog", boxes=list(boxes))


IMAGE_CASES: dict[str, Case] = {
    "good0": ({"json": GOOD_META, "jpg": JPEG}, None),
    "notutf8": ({"json": b"\xff\xfe" + GOOD_META, "jpg": JPEG}, "bad_metadata"),
    "jsonlist": ({"json": b'[{"captions": []}]', "jpg": JPEG}, "bad_metadata"),
    "longnumber": ({"json": b'{"captions": ' + b"7" * 5000 + b"}", "jpg": JPEG}, "bad_metadata"),
    "deepjson": ({"json": b"[" * 100_000 + b"]" * 100_000, "jpg": JPEG}, "bad_metadata"),
    "listtokens": ({"json": b'{"captions": [{"raw": "a", "tokens": [["a"], {"b": 1}]}]}', "jpg": JPEG},
                   "no_captions"),
    "hugecaption": ({"json": meta_bytes(HUGE_CAPTION), "jpg": JPEG}, None),
    "emptyimage": ({"json": GOOD_META, "jpg": b""}, "bad_image"),
    "zerobyzero": ({"json": GOOD_META, "png": png_header(0, 0)}, "bad_image"),
    "bomb": ({"json": GOOD_META, "png": png_header(100_000, 100_000)}, "bad_image"),
    "corrupttiff": ({"json": GOOD_META, "jpg": CORRUPT_TIFF}, "bad_image"),
    "onebyn": ({"json": GOOD_META, "png": png_bytes((1, 37))}, None),
    "nbyone": ({"json": GOOD_META, "png": png_bytes((37, 1))}, None),
    "clipped": ({"json": _boxes([-0.5, -0.5, 0.5, 1.5]), "jpg": JPEG}, None),
    "outside": ({"json": _boxes([0.1, 0.1, 0.5, 0.5], [1.5, 0.2, 2.0, 0.8]), "jpg": JPEG}, "bad_boxes"),
    "nanbox": ({"json": _boxes([float("nan"), 0, 1, 1]), "jpg": JPEG}, "bad_boxes"),
    "inverted": ({"json": _boxes([0.8, 0.1, 0.2, 0.9]), "jpg": JPEG}, "bad_boxes"),
    "hugeint": ({"json": _boxes([10**400, 0, 1, 1]), "jpg": JPEG}, "bad_boxes"),
    "ragged": ({"json": _boxes([0, 0, 1]), "jpg": JPEG}, "bad_boxes"),
    "dirimage": ({"json": GOOD_META, "jpg": NonFile(tarfile.DIRTYPE)}, "missing_image"),
    "symlinkimage": ({"json": GOOD_META, "jpg": NonFile(tarfile.SYMTYPE, "good0.jpg")}, "missing_image"),
    "hardlinkimage": ({"json": GOOD_META, "jpg": NonFile(tarfile.LNKTYPE, "good0.jpg")}, "missing_image"),
    "good1": ({"json": GOOD_META, "jpg": jpeg_bytes(1)}, None),
}


def _feature_case(features: np.ndarray | bytes | NonFile, boxes: list | None = None, **meta: bytes) -> dict:
    rows = features.shape[0] if isinstance(features, np.ndarray) and features.ndim else 1
    members = {"json": meta_bytes("a dog", region_boxes=[[0, 0, 1, 1]] * rows if boxes is None else boxes),
               "npy": npy_bytes(features) if isinstance(features, np.ndarray) else features}
    return {**members, **meta}


def _lying_header() -> bytes:
    """A .npy header that claims 3 TiB of float32 before 64 bytes of data."""
    return npy_bytes(np.ones((2, DIM), np.float32)).replace(b"(2, 8)", b"(99999999999, 8)")


def _bool_shape() -> bytes:
    """A header whose shape holds a bool (numpy's own header check accepts it) before a row of data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (True, DIM)})
    return out.getvalue() + np.ones(DIM, np.float32).tobytes()


def _npz() -> bytes:
    out = io.BytesIO()
    np.savez(out, features=np.ones((2, DIM), np.float32))
    return out.getvalue()


ROWS = np.ones((3, DIM), np.float16)
FEATURE_CASES: dict[str, Case] = {
    "good0": (_feature_case(ROWS), None),
    "npz": (_feature_case(_npz()), "bad_features"),
    "lyingheader": (_feature_case(_lying_header()), "bad_features"),
    "boolshape": (_feature_case(_bool_shape()), "bad_features"),
    "truncatednpy": (_feature_case(npy_bytes(ROWS)[:-5]), "bad_features"),
    "emptynpy": (_feature_case(b""), "bad_features"),
    "dirnpy": (_feature_case(NonFile(tarfile.DIRTYPE)), "bad_features"),
    "nan": (_feature_case(np.full((3, DIM), np.nan, np.float32)), "bad_features"),
    "inf": (_feature_case(np.full((3, DIM), np.inf, np.float16)), "bad_features"),
    "wrongdim": (_feature_case(np.ones((3, DIM - 1), np.float32)), "bad_features"),
    "threedims": (_feature_case(np.ones((3, 2, DIM), np.float32)), "bad_features"),
    "float64": (_feature_case(ROWS.astype(np.float64)), "bad_features"),
    "norows": (_feature_case(np.ones((0, DIM), np.float32)), "bad_features"),
    "boxcount": (_feature_case(ROWS, boxes=[[0, 0, 1, 1]] * 2), "bad_features"),
    "flatboxes": (_feature_case(np.ones((8, DIM), np.float32), boxes=[0, 0, 1, 1] * 2), "bad_features"),
    "nanbox": (_feature_case(ROWS, boxes=[[0, 0, 1, 1], [0, float("nan"), 1, 1], [0, 0, 1, 1]]), "bad_boxes"),
    "inverted": (_feature_case(ROWS, boxes=[[0, 0, 1, 1], [0.9, 0, 0.1, 1], [0, 0, 1, 1]]), "bad_boxes"),
    "notutf8": (_feature_case(ROWS, json=b"\xff" + GOOD_META), "bad_metadata"),
    "hugecaption": (_feature_case(ROWS, json=meta_bytes(HUGE_CAPTION, region_boxes=[[0, 0, 1, 1]] * 3)), None),
    "good1": (_feature_case(ROWS * 2), None),
}


def _eval_pass(urls: list[str], decoder, collate) -> tuple[dict[str, tuple[dict, int]], ShardLoader]:
    """One evaluation pass; every yielded sample as key -> (its batch, its row in the batch)."""
    loader = ShardLoader(ShardStream(urls, decoder, collate, batch_size=4, mode="eval", rank=0, world_size=1))
    seen = {key: (batch, row) for batch in loader for row, key in enumerate(batch["keys"])}
    return seen, loader


def _assert_exact(seen: dict, loader: ShardLoader, cases: dict[str, Case]) -> None:
    """The good samples come through, each bad one is counted under its reason, and nothing else happens."""
    assert sorted(seen) == sorted(key for key, (_, reason) in cases.items() if reason is None)
    expected = Counter(reason for _, reason in cases.values() if reason is not None)
    assert loader.skipped == expected
    detail = ", ".join(f"{reason}={n}" for reason, n in sorted(expected.items()))
    assert loader.report() == f"skipped {expected.total()} ({detail})"


def test_bad_image_samples_are_skipped_and_counted_exactly(tmp_path):
    shard = write_shard(tmp_path / "images.tar", {key: members for key, (members, _) in IMAGE_CASES.items()})
    seen, loader = _eval_pass([str(shard)], ImageSampleDecoder(VOCAB, max_len=MAX_LEN), collate_images)
    _assert_exact(seen, loader, IMAGE_CASES)
    batch, row = seen["hugecaption"]
    assert batch["token_mask"][row, 0].sum() == MAX_LEN and len(batch["raw_captions"][row][0]) > 1_000_000
    sizes = {key: seen[key][0]["image_sizes"][seen[key][1]].tolist() for key in ("onebyn", "nbyone")}
    assert sizes == {"onebyn": [37, 1], "nbyone": [1, 37]}  # (height, width)
    batch, row = seen["clipped"]
    assert batch["boxes"][row, 0].tolist() == [0.0, 0.0, 0.5, 1.0]


def test_bad_feature_samples_are_skipped_and_counted_exactly(tmp_path):
    shard = write_shard(tmp_path / "features.tar", {key: members for key, (members, _) in FEATURE_CASES.items()})
    decoder = FeatureSampleDecoder(VOCAB, max_len=MAX_LEN, feature_dim=DIM)
    seen, loader = _eval_pass([str(shard)], decoder, collate_features)
    _assert_exact(seen, loader, FEATURE_CASES)
    batch, row = seen["hugecaption"]
    assert batch["token_mask"][row, 0].sum() == MAX_LEN and batch["region_mask"][row].sum() == 3


def test_decoding_a_corrupt_tiff_is_a_value_error():
    with pytest.raises(ValueError, match="undecodable image"):
        decode_rgb(CORRUPT_TIFF)


# Truncated shards: what was read before the cut comes through, the sample cut in two is counted, the shard
# is counted once as corrupt, whatever byte the cut falls on.


@pytest.fixture(scope="module")
def whole_shard(tmp_path_factory) -> tuple[bytes, Path]:
    folder = tmp_path_factory.mktemp("cut")
    samples = {f"s{i}": {"json": GOOD_META, "jpg": jpeg_bytes(i)} for i in range(4)}
    return write_shard(folder / "whole.tar", samples).read_bytes(), folder / "cut.tar"


def _members(whole: bytes) -> list[tarfile.TarInfo]:
    """The members as Python's tarfile sees them: the oracle for where each one starts and ends."""
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        return tar.getmembers()


def _end(member: tarfile.TarInfo) -> int:
    return member.offset_data + -(-member.size // 512) * 512  # data padded to whole blocks


def _expected_after_cut(whole: bytes, cut: int) -> tuple[list[str], Counter]:
    """Samples whose members all end before the cut come through; one with only its first member (jpg)
    complete is counted as missing its metadata; the shard is corrupt unless its end marker survived."""
    members = _members(whole)
    complete = Counter(m.name.split(".")[0] for m in members if _end(m) <= cut)
    good = sorted(key for key, n in complete.items() if n == 2)
    skipped = Counter(missing_metadata=sum(n == 1 for n in complete.values()),
                      corrupt_shard=int(cut < _end(members[-1]) + 512))
    return good, +skipped


def _assert_cut_is_accounted_for(whole: bytes, path: Path, cut: int) -> None:
    path.write_bytes(whole[:cut])
    seen, loader = _eval_pass([str(path)], ImageSampleDecoder(VOCAB), collate_images)
    assert (sorted(seen), loader.skipped) == _expected_after_cut(whole, cut)


def test_a_shard_cut_between_members_is_a_corrupt_shard(whole_shard):
    """Without the end-of-archive marker check, such a cut lost the samples after it without a count."""
    whole, path = whole_shard
    for member in _members(whole):
        _assert_cut_is_accounted_for(whole, path, member.offset)


@FUZZ
@given(st.data())
def test_a_shard_cut_at_any_byte_loses_only_the_samples_after_the_cut(whole_shard, data):
    whole, path = whole_shard
    _assert_cut_is_accounted_for(whole, path, data.draw(st.integers(0, len(whole)), label="cut"))


def test_a_header_claiming_a_huge_member_is_a_corrupt_shard(tmp_path):
    """A size field of 2**80 bytes (GNU base-256) used to reach ``read(2**80)``: OverflowError, pass aborted."""
    whole = write_shard(tmp_path / "s.tar", {"a": {"json": GOOD_META, "jpg": JPEG}}).read_bytes()
    info = tarfile.TarInfo("b.jpg")
    info.size = 2**80
    body = whole[: _end(_members(whole)[-1])]
    (tmp_path / "huge.tar").write_bytes(body + info.tobuf(tarfile.GNU_FORMAT) + JPEG + bytes(1024))
    seen, loader = _eval_pass([str(tmp_path / "huge.tar")], ImageSampleDecoder(VOCAB), collate_images)
    assert (sorted(seen), loader.skipped) == (["a"], {"corrupt_shard": 1})


# Random shards: whatever the members hold, every sample is either yielded or counted, exactly once.

captions = st.lists(shaped(raw=st.text(max_size=8), tokens=st.lists(st.sampled_from(WORDS), max_size=4)),
                    max_size=3)
coordinates = st.floats(-0.5, 1.5) | st.just(float("nan"))
boxes = st.lists(st.lists(coordinates, min_size=4, max_size=4), max_size=3)
metadata = (shaped(captions=captions, boxes=boxes, region_boxes=boxes).map(lambda m: json.dumps(m).encode())
            | st.sampled_from([GOOD_META, b"", b"[]", b"\xff"]) | st.binary(max_size=12))
images = st.sampled_from([JPEG, JPEG[:60], b"", png_bytes((1, 3))]) | st.binary(max_size=12)
features = (hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64]),
                       st.tuples(st.integers(0, 3), st.sampled_from([DIM, DIM + 1])) | hnp.array_shapes(max_dims=3)
                       ).map(npy_bytes)  # elements include NaN and infinities
            | st.binary(max_size=12))


def _random_samples(payload: str, payloads: st.SearchStrategy) -> st.SearchStrategy:
    members = st.fixed_dictionaries({"txt": st.binary(max_size=4)}, optional={"json": metadata, payload: payloads})
    return st.lists(members, min_size=1, max_size=6).map(
        lambda samples: {f"k{i:02d}": sample for i, sample in enumerate(samples)})


def _assert_every_sample_accounted_for(seen: dict, loader: ShardLoader, samples: dict) -> None:
    assert len(seen) + loader.skipped.total() == len(samples) and "corrupt_shard" not in loader.skipped


@FUZZ
@given(_random_samples("jpg", images))
def test_random_image_samples_are_each_yielded_or_counted(tmp_path, samples):
    shard = write_shard(tmp_path / "random.tar", samples)
    seen, loader = _eval_pass([str(shard)], ImageSampleDecoder(VOCAB), collate_images)
    _assert_every_sample_accounted_for(seen, loader, samples)
    assert {k for k, s in samples.items() if s.get("json") == GOOD_META and s.get("jpg") == JPEG} <= set(seen)


@FUZZ
@given(_random_samples("npy", features))
def test_random_feature_samples_are_each_yielded_or_counted(tmp_path, samples):
    shard = write_shard(tmp_path / "random.tar", samples)
    seen, loader = _eval_pass([str(shard)], FeatureSampleDecoder(VOCAB, feature_dim=DIM), collate_features)
    _assert_every_sample_accounted_for(seen, loader, samples)
    for batch, row in seen.values():
        rows = int(batch["region_mask"][row].sum())
        assert rows > 0 and batch["regions"][row, :rows].isfinite().all() and batch["regions"].shape[-1] == DIM
        real = batch["boxes"][row, :rows]
        assert ((real >= 0) & (real <= 1)).all() and (real[:, 2:] > real[:, :2]).all()
