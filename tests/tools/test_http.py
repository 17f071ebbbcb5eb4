"""`fetch` and `http_get` against real HTTP servers on 127.0.0.1 (threads), no mocks.

Network rule of this file: traffic goes to 127.0.0.0/8 only. An autouse guard wraps
`socket.socket.connect` and fails the test on any other destination, so a broken SSRF check
fails here instead of reaching a private or public address; blocked URLs must also make no
connection at all.

The SSRF table is the tables below (`SSRF_TABLES`): every row is a way a model could point
`fetch` somewhere it must not reach, and each is refused. docs/reliability.md quotes their count.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
import urllib.parse
from pathlib import Path

import pytest

from agentrl.errors import ToolError, ToolErrorKind
from agentrl.tools.builtin.http_fetch import make_http_get_tool
from agentrl.tools.http import FetchPolicy, fetch, is_public_address

LOCAL = FetchPolicy(deadline_s=5.0, max_bytes=256 * 1024, allow_networks=("127.0.0.1/32",))

# Hosts that reach loopback, private, link-local, metadata or other non-public addresses, written
# every way a resolver accepts (short, hex, octal, decimal, IPv4 inside IPv6, names).
FORBIDDEN_HOSTS = [
    "127.1", "0x7f000001", "2130706433", "0177.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]",
    "[::ffff:a00:1]", "[::10.0.0.1]", "[2002:a00:1::1]", "[64:ff9b::a9fe:a9fe]", "169.254.169.254", "10.0.0.1",
    "172.16.0.1", "192.168.1.1", "100.64.0.1", "0.0.0.0", "[::]", "[fe80::1]", "[fd00::1]", "224.0.0.1",
    "240.0.0.1", "255.255.255.255",
    "localhost", "0", "0x7f.1", "0177.1", "017700000001", "127.127.127.127", "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::ffff:7f00:1]", "0xa9fea9fe", "2852039166", "[::ffff:a9fe:a9fe]", "[fd00:ec2::254]",  # AWS metadata forms
    "100.100.100.200", "192.0.0.192",  # Alibaba and Oracle Cloud metadata
    "198.51.100.1", "203.0.113.1", "[2001:db8::1]", "[3fff::1]", "[ff02::1]",
]
# URLs refused for their form: schemes other than http(s), relative URLs, credentials, no host.
BAD_URLS = [
    "file:///etc/passwd", "ftp://example.com/file", "gopher://example.com/", "javascript:alert(1)",
    "example.com/page", "//example.com/page", "http://user:pw@example.com/", "http:///nohost", "not a url",
    "data:text/plain,hi", "dict://127.0.0.1:11211/", "ldap://127.0.0.1/", "http://user@127.0.0.1/",
]
# Allowed by the policy, so only the URL check stands between these and a crash further on.
MALFORMED_URLS = ["http://xn--/", "http://127.0.0.1:99999/", "http://127.0.0.1:0/"]
# Redirect targets refused at the hop (the first request happens, the second never does).
FORBIDDEN_REDIRECTS = [
    "http://10.0.0.1/secret", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.1]/",
    "file:///etc/passwd", "http://127.0.0.2/", "http://0x7f000002/", "http://0/", "http://192.0.0.192/",
    "gopher://127.0.0.1/", "http://[::1]/",
]
# Location headers that are not URLs; httpx raised InvalidURL or IDNAError out of fetch() for these.
MALFORMED_REDIRECTS = ["http:a", "http:[", "https://xn--/", "http://xn--ls8h/"]
# is_public_address against the IANA special-purpose registries (RFC 6890 and successors).
ADDRESS_TABLE = [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.31.255.255", False), ("172.32.0.1", True),
    ("192.168.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("100.128.0.1", True),
    ("0.0.0.0", False), ("224.0.0.251", False), ("239.255.255.250", False), ("240.0.0.1", False),
    ("192.0.2.1", False), ("198.18.0.1", False), ("::", False), ("::1", False), ("fe80::1", False),
    ("fc00::1", False), ("fd12:3456::1", False), ("fec0::1", False), ("ff02::1", False),
    ("::ffff:169.254.169.254", False), ("::127.0.0.1", False), ("2002:7f00:1::", False),
    ("2002:808:808::", True), ("2001::1", False), ("2001:db8::1", False),
    ("192.0.0.192", False), ("::ffff:192.0.0.192", False), ("3fff::1", False),
]
SSRF_TABLES = {"forbidden hosts": FORBIDDEN_HOSTS, "bad URLs": BAD_URLS, "malformed URLs": MALFORMED_URLS,
               "forbidden redirect targets": FORBIDDEN_REDIRECTS, "malformed redirects": MALFORMED_REDIRECTS,
               "address classification": ADDRESS_TABLE}
BOMB = gzip.compress(bytes(50 * 2**20), compresslevel=9)  # 50 MiB of zeros, ~50 KB on the wire


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.seen.append(self.path)
        path, _, query = self.path.partition("?")
        if path == "/hello":
            self.reply(200, b"hello world", {"Content-Type": "text/plain; charset=utf-8"})
        elif path == "/host":
            self.reply(200, self.headers["Host"].encode(), {"Content-Type": "text/plain"})
        elif path == "/redirect":
            self.reply(302, b"", {"Location": urllib.parse.parse_qs(query)["to"][0]})
        elif path == "/loop":
            self.reply(302, b"", {"Location": "/loop"})
        elif path == "/bomb":
            self.reply(200, BOMB, {"Content-Encoding": "gzip", "Content-Type": "text/plain"})
        elif path == "/huge-length":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.stream(b"a" * 65536, count=2000, pause=0.0)
        elif path == "/drip":  # the whole response, status line included, one byte at a time
            self.stream(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000, pause=0.2, raw=True)
        elif path == "/binary":
            self.reply(200, bytes(range(256)), {"Content-Type": "image/png"})
        else:
            self.reply(404, b"no such page", {"Content-Type": "text/plain"})

    def stream(self, data: bytes, count: int = 1, pause: float = 0.0, raw: bool = False) -> None:
        pieces = [data[i:i + 1] for i in range(len(data))] if raw else [data] * count
        try:
            for piece in pieces:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(pause)
        except OSError:  # the client hung up, as it should
            pass
        self.close_connection = True


def serve(server: http.server.ThreadingHTTPServer):
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def server():
    srv = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Record every connect; fail on any destination outside 127.0.0.0/8 and ::1."""
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        attempts.append(host)
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            raise AssertionError(f"test tried to connect to non-loopback {address!r}")

    monkeypatch.setattr(socket.socket, "connect", lambda self, a: (check(a), real_connect(self, a))[1])
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, a: (check(a), real_connect_ex(self, a))[1])
    Handler.seen.clear()
    return attempts


