"""Fetch HTTP(S) resources for tools, safe against SSRF and hostile servers.

A model chooses the URL, so every request is treated as hostile in both directions:

* Only http/https, no credentials in the URL.
* SSRF guard: the host name is resolved here (getaddrinfo, which also accepts numeric forms like
  `127.1`, `0x7f000001` or `2130706433`) and every resulting address must be public unicast
  (`is_public_address`); IPv4 embedded in IPv6 (mapped, compatible, 6to4, NAT64) is judged as
  the IPv4 it reaches. One non-public address rejects the host. `FetchPolicy.allow_hosts` and
  `allow_networks` open named hosts or networks (tests, users' own services).
* DNS rebinding: the connection goes to the address that was checked. The request URL carries
  that IP, the Host header the original name, and for https the `sni_hostname` extension keeps
  SNI and certificate verification on the original name.
* Redirects are followed by hand (at most `max_redirects`), each hop checked as above.
* One deadline covers the whole exchange, redirects and slow bodies included, so a server that
  drips a byte a second fails at the deadline, not at an inactivity timeout.
* The body is capped while it streams, before and after decompression; gzip/deflate are
  inflated here with `max_length`, so a compression bomb stops at the cap instead of inflating
  in memory first. Content-Length is not trusted either way.
* Proxies and other environment settings are ignored (`trust_env=False`): a proxy would bypass
  the address pinning.

Failures are `ToolError`s: INVALID_ARGUMENTS (bad URL, scheme or address), TIMEOUT,
OUTPUT_TOO_LARGE, RUNTIME (name resolution, connection or protocol failures, too many redirects).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import zlib
from dataclasses import dataclass

import httpx

from agentrl.errors import ToolError, ToolErrorKind

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MiB = 1 << 20
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
# Judged here rather than left to `ipaddress`, whose answer for them changed between Python patch
# releases (3.11.7 calls 192.0.0.192 global): IETF protocol assignments, where Oracle Cloud's
# metadata service lives (192.0.0.192), and the IPv6 documentation range of RFC 9637.
_NEVER_PUBLIC = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("3fff::/20"))
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_NOT_ALLOWED = "only public internet hosts can be fetched"


@dataclass(frozen=True)
class FetchPolicy:
    """Bounds and permissions of `fetch`.

    Attributes:
        deadline_s: Wall-clock limit of the whole exchange, redirects included.
        max_bytes: Largest body kept, counted after decompression (and before it).
        max_redirects: Redirects followed before giving up.
        allow_hosts: Host names (exact, case-insensitive) allowed whatever they resolve to.
        allow_networks: CIDR networks (e.g. "127.0.0.1/32") whose addresses are allowed.
        ca_file: PEM bundle to verify https servers with instead of the default roots.
        user_agent: Sent as the User-Agent header.
    """

    deadline_s: float = 10.0
    max_bytes: int = 1 * MiB
    max_redirects: int = 5
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[str, ...] = ()
    ca_file: str | None = None
    user_agent: str = "agentrl-http_get/0.1"

    def __post_init__(self) -> None:
        if not self.deadline_s > 0 or not self.max_bytes > 0 or self.max_redirects < 0:
            raise ValueError(f"FetchPolicy needs deadline_s > 0, max_bytes > 0, max_redirects >= 0; got {self!r}")
        if isinstance(self.allow_hosts, str) or isinstance(self.allow_networks, str):
            raise ValueError("FetchPolicy.allow_hosts / allow_networks take a collection of strings, not one string")
        object.__setattr__(self, "allow_hosts", frozenset(h.lower().strip("[]") for h in self.allow_hosts))
        object.__setattr__(self, "allow_networks", tuple(self.allow_networks))
        for net in self.allow_networks:
            try:
                ipaddress.ip_network(net)
            except ValueError as exc:
                raise ValueError(f"FetchPolicy.allow_networks: {net!r} is not a CIDR network like '10.0.0.0/8' ({exc})") from None


@dataclass(frozen=True)
class FetchResult:
    """A completed response (any status code; redirects already followed).

    Attributes:
        url: The final URL, after redirects.
        status_code: HTTP status of the final response.
        reason: Its reason phrase.
        content_type: The Content-Type header, or "".
        content: The decompressed body.
        encoding: Charset from Content-Type, else "utf-8".
    """

    url: str
    status_code: int
    reason: str
    content_type: str
    content: bytes
    encoding: str = "utf-8"

    @property
    def text(self) -> str:
        try:
            return self.content.decode(self.encoding, errors="replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", errors="replace")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches, for the forms that embed one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are judged as IPv6
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses.

    Loopback, private, link-local (cloud metadata 169.254.169.254 included), CGNAT, IETF protocol
    assignments (192.0.0.0/24, Oracle Cloud's metadata 192.0.0.192 included), multicast,
    unspecified, reserved, documentation, unique-local and site-local addresses are not public;
    an IPv6 address that embeds an IPv4 one is judged by the IPv4 address.

    Example:
        >>> is_public_address(ipaddress.ip_address("::ffff:10.0.0.1"))
        False
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(embedded)
        if ip in _UNIQUE_LOCAL or ip.is_site_local:
            return False
    elif ip in _CGNAT:
        return False
    if any(ip in net for net in _NEVER_PUBLIC if net.version == ip.version):
        return False
    special = ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    return ip.is_global and not special


def _address_allowed(ip: IPAddress, host: str, policy: FetchPolicy) -> bool:
    if host.lower() in policy.allow_hosts:
        return True
    forms = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
        forms.append(embedded)
    for net in map(ipaddress.ip_network, policy.allow_networks):
        if any(form.version == net.version and form in net for form in forms):
            return True
    return is_public_address(ip)


def _checked_url(url: str | httpx.URL, what: str = "the URL") -> httpx.URL:
    """Parse and check the parts of a URL that need no network: scheme, host, credentials."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        host = parsed.host  # decodes the IDNA labels: `xn--` garbage fails here, not inside a later error message
    except (httpx.InvalidURL, TypeError, ValueError) as exc:  # IDNAError is a ValueError
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, f"{what} is not a valid URL ({exc}); give an absolute URL like https://example.com/page") from None
    if parsed.scheme not in ("http", "https"):
        scheme = f"{parsed.scheme}://" if parsed.scheme else "a relative"
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, f"{what} is {scheme} URL; only absolute http:// and https:// URLs can be fetched")
    if not host:
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, f"{what} has no host; give an absolute URL like https://example.com/page")
    if parsed.port is not None and not 0 < parsed.port < 65536:  # httpx accepts any number; connect() would not
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, f"{what} has port {parsed.port}; ports are 1 to 65535")
    if parsed.userinfo:
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, f"{what} contains credentials (user:password@), which are not supported")
    return parsed


