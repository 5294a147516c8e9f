"""Fixtures for the Kubeflow tests; among them a small KFP API server on 127.0.0.1.

The server is an in-memory Kubeflow Pipelines API (v2beta1).

It implements the endpoints ``kfp.Client`` calls for ``fullgrad schedule`` (healthz,
experiments, pipeline upload/list, pipeline versions, recurring runs create/list/get/delete)
with the JSON field names of kfp_server_api's models, keeps state between calls, and records
every request, so a test drives the real client and asserts on what went over the wire.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import io
import itertools
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

API = "/apis/v2beta1"


@dataclasses.dataclass
class Request:
    """One request as received: method, path, query (first values), JSON body, files."""

    method: str
    path: str
    query: dict[str, str]
    body: Any = None
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)


class KfpServer:
    """The server and its state; use as a context manager.

    Example:
        >>> with KfpServer() as server:
        ...     client = kfp.Client(host=server.url)
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._ids = (f"id-{n:04d}" for n in itertools.count(1))
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def calls(self, method: str, path: str) -> list[Request]:
        """The recorded requests with this method and path (path without the API prefix)."""
        return [r for r in self.requests if r.method == method and r.path == API + path]

    # -- request handling -------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Request(method, url.path, query)
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/form-data"):
                    request.files = _multipart_files(content_type, raw)
                elif raw:
                    request.body = json.loads(raw)
                with server._lock:
                    server.requests.append(request)
                    status, payload = server._route(request)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        return Handler

    def _route(self, r: Request) -> tuple[int, Any]:
        path = r.path[len(API) :] if r.path.startswith(API) else None
        if path is None:
            return 404, {"error": f"no route {r.path}"}
        if r.method == "GET" and path == "/healthz":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if path == "/experiments":
            if r.method == "GET":
                found = _filtered(self.experiments.values(), r.query.get("filter"))
                return 200, {"experiments": found, "total_size": len(found)}
            experiment = {**r.body, "experiment_id": next(self._ids), "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if path == "/pipelines" and r.method == "GET":
            found = _filtered(self.pipelines.values(), r.query.get("filter"))
            return 200, {"pipelines": found, "total_size": len(found)}
        if path == "/pipelines/upload" and r.method == "POST":
            name = r.query.get("name") or r.query.get("display_name")
            pipeline = {"pipeline_id": next(self._ids), "display_name": name, "name": name}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], name, r.files["uploadfile"])
            return 200, pipeline
        if path == "/pipelines/upload_version" and r.method == "POST":
            pipeline_id = r.query["pipelineid"]
            if pipeline_id not in self.pipelines:
                return 404, {"error": f"pipeline {pipeline_id} not found"}
            return 200, self._add_version(pipeline_id, r.query["name"], r.files["uploadfile"])
        match = re.fullmatch(r"/pipelines/([^/]+)/versions", path)
        if match and r.method == "GET":
            versions = [v for v in self.versions.values() if v["pipeline_id"] == match[1]]
            found = _filtered(versions, r.query.get("filter"))
            return 200, {"pipeline_versions": found, "total_size": len(found)}
        if path == "/recurringruns":
            if r.method == "POST":
                run = {**r.body, "recurring_run_id": next(self._ids), "status": "ENABLED"}
                self.recurring_runs[run["recurring_run_id"]] = run
                return 200, run
            runs = [
                run
                for run in self.recurring_runs.values()
                if "experiment_id" not in r.query
                or run["experiment_id"] == r.query["experiment_id"]
            ]
            # Two per page whatever was asked, so clients must follow next_page_token.
            start = int(r.query.get("page_token") or 0)
            page = runs[start : start + 2]
            token = str(start + 2) if start + 2 < len(runs) else ""
            return 200, {"recurringRuns": page, "total_size": len(runs), "next_page_token": token}
        match = re.fullmatch(r"/recurringruns/([^/:]+)", path)
        if match:
            run = self.recurring_runs.get(match[1])
            if run is None:
                return 404, {"error": f"recurring run {match[1]} not found", "code": 5}
            if r.method == "DELETE":
                del self.recurring_runs[match[1]]
                return 200, {}
            return 200, run
        return 404, {"error": f"no route {r.method} {r.path}"}

    def _add_version(self, pipeline_id: str, name: str, package: bytes) -> dict:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": next(self._ids),
            "display_name": name,
            "name": name,
            "pipeline_spec": yaml.safe_load(package),
            "package": package.decode(),
        }
        self.versions[version["pipeline_version_id"]] = version
        return {k: v for k, v in version.items() if k != "package"}


def _filtered(items: Any, filter_json: str | None) -> list[dict]:
    """Applies KFP's EQUALS-on-display_name filter, the only one the client sends here."""
    items = list(items)
    if not filter_json:
        return items
    for predicate in json.loads(filter_json)["predicates"]:
        assert predicate["operation"] in ("EQUALS", 1), predicate
        items = [i for i in items if i.get(predicate["key"]) == predicate["stringValue"]]
    return items


def _multipart_files(content_type: str, raw: bytes) -> dict[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


@pytest.fixture()
def kfp_server(monkeypatch, tmp_path):
    """A running :class:`KfpServer`; HOME points at tmp so no user kfp context is read."""
    monkeypatch.setenv("HOME", str(tmp_path))
    with KfpServer() as server:
        yield server


# -- a tiny real dataset and model for the kfp.local runs -------------------------------------

SIZE = 32
CLASSES = 3


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small conv-BN-ReLU classifier ending in softmax, saved as ``.keras`` (random weights)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input([SIZE, SIZE, 3])
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x)
    path = tmp_path_factory.mktemp("model") / "classifier.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A folder with one Parquet file: 8 PNG images with labels and object masks, plus one row
    whose image bytes are corrupt (it must come out as a dead letter, not vanish)."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(8):
        image = rng.integers(0, 60, [SIZE, SIZE, 3], dtype=np.uint8)
        top, left = 4 + i % 3 * 4, 6 + i % 4 * 3
        image[top : top + 12, left : left + 12] = 200 + 20 * (i % CLASSES)
        mask = np.zeros([SIZE, SIZE], np.uint8)
        mask[top : top + 12, left : left + 12] = 255
        rows.append(
            {"id": f"img-{i}", "image": _png(image), "label": i % CLASSES, "mask": _png(mask)}
        )
    rows.append({"id": "broken", "image": b"\x89PNG not really", "label": 0, "mask": None})
    folder = tmp_path_factory.mktemp("dataset") / "images"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
    return folder
