"""The `browser` built-in tool: harmony's `browser.search`, `browser.open` and `browser.find`, run by the
server over a backend the operator chooses, with the model's citations turned into `url_citation`s.

    from gptoss_jax.tools import BrowserTool, LocalIndex, SafeFetcher, SearxngBackend

    tool = BrowserTool(LocalIndex("docs/"))                          # serve --browser-index docs/
    tool = BrowserTool(SearxngBackend("http://127.0.0.1:8888",       # serve --browser-search-url ...
                                      SafeFetcher(allow=["wiki.lan"])))  # ... --browser-allow wiki.lan
    result = await tool.call(ToolCall("browser.search", '{"query": "rope scaling"}', conversation="c1"))
    result.text        # what the model reads: "[0] rope scaling\\n**viewing lines [0 - 9] of 9**\\n\\nL0: ..."
    result.item        # {"type": "web_search_call", "action": {"type": "search", "query": ..., "sources": [...]}}
    tool.annotate("c1", answer)    # url_citation annotations for the answer's 【cursor†Lstart-Lend】 marks
    tool.cite("c1", answer)        # (text with the marks replaced by ([domain](url)), annotations)

What the model sees (the behaviour of OpenAI's reference browser, gpt_oss/tools/simple_browser)
------------------------------------------------------------------------------------------------
* `config()` is harmony's own declaration, `ToolNamespaceConfig.browser()`, unchanged.
* Every search, open and find shows a page and gives it the next cursor of the conversation: a header
  `[cursor] title (url)`, then `**viewing lines [a - b] of N**` (N: the last line's number), then the page's
  lines numbered `L0: ...`. Text is wrapped at 80 columns; a view holds about `view_tokens` tokens (the
  model's own tokenizer) unless `num_lines` asks for a number of lines.
* `search(query, topn=10)` shows a result page `# Search Results` with one line per hit,
  `* 【i†title†domain】 snippet`; `topn` is capped at `max_results`.
* `open(id, cursor=-1, loc=-1, num_lines=-1)`: an integer `id` follows the link `【id†...】` of the page at
  `cursor` (the last page by default); a string `id` is a URL to open; no `id` scrolls the page at `cursor`
  to `loc` (`view_source` and `source` are accepted and ignored). Links inside pages are numbered the same way, `【id†text】` (`【id†text†domain】` for another
  site); a page already opened in the conversation is not fetched again unless opened by URL.
* `find(pattern, cursor=-1)` lists the lines of a page that contain `pattern` (case-insensitive), four lines
  each, as links `【k†match at Ln】` that `open` shows in place; not on a result page.
* The model's mistakes (bad JSON, an unknown function or argument, a cursor or link id that does not exist,
  a line past the end) and the backend's failures (`ToolError`: a refused address, a timeout, no such
  document) come back as the tool's text, with `ToolResult.error` set; `call` never raises for them.
* Each conversation keeps its last `max_pages` pages (a cursor older than that is an error that says so);
  at most `max_conversations` conversations are kept, the least recently used forgotten first.
* Page text cannot forge links or citations: 【 and 】 in a document are shown as 〖 and 〗.

`ToolResult.item` is the Responses `web_search_call` item (no id or status), its action `search` (query and
sources: the hits' URLs), `open_page` (the URL opened) or `find_in_page` (the page's URL and the pattern).

Citations
---------
The model cites as harmony tells it to, `【cursor†Lstart-Lend】` or `【cursor†Lstart】`. A citation of a
page (or of a find on a page) becomes `{"type": "url_citation", "start_index", "end_index", "url",
"title"}` with that page's URL and title; citations of a result page, or of a cursor this conversation does
not have, are left as they are, with no annotation. Indices count Python characters (code points).

* `annotate(conversation, text)` (the `Tool` interface) keeps the text as the model wrote it: each
  annotation spans its 【...】 mark. This is what a streamed answer needs, whose deltas have gone out already.
* `cite(conversation, text)` returns `(new_text, annotations)` with each mark replaced by
  ` ([domain](url))`, as OpenAI's reference and the hosted web search render them; each annotation spans
  its replacement.

Backends (each a `base.BrowserBackend`)
---------------------------------------
* `LocalIndex(directory)`: the .txt, .md/.markdown and .html/.htm files under `directory` (hidden ones and
  symlinks out of it skipped), indexed at construction in SQLite's FTS5 (Python's own sqlite3, in memory;
  Porter stemming) and ranked by its BM25. A document's URL is `local://<name>/<path>`: `<name>` is the
  directory's base name (lower case, other characters as `-`; `name=` sets it), `<path>` its path under the
  directory, percent-encoded. HTML is laid out as text (`fetch.html_to_text`); relative links between
  documents become links to their `local://` URLs. Given a `fetcher`, http(s) URLs open through it too.
* `SearxngBackend(base_url, fetcher)`: a SearXNG instance's JSON API (`GET <base_url>/search?q=...&
  format=json`; `json` must be among the instance's `search.formats`); the pages are opened through
  `fetcher` (a `SafeFetcher`: see gptoss_jax/tools/fetch.py for its rules). The search URL itself is the
  operator's, so it is not subject to the fetcher's address rules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import re
import sqlite3
import textwrap
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

from .base import BrowserBackend, Document, SearchHit, ToolCall, ToolError, ToolResult
from .fetch import SafeFetcher, detect_charset, html_to_text

log = logging.getLogger(__name__)

FUNCTIONS = ("search", "open", "find")
_ARGUMENTS = {
    "search": ("query", "topn", "top_n", "source"),
    "open": ("id", "cursor", "loc", "num_lines", "view_source", "source"),
    "find": ("pattern", "cursor"),
}
# a Markdown link (not an image): [text](target "optional title")
MARKDOWN_LINK = re.compile(r'(?<!!)\[([^\[\]\n]{1,500})\]\(\s*<?([^()\s<>]+)>?(?:\s+"[^"\n]*")?\s*\)')
_MARKER = re.compile(r"【(\d+)†([^†】\n]*)(?:†([^†】\n]*))?】")
_CITATION = re.compile(r"【(\d+)†\s*L(\d+)(?:\s*-\s*L?(\d+))?\s*】")
_FIND_LINES = 4  # lines shown per match
_FIND_MAX = 50


def _clean(text: str) -> str:
    """Document text as the browser shows it: no characters that would read as its own link marks."""
    return (
        text.replace("\r\n", "\n")
        .replace("\r", "\n")
        .replace("【", "〖")
        .replace("】", "〗")
        .replace("\u200b", "")
    )


def _label(text: str, limit: int = 200) -> str:
    """A title or link text inside a 【...】 mark: one line, no mark characters."""
    text = " ".join(_clean(text).replace("†", "‡").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _domain(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or parts.scheme or url


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` columns, as the model reads and cites them; a link mark is not split
    (its spaces are non-breaking while wrapping)."""
    protected = _MARKER.sub(lambda m: m.group(0).replace(" ", "\xa0"), text)
    lines: list[str] = []
    for line in protected.split("\n"):
        wrapped = textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False, tabsize=4)
        lines.extend(wrapped or [""])
    return [line.replace("\xa0", " ") for line in lines]


