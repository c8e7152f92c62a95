"""A small CNN feature extractor for Fréchet distances on the demo's 16x16 procedural images.

Inception-v3 needs a download and 299x299 inputs; this net ships with the demo (`assets/demo/feature_net.pt`)
and is trained by `launch/make_demo_assets.py` to tell (domain x shape) apart, to flag corrupted images, and to
regress each image's position, size and colours, so its features see domain, class, artefacts and within-class
variation. It plugs into torchmetrics as `FrechetInceptionDistance(feature=net)`: it exposes `num_features` (so
the metric never probes it with a dummy input) and accepts uint8 images in [0, 255] (the metric's default,
`normalize=False`) as well as float images in [0, 1] (`normalize=True`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models import frechet


class FeatureNet(nn.Module):
    """Conv trunk -> 4x4 grid -> `num_features` embedding (the FID features) -> class and attribute heads."""

    def __init__(self, num_classes: int = 9, num_attributes: int = 9, num_features: int = 32, width: int = 32):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics to size its covariance states
        # No batch norm: the metric may switch its children to train mode, and features must not change then.
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            # A fixed 4x4 grid keeps where things are (position is a feature) and accepts other image sizes.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.embed = nn.Linear(2 * width * 16, num_features)
        self.class_head = nn.Sequential(nn.SiLU(), nn.Linear(num_features, num_classes))
        self.attribute_head = nn.Sequential(nn.SiLU(), nn.Linear(num_features, num_attributes))
        self.config = dict(
            num_classes=num_classes, num_attributes=num_attributes, num_features=num_features, width=width
        )

    def to_unit_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] NCHW images -> [-1, 1] in the weights' dtype.

        Following the weights' dtype matters because `metric.set_dtype(torch.float64)` converts this child too."""
        dtype = self.embed.weight.dtype
        if images.dtype == torch.uint8:
            return images.to(dtype) / 127.5 - 1.0
        return images.to(dtype) * 2.0 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(self.to_unit_float(images)))

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, attribute predictions): the training outputs."""
        features = self.features(images)
        return self.class_head(features), self.attribute_head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, num_features] features of NCHW images, the output torchmetrics' FID expects."""
        return self.features(images)


def save_feature_net(net: FeatureNet, path: str | Path) -> None:
    """A plain state dict plus the constructor arguments, loadable with `torch.load(weights_only=True)`."""
    torch.save({"config": dict(net.config), "state_dict": net.state_dict()}, path)


def load_feature_net(path: str | Path) -> FeatureNet:
    """The shipped feature net, in eval mode with frozen weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run launch/make_demo_assets.py to build the demo assets")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    net = FeatureNet(**payload["config"])
    net.load_state_dict(payload["state_dict"])
    return net.eval().requires_grad_(False)


@torch.no_grad()
def frechet_distance(net: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 500) -> float:
    """FID between two NCHW image sets (uint8 [0, 255] or float [0, 1]; the net reads both) on the net's features."""

    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])

    return frechet.frechet_distance(features(real), features(fake))


def nhwc_to_nchw(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] numpy/tensor images (as `data.procedural` makes them) -> uint8 NCHW tensor."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()
