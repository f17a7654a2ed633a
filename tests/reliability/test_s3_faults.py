"""S3 faults: the object store goes away in the middle of an alert-file write.

A local S3 server (moto) sits behind a small TCP proxy, which is the endpoint
the pipeline talks to. The proxy models the server stopping and restarting:
it cuts an upload after half of its body was sent, drops every open
connection, refuses new ones for a while, then listens again. moto's state
lives in the test process, so the bucket survives the "restart", as a real
store's does.

Guarantees tested: a failed write raises :class:`~core.errors.TransientError`
(the flow's tasks retry on it, and only on it); no partial object ever appears
under a final name; the retried write leaves complete alert files.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import threading
import time

import pytest

from alerts.cutouts import make_cutouts
from alerts.packet import package_alerts
from alerts.store import AlertStoreConfig, read_alert_batch, write_alerts
from core.errors import TransientError
from flows.visit import run_visit
from tests.alerts.conftest import make_alert_inputs
from tests.conftest import V0, make_config
from tests.conftest import free_port as _free_port

pytestmark = pytest.mark.s3
BUCKET = "faults"


class FlakyEndpoint:
    """A TCP proxy on 127.0.0.1 in front of an S3 server, with an outage switch.

    Parameters
    ----------
    upstream : int
        Port of the real S3 server.
    """

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = _free_port()
        self.cut_key: bytes | None = None
        self.outage_s = 0.0
        self.on_cut = None
        self.cuts = 0
        self.cut_paths: list[str] = []
        self._timer: threading.Timer | None = None
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port."""
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        ls.settimeout(0.05)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every open connection: clients see refused/reset."""
        ls, self._listener = self._listener, None
        if ls is not None:
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def close(self) -> None:
        """Stop for good (cancel a pending restart)."""
        if self._timer is not None:
            self._timer.cancel()
        self.stop()

    def cut_next_put(self, key: str, outage_s: float | None, on_cut=None) -> None:
        """Cut the next PUT whose path contains ``key`` halfway, then be down ``outage_s``
        seconds (None: until :meth:`start` is called)."""
        self.cut_key, self.outage_s, self.on_cut = key.encode(), outage_s, on_cut

    def _accept(self, ls: socket.socket) -> None:
        while self._listener is ls:
            try:
                client, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            up = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._conns |= {client, up}
            threading.Thread(target=self._up, args=(client, up), daemon=True).start()
            threading.Thread(target=self._down, args=(up, client), daemon=True).start()

    def _down(self, up: socket.socket, client: socket.socket) -> None:
        try:
            while data := up.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(up)

    def _up(self, client: socket.socket, up: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                if self.cut_key and line.startswith(b"PUT ") and self.cut_key in line:
                    self._cut(data, client, up)
                    return
                up.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(up)

    def _cut(self, data: bytes, client: socket.socket, up: socket.socket) -> None:
        """Forward the headers and half the body, then drop everything and go down."""
        self.cut_key = None
        client.settimeout(2.0)
        try:
            while b"\r\n\r\n" not in data:
                data += client.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for h in head.split(b"\r\n")[1:]:
                name, _, value = h.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length // 2:
                more = client.recv(65536)
                if not more:
                    break
                body += more
        except (TimeoutError, OSError):
            head, body, length = data, b"", 0
        up.sendall(head + b"\r\n\r\n" + body[: max(length // 2, 1)])
        self.cuts += 1
        self.cut_paths.append(head.split(b" ", 2)[1].split(b"?")[0].decode())
        self.stop()
        if self.on_cut is not None:
            self.on_cut()
        if self.outage_s is not None:
            self._timer = threading.Timer(self.outage_s, self.start)
            self._timer.start()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture(scope="module")
def s3server(moto_s3_port):
    """The session's moto server (its state outlives any outage of the proxy), bucket ``faults``."""
    import s3fs

    direct = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{moto_s3_port}"}, skip_instance_cache=True
    )
    direct.mkdir(BUCKET)
    return moto_s3_port, direct


@pytest.fixture
def endpoint(s3server):
    proxy = FlakyEndpoint(s3server[0])
    proxy.start()
    yield proxy
    proxy.close()


def _options(endpoint: FlakyEndpoint) -> dict:
    """s3fs options: through the proxy, few client-side retries (the pipeline retries)."""
    return {
        "client_kwargs": {"endpoint_url": endpoint.url},
        "config_kwargs": {
            "retries": {"max_attempts": 2, "mode": "standard"},
            "connect_timeout": 2,
            "read_timeout": 5,
        },
        "skip_instance_cache": True,
    }


def _objects(direct, prefix: str) -> list[str]:
    """Every object under ``prefix``, read straight from the server (no cache)."""
    direct.invalidate_cache()
    return sorted(direct.find(f"{BUCKET}/{prefix}"))


@pytest.fixture(scope="module")
def batch():
    bundle, new, objects, hist, forced = make_alert_inputs(seed=43, n_alerts=30, depth=8)
    return package_alerts(new, objects, hist, forced, make_cutouts(new, bundle), bundle.visit)


