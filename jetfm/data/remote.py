"""Where a shard set lives: a local directory, or a URL read through fsspec, chunk by chunk.

    data.path=data/jetclass                     # a directory (holds manifest.json)
    data.path=file:///scratch/jetclass          # the same, as a URL
    data.path=https://host/datasets/jetclass    # any web server that answers Range requests
    data.path=s3://bucket/jetclass              # object stores: s3:// (install s3fs), gs:// (gcsfs), ...

The manifest is read from the same place and its shard paths are relative to it. A chunk is read
with one range request of exactly the bytes the manifest records for it (`chunks` of a shard
record: [offset, length] per chunk), so memory holds one chunk, never a shard, and a resumed or
newly assigned stream starts at its chunk. Shard sets written before those spans were recorded
still read: their tar headers are scanned once per shard (locally a header walk; remotely one
streamed pass over the shard, bounded memory).

Why fsspec rather than WebDataset's `pipe:curl ...` URLs: the reader visits chunks out of order
(the epoch plan permutes (shard, chunk) units) and resumes at a chunk; a pipe is a sequential
stream from a shell command and can only get there by reading the shard from its start. fsspec
gives byte-range reads over HTTP, S3, GCS and Azure behind one call, takes credentials from each
library's standard places (AWS_* variables and ~/.aws, gcloud application-default credentials,
...), and runs no shell. jetfm never reads credentials from its config and never logs them.

Faults. A dropped connection, a short answer, a timeout or an HTTP 5xx/408/429 is retried with
exponential backoff, re-requesting the same chunk, so no jet is lost or read twice; after
`JETFM_DATA_RETRIES` retries (default 5) it is an error naming the URL. A 401/403/404 is an error
at once, naming the URL. A server that stops answering times out after `JETFM_DATA_TIMEOUT_S`
seconds without a byte (default 60) and is retried like a dropped connection.

Cache. `ShardCache(directory, max_bytes)` (config: data.cache_dir, data.cache_gb) keeps whole
fetched shards on local disk for later epochs, least recently used evicted first; a shard is
downloaded by streaming it to a temporary file (bounded memory) and published by rename, so
concurrent workers never see half a shard. The cache is keyed by URL: clear it when the data at
a URL changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import time
from pathlib import Path

from .. import messages
from .format import DataError, tar_chunk_spans

#: statuses that a later attempt may get past (server trouble, rate limits, request timeouts).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(where) -> bool:
    """True for `scheme://...` other than file:// (those are read through fsspec)."""
    return isinstance(where, str) and bool(_URL.match(where)) and not where.startswith("file://")


def location(where) -> str | Path:
    """A data location as given by a user: a Path for directories and file:// URLs, the URL string
    otherwise (never `Path(url)`: it folds `//` and turns the URL into a relative path)."""
    if isinstance(where, ShardStore):
        return where.root
    if isinstance(where, str) and where.startswith("file://"):
        return Path(where[len("file://"):])
    return where if is_url(where) else Path(where)


def resolved(where) -> str:
    """A data location for provenance records: the absolute path of a directory, a URL as given."""
    where = location(where)
    return str(where.resolve()) if isinstance(where, Path) else where


def env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise DataError(f"${name}={value!r}: expected a number") from None


