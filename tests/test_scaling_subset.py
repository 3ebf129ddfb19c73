"""Nested training subsets (data.train_jets): deterministic, nested, whole chunks, validation untouched."""

import numpy as np
import pytest
from test_trainer import write_tiny_dataset

from jetfm.config import ConfigError
from jetfm.config_io import load_config
from jetfm.data.format import DataError
from jetfm.data.reader import make_loader
from jetfm.data.subset import subset_jets



def epoch_jets(cfg, split, seed):
    """(chunks of the subset, its jets, jets one shuffled epoch yields)."""
    loader = make_loader(cfg.data, split, seed=seed, shuffle=True)
    units = loader.dataset.units
    return {(u.shard, u.chunk) for u in units}, subset_jets(units), sum(len(b.seqlens) for b in loader)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("subset"), chunks_per_split=(12, 2), shards=3, chunk_size=10)


def config(tmp_path, shard_dir, train_jets):
    from test_trainer import tiny_config
    path = tiny_config(tmp_path, shard_dir, data={"path": str(shard_dir), "batch_size": 10, "shuffle_buffer": 10,
                                                  "train_jets": train_jets})
    return load_config(path)


def test_subsets_are_nested_deterministic_and_seed_independent(tmp_path, shard_dir):
    sets = []
    for n in (15, 40, 80, 120):
        chunks, unique, read = epoch_jets(config(tmp_path, shard_dir, n), "train", seed=0)
        again, _, _ = epoch_jets(config(tmp_path, shard_dir, n), "train", seed=7)  # another run seed
        assert chunks == again
        assert unique == read == 10 * len(chunks) and n <= unique < n + 10  # whole chunks, rounded up
        sets.append(chunks)
    for small, large in zip(sets, sets[1:]):
        assert small < large
    assert len(sets[-1]) == 12  # 120 jets = the whole split
    _, val_jets, _ = epoch_jets(config(tmp_path, shard_dir, 15), "val", seed=0)  # validation is never subset
    assert val_jets == 20


def test_subset_errors_name_the_option(tmp_path, shard_dir):
    with pytest.raises(DataError, match="data.train_jets=121 exceeds the 120 jets"):
        make_loader(config(tmp_path, shard_dir, 121).data, "train")
    with pytest.raises(ConfigError, match="data.train_jets must be >= 1"):
        config(tmp_path, shard_dir, 0)


def test_subset_order_is_fixed():
    from jetfm.data.subset import subset_order
    assert np.array_equal(subset_order(6), subset_order(6)) and sorted(subset_order(6)) == list(range(6))
