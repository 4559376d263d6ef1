"""The pretrained backbone and the two pooling modes on real photos shipped with scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dsalign.features.backbones import load_backbone
from dsalign.features.extract import RegionFeaturizer

skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
WHOLE = [0.0, 0.0, 1.0, 1.0]
CAT_A, CAT_B = [0.05, 0.0, 0.6, 0.9], [0.1, 0.05, 0.65, 0.95]  # two crops of Chelsea's head and body
CUP = [0.1, 0.0, 0.9, 0.8]  # the espresso cup in coffee()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]


def _features(backbone, photos, pooling: str) -> list[torch.Tensor]:
    featurizer = RegionFeaturizer(backbone, 224, pooling, crop_size=112)
    images = torch.stack([featurizer.to_input(p) for p in photos])
    return featurizer(images, [np.array([WHOLE, CAT_A, CAT_B]), np.array([WHOLE, CUP])])


def test_pretrained_weights_name_the_right_imagenet_class(backbone, photos):
    cat, coffee = _features(backbone, photos, "roi")
    with torch.inference_mode():
        cat_classes = backbone.classify(cat).argmax(-1).tolist()
        coffee_classes = backbone.classify(coffee).argmax(-1).tolist()
    assert backbone.feature_dim == 1280 and cat.shape == (3, 1280)
    assert set(cat_classes) <= CAT_CLASSES, cat_classes
    assert coffee_classes[0] in COFFEE_CLASSES and coffee_classes[1] in COFFEE_CLASSES, coffee_classes


@pytest.mark.parametrize("pooling", ["roi", "crop"])
def test_whole_image_region_is_exactly_the_pooled_backbone_feature(backbone, photos, pooling):
    # In crop mode too: the whole image is seen at the full input size, not as a crop-size thumbnail.
    featurizer = RegionFeaturizer(backbone, 224, pooling, crop_size=112)
    images = torch.stack([featurizer.to_input(p) for p in photos])
    with torch.inference_mode():
        reference = backbone.pool(backbone(images))
    cat, coffee = featurizer(images, [np.array([WHOLE, CAT_A]), np.array([WHOLE])])
    torch.testing.assert_close(cat[0], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(coffee[0], reference[1], atol=1e-5, rtol=1e-5)
    assert (cat[1] - cat[0]).abs().max() > 0.1  # the other region is not the whole image's feature


@pytest.mark.parametrize("pooling", ["roi", "crop"])
def test_two_crops_of_one_object_are_closer_than_an_unrelated_crop(backbone, photos, pooling):
    cat, coffee = _features(backbone, photos, pooling)
    a, b, cup = (torch.nn.functional.normalize(v, dim=0) for v in (cat[1], cat[2], coffee[1]))
    assert a @ b > a @ cup + 0.3 and a @ b > b @ cup + 0.3


def test_torchvision_backbone_from_a_local_weights_file(tmp_path):
    path = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).state_dict(), path)
    backbone = load_backbone("mobilenet_v3_small", path)
    assert backbone.feature_dim == 576  # the pooled activation, before the classifier's hidden layer
    featurizer = RegionFeaturizer(backbone, 64, "roi")
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    features = featurizer(images, [np.array([WHOLE, CAT_A]), np.array([WHOLE])])
    assert [f.shape for f in features] == [(2, 576), (1, 576)]
    assert backbone.classify(features[1]).shape == (1, 10)


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --backbone-weights"):
        load_backbone("resnet18")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_backbone("resnet18", garbage)
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("vgg99")
