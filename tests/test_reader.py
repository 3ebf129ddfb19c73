"""Shards and the reader: round trips, exact resume, rank/worker splits, corrupt input."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from jetfm.data.features import Preprocessing, four_momenta_from_relative, particle_features
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES, DataError, JetArrays, tar_chunk_spans
from jetfm.data.reader import JetDataset, JetLoader, iterate_jets, verify_shards
from jetfm.data.shards import Manifest, ShardWriter, creation_info


def random_jets(rng, n_jets, n_classes=2, max_mult=40):
    """Physical-looking jets: massless constituents around a random axis, pT-descending."""
    mult = rng.integers(1, max_mult, n_jets)
    offsets = np.concatenate([[0], np.cumsum(mult)])
    pt = np.sort(rng.exponential(20.0, offsets[-1]) + 0.5)[::-1]  # resorted per jet below
    eta = rng.normal(0, 0.3, offsets[-1]) + np.repeat(rng.uniform(-2, 2, n_jets), mult)
    phi = rng.normal(0, 0.3, offsets[-1]) + np.repeat(rng.uniform(-3, 3, n_jets), mult)
    for b in range(n_jets):
        s = slice(offsets[b], offsets[b + 1])
        pt[s] = np.sort(pt[s])[::-1]
    p4 = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], 1)
    jet = np.zeros((n_jets, len(JET_FEATURES)), np.float32)
    jet[:, 0] = rng.uniform(500, 600, n_jets)  # unique id per jet for the bookkeeping tests
    jet[:, 5] = mult
    return JetArrays(p4.astype(np.float32), offsets.astype(np.int64), jet, rng.integers(0, n_classes, n_jets))


def write_dataset(root, n_shards=3, jets_per_shard=230, chunk_size=50, seed=0, splits=("train",)):
    rng = np.random.default_rng(seed)
    manifest = Manifest(source={"kind": "test"}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=["QCD", "Tbqq"], chunk_size=chunk_size,
                        created_by=creation_info())
    written = {}
    for split in splits:
        everything = []
        for k in range(n_shards):
            jets = random_jets(rng, jets_per_shard)
            writer = ShardWriter(root, f"{split}/shard-{k:06d}.tar", manifest.particle_features,
                                 manifest.jet_features, 2, chunk_size=chunk_size)
            # odd write sizes exercise the chunk re-buffering
            for start in range(0, len(jets), 37):
                writer.write(jets.select(np.arange(start, min(start + 37, len(jets)))))
            manifest.add_shard(split, writer.close())
            everything.append(jets)
        written[split] = JetArrays.concat(everything)
    manifest.save(root)
    return manifest, written


def ids_of(batch):
    return batch.jet[:, 0].numpy().tolist()


def prep():
    return Preprocessing()


def test_round_trip_identical(tmp_path):
    manifest, written = write_dataset(tmp_path)
    read = JetArrays.concat(list(iterate_jets(tmp_path, "train")))
    for name in ("part", "offsets", "jet", "label"):
        np.testing.assert_array_equal(getattr(read, name), getattr(written["train"], name))
    loaded = Manifest.load(tmp_path)
    assert loaded.n_jets("train") == 3 * 230
    assert sum(loaded.class_counts("train")) == 3 * 230
    stats = json.loads((tmp_path / "manifest.json").read_text())["statistics"]["train"]
    assert stats["particles"]["part_pt"]["min"] > 0.49
    verify_shards(tmp_path, loaded)
    loaded.splits["train"][0]["n_jets"] += 1  # a manifest that disagrees with its shard
    with pytest.raises(DataError, match=r"shard-000000.tar: holds 230 jets in .* manifest says 231 jets"):
        verify_shards(tmp_path, loaded)


def test_webdataset_library_reads_our_shards(tmp_path):
    import webdataset as wds

    write_dataset(tmp_path, n_shards=1)
    samples = list(wds.WebDataset(str(tmp_path / "train" / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 5  # 230 jets in chunks of 50
    part = np.load(io.BytesIO(samples[0]["part.npy"]), allow_pickle=False)
    assert part.shape[1] == 4


def full_epoch(loader):
    return [jet_id for batch in loader for jet_id in ids_of(batch)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_jet_once_per_epoch_and_deterministic(tmp_path, num_workers):
    _, written = write_dataset(tmp_path)
    make = lambda: JetLoader(JetDataset(tmp_path, "train", prep(), 32, shuffle_buffer=100, seed=3), num_workers=num_workers)
    loader = make()
    epoch0 = full_epoch(loader)
    epoch1 = full_epoch(loader)
    assert sorted(epoch0) == sorted(written["train"].jet[:, 0].tolist())
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # reshuffled per epoch
    again = make()
    assert full_epoch(again) == epoch0  # deterministic given (seed, epoch)


def test_two_ranks_two_workers_partition(tmp_path):
    _, written = write_dataset(tmp_path, n_shards=2)
    seen = []
    for rank in range(2):
        ds = JetDataset(tmp_path, "train", prep(), 16, shuffle_buffer=60, seed=1, rank=rank, world_size=2)
        seen += full_epoch(JetLoader(ds, num_workers=2))
    assert len(seen) == len(written["train"]) and set(seen) == set(written["train"].jet[:, 0].tolist())


def test_drop_uneven_gives_equal_batch_counts(tmp_path):
    write_dataset(tmp_path, n_shards=3, jets_per_shard=97)
    counts = []
    for rank in range(2):
        ds = JetDataset(tmp_path, "train", prep(), 20, seed=1, rank=rank, world_size=2, drop_last=True)
        counts.append(sum(1 for _ in JetLoader(ds, num_workers=2, drop_uneven=True)))
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_rest(tmp_path, num_workers):
    write_dataset(tmp_path)
    make = lambda: JetLoader(JetDataset(tmp_path, "train", prep(), 24, shuffle_buffer=120, seed=5), num_workers=num_workers)
    reference = make()
    uninterrupted = [ids_of(b) for b in reference] + [ids_of(b) for b in reference]
    interrupted = make()
    first = []
    for i, batch in enumerate(interrupted):
        first.append(ids_of(batch))
        if i == 6:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive JSON (trainer_state.json)
    resumed = make()
    resumed.load_state_dict(state)
    rest = [ids_of(b) for b in resumed] + [ids_of(b) for b in resumed]
    assert first + rest == uninterrupted


def global_batches(tmp_path, world, per_process, accum, num_workers=0, epochs=1, state=None, **kw):
    """The epoch's global batches as jet ids: every process's micro-batches of global batch t, rank order."""
    per_rank = []
    for rank in range(world):
        ds = JetDataset(tmp_path, "train", prep(), per_process, shuffle_buffer=100, seed=7, rank=rank,
                        world_size=world, accum=accum, drop_last=True, **kw)
        loader = JetLoader(ds, num_workers=num_workers)
        if state is not None:
            loader.load_state_dict(state)
        per_rank.append([ids_of(b) for _ in range(epochs) for b in loader])
    steps = [[per_rank[r][i * accum : (i + 1) * accum] for r in range(world)] for i in range(len(per_rank[0]) // accum)]
    return [[j for rank in step for micro in rank for j in micro] for step in steps]


@pytest.mark.parametrize("world, per_process, accum, num_workers",
                         [(2, 16, 1, 0), (4, 8, 1, 2), (1, 16, 2, 0), (2, 8, 2, 2), (8, 4, 1, 0), (1, 32, 1, 2)])
def test_global_batches_do_not_depend_on_processes_workers_or_accumulation(tmp_path, world, per_process, accum,
                                                                           num_workers):
    _, written = write_dataset(tmp_path)  # 690 jets in 50-jet chunks, last chunk of each shard 30
    reference = global_batches(tmp_path, 1, 32, 1, epochs=2)
    assert global_batches(tmp_path, world, per_process, accum, num_workers, epochs=2) == reference
    epoch = reference[: len(reference) // 2]
    assert len(epoch) == 690 // 32 and all(len(b) == 32 for b in epoch)  # at most one global batch dropped
    seen = [j for b in epoch for j in b]
    assert len(set(seen)) == len(seen)  # no jet twice in an epoch


@pytest.mark.parametrize("saved_world, resumed_world, num_workers", [(2, 1, 0), (1, 4, 2)])
def test_resume_with_another_process_count_continues_the_sequence(tmp_path, saved_world, resumed_world, num_workers):
    write_dataset(tmp_path)
    reference = global_batches(tmp_path, 1, 48, 1, epochs=2)
    per = 48 // saved_world
    loaders = [JetLoader(JetDataset(tmp_path, "train", prep(), per, shuffle_buffer=100, seed=7, rank=r,
                                    world_size=saved_world, drop_last=True), num_workers=num_workers)
               for r in range(saved_world)]
    states = []
    for loader in loaders:  # 17 global batches, an epoch holds 14: past the epoch boundary
        batches = (b for _ in range(2) for b in loader)
        for _ in range(17):
            next(batches)
        states.append(json.loads(json.dumps(loader.state_dict())))
        batches.close()
    assert all(s == states[0] for s in states) and states[0]["epoch"] == 1  # one position for every process
    rest = global_batches(tmp_path, resumed_world, 48 // resumed_world, 1, num_workers, epochs=1, state=states[0])
    assert len(reference) == 28 and reference[:17] + rest == reference


def test_resume_refuses_another_global_batch_and_uneven_streams(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    loader = JetLoader(JetDataset(tmp_path, "train", prep(), 24), num_workers=0)
    state = loader.state_dict()
    other = JetLoader(JetDataset(tmp_path, "train", prep(), 24, world_size=2), num_workers=0)
    with pytest.raises(ValueError, match=r"global_batch=24 but this run has 48 .*data.batch_size x processes"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"3 processes cannot share data.streams=8.*must divide data.streams"):
        JetDataset(tmp_path, "train", prep(), 24, world_size=3)


def test_small_split_is_read_whole_on_any_process_count(tmp_path):
    """A split of one chunk, smaller than a global batch: evaluation still reads every jet once."""
    _, written = write_dataset(tmp_path, n_shards=1, jets_per_shard=45, chunk_size=50)
    seen = []
    for rank in range(4):
        ds = JetDataset(tmp_path, "train", prep(), 32, shuffle=False, rank=rank, world_size=4)
        seen += full_epoch(JetLoader(ds, num_workers=0))
    assert sorted(seen) == sorted(written["train"].jet[:, 0].tolist())


def test_batch_features_match_reference_preprocessing(tmp_path):
    _, written = write_dataset(tmp_path, n_shards=1)
    ds = JetDataset(tmp_path, "train", prep(), 1000, shuffle=False, max_particles=10)
    batch = next(iter(JetLoader(ds)))
    jets = written["train"]
    assert batch.num_jets == len(jets)
    assert torch.equal(batch.seqlens, torch.from_numpy(np.minimum(jets.multiplicity, 10)).int())
    # first particle of jet 3, by hand (jet axis = all stored constituents)
    b = 3
    p = jets.part[jets.offsets[b]: jets.offsets[b + 1]].astype(np.float64)
    axis = p.sum(0)
    axis_eta = np.arcsinh(axis[2] / np.hypot(axis[0], axis[1]))
    pt0 = np.hypot(p[0, 0], p[0, 1])
    eta0 = np.arcsinh(p[0, 2] / pt0)
    x0 = batch.x[batch.cu_seqlens[b]].numpy()
    assert x0[0] == pytest.approx(np.log1p(pt0) - 1.8, rel=1e-5)
    assert x0[1] == pytest.approx(3 * (eta0 - axis_eta), abs=1e-4)
    x_pad, mask = batch.padded()
    assert x_pad.shape == (len(jets), 10, 3) and mask.sum() == batch.num_particles


def test_preprocessing_inverts_to_four_momenta(tmp_path):
    rng = np.random.default_rng(0)
    jets = random_jets(rng, 50)
    names = ["part_pt", "part_etarel", "part_phirel", "part_eta", "part_phi"]
    raw = particle_features(jets.part, jets.offsets, list(KINEMATIC_FEATURES), names).astype(np.float64)
    model = Preprocessing().forward(raw[:, :3])
    back = Preprocessing().inverse(model)
    np.testing.assert_allclose(back, raw[:, :3], rtol=1e-4, atol=1e-4)
    axis_eta = raw[:, 3] - raw[:, 1]
    axis_phi = raw[:, 4] - raw[:, 2]
    p4 = four_momenta_from_relative(back[:, 0], back[:, 1], back[:, 2], axis_eta, axis_phi)
    np.testing.assert_allclose(p4, jets.part, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- bad input
def test_truncated_shard_raises_naming_file(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    path = tmp_path / "train" / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    loader = JetLoader(JetDataset(tmp_path, "train", prep(), 16), num_workers=0)
    with pytest.raises(DataError, match="shard-000000.tar"):
        full_epoch(loader)


def test_garbage_shard_raises(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(DataError, match="shard-000000.tar"):
        full_epoch(JetLoader(JetDataset(tmp_path, "train", prep(), 16), num_workers=0))


def test_manifest_disagreeing_with_shards(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["splits"]["train"][0]["n_chunks"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="manifest"):
        full_epoch(JetLoader(JetDataset(tmp_path, "train", prep(), 16, shuffle=False), num_workers=0))
    shutil.rmtree(tmp_path / "train")
    with pytest.raises(DataError, match="missing"):
        Manifest.load(tmp_path).verify(tmp_path)


def test_pickled_entry_is_refused(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    path = tmp_path / "train" / "shard-000000.tar"
    evil = io.BytesIO()
    np.save(evil, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(path, "r:") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            if member.name == "chunk000000.label.npy":
                payload = evil.getvalue()
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    data = json.loads((tmp_path / "manifest.json").read_text())  # the bytes moved: a forger records them too
    with tarfile.open(path, "r:") as tar:
        data["splits"]["train"][0]["chunks"] = [[o, n] for _, o, n in tar_chunk_spans(tar)]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="not a plain .npy"):
        full_epoch(JetLoader(JetDataset(tmp_path, "train", prep(), 16, shuffle=False), num_workers=0))


def test_nan_in_written_jets_is_refused(tmp_path):
    jets = random_jets(np.random.default_rng(0), 10)
    jets.part[3, 1] = np.nan
    writer = ShardWriter(tmp_path, "train/shard-000000.tar", list(KINEMATIC_FEATURES), list(JET_FEATURES), 2)
    with pytest.raises(DataError, match="NaN"):
        writer.write(jets)
    writer.abort()
    clean, counts = jets.drop_bad()
    assert len(clean) == 9 and counts["nonfinite"] == 1


def test_unknown_feature_and_schema(tmp_path):
    write_dataset(tmp_path, n_shards=1)
    with pytest.raises(DataError, match=rf"{tmp_path}: data.features asks for .*part_bogus"):
        JetDataset(tmp_path, "train", Preprocessing.from_config({"part_bogus": {}}), 16)
    with pytest.raises(ValueError, match="unknown keys"):
        Preprocessing.from_config({"part_pt": {"scale": 2}})
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="schema_version"):
        Manifest.load(tmp_path)