def get(url: str, policy: FetchPolicy = LOCAL):
    return asyncio.run(fetch(url, policy))


def error_of(url: str, policy: FetchPolicy = LOCAL) -> ToolError:
    with pytest.raises(ToolError) as info:
        get(url, policy)
    return info.value


def test_normal_fetch_with_allow_list(server, loopback_only):
    result = get(f"{server}/hello")
    assert (result.status_code, result.text, result.content_type) == (200, "hello world", "text/plain; charset=utf-8")
    assert result.url == f"{server}/hello"
    assert Handler.seen == ["/hello"] and loopback_only == ["127.0.0.1"]  # the guard sees httpx's connects


def test_pinned_request_keeps_the_host_header_as_written(server, loopback_only):
    port = server.rsplit(":", 1)[1]
    policy = FetchPolicy(deadline_s=5.0, allow_hosts=frozenset({"localhost"}))
    assert get(f"http://LocalHost:{port}/host", policy).text == f"localhost:{port}"  # URL hosts are case-folded
    assert loopback_only == ["127.0.0.1"]


def test_loopback_is_refused_without_allow_list(server, loopback_only):
    err = error_of(f"{server}/hello", FetchPolicy())
    assert err.kind is ToolErrorKind.INVALID_ARGUMENTS and "not allowed" in err.message
    assert loopback_only == [] and Handler.seen == []


@pytest.mark.parametrize("host", FORBIDDEN_HOSTS)
def test_forbidden_addresses_are_refused_before_connecting(server, loopback_only, host):
    port = server.rsplit(":", 1)[1]
    err = error_of(f"http://{host}:{port}/hello", FetchPolicy())
    assert err.kind is ToolErrorKind.INVALID_ARGUMENTS
    assert "127.0.0.1" in host or "127.0.0.1" not in err.message  # the resolved address is not revealed
    assert loopback_only == [] and Handler.seen == []


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_urls_and_schemes_are_invalid_arguments(url, loopback_only):
    err = error_of(url, FetchPolicy())
    assert err.kind is ToolErrorKind.INVALID_ARGUMENTS
    assert loopback_only == []


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_host_or_port_is_invalid_arguments(url, loopback_only):
    # Allowed by the policy, so only the URL check stands between these and a crash further on
    # (an IDNAError while formatting a message, an OverflowError from connect()).
    err = error_of(url, FetchPolicy(deadline_s=5.0, allow_networks=("127.0.0.1/32",), allow_hosts=frozenset({"xn--"})))
    assert err.kind is ToolErrorKind.INVALID_ARGUMENTS and ("valid URL" in err.message or "port" in err.message)
    assert loopback_only == []


