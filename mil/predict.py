"""Prediction, shared by training (validation) and evaluation: a MIL head over bags, a BagNet over images.

* `predict`: the probability of every bag of a `BagDataset`, one bag at a time (no padding).
* `predict_images`: BagNet logits of every image of an image set, and saliency maps on request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mil.bagnet import BagNet
from mil.data import BagDataset
from mil.device import module_device
from mil.imagesets import ImageSetDataset


@torch.inference_mode()
def predict(model: torch.nn.Module, ds: BagDataset, autocast: torch.dtype | None = None) -> pd.DataFrame:
    """Probabilities of every bag of `ds` (one bag at a time: no padding, any size), on the model's device.

    `autocast`: the mixed-precision dtype of the forward pass (`mil.device.autocast_dtype`), or None.
    """
    model.eval()
    dev = module_device(model)
    rows = []
    for i in range(len(ds)):
        X, y, sid = ds[i]  # (N, D)
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            logit = model(X[None].to(dev)).logits  # (1,)
        p = torch.sigmoid(logit.float())[0].item()
        rows.append((sid, int(y), p))
    return pd.DataFrame(rows, columns=["slide_id", "label", "probability"])


@torch.inference_mode()
def predict_images(
    net: BagNet, ds: ImageSetDataset, batch_size: int, device: torch.device, saliency_for=None
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Logits of every image of `ds` in order, ``(n,)``, and saliency maps ``{row: (h, w)}`` for the rows in `saliency_for`.

    The saliency map is `BagNet.saliency`: the classifier applied to each position's embedding
    (computed in the same pass as the logits, from `BagNet.forward_bag`).
    """
    net.eval()
    want = set() if saliency_for is None else {int(i) for i in saliency_for}
    n = len(ds)
    logits, maps = np.zeros(n, np.float32), {}
    H, W = ds.split.images.shape[-2:]
    h, w = net.feature_size(H, W)
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        x = torch.stack([ds[i][0] for i in rows]).to(device)  # (B, C, H, W)
        if want.intersection(rows):
            out = net.forward_bag(x)
            logits[start : start + len(rows)] = out.logits.float().cpu().numpy()  # (B,)
            scores = out.instance_scores.float().reshape(len(rows), h, w).cpu().numpy()  # (B, h, w)
            maps.update({i: scores[i - start] for i in rows if i in want})
        else:
            logits[start : start + len(rows)] = net(x).float().cpu().numpy()  # (B,)
    return logits, maps
