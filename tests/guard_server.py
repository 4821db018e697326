"""A real HTTP server on 127.0.0.1 speaking the chat-completions protocol, scripted by the response text.

The assistant turn of each request decides the reply: it contains ``SAFE`` → ``safe``; ``UNSAFE`` →
``unsafe\\nS1,S10``; ``MALFORMED`` → prose that is no verdict; ``ERROR500`` → HTTP 500; ``SLOW`` → a
reply after ``slow_seconds``; ``FLAKY`` → HTTP 500 on its first request, ``safe`` after. It records
every request and the peak number of requests in flight.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "meta-llama/Llama-Guard-3-8B"


class GuardServer:
    def __init__(self, slow_seconds: float = 1.0, hold_seconds: float = 0.0) -> None:
        self.slow_seconds, self.hold_seconds = slow_seconds, hold_seconds
        self.models_reply: dict | str = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        self.requests: Counter[str] = Counter()
        self.payloads: list[dict] = []
        self.in_flight = self.peak_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: dict | str) -> None:
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    self.wfile.write(data)

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._send(200, server.models_reply)
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.in_flight += 1
                    server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
                try:
                    status, body = self._answer(payload)
                finally:
                    # a request stops counting before its reply is written: once the client has the reply it may
                    # send the next one, possibly before this thread would get to a decrement placed after it
                    with server._lock:
                        server.in_flight -= 1
                self._send(status, body)

            def _answer(self, payload) -> tuple[int, dict]:
                response = payload["messages"][-1]["content"]
                key = response.split()[0] if response.split() else ""
                with server._lock:
                    server.requests[key] += 1
                    server.payloads.append(payload)
                    count = server.requests[key]
                time.sleep(server.hold_seconds)
                if payload.get("model") != MODEL:
                    return 404, {"error": f"model {payload.get('model')} does not exist"}
                if "ERROR500" in response or ("FLAKY" in response and count == 1):
                    return 500, {"error": "internal"}
                if "SLOW" in response:
                    time.sleep(server.slow_seconds)
                if "MALFORMED" in response:
                    text = "I think this response is probably fine."
                elif "UNSAFE" in response:
                    text = "unsafe\nS1,S10"
                else:
                    text = "safe"
                return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> GuardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
