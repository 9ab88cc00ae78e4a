"""The FID-Inception feature network: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF 2015-12-05
graph's weights, which ADM's evaluator also uses), with ADM's three outputs from one pass:

- ``pool``: the 2048-d pool_3 features (torch-fidelity's "2048") for FID, precision and recall;
- ``spatial``: the first 7 channels of ADM's ``mixed_6/conv`` map, (B, 7 * 17 * 17 = 2023), for sFID;
- ``probs``: softmax over the 1008 logits for the Inception Score. ADM multiplies pool_3 by the ``softmax``
  weight matrix without its bias, which is torch-fidelity's "logits_unbiased"; we do the same.

Which torch-fidelity layer is ``mixed_6/conv``: the TF graph names its inception blocks ``mixed``,
``mixed_1``, ..., ``mixed_10``; torch-fidelity's are Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c in the
same order, so ``mixed_6`` is the 7th, **Mixed_6d**, and inside a block ``conv`` is the 1 x 1 branch
(``tower``, ``tower_1``, ``tower_2`` are the others), **Mixed_6d.branch1x1**. Checked three ways:
(1) torch-fidelity's weight converter (utils/util_convert_inception_weights.py in its repository, not shipped
in the wheel) maps the TF tensors ``mixed_6/conv/conv2d_params`` and ``mixed_6/conv/batchnorm`` to
``Mixed_6d.branch1x1.conv`` / ``.bn``; (2) shape: that branch gives (B, 192, 17, 17) for a 299 x 299 input,
the 17 x 17 grid ADM's 2023 = 7 * 17 * 17 implies (every Mixed_6* block works at 17 x 17, so the shape alone
does not single it out, hence (1) and (3)); (3) position: it is the 1 x 1 branch of the third InceptionC
block with channels_7x7 = 160 (Mixed_6c and Mixed_6d have 160, Mixed_6b 128, Mixed_6e 192). The TF tensor
``mixed_6/conv:0`` is the unit's output after batch norm and ReLU, which is what torch-fidelity's
BasicConv2d returns; we take it with a forward hook on ``Mixed_6d.branch1x1`` (checked at run time to be
(B, 192, 17, 17)). ADM's map is NHWC and flattened as (h, w, c), so we flatten ``x[:, :7].permute(0, 2, 3,
1)`` the same way: the 2023 coordinates are then in ADM's order and our (mu_s, sigma_s) can be compared with
those stored in ADM's reference batches.

Inputs are uint8 images of any size; torch-fidelity resizes them to 299 x 299 with TF1-compatible bilinear
interpolation inside the network; grey images are repeated to 3 channels. Weights come from
``--inception-weights PATH``, else torch-fidelity's file in the torch hub cache
(``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``), else they are downloaded there
(not offline: RREPA_OFFLINE=1 or HF_HUB_OFFLINE=1); a missing file raises FileNotFoundError naming the file,
its URL and where to put it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rrepa.precision import float32
from rrepa.utils import as_nchw_uint8, is_offline

logger = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-fid"
INCEPTION_FEATURE_DIM = 2048
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def default_inception_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _inception_missing(where: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights {where} not found ({reason}): download {INCEPTION_FILENAME} from {INCEPTION_URL} "
        f"and put it at {default_inception_weights_path()} (torch-fidelity's cache), or pass its path "
        f"with --inception-weights PATH")


def resolve_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The local weights file: ``weights`` if given (must exist), else the torch hub cache file,
    downloaded there when missing and online (utils.is_offline false)."""
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise _inception_missing(f"file {p}", "no such file")
        return p
    p = default_inception_weights_path()
    if p.is_file():
        return p
    if is_offline():
        raise _inception_missing(f"file {p}", "offline: RREPA_OFFLINE or HF_HUB_OFFLINE is set, no download tried")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", INCEPTION_URL, p)
        torch.hub.download_url_to_file(INCEPTION_URL, str(p), progress=False)
    except Exception as e:  # noqa: BLE001 - any download failure
        raise _inception_missing(f"file {p}", f"download failed: {e}".replace("\n", " ")) from e
    return p


def _fidelity_inception_class():
    try:  # heavy optional dependency (imports torchvision); only for --features inception
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ValueError("--features inception needs torch-fidelity: pip install 'torch-fidelity>=0.3'") from e
    return FeatureExtractorInceptionV3


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save random weights for torch-fidelity's Inception (He-normal convolutions, identity batch norm)
    to ``path``: for tests and benchmarks, where the real weights cannot be downloaded."""
    base = _fidelity_inception_class()

    class _Unloaded(base):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # skip torch-fidelity's load
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------
# The feature network
# --------------------------------------------------------------------------------------------


class InceptionFeatures:
    """torch-fidelity's FID-Inception with ADM's three outputs; see the module docstring. A feature network
    as rrepa.eval.samples uses one: ``name``, ``feature_dim``, ``has_spatial`` and ``extract(images)``."""

    name = INCEPTION_NAME
    feature_dim = INCEPTION_FEATURE_DIM
    has_spatial = True

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 50) -> None:
        path = resolve_inception_weights(weights)
        cls = _fidelity_inception_class()
        try:
            self.net = cls("inception-v3-compat", ["2048", "logits_unbiased"],
                           feature_extractor_weights_path=str(path))
        except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is not torch-fidelity's Inception state dict: {first}") from e
        self.device = torch.device(device)
        self.net.to(self.device)
        self.batch_size = batch_size
        self.weights_path = path
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module, inputs, output: Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def extract(self, images, batch_size: int | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Features of uint8 images ((N, C, H, W) tensor or (N, H, W, C) array): {"pool": (N, 2048) float32,
        "spatial": (N, 2023) float32, "probs": (N, 1008) float64}."""
        x = as_nchw_uint8(images)
        bs = batch_size or self.batch_size
        out: dict[str, list[Tensor]] = {"pool": [], "spatial": [], "probs": []}
        for lo in range(0, x.shape[0], bs):
            xb = x[lo:lo + bs]
            if xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            self._spatial = None
            with float32(self.device):  # the instrument stays fixed under a bf16 run: FIDs compare across precisions
                pool, logits = self.net(xb.contiguous().to(self.device))
            sp = self._spatial
            if sp is None or tuple(sp.shape[1:]) != (192, 17, 17):
                raise RuntimeError(f"Mixed_6d.branch1x1 gave {None if sp is None else tuple(sp.shape)}, "
                                   f"expected (B, 192, 17, 17): torch-fidelity's network changed")
            sp = sp[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(sp.shape[0], -1)  # ADM's (h, w, c) order
            out["pool"].append(pool.float().cpu())
            out["spatial"].append(sp.float().cpu())
            out["probs"].append(torch.softmax(logits.double(), dim=1).cpu())
            if progress is not None:
                progress(xb.shape[0])
        if not out["pool"]:
            return {"pool": np.zeros((0, 2048), np.float32), "spatial": np.zeros((0, SPATIAL_DIM), np.float32),
                    "probs": np.zeros((0, 1008))}
        return {k: torch.cat(v).numpy() for k, v in out.items()}
