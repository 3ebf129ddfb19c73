"""Shard sets read over HTTP from a server started here (127.0.0.1): same batches as from the
directory, exact resume, and the network faults the reader must survive or name.

The server is the standard library's, with a small handler that answers Range requests and can
be told to drop a connection mid-answer, answer 503, stall, or refuse (403/404).
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jetfm.data.format import DataError, JetArrays
from jetfm.data.reader import JetDataset, JetLoader, iterate_jets
from jetfm.data.remote import ShardCache, open_store
from jetfm.data.shards import Manifest
from test_reader import ids_of, prep, write_dataset
from test_trainer import (  # noqa: F401 - the fixture is used by name
    _fresh_accelerate_state,
    read_metric_records,
    run,
    tiny_config,
    write_tiny_dataset,
)


# --------------------------------------------------------------------------- the server
class ShardServer(http.server.ThreadingHTTPServer):
    """Serves `root` with Range support; `faults` is a list of (path regex, action) consumed in order,
    each applying to the next GET whose path matches: "drop" (send half the body, then close),
    "503", "stall" (sleep `stall_s` before answering), "403", "404"."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = Path(root)
        self.faults: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of every GET
        self.stall_s = 3.0
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):  # a client that gave up on a stalled answer
        pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take_fault(self, path: str) -> str | None:
        with self.lock:
            for i, (pattern, action) in enumerate(self.faults):
                if re.search(pattern, path):
                    del self.faults[i]
                    return action
        return None


class RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _body(self) -> tuple[int, bytes, dict] | None:
        path = self.server.root / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404)
            return None
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None:
            return 200, data, {}
        start = int(match[1])
        end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        return 206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"}

    def do_HEAD(self):
        answer = self._body()
        if answer is not None:
            status, body, headers = answer
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        fault = self.server.take_fault(self.path)
        if fault in ("503", "403", "404"):
            self.send_error(int(fault))
            return
        if fault == "stall":
            time.sleep(self.server.stall_s)
        answer = self._body()
        if answer is None:
            return
        status, body, headers = answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if fault == "drop":  # half the promised bytes, then the connection goes away
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def serve():
    """serve(root) -> a running ShardServer for `root`; stopped after the test."""
    servers = []

    def start(root: Path) -> ShardServer:
        server = ShardServer(root)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _quick_faults(monkeypatch):
    """Short timeouts and backoff, so a stall or a retry costs a fraction of a second."""
    monkeypatch.setenv("JETFM_DATA_TIMEOUT_S", "1")
    monkeypatch.setenv("JETFM_DATA_BACKOFF_S", "0.05")
    monkeypatch.setenv("JETFM_DATA_RETRIES", "3")


def all_batches(loader) -> list:
    return [(b.x.clone(), b.cu_seqlens.clone(), b.labels.clone(), ids_of(b)) for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ca, la, ia), (xb, cb, lb, ib) in zip(a, b):
        assert ia == ib
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(ca, cb) and torch.equal(la, lb)


def loader(where, workers=0, batch=32, **kwargs) -> JetLoader:
    return JetLoader(JetDataset(where, "train", prep(), batch, shuffle_buffer=100, seed=5, **kwargs),
                     num_workers=workers)


# --------------------------------------------------------------------------- same data as from the directory
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_over_http_equal_the_directory(tmp_path, serve, workers):
    write_dataset(tmp_path)
    server = serve(tmp_path)
    local = all_batches(loader(tmp_path, workers=workers))  # worker processes fetch their own chunks
    assert_same_batches(all_batches(loader(server.url, workers=workers)), local)
    # every request is exactly one chunk's recorded bytes (no shard is fetched whole), every chunk is
    # fetched, and only a chunk on the boundary of two streams (data.streams, default 8) twice
    spans = {(f"/{s['path']}", f"bytes={o}-{o + n - 1}") for s in Manifest.load(tmp_path).shards("train")
             for o, n in s["chunks"]}
    tar_requests = [r for r in server.requests if r[0].endswith(".tar")]
    assert set(tar_requests) == spans and len(spans) <= len(tar_requests) <= len(spans) + 8 - 1


