"""A fold's head fitted on cached pooled features (model.evaluation.features).

The body is frozen and in eval mode, so its pooled features do not change while the head
learns: computing them once for all patches and views and fitting each fold's head on them
gives the same network as fastai's frozen phase with the body's BatchNorm statistics kept,
at a fraction of the cost (a head epoch over 4,800 patches x 8 views takes about a second on
2 cores instead of minutes). The 8 dihedral views of a training patch are its augmentation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from model.evaluation.metrics import per_patch_losses, roc_auc


@dataclass
class HeadFit:
    epochs: int = 8
    lr: float = 2e-3  # one-cycle maximum (AdamW)
    wd: float = 0.01
    bs: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


def _batch(feats: np.ndarray, rows: np.ndarray, views: np.ndarray) -> torch.Tensor:
    order = np.argsort(rows, kind="stable")  # memmap reads in file order
    out = np.empty((len(rows), feats.shape[2]), np.float32)
    out[order] = feats[rows[order], views[order]]
    return torch.from_numpy(out)


def view_probs(head: nn.Module, feats: np.ndarray, rows: np.ndarray,
               bs: int = 2048) -> np.ndarray:
    """[len(rows), V] float64 P(class 1) of each view of the given patches."""
    was = head.training
    head.eval()
    n_views = feats.shape[1]
    out = np.empty((len(rows), n_views), np.float64)
    try:
        with torch.inference_mode():
            for s in range(0, len(rows), bs):
                r = np.asarray(rows[s:s + bs])
                order = np.argsort(r, kind="stable")  # memmap reads in file order
                x = torch.from_numpy(np.asarray(feats[r[order]], np.float32))
                logits = head(x.reshape(-1, x.shape[-1])).float()
                p = torch.softmax(logits, 1)[:, 1].reshape(len(r), n_views)
                out[s + order] = p.double().numpy()
    finally:
        head.train(was)
    return out


def fit_head(head: nn.Module, feats: np.ndarray, labels: np.ndarray, train_rows: np.ndarray,
             fit: HeadFit, seed: int, valid_rows: np.ndarray | None = None,
             log=None) -> list[dict]:
    """Fit `head` (features -> logits, trained in place) on every view of the training patches
    with AdamW and a one-cycle schedule; returns one history row per epoch (train loss, and
    validation loss/AUC of the TTA-averaged probabilities when `valid_rows` is given)."""
    torch.manual_seed(seed)  # dropout
    rng = np.random.default_rng(seed)
    n_views = feats.shape[1]
    pairs_r = np.repeat(np.asarray(train_rows, np.int64), n_views)
    pairs_v = np.tile(np.arange(n_views), len(train_rows))
    y_all = torch.as_tensor(np.asarray(labels, np.int64))
    steps = max(1, len(pairs_r) // fit.bs)
    opt = torch.optim.AdamW(head.parameters(), lr=fit.lr, weight_decay=fit.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=fit.lr, total_steps=steps * fit.epochs)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(fit.epochs):
        head.train()
        perm = rng.permutation(len(pairs_r))
        total = 0.0
        for s in range(steps):
            take = perm[s * fit.bs:(s + 1) * fit.bs]
            x = _batch(feats, pairs_r[take], pairs_v[take])
            loss = loss_fn(head(x), y_all[pairs_r[take]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        row = {"epoch": epoch, "phase": "head", "train_loss": total / steps}
        if valid_rows is not None and len(valid_rows):
            p = view_probs(head, feats, valid_rows).mean(1)
            y = np.asarray(labels)[valid_rows]
            row["valid_loss"] = float(per_patch_losses(y, p).mean())
            row["valid_auc"] = float(roc_auc(y, p)) if len(np.unique(y)) == 2 else float("nan")
        history.append(row)
        if log and epoch == fit.epochs - 1:
            log("  head epoch {epoch}: train_loss {train_loss:.4f}".format(**row)
                + (" valid_loss {valid_loss:.4f} valid_auc {valid_auc:.4f}".format(**row)
                   if "valid_auc" in row else ""))
    return history
