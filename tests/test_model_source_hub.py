"""A hub id downloads every file the weights, tokenizer and chat template need, and nothing else: huggingface_hub's
own client fetches from a local mirror of the hub's HTTP layout (repo info, tree listing, resolve URLs) served on
loopback, into a hub cache in the test's folder. No network."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from engines.model_source import resolve_model

REPO = "kiln-test/tiny-chat"
SHA = "0123456789abcdef0123456789abcdef01234567"
NEEDED = {
    "config.json": b'{"model_type": "qwen3"}',
    "model.safetensors": b"weights",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "merges.txt": b"",
    "tokenizer.model": b"sentencepiece",
}
NOT_NEEDED = {
    "README.md": b"# card",
    "original/consolidated.pth": b"another copy of the weights",
    "model.gguf": b"gguf",
}


class HubMirror(BaseHTTPRequestHandler):
    """The three hub routes snapshot_download reads, for one repo at one commit."""

    files: dict[str, bytes] = NEEDED | NOT_NEEDED

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        api = f"/api/models/{REPO}/"
        if path == api + "revision/main":
            info = {"id": REPO, "sha": SHA, "siblings": [{"rfilename": f} for f in self.files]}
            return self._send(json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if path == api + f"tree/{SHA}":
            tree = [
                {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for f, b in self.files.items()
            ]
            return self._send(json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
        prefix = f"/{REPO}/resolve/{SHA}/"
        if path.startswith(prefix) and path[len(prefix) :] in self.files:
            body = self.files[path[len(prefix) :]]
            etag = f'"{hashlib.sha1(body).hexdigest()}"'
            return self._send(body, {"ETag": etag, "X-Repo-Commit": SHA}, head)
        self.send_error(404)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """The mirror's endpoint set as the hub's, a fresh hub cache; yields the cache folder."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), HubMirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield cache
    server.shutdown()
    thread.join()


def test_hub_id_downloads_weights_tokenizer_and_chat_template_only(hub):
    folder = resolve_model(REPO)
    assert folder.is_relative_to(hub) and folder.name == SHA
    downloaded = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert downloaded == set(NEEDED)
    assert (folder / "chat_template.jinja").read_bytes() == NEEDED["chat_template.jinja"]
