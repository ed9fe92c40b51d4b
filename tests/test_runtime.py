"""model.core.runtime.tune_allocator: applied on Linux/glibc, idempotent, and it does what it is for
(large tensors no longer page-fault on every allocation)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_PROBE = r"""
import resource, sys, torch
sys.path.insert(0, {repo!r})
from model.core.runtime import tune_allocator
if {tune}:
    assert tune_allocator() is True and tune_allocator() is True
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm up
    torch.ones(64, 32, 72, 72).sum()
before = faults()
for _ in range(20):  # 42 MB each: above glibc's largest default mmap threshold (32 MB)
    torch.ones(64, 32, 72, 72).sum()
print(faults() - before)
"""


def _faults(tune: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(repo=str(REPO), tune=tune)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # starts Python subprocesses (torch import each)
def test_large_tensors_reuse_heap_memory_instead_of_faulting_in_new_pages():
    plain, tuned = _faults(False), _faults(True)
    # untuned: every 42 MB tensor is a fresh mmap, ~10k page faults each (207,380 for 20 here);
    # tuned: the heap is reused (10-21k in all, from the sum's temporaries and heap growth)
    assert plain > 20 * 5_000, plain
    assert tuned < plain / 5, (plain, tuned)


def test_can_be_turned_off(monkeypatch):
    import model.core.runtime as rt

    monkeypatch.setattr(rt, "_done", None)
    monkeypatch.setenv("PCAM_LENS_NO_MALLOPT", "1")
    assert rt.tune_allocator() is False
    monkeypatch.setattr(rt, "_done", None)  # leave it to be applied again