@pytest.mark.parametrize("target", FORBIDDEN_REDIRECTS)
def test_redirect_to_a_forbidden_target_is_refused_at_the_hop(server, loopback_only, target):
    err = error_of(f"{server}/redirect?to={urllib.parse.quote(target)}")
    assert err.kind is ToolErrorKind.INVALID_ARGUMENTS
    assert len(Handler.seen) == 1 and set(loopback_only) == {"127.0.0.1"}


@pytest.mark.parametrize("location", MALFORMED_REDIRECTS)
def test_malformed_redirect_location_is_a_runtime_error(server, loopback_only, location):
    err = error_of(f"{server}/redirect?to={urllib.parse.quote(location)}")
    assert err.kind is ToolErrorKind.RUNTIME and "invalid redirect location" in err.message
    assert len(Handler.seen) == 1 and set(loopback_only) == {"127.0.0.1"}


def test_relative_redirect_is_followed_and_redirect_loops_stop(server):
    assert get(f"{server}/redirect?to=/hello").text == "hello world"
    err = error_of(f"{server}/loop")
    assert err.kind is ToolErrorKind.RUNTIME and "redirects" in err.message
    assert Handler.seen[2:] == ["/loop"] * 6  # the first request and 5 redirects, no more


def test_gzip_bomb_stops_at_the_cap_without_inflating(server):
    tracemalloc.start()
    try:
        err = error_of(f"{server}/bomb", FetchPolicy(deadline_s=5.0, max_bytes=2**20, allow_networks=("127.0.0.1/32",)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.kind is ToolErrorKind.OUTPUT_TOO_LARGE
    assert peak < 8 * 2**20  # a 1 MiB cap, never the 50 MiB the bomb inflates to


def test_huge_content_length_is_ignored_for_the_streaming_cap(server):
    start = time.monotonic()
    err = error_of(f"{server}/huge-length")
    assert err.kind is ToolErrorKind.OUTPUT_TOO_LARGE and time.monotonic() - start < 3.0


def test_dripping_server_hits_the_total_deadline(server):
    # A byte every 0.2 s never trips an inactivity timeout; only the total deadline stops it.
    start = time.monotonic()
    err = error_of(f"{server}/drip", FetchPolicy(deadline_s=1.5, allow_networks=("127.0.0.1/32",)))
    elapsed = time.monotonic() - start
    assert err.kind is ToolErrorKind.TIMEOUT
    assert 1.4 < elapsed < 15.0  # stopped at the deadline, long before the drip ends (~200 s)


def test_connection_refused_is_a_runtime_error(loopback_only):
    with socket.socket() as s:  # a port nobody listens on: bind, learn it, close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert error_of(f"http://127.0.0.1:{port}/").kind is ToolErrorKind.RUNTIME


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_https_is_pinned_yet_verified_against_the_host_name(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    serve(srv)
    port = srv.server_address[1]
    try:
        by_name = FetchPolicy(deadline_s=5.0, allow_hosts=frozenset({"localhost"}), ca_file=str(cert))
        result = get(f"https://localhost:{port}/hello", by_name)
        assert result.text == "hello world"  # connected to the checked IP, verified as "localhost"
        by_ip = FetchPolicy(deadline_s=5.0, allow_networks=("127.0.0.1/32",), ca_file=str(cert))
        assert error_of(f"https://127.0.0.1:{port}/hello", by_ip).kind is ToolErrorKind.RUNTIME  # cert is not for the IP
    finally:
        srv.shutdown()


def test_http_get_tool_formats_status_and_binary_bodies(server):
    http_get = make_http_get_tool(LOCAL)
    assert http_get.name == "http_get" and http_get.parameters["required"] == ["url"]
    assert asyncio.run(http_get.fn(f"{server}/hello")) == "hello world"
    assert asyncio.run(http_get.fn(f"{server}/missing")) == "HTTP 404 Not Found\n\nno such page"
    assert asyncio.run(http_get.fn(f"{server}/binary")) == "[256 bytes of image/png, not shown]"


@pytest.mark.parametrize("address, public", ADDRESS_TABLE)
def test_is_public_address_table(address, public):
    # Expected values from the IANA special-purpose registries (RFC 6890 and successors); 192.0.0.0/24
    # is judged by hand, as Python patch releases disagree about it.
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_reliability_doc_quotes_the_ssrf_count():
    total = sum(len(rows) for rows in SSRF_TABLES.values())
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    assert f"SSRF table: {total} cases" in doc, f"docs/reliability.md should say 'SSRF table: {total} cases'"
