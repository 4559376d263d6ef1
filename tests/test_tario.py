"""The streaming tar reader agrees with Python's tarfile on archives written by other tools' conventions,
and shards are readable by the webdataset library."""

import io
import tarfile

import pytest
import webdataset as wds

from dsalign.data.shards import ShardWriter
from dsalign.data.tario import TarFormatError, iter_samples, iter_tar_members


def _archive(fmt: int, names: list[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("a_dir"), None)  # a non-regular member (type 0 with size 0 is regular)
        for i, name in enumerate(names):
            data = bytes(range(256)) * i + b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = names[0]
        tar.addfile(link)
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60
    names = ["k1.json", "k1.jpg", f"{long_dir}/k2.json", "k2.txt", "dé/k3.cls"]
    data = _archive(fmt, names)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert list(iter_tar_members(io.BytesIO(data))) == expected
    assert [k for k, _ in iter_samples(io.BytesIO(data))] == ["a_dir", "k1", "k2", "k3"]


def test_truncated_and_garbage_archives_raise():
    data = _archive(tarfile.USTAR_FORMAT, ["k.json", "k.jpg"])
    with pytest.raises(TarFormatError):
        list(iter_tar_members(io.BytesIO(data[:700])))
    with pytest.raises(TarFormatError, match="checksum|numeric"):
        list(iter_tar_members(io.BytesIO(b"not a tar at all" * 64)))


def test_webdataset_reads_our_shards(tmp_path):
    with ShardWriter(tmp_path, "s", max_count=2) as writer:
        for i in range(5):
            writer.write(f"{i:04d}", {"json": b'{"i": %d}' % i, "png": b"PNG" * i})
    urls = [str(p) for p in writer.paths]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:04d}" for i in range(5)]
    assert [s["png"] for s in samples] == [b"PNG" * i for i in range(5)]


def test_flipped_byte_in_a_header_is_caught_by_the_checksum():
    data = bytearray(_archive(tarfile.USTAR_FORMAT, ["k.json", "k.jpg"]))
    data[512 + 3] ^= 0x01  # first real member's name
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(data))))
