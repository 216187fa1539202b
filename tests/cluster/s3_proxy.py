"""A loopback HTTP proxy in front of the real S3 server that injects faults (chaos tests only).

Per request, with the configured probabilities: ``fail`` answers 503 SlowDown without forwarding
(botocore retries it); ``drop`` forwards a PUT/POST/DELETE, lets it succeed on the server, then
closes the connection without answering (the response is lost: botocore resends it, and a resent
conditional PUT gets 412). The Host header and body are passed through unchanged, so SigV4
signatures stay valid. Counts what it injected.
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultyS3Proxy:
    def __init__(self, upstream: str, fail: float = 0.0, drop: float = 0.0, seed: int = 0) -> None:
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port
        self.fail, self.drop = fail, drop
        self.random = random.Random(seed)
        self.guard = threading.Lock()
        self.counts = {"requests": 0, "failed": 0, "dropped": 0}
        self.enabled = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.guard:
                    proxy.counts["requests"] += 1
                    roll = proxy.random.random()
                    enabled = proxy.enabled
                if enabled and roll < proxy.fail:
                    with proxy.guard:
                        proxy.counts["failed"] += 1
                    payload = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                drop = enabled and self.command in ("PUT", "POST", "DELETE") and roll < proxy.fail + proxy.drop
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                finally:
                    upstream.close()
                if drop:
                    with proxy.guard:
                        proxy.counts["dropped"] += 1
                    self.close_connection = True
                    self.connection.close()  # done on the server; the answer is lost
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="s3-fault-proxy")

    def start(self) -> "FaultyS3Proxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