@dataclass
class _Page:
    kind: str  # "page", "search" or "find"
    url: str  # shown in the header ("" for a result page)
    title: str
    lines: list[str]
    links: dict[int, tuple[str, int | None]]  # link id -> (URL, the line to show first)
    cite_url: str | None  # what a citation of this page points at (None: a result page)
    cite_title: str


@dataclass
class _Conversation:
    pages: OrderedDict[int, _Page] = field(default_factory=OrderedDict)  # cursor -> page
    cache: OrderedDict[str, _Page] = field(default_factory=OrderedDict)  # URL -> opened page
    next_cursor: int = 0


class _CallError(Exception):
    """A call that failed: the message is for the model."""


def _int_arg(args: dict, name: str, default: int) -> int:
    value = args.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise _CallError(f"`{name}` must be an integer, got {json.dumps(value)}")
    return int(value)


def _str_arg(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value.strip():
        got = "nothing" if value is None else json.dumps(value)
        raise _CallError(f"`{name}` must be a non-empty string, got {got}")
    return value


class BrowserTool:
    """harmony's `browser` tool over a `BrowserBackend` (see the module's docstring).

    BrowserTool(backend, *, max_results=20, view_tokens=1024, line_width=80, max_pages=64,
                max_conversations=256, max_page_chars=2_000_000, count_tokens=None)

    `count_tokens(text) -> int` sizes a view; by default the model's tokenizer (o200k_harmony).
    """

    name = "browser"

    def __init__(
        self,
        backend: BrowserBackend,
        *,
        max_results: int = 20,
        view_tokens: int = 1024,
        line_width: int = 80,
        max_pages: int = 64,
        max_conversations: int = 256,
        max_page_chars: int = 2_000_000,
        count_tokens: Callable[[str], int] | None = None,
    ):
        if not isinstance(backend, BrowserBackend):
            raise TypeError(
                f"backend must be a BrowserBackend (name, search, fetch), got {type(backend).__name__}"
            )
        for name, value in (
            ("max_results", max_results),
            ("view_tokens", view_tokens),
            ("line_width", line_width),
            ("max_pages", max_pages),
            ("max_conversations", max_conversations),
            ("max_page_chars", max_page_chars),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.backend = backend
        self.max_results = max_results
        self.view_tokens = view_tokens
        self.line_width = line_width
        self.max_pages = max_pages
        self.max_conversations = max_conversations
        self.max_page_chars = max_page_chars
        self._count_tokens = count_tokens
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()

    # ---- the Tool interface ----------------------------------------------------------------------------

    def config(self):
        """harmony's declaration of the browser, as harmony defines it."""
        from openai_harmony import ToolNamespaceConfig

        return ToolNamespaceConfig.browser()

    async def call(self, call: ToolCall) -> ToolResult:
        function = call.function
        action: dict = {"type": "search"}
        if function == "open":
            action = {"type": "open_page"}
        elif function == "find":
            action = {"type": "find_in_page", "url": "", "pattern": ""}
        try:
            if function not in FUNCTIONS:
                raise _CallError(
                    f"Unknown function `{call.recipient}`: the browser has browser.search, browser.open "
                    "and browser.find"
                )
            args = self._arguments(function, call.arguments)
            conversation = self._conversation(call.conversation)
            if function == "search":
                text = await self._search(conversation, args, action)
            elif function == "open":
                text = await self._open(conversation, args, action)
            else:
                text = self._find(conversation, args, action)
        except _CallError as e:
            message = str(e)
            return ToolResult(text=message, item={"type": "web_search_call", "action": action}, error=message)
        return ToolResult(text=text, item={"type": "web_search_call", "action": action})

    def annotate(self, conversation: str, text: str) -> list[dict]:
        """url_citation annotations for the citations in `text`, which stays as it is: each annotation
        spans its 【cursor†Lstart-Lend】 mark."""
        return [
            {
                "type": "url_citation",
                "start_index": m.start(),
                "end_index": m.end(),
                "url": url,
                "title": title,
            }
            for m, url, title in self._citations(conversation, text)
        ]

    def cite(self, conversation: str, text: str) -> tuple[str, list[dict]]:
        """(text, annotations) with each citation of a page replaced by ` ([domain](url))`, each annotation
        spanning its replacement (OpenAI's reference browser does the same)."""
        out: list[str] = []
        annotations: list[dict] = []
        size = last = 0
        for m, url, title in self._citations(conversation, text):
            before = text[last : m.start()]
            if m.start() > 0 and not text[m.start() - 1].isspace():
                before += " "
            out.append(before)
            size += len(before)
            replacement = f"([{_domain(url)}]({url}))"
            annotations.append(
                {
                    "type": "url_citation",
                    "start_index": size,
                    "end_index": size + len(replacement),
                    "url": url,
                    "title": title,
                }
            )
            out.append(replacement)
            size += len(replacement)
            last = m.end()
        out.append(text[last:])
        return "".join(out), annotations

    def close(self, conversation: str) -> None:
        self._conversations.pop(conversation, None)

    def shutdown(self) -> None:
        self._conversations.clear()
        close = getattr(self.backend, "close", None)
        if callable(close):
            try:
                close()
            except Exception as e:  # noqa: BLE001 - shutting down regardless
                log.warning("browser: closing the backend: %s", e)

    # ---- state -----------------------------------------------------------------------------------------

    def _conversation(self, key: str) -> _Conversation:
        conversation = self._conversations.get(key)
        if conversation is None:
            conversation = self._conversations[key] = _Conversation()
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        else:
            self._conversations.move_to_end(key)
        return conversation

    def _page(self, conversation: _Conversation, cursor: int) -> tuple[int, _Page]:
        if not conversation.pages:
            raise _CallError("No pages to access! Use browser.search, or browser.open with a URL, first.")
        if cursor < 0:
            cursor = next(reversed(conversation.pages))
        page = conversation.pages.get(cursor)
        if page is None:
            first, last = next(iter(conversation.pages)), next(reversed(conversation.pages))
            if 0 <= cursor < first:
                raise _CallError(
                    f"Cursor `{cursor}` is no longer kept (only the last {self.max_pages} pages are); "
                    "open that page again."
                )
            raise _CallError(
                f"Cursor `{cursor}` is out of range. Available cursor indices: [{first} - {last}]."
            )
        return cursor, page

    def _push(self, conversation: _Conversation, page: _Page) -> int:
        cursor = conversation.next_cursor
        conversation.next_cursor += 1
        conversation.pages[cursor] = page
        while len(conversation.pages) > self.max_pages:
            conversation.pages.popitem(last=False)
        if page.kind == "page":
            conversation.cache[page.url] = page
            conversation.cache.move_to_end(page.url)
            while len(conversation.cache) > self.max_pages:
                conversation.cache.popitem(last=False)
        return cursor

    # ---- pages -----------------------------------------------------------------------------------------

    def _tokens(self, text: str) -> int:
        if self._count_tokens is None:
            from ..tokenizer import get_encoding

            encoding = get_encoding()
            self._count_tokens = lambda s: len(encoding.encode_ordinary(s))
        return self._count_tokens(text)

    def _view(self, cursor: int, page: _Page, loc: int, num_lines: int) -> str:
        total = len(page.lines)
        if num_lines > 0:
            end = min(loc + num_lines, total)
        else:
            numbered = [f"L{i}: {page.lines[i]}\n" for i in range(loc, total)]
            end, budget = loc, self.view_tokens
            if sum(map(len, numbered)) <= budget:  # at least a character a token: all of it fits
                end = total
            else:
                for line in numbered:
                    budget -= self._tokens(line)
                    if budget < 0 and end > loc:
                        break
                    end += 1
        body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(loc, end))
        header = f"[{cursor}] {page.title}"
        if page.url:
            shown = unquote(page.url)
            header += f" ({shown if len(shown) <= 200 else shown[:197] + '...'})"
        return f"{header}\n**viewing lines [{loc} - {end - 1}] of {total - 1}**\n\n{body}"

    def _document_page(self, doc: Document) -> _Page:
        """A fetched document as lines, its Markdown links made numbered 【id†text】 links."""
        text = _clean(doc.text[: self.max_page_chars]).rstrip()
        links: dict[int, tuple[str, int | None]] = {}
        ids: dict[str, int] = {}
        scheme, host = urlsplit(doc.url).scheme.lower(), _domain(doc.url)

        def link(m: re.Match) -> str:
            label, target = _label(m.group(1)), m.group(2)
            target_scheme = urlsplit(target).scheme.lower()
            if not target_scheme and scheme in ("http", "https"):
                target, target_scheme = urljoin(doc.url, target), scheme
            if not label or target_scheme not in {"http", "https", scheme} - {""}:
                return label or m.group(0)
            link_id = ids.setdefault(target, len(ids))
            links[link_id] = (target, None)
            domain = _domain(target)
            return f"【{link_id}†{label}】" if domain == host else f"【{link_id}†{label}†{domain}】"

        text = MARKDOWN_LINK.sub(link, text)
        title = _label(doc.title) or doc.url
        return _Page("page", doc.url, title, _wrap(text, self.line_width), links, doc.url, title)

    async def _open_document(self, url: str) -> _Page:
        doc = await self._fetch(url)
        return await asyncio.to_thread(self._document_page, doc)  # wrapping a long page takes a while

    async def _fetch(self, url: str) -> Document:
        try:
            doc = await self.backend.fetch(url)
        except ToolError as e:
            raise _CallError(f"Error fetching URL `{url}`: {e}") from None
        except Exception as e:
            log.exception("browser: %s backend failed to fetch %s", getattr(self.backend, "name", "?"), url)
            raise _CallError(f"Error fetching URL `{url}`: {e.__class__.__name__}") from None
        if not isinstance(doc, Document):
            raise _CallError(f"Error fetching URL `{url}`: the backend returned no document")
        return doc

    # ---- the functions ---------------------------------------------------------------------------------

    def _arguments(self, function: str, text: str) -> dict:
        if not isinstance(text, str):
            raise _CallError(f"Invalid function arguments: expected JSON text, got {type(text).__name__}")
        if not text.strip():
            args = {}
        else:
            try:
                args = json.loads(text)
            except json.JSONDecodeError as e:
                raise _CallError(
                    f"Invalid function arguments: not JSON ({e.msg} at character {e.pos})"
                ) from None
        if not isinstance(args, dict):
            raise _CallError(f"Invalid function arguments: expected a JSON object, got {type(args).__name__}")
        unknown = sorted(set(args) - set(_ARGUMENTS[function]))
        if unknown:
            raise _CallError(
                f"Unknown argument(s) {', '.join(f'`{k}`' for k in unknown)} for browser.{function}; it takes "
                + ", ".join(f"`{k}`" for k in _ARGUMENTS[function] if k != "top_n")
            )
        return args

    async def _search(self, conversation: _Conversation, args: dict, action: dict) -> str:
        query = _str_arg(args, "query")
        action["query"] = query
        topn = _int_arg(args, "topn", _int_arg(args, "top_n", 10))
        topn = min(max(topn, 1), self.max_results)
        try:
            hits = list(await self.backend.search(query, topn))[:topn]
        except ToolError as e:
            raise _CallError(f"Error during search for `{query}`: {e}") from None
        except Exception as e:
            log.exception(
                "browser: %s backend failed to search %r", getattr(self.backend, "name", "?"), query
            )
            raise _CallError(f"Error during search for `{query}`: {e.__class__.__name__}") from None
        hits = [h for h in hits if isinstance(h, SearchHit)]
        action["sources"] = [{"type": "url", "url": h.url} for h in hits]
        lines = ["# Search Results", ""]
        for i, hit in enumerate(hits):
            snippet = " ".join(_clean(MARKDOWN_LINK.sub(r"\1", hit.snippet)).split())
            entry = f"  * 【{i}†{_label(hit.title) or _label(hit.url)}†{_domain(hit.url)}】"
            lines.append(f"{entry} {snippet}" if snippet else entry)
        if not hits:
            lines.append(f"No results found for `{query}`.")
        links = {i: (hit.url, None) for i, hit in enumerate(hits)}
        page = _Page("search", "", _label(query), _wrap("\n".join(lines), self.line_width), links, None, "")
        cursor = self._push(conversation, page)
        return self._view(cursor, page, 0, -1)

    async def _open(self, conversation: _Conversation, args: dict, action: dict) -> str:
        link = args.get("id", -1)
        cursor = _int_arg(args, "cursor", -1)
        loc = _int_arg(args, "loc", -1)
        num_lines = _int_arg(args, "num_lines", -1)
        if isinstance(link, str) and not re.fullmatch(r"\s*-?\d+\s*", link):
            url = link.strip()
            action["url"] = url
            page = await self._open_document(url)
        else:
            link = _int_arg(args, "id", -1)
            _, base = self._page(conversation, cursor)
            if link < 0:  # scroll the page at `cursor`
                page = base
                if base.url:
                    action["url"] = base.url
            else:
                if link not in base.links:
                    valid = f"[0 - {max(base.links)}]" if base.links else "none: this page has no links"
                    raise _CallError(f"Invalid link id `{link}`. Valid link ids on this page: {valid}.")
                url, line = base.links[link]
                action["url"] = url
                page = conversation.cache.get(url) or await self._open_document(url)
                if loc < 0 and line is not None:
                    loc = line - 4 if line > 4 else line
            if page.url:
                action["url"] = page.url
        loc = max(loc, 0)
        if loc >= len(page.lines):
            raise _CallError(
                f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {len(page.lines) - 1}."
            )
        new_cursor = self._push(conversation, page)
        return self._view(new_cursor, page, loc, num_lines)

    def _find(self, conversation: _Conversation, args: dict, action: dict) -> str:
        pattern = _str_arg(args, "pattern")
        action["pattern"] = pattern
        _, page = self._page(conversation, _int_arg(args, "cursor", -1))
        action["url"] = page.url
        if page.kind != "page":
            raise _CallError("Cannot run `find` on search results page or find results page")
        plain = [_MARKER.sub(lambda m: m.group(2), line) for line in page.lines]
        needle = pattern.lower()
        chunks: list[str] = []
        links: dict[int, tuple[str, int | None]] = {}
        i = 0
        while i < len(plain) and len(chunks) < _FIND_MAX:
            if needle not in plain[i].lower():
                i += 1
                continue
            k = len(chunks)
            chunks.append(f"# 【{k}†match at L{i}】\n" + "\n".join(plain[i : i + _FIND_LINES]))
            links[k] = (page.url, i)
            i += _FIND_LINES
        text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
        title = f"Find results for text: `{_label(pattern)}` in `{page.title}`"
        found = _Page(
            "find", page.url, title, _wrap(text, self.line_width), links, page.cite_url, page.cite_title
        )
        cursor = self._push(conversation, found)
        return self._view(cursor, found, 0, -1)

    # ---- citations -------------------------------------------------------------------------------------

    def _citations(self, conversation: str, text: str) -> list[tuple[re.Match, str, str]]:
        state = self._conversations.get(conversation)
        if state is None or not isinstance(text, str):
            return []
        found = []
        for m in _CITATION.finditer(text):
            page = state.pages.get(int(m.group(1)))
            if page is not None and page.cite_url:
                found.append((m, page.cite_url, page.cite_title))
        return found


# ---- backends ---------------------------------------------------------------------------------------------


_SUFFIXES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}


