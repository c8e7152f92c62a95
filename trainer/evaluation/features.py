"""Image features and the metrics computed from them: FID, sFID, KID, precision/recall.

Features come from a frozen net: Inception-v3 from a local weights file (torchmetrics' `NoTrainInceptionV3`, the
network torch-fidelity ported from the TensorFlow FID graph) or a small `models/feature_net.py` net. FID and KID
are the Fréchet distance of `models/frechet.py` (a symmetric form that converges on any LAPACK) and torchmetrics'
KID, fed with features computed already; sFID is the same Fréchet distance of spatial features,
the first 7 channels of a mid-level feature map (Nash et al., 2021), and precision/recall is the k-NN estimate of
Kynkäänniemi et al. (2019): the two parts that neither torchmetrics nor torch-fidelity's importable code computes.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from models.feature_net import load_feature_net
from models.frechet import frechet_distance
from trainer.config import ConfigError, EvalConfig

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7
# The map sFID reads: Inception's "mixed_6/conv" (the 1x1 branch of Mixed_6d, 17x17); the feature net's 4x4 grid.
SPATIAL_LAYERS = {"inception": "Mixed_6d.branch1x1", "feature_net": "trunk.10"}


def check_feature_source(ev: EvalConfig) -> None:
    """Stops before any work when the feature extractor cannot be built (missing file, missing package)."""
    if bool(ev.inception) == bool(ev.feature_net):
        raise ConfigError(
            "set exactly one of eval.inception=/path/to/" + INCEPTION_FILE + " (Inception-v3 features, FID as "
            "published) or eval.feature_net=/path/to/net.pt (a models/feature_net.py net, as "
            "assets/demo/feature_net.pt)"
        )
    if ev.feature_net and not Path(ev.feature_net).is_file():
        raise FileNotFoundError(f"eval.feature_net={ev.feature_net} does not exist: point it to a saved FeatureNet")
    if ev.inception:
        if not Path(ev.inception).is_file():
            raise FileNotFoundError(
                f"eval.inception={ev.inception} does not exist. It is the Inception-v3 FID weights file "
                f"{INCEPTION_FILE} "
                "(about 91 MB), published with pytorch-fid's GitHub release 'fid_weights' (torch-fidelity serves the "
                "same weights as weights-inception-2015-12-05-6726825d.pth); nothing is downloaded at run time: fetch "
                "it once on a machine with internet and set eval.inception to its path. Nothing was sampled."
            )
        try:
            import torch_fidelity  # noqa: F401
            from torchmetrics.image.fid import NoTrainInceptionV3  # noqa: F401  (imports torch-fidelity)
        except ImportError as err:
            raise ConfigError(
                f"eval.inception needs the torch-fidelity package ({err}): `pip install '.[inception]'` where "
                "torchvision works with your torch (PyPI's torch); or use eval.feature_net for small images"
            ) from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureExtractor:
    """uint8 NCHW images -> (pooled features [N, D], spatial features [N, 7 * h * w]), both float32."""

    def __init__(self, net: nn.Module, kind: str, fingerprint: str, device: torch.device):
        self.net = net.to(device).eval().requires_grad_(False)
        self.kind, self.fingerprint, self.device = kind, fingerprint, device
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(SPATIAL_LAYERS[kind]).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.net(images.to(self.device)).reshape(len(images), -1)
        spatial = self._spatial[:, :SPATIAL_CHANNELS].reshape(len(images), -1)
        return pooled.float(), spatial.float()

    def dims(self, image_size: int) -> tuple[int, int]:
        pooled, spatial = self(torch.zeros((1, 3, image_size, image_size), dtype=torch.uint8))
        return pooled.shape[1], spatial.shape[1]


def load_extractor(ev: EvalConfig, device: torch.device) -> FeatureExtractor:
    check_feature_source(ev)
    if ev.feature_net:
        return FeatureExtractor(load_feature_net(ev.feature_net), "feature_net", file_sha256(ev.feature_net), device)
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=ev.inception)
    return FeatureExtractor(net, "inception", file_sha256(ev.inception), device)


class Precomputed(nn.Module):
    """The feature 'extractor' handed to torchmetrics: our features are computed (and gathered) already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int):
    """KID (mean, std over random subsets); the subsets are drawn from a seeded generator, so reruns agree."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # that it keeps every feature: so do we, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(
            feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the metric draws its subsets with torch.randperm
    try:
        mean, std = metric.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 2048) -> tuple[float, float]:
    """Precision: the share of fake samples inside the real manifold, the union of balls around every real
    sample reaching its k-th nearest real neighbour; recall: the same with the roles swapped."""

    def radii(points: torch.Tensor) -> torch.Tensor:  # k + 1: the nearest neighbour of a point is itself
        return torch.cat([torch.cdist(part, points).kthvalue(k + 1, dim=1).values for part in points.split(chunk)])

    def share_inside(points: torch.Tensor, centres: torch.Tensor, centre_radii: torch.Tensor) -> float:
        inside = [(torch.cdist(part, centres) <= centre_radii).any(dim=1) for part in points.split(chunk)]
        return float(torch.cat(inside).double().mean())

    real, fake = real.double(), fake.double()
    if min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision/recall needs more than eval.pr_neighbours={k} samples in each set")
    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


def all_metrics(real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor], ev: EvalConfig) -> dict[str, float]:
    """FID, sFID, KID and precision/recall of two feature sets ({"pooled": [N, D], "spatial": [N, S]})."""
    kid_mean, kid_std = kernel_distance(real["pooled"], fake["pooled"], ev.kid_subsets, ev.kid_subset_size, ev.seed)
    precision, recall = precision_recall(real["pooled"], fake["pooled"], ev.pr_neighbours)
    return {
        "fid": frechet_distance(real["pooled"], fake["pooled"]),
        "sfid": frechet_distance(real["spatial"], fake["spatial"]),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }
