"""What the server's port answers while the server starts, before the API takes it over.

The port is bound first (a taken port fails at once), and loading the model, building the index
or starting the retrieval tier takes from seconds to minutes. Meanwhile ``GET /healthz`` answers
200 (the process lives: a liveness probe must not restart it) and every other request 503 with
``{"ready": false, "starting": STEP}``, the step under way; a client that retries on 503 waits
correctly, and nothing hangs on a socket nobody accepts on.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


class StartingResponder:
    """Answers on ``listener`` from :meth:`start` to :meth:`stop`; :meth:`step` names what runs now."""

    def __init__(self, listener: socket.socket):
        self.current = "starting"
        responder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                alive = self.path.split("?")[0] == "/healthz"
                body = json.dumps({"status": "ok"} if alive else {"ready": False, "starting": responder.current}).encode()
                self.send_response(200 if alive else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, *args) -> None:
                pass  # probes every second would flood the log

        self._server = HTTPServer(listener.getsockname()[:2], Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = listener  # already bound and listening: the API takes it over later
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="starting-responder", daemon=True)

    def start(self) -> StartingResponder:
        self._thread.start()
        return self

    def step(self, text: str) -> None:
        self.current = text

    def stop(self) -> None:
        """Stop answering; the listening socket stays open for the API."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