class LocalIndex:
    """A local collection of .txt, .md and .html files, searched with SQLite FTS5's BM25 (see the module's
    docstring for the `local://<name>/<path>` URLs).

    LocalIndex(directory, *, name=None, fetcher=None, max_file_bytes=8 MiB)

    ValueError if `directory` is not a directory or holds no such file.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        name: str | None = None,
        fetcher: SafeFetcher | None = None,
        max_file_bytes: int = 8 << 20,
    ):
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise ValueError(f"browser index: {str(directory)!r} is not a directory")
        self.root = root.resolve()
        label = name if name is not None else self.root.name
        self.host = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-") or "index"
        self.name = f"local:{self.host}"
        self.fetcher = fetcher
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE docs USING fts5(title, body, path UNINDEXED,"
            " tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        count = self._index()
        if count == 0:
            raise ValueError(f"browser index: {str(directory)!r} holds no .txt, .md or .html file")
        self.count = count

    def url(self, path: str) -> str:
        """The URL of the document at `path` (relative to the directory, with /)."""
        return f"local://{self.host}/{quote(path)}"

    def _path(self, url: str) -> str | None:
        parts = urlsplit(url)
        if parts.scheme != "local" or parts.netloc != self.host:
            return None
        return unquote(parts.path).lstrip("/")

    def _join(self, base: str, href: str) -> str | None:
        """A link of a document: an absolute URL stays; a relative one becomes a document's local URL
        (None if it leads out of the directory)."""
        parts = urlsplit(href)
        if parts.scheme:
            return href
        if not parts.path:
            return None
        path = unquote(parts.path)
        base_path = self._path(base) or ""
        joined = (
            path.lstrip("/") if path.startswith("/") else posixpath.join(posixpath.dirname(base_path), path)
        )
        joined = posixpath.normpath(joined)
        if joined in (".", "") or joined.startswith("../") or joined == "..":
            return None
        return self.url(joined)

    def _document(self, path: str, kind: str, data: bytes) -> tuple[str, str]:
        """(title, text) of a file."""
        url = self.url(path)
        stem = posixpath.splitext(posixpath.basename(path))[0]
        if kind == "html":
            title, text = html_to_text(
                data.decode(detect_charset("text/html", data), errors="replace"), url, self._join
            )
            return title or stem, text
        text = data.decode("utf-8", errors="replace")
        if kind == "markdown":

            def relink(m: re.Match) -> str:
                target = self._join(url, m.group(2))
                return f"[{m.group(1)}]({target})" if target else m.group(1)

            text = MARKDOWN_LINK.sub(relink, text)
            heading = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
            return (heading.group(1) if heading else stem), text
        return stem, text

    def _index(self) -> int:
        count = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                kind = _SUFFIXES.get(os.path.splitext(filename)[1].lower())
                if kind is None or filename.startswith("."):
                    continue
                full = os.path.join(dirpath, filename)
                real = os.path.realpath(full)
                if not real.startswith(str(self.root) + os.sep):
                    log.warning("browser index: skipping %s (a link out of %s)", full, self.root)
                    continue
                try:
                    if os.path.getsize(real) > self.max_file_bytes:
                        log.warning("browser index: skipping %s (over %d bytes)", full, self.max_file_bytes)
                        continue
                    with open(real, "rb") as f:
                        data = f.read()
                except OSError as e:
                    log.warning("browser index: skipping %s: %s", full, e)
                    continue
                path = Path(full).relative_to(self.root).as_posix()
                title, text = self._document(path, kind, data)
                self._db.execute("INSERT INTO docs (title, body, path) VALUES (?, ?, ?)", (title, text, path))
                count += 1
        self._db.commit()
        return count

    def _query(self, query: str, topn: int) -> list[SearchHit]:
        terms = list(dict.fromkeys(re.findall(r"\w+", query.lower())))[:32]
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        with self._lock:
            rows = self._db.execute(
                "SELECT path, title, snippet(docs, 1, '', '', ' … ', 24) FROM docs WHERE docs MATCH ?"
                " ORDER BY bm25(docs, 5.0, 1.0) LIMIT ?",
                (match, topn),
            ).fetchall()
        return [SearchHit(url=self.url(path), title=title, snippet=snippet) for path, title, snippet in rows]

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        return await asyncio.to_thread(self._query, query, topn)

    async def fetch(self, url: str) -> Document:
        path = self._path(url)
        if path is None:
            if self.fetcher is not None and urlsplit(url).scheme.lower() in ("http", "https"):
                return await self.fetcher.fetch(url)
            raise ToolError(f"this browser opens only the documents of its index (local://{self.host}/...)")
        with self._lock:
            row = self._db.execute("SELECT title, body FROM docs WHERE path = ?", (path,)).fetchone()
        if row is None:
            raise ToolError(f"no document `{url}` in the index")
        return Document(url=self.url(path), title=row[0], text=row[1])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SearxngBackend:
    """Search through a SearXNG instance's JSON API; pages opened through `fetcher`.

    SearxngBackend(base_url, fetcher=None, *, timeout_s=15.0, params=None)

    `fetcher` defaults to `SafeFetcher()` (nothing allowed beyond the public internet); `params` are added to
    every search (e.g. {"categories": "general", "language": "en"}). ValueError for a bad `base_url`.
    """

    name = "searxng"

    def __init__(
        self,
        base_url: str,
        fetcher: SafeFetcher | None = None,
        *,
        timeout_s: float = 15.0,
        params: dict[str, str] | None = None,
    ):
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"search URL must be an http(s) URL such as http://127.0.0.1:8888, got {base_url!r}"
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        self.base_url = base_url.rstrip("/")
        self.fetcher = fetcher if fetcher is not None else SafeFetcher()
        self.timeout_s = float(timeout_s)
        self.params = dict(params or {})

    async def search(self, query: str, topn: int) -> list[SearchHit]:
        import httpx

        params = {**self.params, "q": query, "format": "json"}
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=self.timeout_s) as client:
                response = await client.get(
                    f"{self.base_url}/search", params=params, headers={"Accept": "application/json"}
                )
        except httpx.HTTPError as e:
            raise ToolError(f"the search service cannot be reached ({e.__class__.__name__})") from None
        if response.status_code == 403:
            raise ToolError(
                "the search service refused a JSON search (SearXNG: `json` is not in search.formats)"
            )
        if response.status_code >= 400:
            raise ToolError(f"the search service answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise ToolError("the search service did not answer JSON") from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise ToolError("the search service's answer has no `results` list")
        hits: list[SearchHit] = []
        seen: set[str] = set()
        for result in results:
            if not isinstance(result, dict):
                continue
            url = result.get("url")
            if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or url in seen:
                continue
            seen.add(url)
            title = result.get("title") if isinstance(result.get("title"), str) else ""
            snippet = result.get("content") if isinstance(result.get("content"), str) else ""
            hits.append(SearchHit(url=url, title=title or url, snippet=snippet))
            if len(hits) >= topn:
                break
        return hits

    async def fetch(self, url: str) -> Document:
        return await self.fetcher.fetch(url)
