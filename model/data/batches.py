"""Batches of uint8 patches for training and inference.

The loader moves raw uint8 bytes only; conversion, augmentation and normalisation happen on
whole batches on the model's device (model.nets.transforms). Small sources are read into memory once
(a 6,000-patch set is 166 MB), large ones are read per batch (packed cache or files).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from model.data.base import PatchSource

PRELOAD_MAX_BYTES = 3 * 1024**3


def read_all(source: PatchSource, *, threads: int = 4, chunk: int = 256,
             progress: bool = True) -> np.ndarray:
    """Read every patch of `source` into one [N,S,S,3] uint8 array (threaded: PIL and h5py
    release the GIL while decoding)."""
    n = len(source)
    out = np.empty((n, source.size, source.size, 3), np.uint8)
    starts = list(range(0, n, chunk))

    def work(s):
        out[s:s + chunk] = source.read_batch(np.arange(s, min(s + chunk, n)))
        return min(chunk, n - s)

    bar = None
    if progress and n > 2 * chunk:

        bar = tqdm(total=n, desc=f"reading {source.kind} patches", unit="patch", leave=False,
                   disable=None)  # None: no bar when stderr is not a terminal (logs)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for k in pool.map(work, starts):
            if bar:
                bar.update(k)
    if bar:
        bar.close()
    return out


class PatchDataset(Dataset):
    """Batched access to (uint8 patches, labels); `__getitems__` returns a whole batch."""

    def __init__(self, source: PatchSource, labels: np.ndarray | None = None,
                 preload: bool | None = None):
        self.source = source
        labels = source.labels if labels is None else labels
        self.labels = (np.zeros(len(source), np.int64) if labels is None
                       else np.asarray(labels, np.int64))
        nbytes = len(source) * source.size * source.size * 3
        if preload is None:
            preload = nbytes <= PRELOAD_MAX_BYTES and source.kind not in ("packed",)
        self.array = read_all(source) if preload else None

    def __len__(self):
        return len(self.source)

    def __getitems__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        x = self.array[idx] if self.array is not None else self.source.read_batch(idx)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[idx])

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _as_batch(batch):
    """collate_fn: `__getitems__` already built the batch."""
    return batch


class EpochSampler(Sampler):
    """Seeded shuffling that depends only on (seed, epoch), so a resumed run sees the same order
    as an uninterrupted one; shards indices across DDP ranks (each rank a disjoint slice)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per = math.ceil(self.n / self.world)
        order = (order + order[:per * self.world - self.n])  # pad so every rank gets `per`
        return iter(order[self.rank * per:(self.rank + 1) * per])

    def __len__(self):
        return math.ceil(self.n / self.world)


def default_workers(dataset: PatchDataset) -> int:
    if dataset.array is not None:
        return 0  # slicing an in-memory array is faster than any worker hand-off
    return min(4, os.cpu_count() or 1)


def make_loader(dataset: PatchDataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                drop_last: bool = False, rank: int = 0, world: int = 1,
                workers: int | None = None) -> DataLoader:
    sampler = EpochSampler(len(dataset), seed, shuffle, rank, world)
    workers = default_workers(dataset) if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      collate_fn=_as_batch, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def iter_batches(source: PatchSource, batch_size: int, *, workers: int | None = None):
    """Yield (start, uint8 tensor) over `source` in order with bounded memory (inference).

    workers=0 reads each batch in this process, between model calls: right for a model on
    the CPU, whose intra-op threads already use every core. Loader processes (or a reading
    thread) only add start-up, pickling and contention there (measured: README,
    Performance). workers>0 (None: up to 4) starts worker processes, for a model on a GPU
    that waits for the CPU to decode."""
    ds = PatchDataset(source, preload=False)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if source.kind in ("synthetic", "packed", "pcam-h5"):
        workers = min(workers, 2)
    if workers == 0:
        yield from _in_order(ds, batch_size)
        return
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=_as_batch,
                    num_workers=workers)
    start = 0
    for x, _ in dl:
        yield start, x
        start += len(x)


def _in_order(ds: PatchDataset, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(ds), batch_size):
        x, _ = ds.__getitems__(np.arange(start, min(start + batch_size, len(ds))))
        yield start, x