def test_store_down_raises_transient_and_leaves_nothing(s3server, endpoint, batch):
    """Server down: TransientError naming the object; back up: the same call succeeds."""
    _, direct = s3server
    config = AlertStoreConfig(location=f"s3://{BUCKET}/down", storage_options=_options(endpoint))
    endpoint.stop()
    with pytest.raises(TransientError, match=rf"s3://{BUCKET}/down/7001_3\.avro"):
        write_alerts(batch, config)
    assert _objects(direct, "down") == []
    endpoint.start()
    url = write_alerts(batch, config)
    written = _objects(direct, "down")
    assert [o for o in written if o.endswith(".avro")] == [f"{BUCKET}/down/7001_3.avro"]
    # the id index of the file is written after the file itself
    assert [o.split("/")[-2] for o in written if not o.endswith(".avro")] == ["index"]
    assert read_alert_batch(url, config.storage_options).payloads == batch.payloads


@pytest.mark.slow  # the S3 client waits out its own retry backoff first
def test_upload_cut_halfway_is_never_visible(s3server, endpoint, batch):
    """The PUT is cut after half its body and the server stays down past the client's
    retries: TransientError, and no object (whole or partial) under the final name."""
    _, direct = s3server
    config = AlertStoreConfig(location=f"s3://{BUCKET}/cut", storage_options=_options(endpoint))
    endpoint.cut_next_put("/cut/7001_3.avro", outage_s=None)
    with pytest.raises(TransientError, match="7001_3.avro"):
        write_alerts(batch, config)
    assert endpoint.cuts == 1, "the upload was cut"
    assert _objects(direct, "cut") == [], "nothing under the final name after a cut upload"
    endpoint.start()
    url = write_alerts(batch, config)
    written = _objects(direct, "cut")
    assert [o for o in written if o.endswith(".avro")] == [f"{BUCKET}/cut/7001_3.avro"]
    # the id index of the file is written after the file itself
    assert [o.split("/")[-2] for o in written if not o.endswith(".avro")] == ["index"]
    back = read_alert_batch(url, config.storage_options)
    assert back.payloads == batch.payloads, "the rewritten object is complete"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_flow_retries_a_write_cut_by_a_restart(s3server, endpoint, survey_root, tmp_path):
    """The visit's alert files on S3; the first upload is cut and the server is down
    for 2.5 s. The produce task retries (TransientError) and the visit completes with
    every alert file whole; the cut object was never visible under its name."""
    _, direct = s3server
    opts = _options(endpoint)
    base = make_config(tmp_path, cache=False, detectors_per_task=2, max_workers=2)
    config = base.model_copy(
        update={
            "output": base.output.model_copy(
                update={
                    "store": AlertStoreConfig(
                        location=f"s3://{BUCKET}/visit/alerts", storage_options=opts
                    ),
                    "dead_letter_location": f"s3://{BUCKET}/visit/dead",
                }
            ),
            "orchestration": base.orchestration.model_copy(
                update={"retries": 3, "retry_backoff_s": 1.0, "retry_jitter_factor": 0.0}
            ),
        }
    )
    during: list[list[str]] = []
    endpoint.cut_next_put(
        ".avro",  # an alert file (the QA tables beside it are parquet)
        outage_s=2.5,
        on_cut=lambda: during.append(
            [p for p in _objects(direct, "visit/alerts") if p.endswith(".avro")]
        ),
    )
    t0 = time.monotonic()
    state, result = run_visit(survey_root, V0, config)
    assert endpoint.cuts == 1, "an upload was cut"
    assert state.name == "Completed", getattr(state, "message", state)
    assert not result["failed"]
    assert time.monotonic() - t0 > 2.5, "the visit waited out the outage"
    (cut,) = endpoint.cut_paths
    assert cut.endswith(".avro") and len(during) == 1
    assert cut.lstrip("/") not in during[0], f"{cut}: nothing visible while its upload was cut"

    names = _objects(direct, "visit/alerts")
    top = [p for p in names if p.count("/") == 3]  # directly under the alert location
    files = [p for p in top if re.fullmatch(rf".*/{V0}_\d+\.avro", p)]
    qa = [p for p in top if re.fullmatch(rf".*/{V0}_\d+\.(marginal|trailed)\.parquet", p)]
    receipts = [p for p in names if "/receipts/" in p]
    assert len(receipts) == len(result["detectors"])
    assert len(qa) == 2 * len(result["detectors"])
    assert sorted(top) == sorted(files + qa), "only final alert files and QA tables there"
    assert not [p for p in names if ".tmp" in p], "no temporary objects left"
    with sqlite3.connect(tmp_path / "apdb.sqlite3") as conn:
        stored = sorted(r[0] for r in conn.execute('SELECT "diaSourceId" FROM "DiaSource"'))
    alerted = []
    for f in files:
        batch = read_alert_batch(f"s3://{f}", opts)  # parses every block: a cut file fails
        alerted += batch.dia_source_ids.tolist()
    assert sorted(alerted) == stored, "every stored DiaSource has its alert in a whole file"
