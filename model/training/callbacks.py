"""fastai callbacks used by training: batch transforms on the device, CPU/GPU autocast,
deterministic per-epoch seeding, and the run recorder that checkpoints every epoch."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from safetensors.torch import save

from model.core.atomic import write_bytes, write_csv, write_json
from model.core.errors import RunError
from model.evaluation.metrics import per_patch_losses
from model.nets.transforms import AugmentConfig, InputConfig, prepare, train_transform
from model.runs.format import read_safetensors, save_weights
from model.training.distributed import unwrap


def _rank_seed(rank: int) -> tuple[int, ...]:
    """Extra seed material for a DDP rank: none for rank 0 (= a single-process run)."""
    return (rank,) if rank else ()


def _mix(*xs: int) -> int:
    """Derive a 63-bit seed from integers (stable across processes, unlike hash())."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class BatchTransform(Callback):
    """uint8 BHWC batches -> normalised float on the model's device; augmented in training.

    Runs first (order -5) so every later callback and the model see ready tensors."""

    order = -5

    def __init__(self, icfg: InputConfig, acfg: AugmentConfig, seed: int = 0, rank: int = 0):
        self.icfg, self.acfg, self.seed, self.rank = icfg, acfg, seed, rank
        self.global_epoch = 0
        self.gen = torch.Generator()

    def before_epoch(self):
        # DDP ranks other than 0 mix their rank in: each rank augments its own patches
        self.gen.manual_seed(_mix(self.seed, self.global_epoch, 1, *_rank_seed(self.rank)))

    def before_batch(self):
        x = self.xb[0]
        if x.dtype != torch.uint8:  # already prepared (e.g. a caller passed floats)
            return
        dev = next(self.model.parameters()).device
        x = x.to(dev, non_blocking=True)
        if self.training:
            x = train_transform(x, self.icfg, self.acfg, self.gen)
        else:
            x = prepare(x, self.icfg)
        self.learn.xb = (x,)
        self.learn.yb = tuple(y.to(dev, non_blocking=True) for y in self.yb)


