"""Data-parallel training and prediction across processes (torchrun / DDP).

    torchrun --standalone --nproc_per_node=4 -m model.train --data DATA ...   # 4 GPUs
    torchrun --standalone --nproc_per_node=2 -m model.train --device cpu ...  # 2 CPU procs
    torchrun --standalone --nproc_per_node=4 -m model.predict RUN --data DATA --tta 8

A run trained by N processes writes the same run directory as a run of one process.

Design (training):
- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE, MASTER_ADDR/PORT);
  `init` reads them and joins the process group: NCCL on CUDA (one GPU per process:
  cuda:LOCAL_RANK), Gloo on the CPU. Without them (or WORLD_SIZE=1) nothing changes.
- `--bs` stays the GLOBAL batch: each rank takes bs/world patches per step from its own
  disjoint shard of the epoch's shuffled order (model.data.EpochSampler(rank, world)), and
  DistributedDataParallel averages the gradients, so the steps per epoch, the one-cycle
  schedule and the effective batch are those of a single-process run (and a run can be
  resumed with another number of processes).
- The model is wrapped in DDP for each fit (`DDPTrainer`, a fastai callback: wrap in
  before_fit, unwrap in after_fit). fastai's own DistributedTrainer is not used: it needs
  the `accelerate` package, re-creates the data loaders as fastai DataLoaders (dropping our
  sampler and batched collate) and broadcasts indices through CUDA tensors (no Gloo/CPU).
- Validation: every rank validates the FULL validation set with the plain module (no DDP
  collectives), after taking rank 0's BatchNorm buffers, so all ranks compute identical
  predictions and metrics (simple and deterministic; costs world x the validation compute).
- Only rank 0 writes (config, split, history, checkpoints, predictions, metrics, progress)
  and prints; every rank waits at a barrier at the end of each epoch, after rank 0's
  checkpoint is written. Resume works the same way (every rank reads the checkpoint).
- lr_find runs on rank 0 alone (before any DDP wrapping, over a full-batch loader of all
  training patches, exactly as a single process would); its suggestion is broadcast.
- Seeds: rank 0 uses the single-process seeds; other ranks mix their rank into the
  augmentation and dropout seeds so that ranks do not draw identical augmentations.
- The train loss in history.csv is averaged over ranks.
- A failure in one rank ends the job: torchrun stops the other ranks.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from model.core.errors import PcamLensError
from model.data.batches import make_loader


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if not self.enabled:
            return
        if torch.distributed.get_backend() == "nccl":  # NCCL wants this rank's GPU named
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (the value passed by other ranks is ignored)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float | None) -> float | None:
        """The mean of `value` over ranks (None stays None: every rank has the same Nones)."""
        if not self.enabled or value is None:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def quiet(self, log):
        """`log` on rank 0, a no-op elsewhere."""
        return log if self.is_main else _no_log


SINGLE = Dist()


def _no_log(*args, **kwargs) -> None:
    pass


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def env_dist() -> Dist | None:
    """The Dist described by torchrun's environment variables, or None without them."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise PcamLensError("RANK / WORLD_SIZE / LOCAL_RANK are not whole numbers.",
                            fix="Launch with torchrun, or unset these variables.") from None
    if world < 1 or not 0 <= rank < world:
        raise PcamLensError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE.",
                            fix="Launch with torchrun, or unset these variables.")
    return Dist(rank, world, local_rank, local_world)


def init(device: str, backend: str | None = None) -> Dist:
    """Join the torchrun process group (NCCL for device 'cuda', else Gloo) and, on CUDA, make
    cuda:LOCAL_RANK this process's default device. Returns SINGLE outside torchrun."""
    d = env_dist()
    if d is None or not d.enabled:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise PcamLensError("This torch build has no torch.distributed.",
                            fix="Install a torch build with distributed support.")
    if device == "cuda":
        if torch.cuda.device_count() <= d.local_rank:
            raise PcamLensError(f"Rank {d.rank} wants GPU {d.local_rank} but "
                                f"{torch.cuda.device_count()} are visible.",
                                fix="Use --nproc_per_node <= the number of GPUs.")
        torch.cuda.set_device(d.local_rank)
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return d


def shutdown(d: Dist) -> None:
    if d.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or `model` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_batch_size(bs: int, world: int) -> int:
    """Patches per step on each rank: `bs` is the global batch of all ranks together."""
    if bs % world:
        raise PcamLensError(f"--bs {bs} cannot be split evenly over {world} processes (the "
                            "batch size is the global batch of all processes together).",
                            fix=f"Use a --bs that is a multiple of {world}, e.g. "
                                f"{max(world, bs - bs % world)}.")
    return bs // world


def quiet_learner(learn) -> None:
    """No progress bars and no fastai metric printing (ranks other than 0)."""
    from fastai.callback.progress import ProgressCallback
    from fastcore.basics import noop

    learn.remove_cb(ProgressCallback)
    learn.logger = noop


@contextlib.contextmanager
def whole_train_loader(learn, config, d: Dist):
    """While inside, rank 0 works alone as a single process would (for lr_find): the learner's
    training loader covers all training patches with the global batch, and fastai - which
    all-gathers losses and metrics whenever the WORLD_SIZE variable says > 1
    (fastai.torch_core.maybe_gather) - sees a world of one, so it waits for no other rank."""
    if not d.enabled:
        yield
        return

    old, world = learn.dls.loaders[0], os.environ["WORLD_SIZE"]
    learn.dls.loaders[0] = make_loader(old.dataset, config.optim.bs, shuffle=True,
                                       seed=config.runtime.seed, drop_last=True,
                                       workers=config.runtime.workers)
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        os.environ["WORLD_SIZE"] = world
        learn.dls.loaders[0] = old


def make_ddp_callback(d: Dist):
    """A fastai callback that trains the learner's model under DistributedDataParallel."""
    from fastai.callback.core import Callback
    from torch.nn.parallel import DistributedDataParallel

    class DDPTrainer(Callback):
        """Wraps the model in DDP for training batches; validation runs the plain module with
        rank 0's BatchNorm buffers. Runs after TrainEvalCallback (-10), before the batch
        transform (-5)."""

        order = -9

        def before_fit(self):
            self.module = unwrap(self.learn.model)
            ids = [torch.cuda.current_device()] if next(
                self.module.parameters()).is_cuda else None
            # DDP broadcasts rank 0's parameters and buffers here, and only reduces the
            # gradients of parameters that require them (frozen body: head + BatchNorm)
            self.ddp = DistributedDataParallel(self.module, device_ids=ids)
            self.learn.model = self.ddp

        def before_train(self):
            self.learn.model = self.ddp
            self.ddp.train()

        def before_validate(self):
            self.learn.model = self.module
            self.module.eval()
            with torch.no_grad():
                for b in self.module.buffers():
                    torch.distributed.broadcast(b, src=0)

        def after_fit(self):
            self.learn.model = self.module
            self.ddp = None

    return DDPTrainer()
