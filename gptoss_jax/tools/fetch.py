"""Fetching web pages for the browser tool, refusing what a server's own network holds, and turning HTML
into the text the browser shows.

    fetcher = SafeFetcher(allow=["127.0.0.1:8080", "intranet.example", "10.1.0.0/16"])
    doc = await fetcher.fetch("https://example.com/")   # -> base.Document(url, title, text); ToolError if refused

The rules (`SafeFetcher`)
-------------------------
* Only `http` and `https` URLs.
* Every host is resolved here (`resolve`, the system's resolver through `getaddrinfo`), and every address
  it resolves to must be a global one: loopback, link-local, private, shared (100.64/10), multicast,
  reserved, documentation and unspecified addresses are refused, IPv4 and IPv6 alike, and so are IPv6
  addresses that carry such an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, 6to4, Teredo, NAT64
  `64:ff9b::/96`). A host with one refused address among several is refused whole.
* The connection goes to the address that was checked: the request is sent to that IP literal, with the
  `Host` header (and, for https, the TLS server name and the certificate check) of the original host, so a
  second DNS answer cannot swap the target (no DNS-rebinding window). Proxies from the environment are
  ignored (`trust_env=False`).
* Redirects are followed here, at most `max_redirects` of them, and each hop is checked the same way before
  anything is sent to it.
* `allow` lifts the rule for what an operator names (`serve --browser-allow`): a host name (`intranet.lan`:
  whatever it resolves to), an address or network (`10.0.0.0/8`, `::1`, `fd00::/8`), each optionally with
  a port (`127.0.0.1:8080`, `[::1]:8080`, `intranet.lan:8443`), which then allows that port only.
* Caps: `max_bytes` of (decoded) body per page, read no further (the text says it was cut); `timeout_s` for
  the whole fetch, redirects and DNS included; non-text content types are refused (text/*, XHTML, XML and
  JSON are read).
* Every failure is a `ToolError` with a one-line message meant for the model.

HTML to text (`html_to_text`)
-----------------------------
Parsed with lxml and laid out as text by inscriptis (tables, lists and block structure kept; scripts and
styles dropped). Each link becomes a Markdown link `[text](absolute URL)` before the layout, which the browser
tool turns into its numbered `【id†text†domain】` links; an image shows as `[alt text]`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urldefrag, urljoin, urlsplit

from .base import Document, ToolError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_TEXT_TYPES = ("application/xhtml+xml", "application/xml", "application/json")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
_SKIP_LINK = ("mailto:", "javascript:", "tel:", "data:")


# ---- addresses ------------------------------------------------------------------------------------------


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, Teredo's client, NAT64), if any: what a
    packet to it may reach, so it is what gets checked."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_kind(ip: IPAddress) -> str | None:
    """Why an address is refused ("loopback", "private", ...), or None for a global one."""
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_ipv4(ip)
        if v4 is not None:
            kind = address_kind(v4)
            return f"{kind} (as {v4})" if kind else None
    for kind, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("shared (carrier-grade NAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED),
        ("non-global", not ip.is_global),
    ):
        if flag:
            return kind
    return None


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (the system resolver, off the event loop). Tests replace this."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ToolError(f"cannot resolve host `{host}`: {e.strerror or e}") from None
    seen: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


@dataclass(frozen=True)
class _Rule:
    host: str | None  # a host name, as written in URLs (lower case)
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None  # None: any port

    def allows_port(self, port: int) -> bool:
        return self.port is None or self.port == port


def parse_allow(entries: Iterable[str]) -> list[_Rule]:
    """`allow` entries: `host`, `host:port`, `address`, `network/len`, `[v6]:port`, `address:port`.
    ValueError names a bad one."""
    if isinstance(entries, str):
        entries = [entries]
    rules = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"allow: each entry must be a host, address or network, got {entry!r}")
        text, port = entry.strip(), None
        if text.startswith("["):
            inner, bracket, rest = text[1:].partition("]")
            if not bracket or rest and not rest.startswith(":"):
                raise ValueError(f"allow: bad entry {entry!r} (expected [ipv6]:port)")
            text, port = inner, rest[1:] or None
        elif text.count(":") == 1:
            text, port = text.split(":")
        if port is not None:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"allow: bad port in {entry!r}")
            port = int(port)
        try:
            rules.append(_Rule(None, ipaddress.ip_network(text, strict=False), port))
            continue
        except ValueError:
            pass
        host = text.lower().rstrip(".")
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", host):
            raise ValueError(f"allow: {entry!r} is not a host name, an address or a network")
        rules.append(_Rule(host, None, port))
    return rules


# ---- HTML to text ---------------------------------------------------------------------------------------


def _link_text(text: str) -> str:
    text = " ".join(text.split())
    return text.replace("[", "(").replace("]", ")")


def _link_url(url: str) -> str:
    """A URL that a Markdown link can hold: no spaces, parentheses or angle brackets left bare."""
    for c, q in (
        (" ", "%20"),
        ("(", "%28"),
        (")", "%29"),
        ("<", "%3C"),
        (">", "%3E"),
        ("\n", ""),
        ("\t", ""),
    ):
        url = url.replace(c, q)
    return url


def html_to_text(
    html: str, base_url: str, join: Callable[[str, str], str | None] | None = None
) -> tuple[str, str]:
    """(title, text) of an HTML page; links as Markdown links to absolute URLs (`join(base_url, href)`,
    urljoin by default; None drops a link, keeping its text)."""
    import lxml.html
    from inscriptis import Inscriptis
    from inscriptis.model.config import ParserConfig
    from lxml.etree import ParserError

    html = _XML_DECLARATION.sub("", html, count=1)
    if not html.strip():
        return "", ""
    try:
        tree = lxml.html.document_fromstring(html)
    except (ParserError, ValueError):
        return "", ""
    title_node = tree.find(".//title")
    title = " ".join((title_node.text_content() if title_node is not None else "").split())
    for node in tree.xpath("//script|//style|//noscript|//template|//title"):
        node.drop_tree()

    join = join or (lambda base, href: urljoin(base, href))
    for a in tree.iter("a"):
        href = (a.get("href") or "").strip()
        if not href or href.startswith("#") or href.lower().startswith(_SKIP_LINK):
            continue
        try:
            target = join(base_url, href)
        except ValueError:
            target = None
        if not target:
            continue
        target = urldefrag(target)[0]
        text = _link_text(a.text_content())
        if not text:
            alts = [_link_text(img.get("alt") or "") for img in a.iter("img")]
            text = next((t for t in alts if t), "")
        if not text:
            continue
        for child in list(a):
            a.remove(child)  # their text is in `text`; a.tail (after the link) stays
        a.text = f"[{text}]({_link_url(target)})"
    config = ParserConfig(display_images=True, display_links=False, display_anchors=False)
    text = Inscriptis(tree, config).get_text()
    lines = [line.rstrip() for line in text.splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return title, text


def detect_charset(content_type: str, body: bytes) -> str:
    m = re.search(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", content_type, re.IGNORECASE)
    if m is None and "html" in content_type:
        m = _META_CHARSET.search(body[:4096])
        name = m.group(1).decode("ascii", "replace") if m else "utf-8"
    else:
        name = m.group(1) if m else "utf-8"
    try:
        "".encode(name)
    except LookupError:
        return "utf-8"
    return name


def body_to_document(url: str, content_type: str, body: bytes, truncated: bool = False) -> Document:
    """What the browser shows of a fetched body (HTML laid out as text, anything else as it is)."""
    text = body.decode(detect_charset(content_type, body), errors="replace")
    mime = content_type.split(";")[0].strip().lower()
    title = ""
    if mime in _HTML_TYPES or (
        not mime and text.lstrip()[:15].lower().startswith(("<!doctype html", "<html"))
    ):
        title, text = html_to_text(text, url)
    if truncated:
        text += "\n\n[the page was cut here: it is larger than this browser reads]"
    return Document(url=url, title=title or url, text=text)


# ---- the fetcher ----------------------------------------------------------------------------------------


class SafeFetcher:
    """Fetches http(s) pages for the model, refusing private networks (see the module's docstring).

    SafeFetcher(allow=(), max_bytes=2 MiB, timeout_s=20.0, max_redirects=5, user_agent=..., verify=True)

    `verify`: TLS certificate verification (True, False or an `ssl.SSLContext`), passed to httpx.
    """

    name = "web"

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        max_bytes: int = 2 << 20,
        timeout_s: float = 20.0,
        max_redirects: int = 5,
        user_agent: str = "gptoss-jax-browser/0.1 (+https://github.com/openai/gpt-oss)",
        verify=True,
    ):
        for field, value in (("max_bytes", max_bytes), ("timeout_s", timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field} must be a positive number, got {value!r}")
        if isinstance(max_redirects, bool) or not isinstance(max_redirects, int) or max_redirects < 0:
            raise ValueError(f"max_redirects must be a non-negative integer, got {max_redirects!r}")
        self.rules = parse_allow(allow)
        self.max_bytes = int(max_bytes)
        self.timeout_s = float(timeout_s)
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self.verify = verify

    # the checks, before anything is sent

    async def _target(self, url: str) -> tuple[str, str, int, list[str]]:
        """(scheme, host, port, addresses to connect to) of a URL that passed the rules; ToolError if not."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ToolError(f"bad URL `{url}`: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ToolError(f"cannot open `{url}`: only http and https URLs can be fetched")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ToolError(f"bad URL `{url}`: no host")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ToolError(f"bad URL `{url}`: the host name is not valid") from None
        port = port or (443 if scheme == "https" else 80)
        named = any(r.host == host and r.allows_port(port) for r in self.rules)
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            addresses = await resolve(host, port)
        if not addresses:
            raise ToolError(f"cannot resolve host `{host}`")
        if not named:
            for address in addresses:
                ip = ipaddress.ip_address(address.split("%")[0])
                kind = address_kind(ip)
                if kind and not any(
                    r.net is not None and ip in r.net and r.allows_port(port) for r in self.rules
                ):
                    shown = host if host == address else f"`{host}` ({address})"
                    raise ToolError(
                        f"refused to open {shown}: a {kind} address; this browser does not open local or "
                        "private network addresses"
                    )
        return scheme, host, port, addresses

    async def get(self, url: str) -> tuple[str, str, bytes, bool]:
        """(final URL, content type, body, truncated) of a text page, after the checks and redirects."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._get(url)
        except TimeoutError:
            raise ToolError(f"fetching `{url}` timed out after {self.timeout_s:g} s") from None

    async def _get(self, url: str) -> tuple[str, str, bytes, bool]:
        import httpx

        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(
            trust_env=False, follow_redirects=False, verify=self.verify, timeout=timeout
        ) as client:
            for _hop in range(self.max_redirects + 1):
                scheme, host, port, addresses = await self._target(url)
                response = await self._send(client, url, scheme, host, port, addresses)
                try:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = urldefrag(urljoin(url, response.headers["location"]))[0]
                        continue
                    return await self._read(url, response)
                finally:
                    await response.aclose()
            raise ToolError(f"too many redirects (more than {self.max_redirects}) from `{url}`")

    async def _send(self, client, url: str, scheme: str, host: str, port: int, addresses: list[str]):
        import httpx

        parts = urlsplit(url)
        default = 443 if scheme == "https" else 80
        host_header = (f"[{host}]" if ":" in host else host) + ("" if port == default else f":{port}")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        error: Exception | None = None
        for address in addresses:
            literal = f"[{address}]" if ":" in address else address
            request = client.build_request(
                "GET",
                f"{scheme}://{literal}:{port}{path}",
                headers={
                    "Host": host_header,
                    "User-Agent": self.user_agent,
                    "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5",
                },
                extensions={"sni_hostname": host} if scheme == "https" else {},
            )
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError as e:  # the next address of the host, if it has one
                error = e
            except httpx.HTTPError as e:
                raise ToolError(f"fetching `{url}` failed: {e.__class__.__name__}: {e}") from None
        raise ToolError(f"cannot connect to `{host}`: {error}")

    async def _read(self, url: str, response) -> tuple[str, str, bytes, bool]:
        import httpx

        if response.status_code >= 400:
            raise ToolError(f"`{url}` answered HTTP {response.status_code} {response.reason_phrase}".rstrip())
        content_type = response.headers.get("content-type", "")
        mime = content_type.split(";")[0].strip().lower()
        if mime and not (mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith(("+xml", "+json"))):
            raise ToolError(f"`{url}` is {mime}, not text: this browser reads only text and HTML pages")
        chunks, size, truncated = [], 0, False
        try:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_bytes:
                    truncated = True
                    break
        except httpx.HTTPError as e:
            raise ToolError(f"reading `{url}` failed: {e.__class__.__name__}: {e}") from None
        body = b"".join(chunks)[: self.max_bytes]
        if not mime and b"\0" in body[:1024]:
            raise ToolError(f"`{url}` is binary, not text: this browser reads only text and HTML pages")
        return url, content_type, body, truncated

    async def fetch(self, url: str) -> Document:
        """The page at `url` as a Document (HTML laid out as text, links as Markdown links)."""
        if not isinstance(url, str) or not url.strip():
            raise ToolError("no URL to open")
        final_url, content_type, body, truncated = await self.get(url.strip())
        return await asyncio.to_thread(body_to_document, final_url, content_type, body, truncated)