class Autocast(Callback):
    """Mixed precision through torch.autocast on CPU (bf16) or CUDA (bf16): no loss scaling is
    needed for bf16. (fastai's MixedPrecision is CUDA-only.)"""

    order = 10

    def __init__(self, device_type: str, dtype: torch.dtype = torch.bfloat16):
        self.device_type, self.dtype = device_type, dtype
        self._ctx = None

    def before_batch(self):
        self._ctx = torch.autocast(self.device_type, dtype=self.dtype)
        self._ctx.__enter__()

    def after_pred(self):
        self.learn.pred = self.pred.float()

    def after_loss(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def after_cancel_batch(self):
        self.after_loss()


class RunRecorder(Callback):
    """After every completed epoch: history row, last/best weights, the resume checkpoint and
    progress.json, each written atomically. Also fixes the seeds of each epoch so that a
    resumed run follows the same path as an uninterrupted one."""

    order = 90  # after fastai's Recorder (order 50) has its numbers

    def __init__(self, run_dir: Path, phase: str, epoch_offset: int, start_epoch: int,
                 state: dict, batch_tfm: BatchTransform, sampler, valid_ids: list[str],
                 valid_labels: np.ndarray, save_resume, dist=None):
        self.run_dir, self.phase, self.offset = Path(run_dir), phase, epoch_offset
        self.start_epoch, self.state, self.batch_tfm = start_epoch, state, batch_tfm
        self.sampler, self.valid_ids, self.valid_labels = sampler, valid_ids, valid_labels
        self.save_resume = save_resume
        self.dist = dist  # model.training.distributed.Dist under torchrun: only rank 0 writes

    # ---- seeding
    def before_epoch(self):
        g = self.offset + self.epoch
        self.batch_tfm.global_epoch = g
        self.batch_tfm.before_epoch()  # re-seed now that the global epoch is known
        self.sampler.set_epoch(g)
        torch.manual_seed(_mix(self.state["seed"], g, 2, *_rank_seed(self.batch_tfm.rank)))
        self._t0 = time.time()
        self._probs, self._lrs, self._train_losses = [], [], []

    def after_batch(self):
        if self.training:
            self._lrs.append(float(self.opt.hypers[-1]["lr"]))
            self._train_losses.append(float(self.loss.detach()))
        else:
            self._probs.append(F.softmax(self.pred.float(), dim=1)[:, 1].detach().cpu())

    # ---- recording
    def after_epoch(self):
        if self.epoch < self.start_epoch or not self._probs:
            return  # an epoch skipped on resume, or cancelled
        from sklearn.metrics import roc_auc_score  # seconds to import: only when scoring

        g = self.offset + self.epoch
        dist = self.dist
        main = dist is None or dist.is_main
        probs = torch.cat(self._probs).numpy().astype(np.float64)
        labels = self.valid_labels
        losses = per_patch_losses(labels, probs)
        auc = float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")
        row = {"epoch": g, "phase": self.phase, "phase_epoch": self.epoch,
               "train_loss": _mean_over_ranks(dist, float(np.mean(self._train_losses))
                                              if self._train_losses else None),
               "valid_loss": float(losses.mean()),
               "accuracy": float(((probs >= 0.5) == labels).mean()), "auc": auc,
               "lr_max": max(self._lrs) if self._lrs else None,
               "seconds": round(time.time() - self._t0, 2)}
        st = self.state
        st["history"].append(row)
        lr_path = self.run_dir / "lr_schedule.csv"
        if main:
            write_csv(self.run_dir / "history.csv", pd.DataFrame(st["history"]), fsync=False)
            lr_rows = pd.DataFrame({"epoch": g, "phase": self.phase, "lr": self._lrs})
            prev = pd.read_csv(lr_path) if lr_path.exists() and g > 0 else None
            if prev is not None:
                lr_rows = pd.concat([prev[prev.epoch < g], lr_rows])
            write_csv(lr_path, lr_rows, fsync=False)

        model = unwrap(self.model)
        if main:
            save_weights(model, self.run_dir / "last.safetensors", {"epoch": g, "auc": auc})
        improved = not (auc <= st.get("best_auc", -1.0))  # NaN counts as improved once
        if improved or (main and not (self.run_dir / "best.safetensors").exists()):
            st["best_auc"], st["best_epoch"] = auc, g
            if main:
                save_weights(model, self.run_dir / "best.safetensors", {"epoch": g, "auc": auc})
                write_csv(self.run_dir / "valid_predictions.csv",
                          pd.DataFrame({"id": self.valid_ids, "label": labels, "prob": probs,
                                        "loss": losses}))
        st["phase"], st["phase_epochs_done"], st["epochs_done"] = self.phase, self.epoch + 1, g + 1
        if main:
            self.save_resume(self.learn, st)  # the commit point of this epoch
            write_json(self.run_dir / "progress.json",
                       {"status": "running", "phase": self.phase, "epochs_done": g + 1,
                        "epochs_total": st["epochs_total"], "best_auc": st["best_auc"],
                        "best_epoch": st["best_epoch"], "updated": time.time()})
        if dist is not None:
            dist.barrier()  # no rank starts the next epoch before rank 0's checkpoint is written


def _mean_over_ranks(dist, value):
    """`value` averaged over DDP ranks (a collective: every rank calls it), or as it is."""
    return value if dist is None else dist.mean(value)


def save_resume_checkpoint(learn, state: dict, path: Path) -> None:
    """Weights + optimizer moments + progress in one safetensors file, written atomically, so
    the resume point is always self-consistent (never weights of epoch k with state of k-1)."""

    tensors = {f"model/{k}": v.detach().cpu().contiguous()
               for k, v in unwrap(learn.model).state_dict().items()}
    scalars: dict[str, dict] = {}
    sd = learn.opt.state_dict()
    for j, pstate in enumerate(sd["state"]):
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{j}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(j), {})[k] = v.item() if hasattr(v, "item") else v
    meta = {"progress": json.dumps({k: v for k, v in state.items() if k != "history"}),
            "history": json.dumps(state["history"]), "opt_scalars": json.dumps(scalars),
            "n_opt_params": str(len(sd["state"]))}
    write_bytes(path, save(tensors, metadata=meta))


def load_resume_checkpoint(learn, path: Path, with_opt: bool = True) -> dict:
    """Restore weights (and optimizer state) saved by `save_resume_checkpoint`; return the
    training state (epochs done, best AUC, history)."""

    tensors, meta = read_safetensors(path)  # values were JSON-encoded strings
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}

    unwrap(learn.model).load_state_dict(model_sd)
    state = meta["progress"]
    state["history"] = meta["history"]
    if not with_opt:
        return state
    n = int(meta["n_opt_params"])
    scalars = meta["opt_scalars"]
    opt_state = [dict(scalars.get(str(j), {})) for j in range(n)]
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, j, name = k.split("/", 2)
            opt_state[int(j)][name] = v
    if learn.opt is None:
        learn.create_opt()
    params = learn.opt.all_params().itemgot(0)
    if len(params) != n:

        raise RunError(f"{path} holds optimizer state for {n} parameters; the model has "
                       f"{len(params)}.", path=path, fix="Start a new run instead of --resume.")
    opt_state = [{k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                 for p, s in zip(params, opt_state)]
    learn.opt.load_state_dict({"state": opt_state, "hypers": learn.opt.hypers})
    return state
