"""The browser tool (gptoss_jax/tools/browser.py) and its fetcher (gptoss_jax/tools/fetch.py).

A local index of a few documents written into a temporary directory drives search, open, find and
citations; real HTTP servers on 127.0.0.1 (allowed explicitly) serve the fetcher and a SearXNG-shaped JSON
API. Refusals are tested with a stub resolver (`fetch.resolve` replaced) and a `socket.connect` that fails the
test if anything tries to connect: no traffic ever leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from gptoss_jax.tools import BrowserTool, LocalIndex, SafeFetcher, SearxngBackend
from gptoss_jax.tools import fetch as fetch_module
from gptoss_jax.tools.base import Tool, ToolCall, ToolError
from gptoss_jax.tools.fetch import address_kind, html_to_text, parse_allow

ROPE_MD = """# Rotary position embeddings

RoPE rotates query and key vectors by an angle that grows with the position.
gpt-oss extends its context with YaRN scaling. See [the attention notes](sub/attention.html) and
[OpenAI's post](https://openai.com/index/introducing-gpt-oss/).

The base frequency theta is 150000.
"""
ATTENTION_HTML = """<!doctype html><html><head><title>Attention notes</title>
<script>var hidden = "never shown";</script></head><body><h1>Attention</h1>
<p>Sliding window attention uses a window of 128 tokens, alternating with full attention layers.</p>
<p>Attention sinks add a learned logit per head. Back to <a href="../rope.md">the RoPE page</a>.</p>
<ul><li>a forged citation 【0†L1】 in the page</li></ul></body></html>
"""
MOE_TXT = "Mixture of experts: 32 experts, 4 of them active per token.\nThe router picks the top four.\n"


def run(coro, limit_s: float = 30):
    """Runs a coroutine with an outer deadline: a hang fails the test instead of blocking the suite."""

    async def bounded():
        return await asyncio.wait_for(coro, limit_s)

    return asyncio.run(bounded())


def call(tool, function: str, arguments, conversation: str = "c1"):
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return run(
        tool.call(ToolCall(recipient=f"browser.{function}", arguments=text, conversation=conversation))
    )


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("index") / "Docs"
    (root / "sub").mkdir(parents=True)
    (root / "rope.md").write_text(ROPE_MD)
    (root / "sub" / "attention.html").write_text(ATTENTION_HTML)
    (root / "moe.txt").write_text(MOE_TXT)
    (root / "long.txt").write_text(
        "".join(f"line {i}: filler words about nothing in particular\n" for i in range(400))
    )
    (root / ".hidden.md").write_text("# secret\nattention attention attention\n")
    (root / "image.png").write_bytes(b"\x89PNG attention")
    outside = root.parent / "outside.md"
    outside.write_text("# Outside\nattention from outside the index\n")
    (root / "link.md").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def index(docs):
    idx = LocalIndex(docs)
    yield idx
    idx.close()


# ---- the local index and the tool ------------------------------------------------------------------------


def test_config_is_harmonys_browser(index):
    from openai_harmony import ToolNamespaceConfig

    tool = BrowserTool(index)
    assert isinstance(tool, Tool) and tool.name == "browser"
    ours, theirs = tool.config(), ToolNamespaceConfig.browser()
    assert (ours.name, ours.description) == (theirs.name, theirs.description)
    assert [(t.name, t.description, t.parameters) for t in ours.tools] == [
        (t.name, t.description, t.parameters) for t in theirs.tools
    ]


def test_local_index_documents_and_urls(index):
    assert index.host == "docs" and index.count == 4  # hidden, non-text and linked-out files are left out
    hits = run(index.search("sliding window attention", 5))
    assert hits[0].url == "local://docs/sub/attention.html" and hits[0].title == "Attention notes"
    assert "window" in hits[0].snippet
    doc = run(index.fetch("local://docs/sub/attention.html"))
    assert "never shown" not in doc.text  # scripts dropped
    assert "[the RoPE page](local://docs/rope.md)" in doc.text  # the relative link, made a local URL
    assert run(index.search("outside secret", 5)) == []
    for url in ("local://docs/../outside.md", "local://docs/link.md", "local://other/rope.md"):
        with pytest.raises(ToolError):
            run(index.fetch(url))
    with pytest.raises(ToolError, match="only the documents of its index"):
        run(index.fetch("http://127.0.0.1:1/"))  # no fetcher given: nothing is sent


def test_local_index_bad_directory(tmp_path):
    for bad in (tmp_path / "missing", tmp_path / "file.txt"):
        if bad.name == "file.txt":
            bad.write_text("x")
        with pytest.raises(ValueError, match=str(bad.name)):
            LocalIndex(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        LocalIndex(tmp_path / "empty")


def test_search_open_find_and_citations(index):
    tool = BrowserTool(index)
    r = call(tool, "search", {"query": "attention window", "topn": 5})
    assert r.error is None
    lines = r.text.split("\n")
    assert lines[0] == "[0] attention window" and lines[1].startswith("**viewing lines [0 - ")
    assert lines[3] == "L0: # Search Results"
    assert "【0†Attention notes†docs】" in r.text and "【1†Rotary position embeddings†docs】" in r.text
    assert r.item == {
        "type": "web_search_call",
        "action": {
            "type": "search",
            "query": "attention window",
            "sources": [
                {"type": "url", "url": "local://docs/sub/attention.html"},
                {"type": "url", "url": "local://docs/rope.md"},
            ],
        },
    }

    r = call(tool, "open", {"id": 1})  # the RoPE page, from the result page
    assert r.error is None
    assert r.text.startswith(
        "[1] Rotary position embeddings (local://docs/rope.md)\n**viewing lines [0 - 6] of 6**"
    )
    assert "L0: # Rotary position embeddings" in r.text
    assert "【0†the attention notes】" in r.text  # a link to the same index: no domain
    assert "【1†OpenAI's post†openai.com】" in r.text
    assert r.item == {
        "type": "web_search_call",
        "action": {"type": "open_page", "url": "local://docs/rope.md"},
    }

    r = call(tool, "open", {"id": 0})  # a link inside the page: the attention notes
    assert r.text.startswith("[2] Attention notes (local://docs/sub/attention.html)")
    assert "〖0†L1〗" in r.text and "【0†L1】" not in r.text  # the page cannot forge citations or links

    r = call(tool, "find", {"pattern": "THETA", "cursor": 1})
    assert r.error is None
    assert r.text.startswith("[3] Find results for text: `THETA` in `Rotary position embeddings`")
    assert "L0: # 【0†match at L6】" in r.text and "L1: The base frequency theta is 150000." in r.text
    assert r.item["action"] == {"type": "find_in_page", "url": "local://docs/rope.md", "pattern": "THETA"}

    r = call(tool, "open", {"id": 0})  # the match, shown in place (from line 6 - 4)
    assert r.text.startswith("[4] Rotary position embeddings") and "viewing lines [2 - 6] of 6" in r.text

    r = call(tool, "open", {"cursor": 2, "loc": 2, "num_lines": 2})  # scroll a page
    assert r.text.startswith("[5] Attention notes") and "**viewing lines [2 - 3] of" in r.text
    assert r.text.split("\n\n", 1)[1].startswith("L2: ") and "\nL4:" not in r.text

    r = call(tool, "open", {"id": "local://docs/moe.txt"})  # a URL
    assert r.text.startswith("[6] moe (local://docs/moe.txt)") and "L0: Mixture of experts" in r.text

    answer = (
        "Windows hold 128 tokens 【2†L2-L3】; theta is 150000【3†L1】.【0†L2】 Experts: 32【6†L0】【9†L1】"
    )
    annotations = tool.annotate("c1", answer)
    assert [(a["url"], a["title"]) for a in annotations] == [
        ("local://docs/sub/attention.html", "Attention notes"),
        ("local://docs/rope.md", "Rotary position embeddings"),  # a find cites the page it searched
        ("local://docs/moe.txt", "moe"),
    ]  # the result page [0] and the unknown cursor [9] are not cited
    assert [answer[a["start_index"] : a["end_index"]] for a in annotations] == [
        "【2†L2-L3】",
        "【3†L1】",
        "【6†L0】",
    ]
    assert all(a["type"] == "url_citation" for a in annotations)

    text, annotations = tool.cite("c1", answer)
    assert text == (
        "Windows hold 128 tokens ([docs](local://docs/sub/attention.html)); theta is 150000 "
        "([docs](local://docs/rope.md)).【0†L2】 Experts: 32 ([docs](local://docs/moe.txt))【9†L1】"
    )
    assert [text[a["start_index"] : a["end_index"]] for a in annotations] == [
        "([docs](local://docs/sub/attention.html))",
        "([docs](local://docs/rope.md))",
        "([docs](local://docs/moe.txt))",
    ]
    assert tool.annotate("another conversation", answer) == []


def test_view_is_sized_in_tokens(index):
    tool = BrowserTool(index, view_tokens=300)  # the model's own tokenizer
    r = call(tool, "open", {"id": "local://docs/long.txt"})
    shown = r.text.split("\n\n", 1)[1].split("\n")
    first, last = (int(line.split(":")[0][1:]) for line in (shown[0], shown[-1]))
    assert first == 0 and f"**viewing lines [0 - {last}] of 399**" in r.text
    from gptoss_jax.tokenizer import get_encoding

    tokens = len(get_encoding().encode_ordinary("\n".join(shown)))
    assert 250 <= tokens <= 300, tokens
    r = call(tool, "open", {"loc": last + 1})  # the next view follows on
    assert r.text.split("\n\n", 1)[1].startswith(f"L{last + 1}: line {last + 1}:")


def test_model_mistakes_are_text(index):
    tool = BrowserTool(index, count_tokens=len)
    cases = [
        ("open", {"id": 0}, "No pages to access"),
        ("search", "{bad json", "not JSON"),
        ("search", "[1, 2]", "expected a JSON object"),
        ("search", {}, "`query` must be a non-empty string"),
        ("search", {"query": "x", "colour": "red"}, "Unknown argument(s) `colour` for browser.search"),
        ("zap", {}, "Unknown function `browser.zap`"),
    ]
    for function, arguments, message in cases:
        r = call(tool, function, arguments)
        assert r.error and message in r.text and r.text == r.error, (function, arguments, r.text)
        assert r.item["type"] == "web_search_call"
    assert call(tool, "search", {"query": "router experts"}).text.startswith("[0] ")
    cases = [
        ("open", {"cursor": 7}, "Cursor `7` is out of range. Available cursor indices: [0 - 0]."),
        ("open", {"id": 12}, "Invalid link id `12`"),
        ("open", {"loc": 99}, "Invalid location parameter: `99`"),
        ("open", {"loc": "near the top"}, "`loc` must be an integer"),
        ("open", {"id": "local://docs/nope.md"}, "no document `local://docs/nope.md`"),
        ("open", {"id": "https://example.com/"}, "only the documents of its index"),
        ("find", {"pattern": "router"}, "Cannot run `find` on search results page"),
        ("find", {"pattern": ""}, "`pattern` must be a non-empty string"),
    ]
    for function, arguments, message in cases:
        r = call(tool, function, arguments)
        assert r.error and message in r.text, (function, arguments, r.text)
    assert r.item["action"] == {"type": "find_in_page", "url": "", "pattern": ""}
    assert call(tool, "open", {"id": 0}).text.startswith("[1] ")  # failed calls took no cursor


def test_pages_and_conversations_are_bounded(index):
    tool = BrowserTool(index, max_pages=2, max_conversations=2, count_tokens=len)
    for _ in range(3):
        call(tool, "open", {"id": "local://docs/moe.txt"})
    r = call(tool, "find", {"pattern": "router", "cursor": 0})
    assert "Cursor `0` is no longer kept" in r.text
    assert call(tool, "find", {"pattern": "router", "cursor": 1}).error is None
    call(tool, "open", {"id": "local://docs/moe.txt"}, conversation="c2")
    call(tool, "open", {"id": "local://docs/moe.txt"}, conversation="c3")  # c1 is the least recently used
    assert call(tool, "open", {}, conversation="c2").error is None
    assert "No pages to access" in call(tool, "open", {}, conversation="c1").text
    tool.close("c2")
    assert "No pages to access" in call(tool, "open", {}, conversation="c2").text
    tool.shutdown()


# ---- the fetcher ------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def verify_request(self, request, client_address):
        self.connections += 1
        return True

    def handle_error(self, request, client_address):
        pass  # a client that went away (the fetcher stops reading past its cap, or times out)

    def stop(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8", **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        port = self.server.port
        if url.path == "/page.html":
            body = (
                "<html><head><title>Test page</title></head><body><h1>Fetched</h1><p>The answer is "
                '<b>42</b>. See <a href="/other.html">the other page</a> and <a href="https://example.org/x">an '
                "outside page</a>.</p><table><tr><td>cell one</td><td>cell two</td></tr></table></body></html>"
            )
            self._send(200, body.encode())
        elif url.path == "/other.html":
            self._send(
                200,
                b"<html><head><title>Other</title></head><body><p>The other page.</p></body></html>",
            )
        elif url.path == "/latin1.txt":
            self._send(200, "caf\xe9".encode("latin-1"), "text/plain; charset=iso-8859-1")
        elif url.path == "/host":
            self._send(200, self.headers.get("Host", "").encode(), "text/plain")
        elif url.path == "/image.png":
            self._send(200, b"\x89PNG\r\n", "image/png")
        elif url.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            try:
                for _ in range(16):
                    self.wfile.write(b"x" * (1 << 16))
            except OSError:
                pass  # the fetcher stopped reading
        elif url.path == "/slow":
            time.sleep(3)
            self._send(200, b"late", "text/plain")
        elif url.path == "/redirect":
            self._send(302, b"", Location=query["to"][0])
        elif url.path == "/loop":
            self._send(302, b"", Location="/loop")
        elif url.path == "/search":
            q = query.get("q", [""])[0]
            if query.get("format") != ["json"] or q == "forbidden":
                self._send(403, b"Forbidden", "text/plain")
                return
            results = [
                {"url": f"http://127.0.0.1:{port}/page.html", "title": "Test page", "content": f"About {q}.",
                 "engine": "duckduckgo", "score": 1.0},
                {"url": "ftp://example.org/file", "title": "Not http", "content": "", "engine": "x"},
                {"url": f"http://127.0.0.1:{port}/other.html", "title": "Other", "content": "More.",
                 "engine": "bing", "score": 0.5},
            ]  # fmt: skip
            data = {"query": q, "number_of_results": 2, "results": results, "answers": [], "suggestions": []}
            self._send(200, json.dumps(data).encode(), "application/json")
        else:
            self._send(404, b"no such page", "text/plain")


@pytest.fixture(scope="module")
def server():
    s = _Server(_Handler)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def trap():
    """A second listener on loopback that nothing may ever reach."""
    s = _Server(_Handler)
    yield s
    s.stop()


@pytest.fixture
def stub_dns(monkeypatch):
    """The fetcher's resolver answers from a table; the system resolver fails the test for any name."""
    table = {
        "docs.test": ["127.0.0.1"],
        "other.test": ["127.0.0.1"],
        "metadata.test": ["169.254.169.254"],
        "intranet.test": ["10.0.0.1"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "v6.test": ["fe80::1"],
        "ula.test": ["fd12:3456::1"],
        "mixed.test": ["93.184.216.34", "192.168.1.1"],
        "loop6.test": ["::1"],
    }
    asked: list[str] = []

    async def resolve(host, port):
        asked.append(host)
        if host not in table:
            raise ToolError(f"cannot resolve host `{host}`")
        return table[host]

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kw):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pytest.fail(f"the system resolver was asked for {host!r}")
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(fetch_module, "resolve", resolve)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.fixture
def no_connect(monkeypatch):
    """Every socket connection attempt is recorded and fails."""
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise AssertionError(f"connection attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


def test_address_rules():
    refused = {
        "127.0.0.1": "loopback", "10.1.2.3": "private", "172.16.0.1": "private", "192.168.0.1": "private",
        "169.254.169.254": "link-local", "100.64.0.1": "shared", "0.0.0.0": "unspecified",
        "224.0.0.1": "multicast", "240.0.0.1": "private", "::1": "loopback", "::": "unspecified",
        "fe80::1": "link-local", "fd00::1": "private", "ff02::1": "multicast", "::ffff:127.0.0.1": "loopback",
        "::ffff:10.0.0.1": "private", "2002:a9fe:a9fe::1": "link-local", "64:ff9b::a00:1": "private",
    }  # fmt: skip
    for address, kind in refused.items():
        assert (address_kind(ipaddress.ip_address(address)) or "").startswith(kind), address
    for address in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert address_kind(ipaddress.ip_address(address)) is None, address
    rules = parse_allow(["127.0.0.1:8080", "[::1]:81", "10.0.0.0/8", "Wiki.LAN", "fd00::/8"])
    assert [(r.host, str(r.net) if r.net else None, r.port) for r in rules] == [
        (None, "127.0.0.1/32", 8080), (None, "::1/128", 81), (None, "10.0.0.0/8", None), ("wiki.lan", None, None),
        (None, "fd00::/8", None),
    ]  # fmt: skip
    for bad in ("host:port", "bad host", "[::1", "a:0"):
        with pytest.raises(ValueError, match="allow"):
            parse_allow([bad])


def test_fetch_allowed_local_server(server):
    fetcher = SafeFetcher(allow=[f"127.0.0.1:{server.port}"])
    doc = run(fetcher.fetch(f"http://127.0.0.1:{server.port}/page.html"))
    assert doc.title == "Test page" and doc.url == f"http://127.0.0.1:{server.port}/page.html"
    assert "The answer is 42." in doc.text.replace("\n", " ") or "The answer is 42" in doc.text
    assert f"[the other page](http://127.0.0.1:{server.port}/other.html)" in doc.text
    assert "[an outside page](https://example.org/x)" in doc.text and "cell one" in doc.text
    doc = run(fetcher.fetch(f"http://127.0.0.1:{server.port}/latin1.txt"))
    assert doc.text == "café"
    with pytest.raises(ToolError, match="HTTP 404"):
        run(fetcher.fetch(f"http://127.0.0.1:{server.port}/missing"))
    with pytest.raises(ToolError, match="image/png, not text"):
        run(fetcher.fetch(f"http://127.0.0.1:{server.port}/image.png"))
    with pytest.raises(ToolError, match="too many redirects"):
        run(
            SafeFetcher(allow=[f"127.0.0.1:{server.port}"], max_redirects=3).fetch(
                f"http://127.0.0.1:{server.port}/loop"
            )
        )
    with pytest.raises(ToolError, match="only http and https"):
        run(fetcher.fetch("file:///etc/passwd"))


def test_fetch_caps_size_and_time(server):
    fetcher = SafeFetcher(allow=[f"127.0.0.1:{server.port}"], max_bytes=10_000, timeout_s=0.5)
    doc = run(fetcher.fetch(f"http://127.0.0.1:{server.port}/big"))
    assert doc.text.startswith("x" * 10_000) and doc.text.count("x") == 10_000
    assert doc.text.endswith("[the page was cut here: it is larger than this browser reads]")
    t0 = time.monotonic()
    with pytest.raises(ToolError, match="timed out after 0.5 s"):
        run(fetcher.fetch(f"http://127.0.0.1:{server.port}/slow"))
    assert time.monotonic() - t0 < 2


def test_fetch_refuses_local_addresses_before_connecting(server, trap, stub_dns, no_connect):
    fetcher = SafeFetcher(allow=[f"127.0.0.1:{server.port}"])
    urls = {
        f"http://127.0.0.1:{trap.port}/": "loopback",  # loopback, on a port that is not allowed
        f"http://[::1]:{server.port}/": "loopback",
        "http://169.254.169.254/latest/meta-data/": "link-local",
        "http://[::ffff:10.0.0.1]/": "private",
        "http://0.0.0.0/": "unspecified",
        "http://metadata.test/latest/meta-data/": "link-local",  # DNS answers that are not public
        "http://intranet.test/": "private",
        "http://mapped.test/": "loopback",
        "http://v6.test/": "link-local",
        "https://ula.test/": "private",
        "http://mixed.test/": "private",  # one private address among public ones
        "http://loop6.test/": "loopback",
    }
    for url, kind in urls.items():
        with pytest.raises(ToolError, match=f"refused to open .*a {kind}"):
            run(fetcher.fetch(url))
    assert no_connect == [] and trap.connections == 0


def test_fetch_checks_every_redirect(server, trap, stub_dns):
    fetcher = SafeFetcher(allow=[f"127.0.0.1:{server.port}"])
    base = f"http://127.0.0.1:{server.port}/redirect?to="
    before = len(server.requests)
    for target, kind in (
        (f"http://127.0.0.1:{trap.port}/", "loopback"),
        ("http://intranet.test/x", "private"),
    ):
        with pytest.raises(ToolError, match=f"a {kind} address"):
            run(fetcher.fetch(base + target))
    assert [path for path, _ in server.requests[before:]] == [
        f"/redirect?to=http://127.0.0.1:{trap.port}/",
        "/redirect?to=http://intranet.test/x",
    ]
    assert trap.connections == 0 and stub_dns == ["intranet.test"]
    doc = run(fetcher.fetch(base + "/page.html"))  # a redirect that stays on the allowed server
    assert doc.title == "Test page" and doc.url == f"http://127.0.0.1:{server.port}/page.html"


def test_fetch_connects_to_the_checked_address(server, stub_dns):
    """A host name allowed by name: resolved once (by the stub: the system resolver is never asked), the
    connection made to that address, the Host header the name's."""
    fetcher = SafeFetcher(allow=["docs.test"])
    doc = run(fetcher.fetch(f"http://docs.test:{server.port}/host"))
    assert doc.text == f"docs.test:{server.port}" and stub_dns == ["docs.test"]
    with pytest.raises(ToolError, match="a loopback address"):  # the name's permission is not the address's
        run(SafeFetcher(allow=["docs.test"]).fetch(f"http://127.0.0.1:{server.port}/host"))


def _self_signed(name: str) -> tuple[bytes, bytes]:
    """(certificate, key) in PEM for `name`, self-signed."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_fetch_https_checks_the_certificate_of_the_name(tmp_path, stub_dns):
    """https to the checked address: the TLS server name and the certificate check are the URL's host's."""
    import ssl

    cert, key = _self_signed("docs.test")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    tls = _Server(_Handler)
    tls.socket = server_ctx.wrap_socket(tls.socket, server_side=True)
    try:
        trust = ssl.create_default_context(cadata=cert.decode())
        fetcher = SafeFetcher(allow=["docs.test", "other.test"], verify=trust, timeout_s=10)
        doc = run(fetcher.fetch(f"https://docs.test:{tls.port}/host"))
        assert doc.text == f"docs.test:{tls.port}"
        with pytest.raises(ToolError, match="cannot connect to `other.test`.*CERTIFICATE_VERIFY_FAILED"):
            run(fetcher.fetch(f"https://other.test:{tls.port}/host"))  # the certificate is not other.test's
    finally:
        tls.stop()


def test_html_to_text_links_and_title():
    title, text = html_to_text(
        '<html><head><title> A  title </title><style>p{}</style></head><body><p>Go <a href="b c(1).html">'
        'to [B]</a>, <a href="#top">up</a>, <a href="mailto:x@y">mail</a> <a href="/i"><img alt="pic"></a>.'
        "</p></body></html>",
        "https://ex.org/dir/a.html",
    )
    assert title == "A title"
    assert text == "Go [to (B)](https://ex.org/dir/b%20c%281%29.html), up, mail [pic](https://ex.org/i)."


# ---- SearXNG ----------------------------------------------------------------------------------------------


def test_searxng_backend(server):
    port = server.port
    backend = SearxngBackend(f"http://127.0.0.1:{port}/", SafeFetcher(allow=[f"127.0.0.1:{port}"]))
    tool = BrowserTool(backend, count_tokens=len)
    r = call(tool, "search", {"query": "the answer", "topn": 5})
    assert r.error is None
    assert (
        f"【0†Test page†127.0.0.1:{port}】 About the answer." in r.text and "【1†Other†127.0.0.1:" in r.text
    )
    assert "Not http" not in r.text
    assert r.item["action"]["sources"] == [
        {"type": "url", "url": f"http://127.0.0.1:{port}/page.html"},
        {"type": "url", "url": f"http://127.0.0.1:{port}/other.html"},
    ]
    assert any(path.startswith("/search?") and "format=json" in path and "q=the+answer" in path
               for path, _ in server.requests)  # fmt: skip
    r = call(tool, "open", {"id": 0})
    assert r.text.startswith(f"[1] Test page (http://127.0.0.1:{port}/page.html)")
    assert "【0†the other page】" in r.text and "【1†an outside page†example.org】" in r.text
    r = call(tool, "open", {"id": 0})
    assert r.text.startswith("[2] Other") and "L0: The other page." in r.text
    assert "SearXNG: `json` is not in search.formats" in call(tool, "search", {"query": "forbidden"}).text
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = call(
        BrowserTool(SearxngBackend(f"http://127.0.0.1:{closed}"), count_tokens=len), "search", {"query": "x"}
    )
    assert "the search service cannot be reached" in r.text
    for bad in ("127.0.0.1:8888", "ftp://x", ""):
        with pytest.raises(ValueError, match="search URL"):
            SearxngBackend(bad)