class ShardStore:
    """A shard set's location. Paths inside it are the manifest's relative, '/'-separated ones."""

    root: str | Path

    def where(self, relpath: str) -> str:
        """The path or URL of a file of the set, for messages."""
        raise NotImplementedError

    def read_bytes(self, relpath: str) -> bytes:
        raise NotImplementedError

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset` (DataError if the file is shorter)."""
        raise NotImplementedError

    def chunk_spans(self, relpath: str) -> list[tuple[int, int]]:
        """(offset, length) of every chunk of a shard, from its tar headers: for shard sets written
        before the manifest recorded them."""
        raise NotImplementedError

    def exists(self, relpath: str) -> bool:
        raise NotImplementedError

    def prefetch(self, ranges: list[tuple[str, int, int]], owner: int = 0) -> None:
        """Hint that read_range(*r) for each r in `ranges` comes soon, in this order (a remote store
        starts fetching them now; each call replaces the previous hint of the same `owner`, e.g. one
        data stream of several read by this process)."""

    def __str__(self) -> str:
        return str(self.root)


class LocalStore(ShardStore):
    """A directory on a local or shared file system: plain open/seek/read."""

    def __init__(self, directory: Path):
        self.root = Path(directory)

    def where(self, relpath: str) -> str:
        return str(self.root / relpath)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def read_bytes(self, relpath: str) -> bytes:
        return (self.root / relpath).read_bytes()

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        path = self.root / relpath
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except FileNotFoundError:
            raise DataError(f"{path}: shard missing") from None
        if len(data) != length:
            raise DataError(f"{path}: bytes {offset}..{offset + length} run past the end of the file "
                            f"({offset + len(data)} bytes); the shard is truncated")
        return data

    def chunk_spans(self, relpath: str) -> list[tuple[int, int]]:
        path = self.root / relpath
        try:
            with tarfile.open(path, "r:") as tar:  # a header walk: payloads are skipped
                return [(offset, length) for _, offset, length in tar_chunk_spans(tar)]
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DataError(f"{path}: not a readable tar ({error}); the shard is truncated or corrupt") from error

    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).exists()


class ShardCache:
    """Whole shards fetched from a RemoteStore, kept on local disk up to `max_bytes`."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.too_big: set[str] = set()

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.directory / f"{digest}-{url.rstrip('/').rpartition('/')[2]}"

    def fetch(self, store: "RemoteStore", relpath: str) -> Path | None:
        """The local copy of a shard (downloaded now if absent); None if it alone exceeds the limit."""
        url = store.where(relpath)
        if url in self.too_big:
            return None
        path = self.path_for(url)
        if path.exists():
            os.utime(path)  # mark as recently used
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            store.download(relpath, tmp)
            size = tmp.stat().st_size
            if size > self.max_bytes:
                self.too_big.add(url)
                messages.warn(f"{url}: {size / 1e9:.2f} GB exceeds the cache limit of {self.max_bytes / 1e9:.2f} GB; "
                              "reading it chunk by chunk instead of caching it")
                return None
            self.evict(self.max_bytes - size)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def evict(self, budget: int) -> None:
        """Delete least recently used shards until the cached ones take at most `budget` bytes."""
        entries = []
        for entry in self.directory.iterdir():
            if entry.name.endswith(".tmp"):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # another worker evicted it
                continue
            entries.append((stat.st_mtime, stat.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= budget:
                break
            entry.unlink(missing_ok=True)
            total -= size


class RemoteStore(ShardStore):
    """A URL read through fsspec with range requests, retries and timeouts (module docstring)."""

    def __init__(self, url: str, cache: ShardCache | None = None):
        self.root = url.rstrip("/")
        self.protocol = url.split("://", 1)[0].lower()
        self.cache = cache
        self.timeout_s = env_number("JETFM_DATA_TIMEOUT_S", 60.0)
        self.retries = int(env_number("JETFM_DATA_RETRIES", 5))
        self.backoff_s = env_number("JETFM_DATA_BACKOFF_S", 0.5)
        self._fs = None
        self._pid = os.getpid()
        self._pool = None
        self._ahead: dict[tuple[str, int, int], object] = {}  # read-ahead futures, oldest first
        self._hints: dict[int, list[tuple[str, int, int]]] = {}  # owner -> the ranges it asked for

    def __getstate__(self):  # DataLoader workers build their own client (sessions do not cross processes)
        state = dict(self.__dict__)
        state.update(_fs=None, _pool=None, _ahead={}, _hints={})
        return state

    def _forked(self) -> bool:
        """True once in a new process (a forked DataLoader worker): clients and threads are rebuilt."""
        if self._pid == os.getpid():
            return False
        self._pid, self._fs, self._pool, self._ahead, self._hints = os.getpid(), None, None, {}, {}
        return True

    @property
    def fs(self):
        self._forked()
        if self._fs is None:
            import fsspec

            options = {}
            if self.protocol in ("http", "https"):
                import aiohttp

                # no total limit (a shard download may take long), but every connect and read must progress
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
                options = {"client_kwargs": {"timeout": timeout}, "skip_instance_cache": True}
            try:
                self._fs = fsspec.filesystem(self.protocol, **options)
            except (ImportError, ValueError) as error:
                raise DataError(f"{self.root}: cannot read {self.protocol}:// URLs ({error}); install the fsspec "
                                f"backend for it (s3fs for s3://, gcsfs for gs://)") from None
        return self._fs

    def where(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    # ------------------------------------------------------------------ faults
    def _fatal(self, error: BaseException, url: str) -> DataError | None:
        """A DataError for what retrying cannot fix; None for what it may."""
        status = getattr(error, "status", None) or getattr(error, "code", None)
        if isinstance(error, FileNotFoundError) or status == 404:
            return DataError(f"{url}: not found (HTTP 404 / no such object)")
        if isinstance(error, PermissionError) or status in (401, 403):
            return DataError(f"{url}: access denied ({status or error}); credentials come from the environment or "
                             f"the standard configuration of the {self.protocol}:// library, never from jetfm's config")
        if isinstance(status, int) and 400 <= status < 500 and status not in RETRY_STATUSES:
            return DataError(f"{url}: the server refused the request (HTTP {status}: {error})")
        if isinstance(error, (DataError, ImportError, ValueError, TypeError)):
            return error if isinstance(error, DataError) else DataError(f"{url}: {error}")
        return None

    def _retrying(self, url: str, what: str, call):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as error:  # noqa: BLE001 - sorted into fatal / retryable below
                fatal = self._fatal(error, url)
                if fatal is not None:
                    raise fatal from None
                if isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower():
                    reason = f"no answer within {self.timeout_s:g} s (JETFM_DATA_TIMEOUT_S)"
                else:
                    reason = f"{type(error).__name__}: {error}"
                if attempt == self.retries:
                    raise DataError(f"{url}: {what} failed after {attempt + 1} attempts, last: {reason}") from None
                messages.warn(f"{url}: {what}: {reason}; retrying in {delay:g} s", all_ranks=True)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    # ------------------------------------------------------------------ reads
    def read_bytes(self, relpath: str) -> bytes:
        url = self.where(relpath)
        return self._retrying(url, "reading", lambda: self.fs.cat_file(url))

    #: chunks fetched ahead at most (a block of the reader's plan is ~10: a few MB held)
    MAX_AHEAD = 32

    def prefetch(self, ranges: list[tuple[str, int, int]], owner: int = 0) -> None:
        """Fetch the first MAX_AHEAD of `ranges` in background threads, so their transfer overlaps
        the decoding of the chunks before them (request latency is hidden, not only bandwidth
        shared). Each owner (a data stream) has its own hint: fetches no longer asked for by any
        owner are dropped, so memory holds at most MAX_AHEAD chunks per stream of this process."""
        self._forked()
        if self.cache is not None:
            return
        wanted = self._hints[owner] = [tuple(r) for r in ranges[: self.MAX_AHEAD]]
        still_wanted = {key for hint in self._hints.values() for key in hint}
        for key in set(self._ahead) - still_wanted:
            self._ahead.pop(key).cancel()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(4, thread_name_prefix="jetfm-fetch")
        for key in wanted:
            if key not in self._ahead:
                self._ahead[key] = self._pool.submit(self._read_range, *key)

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        self._forked()
        ahead = self._ahead.pop((relpath, offset, length), None)
        if ahead is not None:
            return ahead.result()  # a failure raises here, as if read now (retries included)
        return self._read_range(relpath, offset, length)

    def _read_range(self, relpath: str, offset: int, length: int) -> bytes:
        if self.cache is not None:
            local = self.cache.fetch(self, relpath)
            if local is not None:
                return LocalStore(local.parent).read_range(local.name, offset, length)
        url = self.where(relpath)

        def call():
            data = self.fs.cat_file(url, start=offset, end=offset + length)
            if len(data) == length:
                return data
            if len(data) >= offset + length:  # a server that ignores Range answers the whole file
                return data[offset:offset + length]
            raise ConnectionError(f"answered {len(data)} of {length} bytes")

        return self._retrying(url, f"bytes {offset}..{offset + length}", call)

    def download(self, relpath: str, local: Path) -> None:
        url = self.where(relpath)
        self._retrying(url, "download", lambda: self.fs.get_file(url, str(local)))

    def chunk_spans(self, relpath: str) -> list[tuple[int, int]]:
        url = self.where(relpath)
        kwargs = {"block_size": 0} if self.protocol in ("http", "https") else {}  # 0: one streamed GET

        def scan():  # one sequential pass; a fault mid-way starts the pass again
            with self.fs.open(url, "rb", **kwargs) as stream:
                try:
                    with tarfile.open(fileobj=stream, mode="r|") as tar:
                        return [(offset, length) for _, offset, length in tar_chunk_spans(tar)]
                except (tarfile.TarError, EOFError) as error:
                    raise DataError(f"{url}: not a readable tar ({error}); the shard is truncated or corrupt") from None

        return self._retrying(url, "scanning the tar headers", scan)

    def exists(self, relpath: str) -> bool:
        url = self.where(relpath)
        try:
            self._retrying(url, "probing", lambda: self.fs.cat_file(url, start=0, end=1))
        except DataError as error:
            if "not found" in str(error):
                return False
            raise
        return True


def open_store(where, *, cache_dir: str | Path | None = None, cache_gb: float | None = None) -> ShardStore:
    """The store of a shard set given as a directory, a file:// URL, a URL or a store (returned as is)."""
    if isinstance(where, ShardStore):
        return where
    if where is None or str(where) == "":
        raise DataError("no shard set given (data.path): a directory or URL holding manifest.json")
    where = location(str(where) if not isinstance(where, Path) else where)
    if isinstance(where, Path):
        return LocalStore(where)
    if re.match(r"^[^:/]+://[^/]*@", where):
        raise DataError(f"{where.split('://')[0]}://...: a data URL must not hold a user name or password (the "
                        "config is saved with every checkpoint and logged); give credentials through the "
                        "environment or the filesystem library's standard configuration")
    cache = None
    if cache_dir is not None:
        cache = ShardCache(cache_dir, int((cache_gb if cache_gb is not None else 50.0) * 1e9))
    return RemoteStore(where, cache)


# --------------------------------------------------------------------------- a server for tests and benchmarks
def serve_directory(directory: str | Path, host: str = "127.0.0.1", port: int = 0):
    """An HTTP server (not yet started: call `serve_forever`) for the files under `directory`,
    answering Range requests, which the standard library's `http.server` does not. For trying a
    shard set over HTTP on one machine and for benchmarks; production data belongs behind a real
    web server or an object store."""
    import http.server
    import re as _re

    root = Path(directory).resolve()

    class RangeHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, body: bool) -> None:
            path = (root / self.path.split("?")[0].lstrip("/")).resolve()
            if root not in path.parents or not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            match = _re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            self.send_response(206 if match else 200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                with open(path, "rb") as handle:
                    handle.seek(start)
                    self.wfile.write(handle.read(end - start + 1))

        def do_GET(self):
            self._answer(True)

        def do_HEAD(self):
            self._answer(False)

    server = http.server.ThreadingHTTPServer((host, port), RangeHandler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jetfm.data.remote",
                                     description="serve a shard-set directory over HTTP with Range support (tests)")
    parser.add_argument("dir", help="shard-set directory (holds manifest.json)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server = serve_directory(args.dir, args.host, args.port)
    messages.info(f"serving {Path(args.dir).resolve()} at http://{args.host}:{server.server_address[1]}/ "
                  "(data.path=that URL; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
