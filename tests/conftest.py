"""Session-wide fixtures: tiny real datasets generated once per test session.

`pythia_toptag` is real Pythia 8 + FastJet output (top vs QCD, the toptag preset) written as
real shards; every model test that needs physical jets reads it instead of inventing data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny tensors on a 2-core machine: extra OpenMP threads only add barrier overhead.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: intra-op threads only add barrier overhead (10x slower on a loaded 2-core box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: jets per class and split of the session dataset; 2 classes -> 1,200 jets, ~15 s of Pythia
TOPTAG_JETS = {"train": 400, "val": 100, "test": 100}


@pytest.fixture(scope="session")
def pythia_toptag(tmp_path_factory) -> Path:
    """Directory of a small toptag shard set (train/val/test), generated with real Pythia."""
    from jetfm.data.generate import generate_dataset

    out = tmp_path_factory.mktemp("pythia-toptag")
    generate_dataset(out, preset="toptag", jets_per_class=TOPTAG_JETS, workers=2, seed=1234,
                     jets_per_shard=100, chunk_size=100, progress=False)
    return out
