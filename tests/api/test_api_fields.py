"""docs/serving.md's request-field tables against the code's field policy (`protocol.honoured`, `IGNORED`,
`REFUSED`): every field a request may carry is listed once per endpoint with the status the code gives it,
and every field of OpenAI's own request types (as of openai 2.x, listed here) has a status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gptoss_jax.api import protocol

DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
HEADINGS = {
    "chat": "Chat completions (`POST /v1/chat/completions`):",
    "responses": "Responses (`POST /v1/responses`):",
    "completions": "Completions (`POST /v1/completions`):",
}
# the request fields of the openai package's create() params (ResponseCreateParams, CompletionCreateParams)
OPENAI_FIELDS = {
    "chat": "audio frequency_penalty function_call functions logit_bias logprobs max_completion_tokens max_tokens "
    "messages metadata modalities model moderation n parallel_tool_calls prediction presence_penalty "
    "prompt_cache_key prompt_cache_options prompt_cache_retention reasoning_effort response_format "
    "safety_identifier seed service_tier stop store stream stream_options temperature tool_choice tools "
    "top_logprobs top_p user verbosity web_search_options",
    "responses": "access_programs background background_options context_management conversation image include "
    "input instructions max_output_tokens max_tool_calls metadata model moderation parallel_tool_calls "
    "previous_response_id prompt prompt_cache_key prompt_cache_options prompt_cache_retention reasoning "
    "safety_identifier service_tier store stream stream_options temperature text tool_choice tools top_logprobs "
    "top_p truncation user",
    "completions": "best_of echo frequency_penalty logit_bias logprobs max_tokens model n presence_penalty prompt "
    "seed stop stream stream_options suffix temperature top_p user",
}


def docs_table(endpoint: str) -> dict[str, str]:
    """field -> status of the endpoint's table in docs/serving.md."""
    text = DOCS.read_text()
    start = text.index(HEADINGS[endpoint])
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith(("| field |", "|---")) or not line.strip():
            if rows:
                break
            continue
        m = re.match(r"\| `([a-z_]+)` \| (honoured|ignored|refused) \|", line)
        assert m, f"a row that does not read | `field` | status | ...: {line!r}"
        assert m.group(1) not in rows, f"{m.group(1)} is listed twice for {endpoint}"
        rows[m.group(1)] = m.group(2)
    return rows


def code_policy(endpoint: str) -> dict[str, str]:
    out = {f: "honoured" for f in protocol.honoured(endpoint)}
    out |= {f: "ignored" for f in protocol.ignored(endpoint)}
    out |= {f: "refused" for f in protocol.REFUSED[endpoint]}
    return out


@pytest.mark.parametrize("endpoint", HEADINGS)
def test_docs_table_is_the_codes_field_policy(endpoint):
    docs, code = docs_table(endpoint), code_policy(endpoint)
    assert docs == code, {
        f: (docs.get(f), code.get(f)) for f in set(docs) | set(code) if docs.get(f) != code.get(f)
    }


@pytest.mark.parametrize("endpoint", HEADINGS)
def test_every_openai_request_field_has_a_status(endpoint):
    missing = set(OPENAI_FIELDS[endpoint].split()) - set(code_policy(endpoint))
    assert not missing, f"{endpoint}: fields of OpenAI's API with no status here: {sorted(missing)}"


def test_honoured_ignored_and_refused_do_not_overlap():
    for endpoint in HEADINGS:
        honoured, ignored, refused = (
            protocol.honoured(endpoint),
            protocol.ignored(endpoint),
            set(protocol.REFUSED[endpoint]),
        )
        assert not (honoured & refused) and not (ignored & refused) and not (honoured & ignored)
