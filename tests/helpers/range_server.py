"""An HTTP/1.1 server on 127.0.0.1 with Range requests: the "remote" files of the tests (no network)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeServer:
    """Serves a folder over HTTP/1.1 on 127.0.0.1 with Range requests (206), recording each request. Hostile on
    demand: `pace` seconds between the bytes of each body, or `endless` bodies that ignore Range (up to
    ENDLESS bytes, so that a client without a cap still ends); `sent` counts the body bytes that left."""

    ENDLESS = 256 << 20

    def __init__(self, folder: Path, status: int | None = None, pace: float | None = None, endless: bytes = b""):
        self.folder, self.status, self.requests = folder, status, []
        self.pace, self.endless, self.sent = pace, endless, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = server.folder / self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((self.command, self.path, rng))
                if server.endless and body:
                    return self._endless()
                if server.status:
                    self.send_response(server.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                if rng:
                    start, end = rng.removeprefix("bytes=").split("-")
                    start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
                    part = data[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    part = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self._send(part)

            def _send(self, part: bytes):
                step = 1 if server.pace else 1 << 16
                try:
                    for i in range(0, len(part), step):
                        time.sleep(server.pace or 0)
                        self.wfile.write(part[i:i + step])
                        self.wfile.flush()
                        server.sent += len(part[i:i + step])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: what a bounded client does

            def _endless(self):
                self.send_response(200)  # whatever Range asked: the whole "file", its start first, then on and on
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunk = server.endless.ljust(1 << 16, b" ")
                try:
                    while server.sent < server.ENDLESS:
                        self.wfile.write(chunk)
                        server.sent += len(chunk)
                        chunk = b" " * (1 << 16)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