async def _resolve_checked(url: httpx.URL, policy: FetchPolicy) -> list[str]:
    """Every address of the URL's host, all checked; refuses the host if any one is not allowed."""
    host = url.raw_host.decode("ascii")  # IDNA-encoded, IPv6 without brackets
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ToolError(ToolErrorKind.RUNTIME, f"could not resolve the host name {url.host!r}") from None
    ips = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not ips or not all(_address_allowed(ip, host, policy) for ip in ips):
        raise ToolError(ToolErrorKind.INVALID_ARGUMENTS, f"the address of {url.host!r} is not allowed: {_NOT_ALLOWED}")
    return [str(ip) for ip in ips]


class _BoundedInflater:
    """Decodes one Content-Encoding chunk by chunk, never producing more than asked for."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._started = False
        if encoding in ("", "identity"):
            self._z = None
        elif encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.decompressobj(zlib.MAX_WBITS)
        else:
            raise ToolError(ToolErrorKind.RUNTIME, f"the server sent an unsupported content encoding {encoding!r}")

    def feed(self, data: bytes, limit: int) -> bytes:
        """Decode `data`, returning at most `limit` (> 0) bytes; `limit` bytes back means 'at least'."""
        if self._z is None:
            return data[:limit]
        try:
            out = self._z.decompress(data, limit)
        except zlib.error:
            if self.encoding == "deflate" and not self._started:  # raw deflate, without the zlib header
                self._z, self._started = zlib.decompressobj(-zlib.MAX_WBITS), True
                return self.feed(data, limit)
            raise ToolError(ToolErrorKind.RUNTIME, f"the response body is not valid {self.encoding} data") from None
        self._started = True
        return out


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    encoding = response.headers.get("content-encoding", "").strip().lower()
    inflater = _BoundedInflater(encoding)
    body, raw_total = bytearray(), 0
    async for raw in response.aiter_raw():
        raw_total += len(raw)
        body += inflater.feed(raw, max_bytes - len(body) + 1)
        if len(body) > max_bytes or raw_total > max_bytes:
            raise ToolError(
                ToolErrorKind.OUTPUT_TOO_LARGE,
                f"the response is larger than {max_bytes} bytes; fetch a smaller resource or a more specific URL",
            )
    return bytes(body)


def _client(policy: FetchPolicy) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=policy.ca_file) if policy.ca_file else True
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        verify=verify,
        timeout=httpx.Timeout(policy.deadline_s),
        headers={"User-Agent": policy.user_agent, "Accept-Encoding": "gzip, deflate"},
    )


async def _send_pinned(client: httpx.AsyncClient, url: httpx.URL, ips: list[str]) -> httpx.Response:
    """GET `url` from the first checked address that accepts a connection."""
    host_header = url.netloc.decode("ascii")
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    for i, ip in enumerate(ips):
        request = client.build_request("GET", url.copy_with(host=ip), headers={"Host": host_header}, extensions=extensions)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError:
            if i == len(ips) - 1:
                raise
        except (httpx.InvalidURL, ValueError):
            # Even without following, httpx builds a redirect's next request from the Location header, and
            # some malformed ones (`http:x`, a bad IDNA label) raise InvalidURL or IDNAError there, not an
            # HTTPError; the response is already closed by then.
            raise ToolError(ToolErrorKind.RUNTIME, "the server sent an invalid redirect location") from None
    raise AssertionError("unreachable: _resolve_checked returns at least one address")


async def _follow(client: httpx.AsyncClient, url: httpx.URL, policy: FetchPolicy) -> FetchResult:
    for _ in range(policy.max_redirects + 1):
        ips = await _resolve_checked(url, policy)
        try:
            response = await _send_pinned(client, url, ips)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECT_CODES and location:
                    try:
                        next_url = url.join(location)
                    except (httpx.InvalidURL, ValueError):
                        raise ToolError(ToolErrorKind.RUNTIME, "the server sent an invalid redirect location") from None
                    url = _checked_url(next_url, "the redirect target")
                    continue
                content = await _read_capped(response, policy.max_bytes)
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            raise ToolError(ToolErrorKind.TIMEOUT, f"the request did not complete within {policy.deadline_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ToolError(ToolErrorKind.RUNTIME, f"fetching from {url.host!r} failed: {type(exc).__name__}") from None
        return FetchResult(
            url=str(url),
            status_code=response.status_code,
            reason=response.reason_phrase,
            content_type=response.headers.get("content-type", ""),
            content=content,
            encoding=response.charset_encoding or "utf-8",
        )
    raise ToolError(ToolErrorKind.RUNTIME, f"more than {policy.max_redirects} redirects; the server may be redirecting in a loop")


async def fetch(url: str, policy: FetchPolicy = FetchPolicy()) -> FetchResult:
    """GET a URL under `policy`: SSRF-checked, pinned, capped and bounded by one deadline.

    Args:
        url: Absolute http:// or https:// URL.
        policy: Deadline, size cap, redirect limit and allow-lists.

    Returns:
        The final response after redirects, whatever its status code.

    Raises:
        ToolError: INVALID_ARGUMENTS, TIMEOUT, OUTPUT_TOO_LARGE or RUNTIME (see the module docstring).

    Example:
        >>> policy = FetchPolicy(deadline_s=5, allow_networks=("127.0.0.1/32",))
        >>> result = asyncio.run(fetch("http://127.0.0.1:8000/", policy))  # doctest: +SKIP
    """
    target = _checked_url(url)
    try:
        async with asyncio.timeout(policy.deadline_s):
            async with _client(policy) as client:
                return await _follow(client, target, policy)
    except TimeoutError:
        raise ToolError(ToolErrorKind.TIMEOUT, f"the request did not complete within {policy.deadline_s:g} s") from None
