"""Image fetching over http(s): allow-lists, SSRF rules, redirects, limits and timeouts.

Every case uses a real http.server on 127.0.0.1, reachable only when allow-listed.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from actors.media import (
    MediaError,
    MediaPolicy,
    address_allowed,
)
from tests.actors.test_media import _load, _photo, _png

PNG_BODY = _png(_photo())
BIG_BODY = b"\x00" * 5000
SEEN_HOSTS: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        SEEN_HOSTS.append(self.headers.get("Host", ""))
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/img.png":
            self._send(200, PNG_BODY)
        elif parts.path == "/big":
            self._send(200, BIG_BODY)
        elif parts.path == "/big-nolength":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BIG_BODY)
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG_BODY)
        else:
            self._send(404, b"missing")

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (timeout and size tests)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL_OK = MediaPolicy(allowed_media_domains=["127.0.0.1"])


def test_http_image_loads_when_host_is_allow_listed(server):
    out, raw = _load(f"{server}/img.png", LOCAL_OK)
    assert raw == PNG_BODY and out.size == (64, 48)


def test_named_host_is_pinned_to_its_vetted_address_with_host_header_kept(server):
    port = server.rsplit(":", 1)[1]
    out, raw = _load(
        f"http://LocalHost:{port}/img.png", MediaPolicy(allowed_media_domains=["LOCALHOST"])
    )
    assert raw == PNG_BODY
    assert SEEN_HOSTS[-1].lower() == f"localhost:{port}"


def test_allow_list_ignores_trailing_dot(server):
    out, _ = _load(f"{server}/img.png", MediaPolicy(allowed_media_domains=["127.0.0.1."]))
    assert out.size == (64, 48)


def test_loopback_is_refused_without_allow_list(server):
    with pytest.raises(MediaError, match="disallowed address 127.0.0.1"):
        _load(f"{server}/img.png")


def test_host_not_in_allow_list_is_refused(server):
    with pytest.raises(MediaError, match="not in --allowed-media-domains"):
        _load(f"{server}/img.png", MediaPolicy(allowed_media_domains=["Example.COM"]))


def test_redirect_to_disallowed_host_is_refused(server):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(MediaError, match="'localhost' is not in"):
        _load(f"{server}/redirect?to=http://localhost:{port}/img.png", LOCAL_OK)


def test_redirect_to_non_http_scheme_is_refused(server):
    with pytest.raises(MediaError, match="scheme must be http or https"):
        _load(f"{server}/redirect?to=file:///etc/passwd", LOCAL_OK)


def test_redirect_to_allowed_host_is_followed(server):
    out, raw = _load(f"{server}/redirect?to=/img.png", LOCAL_OK)
    assert raw == PNG_BODY


def test_redirect_loop_is_capped(server):
    with pytest.raises(MediaError, match="too many redirects"):
        _load(f"{server}/loop", LOCAL_OK)


def test_http_error_status_is_reported(server):
    with pytest.raises(MediaError, match="HTTP 404"):
        _load(f"{server}/missing.png", LOCAL_OK)


@pytest.mark.parametrize("path", ["/big", "/big-nolength"])
def test_oversized_body_is_refused(server, path):
    policy = MediaPolicy(allowed_media_domains=["127.0.0.1"], max_bytes=1000)
    with pytest.raises(MediaError, match="image exceeds 1000 bytes"):
        _load(server + path, policy)


def test_slow_server_times_out(server):
    policy = MediaPolicy(allowed_media_domains=["127.0.0.1"], read_timeout_s=0.3)
    with pytest.raises(MediaError, match="timed out"):
        _load(f"{server}/slow", policy)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.png",
        "http://192.168.1.10/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://[fd00:ec2::254]/a.png",
        "http://0.0.0.0/a.png",
        "http://100.64.0.1/a.png",
    ],
)
def test_internal_addresses_are_refused(url):
    with pytest.raises(MediaError, match="disallowed address"):
        _load(url)


def test_metadata_address_is_refused_even_when_allow_listed():
    policy = MediaPolicy(allowed_media_domains=["169.254.169.254"])
    with pytest.raises(MediaError, match="disallowed address"):
        _load("http://169.254.169.254/latest/meta-data/", policy)


def test_credentials_in_url_are_refused():
    with pytest.raises(MediaError, match="credentials"):
        _load("http://user:pw@127.0.0.1/a.png", LOCAL_OK)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("100.64.0.1", False),
        ("169.254.1.1", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:10.0.0.1", False),
    ],
)
def test_address_allow_list(address, allowed):
    assert address_allowed(ipaddress.ip_address(address), host_allowlisted=False) is allowed