def test_file_url_and_old_manifest_without_byte_spans(tmp_path, serve):
    write_dataset(tmp_path)
    local = all_batches(loader(tmp_path))
    assert_same_batches(all_batches(loader(f"file://{tmp_path}")), local)
    data = json.loads((tmp_path / "manifest.json").read_text())
    for shard in data["splits"]["train"]:
        del shard["chunks"]  # as written before the spans were recorded: the reader scans the tar
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    server = serve(tmp_path)
    server.faults.append(("shard-000001", "drop"))  # mid-scan: the pass starts again
    assert_same_batches(all_batches(loader(server.url)), local)
    assert not server.faults
    assert_same_batches(all_batches(loader(tmp_path)), local)


def test_resume_mid_epoch_over_http_equals_uninterrupted(tmp_path, serve):
    write_dataset(tmp_path)
    server = serve(tmp_path)
    full = all_batches(loader(server.url))
    epoch_requests = len([r for r in server.requests if r[0].endswith(".tar")])
    first = loader(server.url)
    head = []
    for batch in first:
        head.append((batch.x.clone(), batch.cu_seqlens.clone(), batch.labels.clone(), ids_of(batch)))
        if len(head) == 7:
            break
    state = json.loads(json.dumps(first.state_dict()))
    server.requests.clear()
    second = loader(server.url)
    second.load_state_dict(state)
    tail = all_batches(second)
    assert_same_batches(head + tail, full)
    # the resumed streams start at their chunks: fewer fetches than a whole epoch's
    assert 0 < len([r for r in server.requests if r[0].endswith(".tar")]) < epoch_requests


def test_training_over_http_gives_the_directory_losses(tmp_path, serve):
    data = write_tiny_dataset(tmp_path / "data")
    server = serve(data)
    losses = {}
    for name, where in (("local", data), ("http", server.url)):
        config = tiny_config(tmp_path, where, name=name, train={"max_steps": 5, "eval_every": 5})
        assert run(config) == 0
        losses[name] = read_metric_records(tmp_path / name) + read_metric_records(tmp_path / name, "val/loss")
    assert losses["http"] == losses["local"] and len(losses["local"]) == 6


# --------------------------------------------------------------------------- inspect and tokenize
def test_inspect_verify_over_http(tmp_path, serve):
    from jetfm.data.inspect import inspect_dataset

    write_dataset(tmp_path / "data", splits=("train", "val"))
    server = serve(tmp_path / "data")
    local = inspect_dataset(tmp_path / "data", tmp_path / "a", verify=True, plots=False, echo=False)
    remote = inspect_dataset(server.url, tmp_path / "b", verify=True, plots=False, echo=False)
    for key in set(local) - {"directory", "summary", "figures"}:
        assert remote[key] == local[key], key
    assert remote["directory"] == server.url and "Verified: all 6 shards" in remote["summary"]
    server.faults.append(("val/shard-000001", "404"))
    with pytest.raises(DataError, match=re.escape(f"{server.url}/val/shard-000001.tar: ") + ".*missing"):
        inspect_dataset(server.url, tmp_path / "c", verify=True, plots=False, echo=False)


def test_tokenize_over_http_writes_the_same_shards(tmp_path, serve):
    from test_tokenizer import save_tokenizer, tiny_model

    from jetfm.tokenizer.tokenize import tokenize_dataset

    write_dataset(tmp_path / "data", n_shards=2, jets_per_shard=60, chunk_size=25)
    server = serve(tmp_path / "data")
    tok_dir = save_tokenizer(tiny_model(seed=2).eval(), tmp_path / "tok")
    tokenize_dataset(tok_dir, tmp_path / "data", tmp_path / "local", batch_size=40, progress=False)
    tokenize_dataset(tok_dir, server.url, tmp_path / "remote", batch_size=40, progress=False)
    local, remote = (JetArrays.concat(list(iterate_jets(tmp_path / d, "train"))) for d in ("local", "remote"))
    assert local.tokens is not None and len(local) == 120
    for name in ("part", "offsets", "jet", "label", "tokens"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(local, name))
    assert Manifest.load(tmp_path / "remote").source["tokenized_from"] == server.url


