"""Prediction, shared by training (validation) and evaluation: a MIL head over bags, a BagNet over images.

* `predict`: the probability of every bag of a `BagDataset`, one bag at a time (no padding); for a
  multi-class head (logits ``(1, C)``) the softmax of every class and the argmax.
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

    Returns:
        binary head (logits ``(1,)``): ``slide_id, label, probability`` (the sigmoid);
        multi-class head (logits ``(1, C)``): ``slide_id, label, prob_0 … prob_<C-1>, predicted`` (softmax, argmax).
    """
    model.eval()
    dev = module_device(model)
    rows, n_classes = [], None
    for i in range(len(ds)):
        X, y, sid = ds[i]  # (N, D)
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            logit = model(X[None].to(dev)).logits  # (1,) binary, (1, C) multi-class
        if logit.ndim == 2:
            p = torch.softmax(logit.double(), dim=1)[0].cpu().numpy()  # (C,) float64: sums to 1 for log_loss
            n_classes = len(p)
            rows.append((sid, int(y), *p.tolist(), int(p.argmax())))
        else:
            rows.append((sid, int(y), torch.sigmoid(logit.float())[0].item()))
    if n_classes is not None:
        return pd.DataFrame(rows, columns=["slide_id", "label", *(f"prob_{k}" for k in range(n_classes)), "predicted"])
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
