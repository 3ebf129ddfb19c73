"""Faulty shards and mismatched data: each is a DataError (`jetfm: error:`) that names the shard,
chunk or data directory and says what was expected — never a traceback from deep inside numpy
or the model, never a misleading "non-finite loss".

Every test writes its own tiny shard set (real tars through ShardWriter) and damages it the way
a fault would: a NaN payload in reco.npy, token ids outside the vocabulary, an untokenized shard
in a tokenized set, random bytes in a .npy entry, a shard cut inside its last chunk, and a
classifier that reads part_charge evaluated on four-momentum-only data.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import yaml
from test_trainer import _fresh_accelerate_state  # noqa: F401 - autouse fixture: fresh accelerate state

from jetfm.data.features import Preprocessing
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES, DataError, JetArrays
from jetfm.data.reader import JetDataset, JetLoader, read_shard_chunks
from jetfm.data.shards import Manifest, ShardWriter, creation_info

CODEBOOK = 8


def jets_of(rng, n, n_extra=0, tokens=False, reco=False) -> JetArrays:
    """n jets of 3-12 massless particles, pT-descending; `n_extra` extra particle columns (charge)."""
    mult = rng.integers(3, 13, n)
    offsets = np.concatenate([[0], np.cumsum(mult)]).astype(np.int64)
    t = int(offsets[-1])
    pt = np.concatenate([np.sort(rng.exponential(20.0, m) + 1.0)[::-1] for m in mult])
    eta, phi = rng.normal(0, 0.3, t), rng.normal(0, 0.3, t)
    part = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], 1)
    if n_extra:
        part = np.concatenate([part, rng.integers(-1, 2, (t, n_extra))], 1)
    jet = np.zeros((n, len(JET_FEATURES)), np.float32)
    jet[:, 0], jet[:, 5] = rng.uniform(500, 600, n), mult
    return JetArrays(part.astype(np.float32), offsets, jet, rng.integers(0, 2, n),
                     tokens=rng.integers(1, CODEBOOK + 1, t).astype(np.int32) if tokens else None,
                     reco=rng.normal(size=(t, 2)).astype(np.float32) if reco else None)


def write_set(root, *, splits=("train",), n_shards=2, jets_per_shard=60, chunk_size=20, extra=(),
              tokens=False, reco=False, untokenized_shard=None, seed=0):
    """A shard set; `untokenized_shard=k` writes shard k of each split without tokens/reco."""
    rng = np.random.default_rng(seed)
    manifest = Manifest(source={"kind": "test"}, particle_features=list(KINEMATIC_FEATURES) + list(extra),
                        jet_features=list(JET_FEATURES), classes=["QCD", "Tbqq"], chunk_size=chunk_size,
                        created_by=creation_info(),
                        tokens={"codebook_size": CODEBOOK, "tokenizer": "tok"} if tokens else None,
                        reco_features=["part_etarel", "part_phirel"] if reco else None)
    for split in splits:
        for k in range(n_shards):
            plain = k == untokenized_shard
            writer = ShardWriter(root, f"{split}/shard-{k:06d}.tar", manifest.particle_features,
                                 manifest.jet_features, 2, chunk_size=chunk_size)
            writer.write(jets_of(rng, jets_per_shard, len(extra), tokens and not plain, reco and not plain))
            manifest.add_shard(split, writer.close())
    manifest.save(root)
    return manifest


def member_spans(shard) -> dict[str, dict[str, tuple[int, int]]]:
    """{chunk key: {entry: (data offset, size)}} of a shard, from its tar headers."""
    spans: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            key, _, entry = member.name.partition(".")
            spans.setdefault(key, {})[entry] = (member.offset_data, member.size)
    return spans


def overwrite_entry(shard, chunk: int, entry: str, payload) -> None:
    """Replace the bytes of one tar member in place (same size): `payload(old bytes) -> new bytes`."""
    offset, size = member_spans(shard)[f"chunk{chunk:06d}"][entry]
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(size)
        new = payload(old)
        assert len(new) == size
        handle.seek(offset)
        handle.write(new)


def read_all(root, split="train"):
    manifest = Manifest.load(root)
    for shard in manifest.shards(split):
        list(read_shard_chunks(root, shard, manifest))


def load_all(root, split="train"):
    """Every batch of an epoch through the training loader (the path a run takes)."""
    dataset = JetDataset(root, split, Preprocessing.from_config({"part_pt": {}}), 16, shuffle=False)
    for _ in JetLoader(dataset, num_workers=0):
        pass


def npy_with_values(old: bytes, values: np.ndarray) -> bytes:
    """The same .npy (header kept) with its payload replaced by `values` (same dtype and size)."""
    array = np.load(io.BytesIO(old), allow_pickle=False)
    header = len(old) - array.nbytes
    return old[:header] + np.ascontiguousarray(values, array.dtype).tobytes()


# --------------------------------------------------------------------------- content of entries
def test_non_finite_reco_names_the_chunk(tmp_path):
    write_set(tmp_path, tokens=True, reco=True)
    shard = tmp_path / "train" / "shard-000001.tar"

    def nan_reco(old):
        reco = np.load(io.BytesIO(old)).copy()
        reco[3, 1] = np.nan
        return npy_with_values(old, reco)

    overwrite_entry(shard, 2, "reco.npy", nan_reco)
    for read in (read_all, load_all):
        with pytest.raises(DataError, match=rf"{shard}:chunk000002: reco contains NaN or inf"):
            read(tmp_path)


@pytest.mark.parametrize("bad", [0, CODEBOOK + 1, -5])
def test_token_ids_outside_the_vocabulary_name_the_chunk(tmp_path, bad):
    write_set(tmp_path, tokens=True)
    shard = tmp_path / "train" / "shard-000000.tar"

    def bad_token(old):
        tokens = np.load(io.BytesIO(old)).copy()
        tokens[5] = bad
        return npy_with_values(old, tokens)

    overwrite_entry(shard, 1, "tokens.npy", bad_token)
    with pytest.raises(DataError, match=rf"{shard}:chunk000001: token ids span \[.*\], expected particle tokens "
                                        rf"in \[1, {CODEBOOK}\]"):
        load_all(tmp_path)


def test_untokenized_shard_in_a_tokenized_set(tmp_path):
    write_set(tmp_path, tokens=True, untokenized_shard=1)
    shard = tmp_path / "train" / "shard-000001.tar"
    with pytest.raises(DataError, match=rf"{shard}:chunk000000: chunk has no tokens.npy.*tokenized set"):
        load_all(tmp_path)


def test_garbage_npy_is_called_corrupt_not_pickled(tmp_path):
    write_set(tmp_path)
    shard = tmp_path / "train" / "shard-000000.tar"
    overwrite_entry(shard, 1, "jet.npy", lambda old: np.random.default_rng(1).bytes(len(old)))
    with pytest.raises(DataError) as error:
        read_all(tmp_path)
    message = str(error.value)
    assert f"{shard}:chunk000001/jet.npy: not a .npy array" in message and "corrupt" in message
    assert "pickle" not in message


def test_shard_cut_inside_its_last_chunk_says_truncated(tmp_path):
    write_set(tmp_path)
    shard = tmp_path / "train" / "shard-000000.tar"
    spans = member_spans(shard)
    last = spans[sorted(spans)[-1]]
    # cut right after the last chunk's first member (its data padded to 512 bytes), where the next
    # member's header would start: tar readers take that for the end of the archive
    offset, size = min(last.values())
    with open(shard, "r+b") as handle:
        handle.truncate(offset + -(-size // 512) * 512)
    with pytest.raises(DataError, match=rf"{shard}: bytes .* run past the end of the file .* the shard is truncated"):
        read_all(tmp_path)
    # a complete tar whose last chunk lacks an entry is not called truncated
    other = tmp_path / "other"
    write_set(other)
    shard = other / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.name != "chunk000002.label.npy"]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError) as error:
        read_all(other)
    assert f"{shard}:chunk000002: chunk lacks entries ['label']" in str(error.value)
    assert "truncated" not in str(error.value)


# --------------------------------------------------------------------------- features the model needs
def test_classifier_with_part_charge_on_four_momentum_data(tmp_path, capsys):
    import argparse

    from jetfm import train as trainer
    from jetfm.finetune.evaluate import add_classifier_arguments, run_classifier

    write_set(tmp_path / "charged", splits=("train", "val", "test"), extra=("part_charge",))
    write_set(tmp_path / "plain", splits=("train", "test"))
    features = {"part_pt": {"function": "signed_log"}, "part_etarel": {"multiply": 3.0},
                "part_charge": {}}
    config = {
        "stage": "finetune", "name": "charged", "seed": 0, "out_dir": str(tmp_path / "run"),
        "data": {"path": str(tmp_path / "charged"), "batch_size": 16, "shuffle_buffer": 40, "features": features},
        "model": {"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.0},
        "finetune": {"head_dim": 16, "head_heads": 2, "head_blocks": 1},
        "train": {"max_steps": 2, "eval_every": 0, "log_every": 1, "checkpoint_every": 0, "progress_bar": False},
        "tracking": {"enabled": False},
    }
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    assert trainer.main(["--config", str(tmp_path / "ft.yaml")]) == 0

    parser = argparse.ArgumentParser()
    add_classifier_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "run" / "final"), "--data", str(tmp_path / "plain"),
                              "--no-progress", "--no-mlflow"])
    capsys.readouterr()
    assert run_classifier(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jetfm: error: {tmp_path / 'plain'}:") and "['part_charge']" in err
    assert "KeyError" not in err and "Traceback" not in err

    # training on such data is refused the same way, before a model is built
    config["data"]["path"] = str(tmp_path / "plain")
    config["out_dir"] = str(tmp_path / "run2")
    (tmp_path / "ft2.yaml").write_text(yaml.safe_dump(config))
    assert trainer.main(["--config", str(tmp_path / "ft2.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'plain'}: data.features asks for particle feature 'part_charge'" in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "run2" / "final")