# --------------------------------------------------------------------------- faults
@pytest.mark.parametrize("faults", [
    [("shard-000001", "drop")],
    [("shard-000000", "503"), ("shard-000000", "503")],
    [("shard-000002", "stall")],
    [("shard-000000", "drop"), ("shard-000001", "503"), ("shard-000001", "stall")],
], ids=["dropped-connection", "503-twice", "stall", "all-three"])
def test_faults_lose_and_duplicate_no_jet(tmp_path, serve, faults):
    _, written = write_dataset(tmp_path)
    server = serve(tmp_path)
    server.stall_s = 2.0  # longer than the 1 s timeout
    server.faults.extend(faults)
    ids = [i for batch in loader(server.url) for i in ids_of(batch)]
    assert not server.faults  # every fault was served
    assert len(ids) == len(set(ids)) == len(written["train"])
    assert sorted(ids) == sorted(written["train"].jet[:, 0].tolist())


def test_refusals_and_hangs_are_errors_naming_the_url(tmp_path, serve, monkeypatch):
    write_dataset(tmp_path)
    server = serve(tmp_path)
    server.faults.append(("shard-000001", "403"))
    with pytest.raises(DataError, match=re.escape(f"{server.url}/train/shard-000001.tar: access denied")):
        list(iterate_jets(server.url, "train"))
    shutil.move(tmp_path / "train" / "shard-000002.tar", tmp_path / "moved.tar")
    with pytest.raises(DataError, match=re.escape(f"{server.url}/train/shard-000002.tar: not found")):
        list(iterate_jets(server.url, "train"))
    with pytest.raises(DataError, match=re.escape(f"{server.url}/nothing/manifest.json: not found")):
        Manifest.load(f"{server.url}/nothing")
    shutil.move(tmp_path / "moved.tar", tmp_path / "train" / "shard-000002.tar")
    with pytest.raises(DataError, match="must not hold a user name or password"):
        Manifest.load(server.url.replace("http://", "http://user:secret@"))
    monkeypatch.setenv("JETFM_DATA_RETRIES", "1")
    server.stall_s = 2.0
    server.faults.extend([("shard-000000", "stall")] * 2)  # every attempt hangs
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"shard-000000.tar: .* failed after 2 attempts, last: no answer within 1 s"):
        list(iterate_jets(server.url, "train"))
    assert time.perf_counter() - started < 6


def test_cache_keeps_shards_within_its_limit(tmp_path, serve):
    write_dataset(tmp_path / "data")
    server = serve(tmp_path / "data")
    sizes = [p.stat().st_size for p in sorted((tmp_path / "data" / "train").glob("*.tar"))]
    limit_gb = (sizes[0] + sizes[1] + sizes[2] // 2) / 1e9  # room for two of the three shards
    cached = loader(server.url, cache_dir=tmp_path / "cache", cache_gb=limit_gb)
    local = all_batches(loader(tmp_path / "data"))
    assert_same_batches(all_batches(cached), local)
    kept = list((tmp_path / "cache").iterdir())
    assert len(kept) == 2 and sum(p.stat().st_size for p in kept) <= limit_gb * 1e9
    assert all(r[1] is None for r in server.requests if r[0].endswith(".tar"))  # whole-shard downloads
    # a shard that is cached is not fetched again
    store = open_store(server.url, cache_dir=tmp_path / "cache", cache_gb=limit_gb)
    name = kept[0].name.partition("-")[2]
    server.requests.clear()
    assert isinstance(store.cache, ShardCache)
    store.read_range(f"train/{name}", 0, 512)
    assert server.requests == []


def test_a_server_that_ignores_range_still_gives_the_same_batches(tmp_path):
    """The standard library's http.server answers every GET with the whole file (no Range)."""
    import functools

    write_dataset(tmp_path, n_shards=2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert_same_batches(all_batches(loader(url)), all_batches(loader(tmp_path)))
    finally:
        server.shutdown()
        server.server_close()
