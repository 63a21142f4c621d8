"""A real local HTTP server standing in for a chat incoming webhook (Slack, Mattermost...)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from pipeline.devstack.host import free_port


@dataclass
class ChatWebhook:
    url: str
    """``http://127.0.0.1:<port>/services/T0/B0``, as an incoming webhook's URL looks."""
    received: list[dict[str, Any]] = field(default_factory=list)
    """Each POST: its ``path`` and the JSON body's keys (``text``)."""
    status: int = 200
    """What the webhook answers; set 404 or 500 to play a revoked or failing webhook."""


@contextmanager
def chat_webhook() -> Iterator[ChatWebhook]:
    hook = ChatWebhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook.received.append({"path": self.path, **json.loads(body)})
            self.send_response(hook.status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = HTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook.url = f"http://127.0.0.1:{server.server_port}/services/T0/B0"
    try:
        yield hook
    finally:
        server.shutdown()
