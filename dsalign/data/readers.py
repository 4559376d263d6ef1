"""Readers that turn caption data sets on disk into :class:`ImageRecord` lists.

Supported: Karpathy-split ``dataset_*.json`` (Flickr8k/Flickr30k/COCO), the Flickr8k token files
(``Flickr8k.token.txt`` + ``Flickr_8k.{train,dev,test}Images.txt``) and COCO ``captions_*.json`` annotations.
Each raises ValueError with a one-line reason on malformed input; images are not opened here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from dsalign.data.records import Caption, ImageRecord
from dsalign.text import tokenize


def _read_text(path: Path) -> str:
    """A UTF-8 text file; ValueError naming the file when it is missing, unreadable or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ValueError(f"file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _load_json(path: str | Path) -> object:
    text = _read_text(Path(path))
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also a number of over 4300 digits
        raise ValueError(f"cannot read JSON {path}: {exc}") from exc


def _caption(raw: str, tokens: list | None = None) -> Caption:
    """Keep the data set's own tokens when given (they define the published vocabularies), else tokenize.

    TypeError when ``raw`` is not a string: the readers turn it into their one-line ValueError."""
    if not isinstance(raw, str):
        raise TypeError(f"caption {raw!r} is not a string")
    if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
        return Caption(raw=raw, tokens=[t.lower() for t in tokens if t.strip()])
    return Caption(raw=raw, tokens=tokenize(raw))


def read_karpathy(path: str | Path, image_root: str | Path, restval_as_train: bool = True) -> list[ImageRecord]:
    """Karpathy-format JSON. COCO's ``restval`` split is merged into train unless ``restval_as_train=False``."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy-format file (expected an object with an 'images' list)")
    root = Path(image_root)
    records = []
    for n, item in enumerate(data["images"]):
        try:
            split = item["split"]
            if not isinstance(split, str):
                raise TypeError(f"split {split!r} is not a string")
            if split == "restval" and restval_as_train:
                split = "train"
            image_id = str(item["cocoid"]) if "cocoid" in item else Path(item["filename"]).stem
            rel = Path(item["filepath"]) / item["filename"] if item.get("filepath") else Path(item["filename"])
            captions = [_caption(s["raw"], s.get("tokens")) for s in item["sentences"]]
        except KeyError as exc:
            raise ValueError(f"{path}: image entry {n} is malformed (missing {exc})") from exc
        except TypeError as exc:
            raise ValueError(f"{path}: image entry {n} is malformed ({exc})") from exc
        records.append(ImageRecord(image_id=image_id, split=split, captions=captions, image_path=root / rel))
    return records


_FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                         "test": "Flickr_8k.testImages.txt"}


def read_flickr8k_tokens(token_file: str | Path, image_root: str | Path,
                         split_dir: str | Path | None = None) -> list[ImageRecord]:
    """``Flickr8k.token.txt`` (``NAME.jpg#k<TAB>sentence``) + the official split lists (dev → val).

    Images listed in no split file are left out; records follow the split files' order, captions #0..#4.
    """
    token_path = Path(token_file)
    split_root = Path(split_dir) if split_dir is not None else token_path.parent
    captions: dict[str, dict[int, str]] = defaultdict(dict)
    for lineno, line in enumerate(_read_text(token_path).splitlines(), 1):
        if not line.strip():
            continue
        name_part, sep, sentence = line.partition("\t")
        name, hash_sep, index = name_part.partition("#")
        if not sep or not hash_sep or not index.strip().isdecimal():  # isdigit() also passes "²", int() fails
            raise ValueError(f"{token_path}:{lineno}: expected 'NAME.jpg#k<TAB>caption'")
        captions[name.strip()][int(index)] = sentence.strip()
    root = Path(image_root)
    records = []
    for split, filename in _FLICKR8K_SPLIT_FILES.items():
        list_path = split_root / filename
        if not list_path.is_file():
            raise ValueError(f"split list not found: {list_path}")
        for name in _read_text(list_path).split():
            if name not in captions:
                raise ValueError(f"{list_path}: image {name} has no captions in {token_path}")
            sentences = [captions[name][k] for k in sorted(captions[name])]
            records.append(ImageRecord(image_id=Path(name).stem, split=split,
                                       captions=[_caption(s) for s in sentences], image_path=root / name))
    return records


def _file_name(image: dict) -> str:
    name = image["file_name"]
    if not isinstance(name, str):
        raise TypeError(f"file_name {name!r} is not a string")
    return name


def read_coco_captions(path: str | Path, image_root: str | Path, split: str) -> list[ImageRecord]:
    """COCO ``captions_*.json``: every annotated image of the file goes to ``split``; ordered by image id."""
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO captions file (expected 'images' and 'annotations')")
    by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    try:
        files = {int(img["id"]): _file_name(img) for img in data["images"]}
        for ann in data["annotations"]:
            by_image[int(ann["image_id"])].append((int(ann.get("id", 0)), str(ann["caption"])))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(Infinity)
        raise ValueError(f"{path}: malformed entry ({exc!r})") from exc
    root = Path(image_root)
    records = []
    for image_id in sorted(by_image):
        if image_id not in files:
            raise ValueError(f"{path}: annotation refers to unknown image id {image_id}")
        sentences = [text for _, text in sorted(by_image[image_id])]
        records.append(ImageRecord(image_id=str(image_id), split=split,
                                   captions=[_caption(s) for s in sentences], image_path=root / files[image_id]))
    return records
