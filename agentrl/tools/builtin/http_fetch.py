"""The builtin `http_get` tool: fetch a public URL and return its body as text.

Everything that makes this safe (SSRF guard, address pinning, one deadline, a byte cap that holds
after decompression) lives in `agentrl.tools.http`; this module only shapes the answer a model
reads. A non-2xx response is an answer, not a tool error: the status line comes first so the
model can tell a 404 page from the page it wanted. Binary bodies are summarised, not dumped.
"""

from __future__ import annotations

from agentrl.tools.core import Tool, ToolPolicy, tool
from agentrl.tools.http import FetchPolicy, FetchResult, fetch

_TEXT_MARKERS = ("text/", "json", "xml", "javascript", "yaml", "csv", "x-www-form-urlencoded")


def format_response(result: FetchResult) -> str:
    """The body as text (or a one-line summary of a binary body), behind a status line unless 2xx."""
    content_type = result.content_type.lower()
    if not content_type or any(marker in content_type for marker in _TEXT_MARKERS):
        body = result.text
    else:
        body = f"[{len(result.content)} bytes of {result.content_type}, not shown]"
    if 200 <= result.status_code < 300:
        return body
    return f"HTTP {result.status_code} {result.reason}\n\n{body}"


def make_http_get_tool(policy: FetchPolicy = FetchPolicy()) -> Tool:
    """Build an `http_get` tool bound to `policy` (e.g. with an allow-list for private services)."""

    async def http_get(url: str) -> str:
        """Fetch a web page or JSON API with an HTTP GET and return the body as text.

        Only public http:// and https:// addresses can be fetched; redirects are followed.

        Args:
            url: An absolute URL, e.g. "https://example.com/page".
        """
        return format_response(await fetch(url, policy))

    return tool(http_get, policy=ToolPolicy(timeout_s=policy.deadline_s + 2.0))


http_get_tool = make_http_get_tool()
