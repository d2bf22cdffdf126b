"""A test server on 127.0.0.1 that speaks OPA's REST Data API, backed by real OPA.

No `opa` executable is installable here; `opa_bindings` embeds OPA (Go) itself, so
decisions come from OPA's own evaluator, not from Charter's in-process engine. The bindings
evaluate with built-in errors strict (rego.StrictBuiltinErrors: a failing built-in fails the
query), which is how Charter asks its sidecar to evaluate (`?strict-builtin-errors=true`),
so a built-in error is answered here as OPA answers it then: 500 `internal_error`. The
server also misbehaves on demand (`mode`), for the fail-closed tests. Test-only.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("ok", "hang", "garbage", "undefined", "error", "not_json_object")


class OpaTestServer:
    def __init__(self) -> None:
        from opa_bindings import OpaEngine

        self.engine = OpaEngine()
        self.lock = threading.Lock()
        self.mode = "ok"
        self.hang_s = 5.0
        self.put_hang_s = 0.0  # PUTs (loading policies and data) answer this much later
        self.requests: list[tuple[str, str]] = []
        self.data: dict[str, Any] = {}
        self.policies: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as a real OPA server: no 40 ms delayed-ACK stalls

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, value: Any) -> None:
                self._send(status, json.dumps(value).encode())

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(("GET", self.path))
                if self.path.startswith("/health"):
                    self._json(200, {})
                elif self.path.startswith("/v1/data/"):
                    path = self.path[len("/v1/data/"):].split("?")[0].replace("/", ".")
                    self._json(200, server.eval(path, None))
                else:
                    self._json(404, {"code": "resource_not_found"})

            def do_PUT(self) -> None:  # noqa: N802
                server.requests.append(("PUT", self.path))
                body = self._body()
                time.sleep(server.put_hang_s)
                if self.path.startswith("/v1/policies/"):
                    server.policies[self.path[len("/v1/policies/"):]] = body.decode()
                    try:
                        server.rebuild()
                    except Exception as exc:  # noqa: BLE001 - OPA's parse error, as OPA says
                        self._json(400, {"code": "invalid_parameter", "message": str(exc)})
                        return
                    self._json(200, {})
                elif self.path.startswith("/v1/data/"):
                    path = self.path[len("/v1/data/"):].strip("/")
                    server.data[path.replace("/", ".")] = json.loads(body)  # PUT replaces
                    server.rebuild()
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._json(404, {"code": "resource_not_found"})

            def do_POST(self) -> None:  # noqa: N802
                server.requests.append(("POST", self.path))
                body = self._body()
                mode = server.mode
                if mode == "hang":
                    time.sleep(server.hang_s)
                if mode == "error":
                    self._json(500, {"code": "internal_error", "message": "boom"})
                    return
                if mode == "garbage":
                    self._send(200, b"\x00not json at all{", "application/json")
                    return
                if mode == "not_json_object":
                    self._json(200, ["result", True])
                    return
                if mode == "undefined":
                    self._json(200, {})
                    return
                path = self.path[len("/v1/data/"):].split("?")[0].replace("/", ".")
                doc = json.loads(body or b"{}")
                from opa_bindings import OpaError

                try:
                    self._json(200, server.eval(path, doc.get("input")))
                except OpaError as exc:  # as OPA answers with ?strict-builtin-errors=true
                    self._json(500, {"code": "internal_error", "message": str(exc),
                                     "errors": [{"code": exc.code, "message": exc.message}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def rebuild(self) -> None:
        from opa_bindings import OpaEngine

        engine = OpaEngine()
        for path, source in self.policies.items():
            engine.add_policy(path, source)
        for path, value in self.data.items():
            engine.add_data(value, path)
        with self.lock:
            old, self.engine = self.engine, engine
        old.close()

    def eval(self, path: str, input_doc: Any) -> dict[str, Any]:
        from opa_bindings import OpaUndefinedError

        try:
            with self.lock:
                return {"result": self.engine.eval_document(path, input_doc)}
        except OpaUndefinedError:
            return {}

    def __enter__(self) -> OpaTestServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()
