"""OpenAI requests -> harmony prompts (api/harmony_io.py, over gptoss_jax.harmony's mapping), checked against
conversations built here with openai-harmony's own classes, so that every rendering rule is stated
independently of the code under test."""

from __future__ import annotations

import datetime as dt

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    ToolNamespaceConfig,
)

from gptoss_jax.api.harmony_io import chat_turn, responses_turn
from gptoss_jax.api.protocol import APIError, ChatRequest, ResponsesRequest, parse
from gptoss_jax.harmony import OutputParser, parts_to_messages
from gptoss_jax.tokenizer import decode, encode, get_harmony_encoding

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}


def expected(
    messages, effort=ReasoningEffort.MEDIUM, instructions=None, tools=None, date="today"
) -> list[int]:
    sys_ = SystemContent.new().with_reasoning_effort(effort)
    if date is not None:
        sys_ = sys_.with_conversation_start_date(dt.date.today().isoformat() if date == "today" else date)
    head = [Message.from_role_and_content(Role.SYSTEM, sys_)]
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools(tools)
        head.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    conv = Conversation.from_messages(head + messages)
    return list(
        get_harmony_encoding().render_conversation_for_completion(
            conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
        )
    )


def user(t):
    return Message.from_role_and_content(Role.USER, t)


def asst(t, ch):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel(ch)


def call(name, args):
    return asst(args, "commentary").with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")


def result(name, out):
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), out)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


def chat(**body):
    return chat_turn(parse(ChatRequest, body)).prompt_tokens()


TOOL = ToolDescription.new("get_weather", "Weather in a city", WEATHER["function"]["parameters"])


@pytest.mark.parametrize("date", [None, "2025-08-05"])
def test_conversation_start_date_as_configured(date):
    """`serve --date none` / a fixed date (a fine-tuned model's prompts as trained); the default is today."""
    turn = chat_turn(parse(ChatRequest, {"messages": [{"role": "user", "content": "Hi"}]}))
    assert turn.prompt_tokens(date) == expected([user("Hi")], date=date)


def test_system_and_developer_become_the_developer_instructions_with_tools():
    got = chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use SI."},
            {"role": "user", "content": "Hi"},
        ],
        tools=[WEATHER],
        reasoning_effort="high",
    )
    assert got == expected([user("Hi")], ReasoningEffort.HIGH, "Be brief.\n\nUse SI.", [TOOL])
    assert "namespace functions" in decode(got) and "type get_weather" in decode(got)


def test_tool_choice_none_keeps_instructions_and_renders_no_tools():
    got = chat(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tools=[WEATHER],
        tool_choice="none",
    )
    assert got == expected([user("Hi")], instructions="Be brief.")
    assert "get_weather" not in decode(got) and "Be brief." in decode(got)


def test_tool_loop_keeps_reasoning_and_renders_calls_and_results():
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
    ]
    got = chat(messages=msgs, tools=[WEATHER])
    want = [
        user("Weather in Paris?"),
        asst("Need the tool.", "analysis"),
        call("get_weather", '{"city":"Paris"}'),
        result("get_weather", '{"temp": 20}'),
    ]
    assert got == expected(want, tools=[TOOL])
    assert "Need the tool." in decode(got)


def test_reasoning_is_dropped_after_a_final_answer_and_kept_in_the_tool_loop_after_it():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning": "think1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "Checking.", "reasoning": "think2", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    got = chat(messages=msgs, tools=[WEATHER])
    want = [
        user("q1"),
        asst("a1", "final"),
        user("q2"),
        asst("think2", "analysis"),
        asst("Checking.", "commentary"),
        call("get_weather", '{"city":"Paris"}'),
        result("get_weather", "sunny"),
    ]
    assert got == expected(want, tools=[TOOL])
    text = decode(got)
    assert "think1" not in text and "think2" in text
    # harmony's own auto_drop_analysis keeps think1 here (it only looks at the first final answer)
    conv = Conversation.from_messages(
        [
            user("q1"),
            asst("think1", "analysis"),
            asst("a1", "final"),
            user("q2"),
            asst("think2", "analysis"),
            call("f", "{}"),
            result("f", "x"),
        ]
    )
    assert "think1" in decode(get_harmony_encoding().render_conversation_for_completion(conv, Role.ASSISTANT))


def test_content_parts_and_several_calls_in_one_turn():
    call2 = {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    msgs = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Paris "}, {"type": "text", "text": "and Oslo"}],
        },
        {"role": "assistant", "tool_calls": [CALL, call2]},
        {"role": "tool", "tool_call_id": "call_2", "content": "cold"},
        {"role": "tool", "tool_call_id": "call_1", "content": "warm"},
    ]
    want = [
        user("Paris and Oslo"),
        call("get_weather", '{"city":"Paris"}'),
        call("get_weather", '{"city":"Oslo"}'),
        result("get_weather", "cold"),
        result("get_weather", "warm"),
    ]
    assert chat(messages=msgs, tools=[WEATHER]) == expected(want, tools=[TOOL])


@pytest.mark.parametrize(
    "body, needle, param",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "tool_call_id": "nope", "content": "y"},
                ]
            },
            "'nope' matches no tool call",
            "messages[1].tool_call_id",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            },
            "'get_time', which is not among the tools",
            "tool_choice",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            "needs tools",
            "tool_choice",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, WEATHER]},
            "duplicate tool name",
            "tools[1].function.name",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}},
                        },
                    }
                ],
            },
            "invalid JSON Schema",
            "tools[0].function.parameters",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            },
            "type 'object'",
            "tools[0].function.parameters",
        ),
        ({"messages": [{"role": "user"}]}, "field required", "messages[0].content"),
    ],
)
def test_bad_conversations(body, needle, param):
    with pytest.raises(APIError) as e:
        chat_turn(parse(ChatRequest, body))
    assert needle in str(e.value) and e.value.param == param and e.value.status == 400
    assert "\n" not in str(e.value)


def test_responses_items_phases_and_previous_response():
    body = {
        "instructions": "Be brief.",
        "tools": [
            {
                "type": "function",
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER["function"]["parameters"],
            }
        ],
        "input": [
            {"role": "user", "content": "Paris?"},
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "Need the tool."}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "On it."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
        "reasoning": {"effort": "low"},
    }
    turn = responses_turn(parse(ResponsesRequest, body), None)
    want = [
        user("Paris?"),
        asst("Need the tool.", "analysis"),
        asst("On it.", "commentary"),
        call("get_weather", "{}"),
        result("get_weather", "sunny"),
    ]
    assert turn.prompt_tokens() == expected(want, ReasoningEffort.LOW, "Be brief.", [TOOL])

    # the model answers; a follow-up refers to it by previous_response_id (stored as harmony messages)
    p = OutputParser()
    for t in encode("<|channel|>final<|message|>It is sunny.<|return|>", allowed_special="all"):
        p.feed(t)
    p.finish()
    turn.messages += parts_to_messages(p.parts)
    nxt = responses_turn(parse(ResponsesRequest, {"input": "Thanks", "previous_response_id": "r"}), turn)
    # instructions and tools are not inherited; the finished turn's reasoning is dropped
    assert nxt.prompt_tokens() == expected(
        want[:1] + want[2:] + [asst("It is sunny.", "final"), user("Thanks")]
    )


def test_responses_assistant_phase_and_unknown_call_id():
    body = {
        "input": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "Working on it.", "phase": "commentary"},
            {"role": "assistant", "content": "Done.", "phase": "final_answer"},
        ]
    }
    assert responses_turn(parse(ResponsesRequest, body), None).messages[1:] == [
        asst("Working on it.", "commentary"),
        asst("Done.", "final"),
    ]
    bad = {"input": [{"type": "function_call_output", "call_id": "zz", "output": "x"}]}
    with pytest.raises(APIError, match="input\\[0\\].call_id: 'zz' matches no function_call"):
        responses_turn(parse(ResponsesRequest, bad), None)
    with pytest.raises(APIError, match="input\\[0\\].type: unsupported input item type 'file_search_call'"):
        responses_turn(parse(ResponsesRequest, {"input": [{"type": "file_search_call"}]}), None)
    with pytest.raises(APIError, match="tools\\[0\\].type: unknown tool type 'nope'"):
        responses_turn(parse(ResponsesRequest, {"input": "x", "tools": [{"type": "nope"}]}), None)


# ------------------------------------------------------------------------------- namespaces, custom, hosted
CRM_FUNCTIONS = [
    {"type": "function", "name": "lookup", "description": "Find a customer",
     "parameters": {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]}},
    {"type": "function", "name": "forget", "description": "Forget a customer"},
]  # fmt: skip
RTOOL = {"type": "function", **WEATHER["function"]}


def expected_dev(messages, dev: DeveloperContent) -> list[int]:
    sys_ = SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)
    sys_ = sys_.with_conversation_start_date(dt.date.today().isoformat())
    head = [
        Message.from_role_and_content(Role.SYSTEM, sys_),
        Message.from_role_and_content(Role.DEVELOPER, dev),
    ]
    conv = Conversation.from_messages(head + messages)
    return list(
        get_harmony_encoding().render_conversation_for_completion(
            conv, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
        )
    )


def test_namespace_tools_render_as_harmony_renders_a_namespace():
    ns = {"type": "namespace", "name": "crm", "description": "The customer database.", "tools": CRM_FUNCTIONS}
    body = {"instructions": "Be brief.", "input": "Who?", "tools": [RTOOL, ns]}
    turn = responses_turn(parse(ResponsesRequest, body), None)
    crm = ToolNamespaceConfig(
        name="crm",
        description="The customer database.",
        tools=[
            ToolDescription.new("lookup", "Find a customer", CRM_FUNCTIONS[0]["parameters"]),
            ToolDescription.new("forget", "Forget a customer", None),
        ],
    )
    dev = DeveloperContent.new().with_instructions("Be brief.").with_function_tools([TOOL]).with_tools(crm)
    assert turn.prompt_tokens() == expected_dev([user("Who?")], dev)
    text = decode(turn.prompt_tokens())
    assert "## crm\n\n// The customer database.\nnamespace crm {" in text and "} // namespace crm" in text
    # a namespace alone (no function tools) renders too
    alone = responses_turn(parse(ResponsesRequest, {"input": "Who?", "tools": [ns]}), None)
    assert alone.prompt_tokens() == expected_dev([user("Who?")], DeveloperContent.new().with_tools(crm))


def test_custom_tools_render_as_a_function_of_one_string():
    grammar = 'start: "*** Begin Patch" /(.|\\n)*/ "*** End Patch"'
    tools = [
        {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
         "format": {"type": "grammar", "syntax": "lark", "definition": grammar}},
        {"type": "custom", "name": "note"},
    ]  # fmt: skip
    turn = responses_turn(parse(ResponsesRequest, {"input": "x", "tools": tools}), None)
    dev = DeveloperContent.new().with_function_tools(
        [
            ToolDescription.new(
                "apply_patch",
                "Apply a patch\nThe input is free-form text (not JSON) that must match this lark grammar:\n"
                + grammar,
                {"type": "string"},
            ),
            ToolDescription.new("note", "The input is free-form text (not JSON).", {"type": "string"}),
        ]
    )
    assert turn.prompt_tokens() == expected_dev([user("x")], dev)
    assert "type note = (_: string) => any;" in decode(turn.prompt_tokens())


def test_namespace_and_custom_calls_and_outputs_render_in_their_namespace():
    ns = {"type": "namespace", "name": "crm", "description": "d", "tools": CRM_FUNCTIONS}
    items = [
        {"role": "user", "content": "x"},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "namespace": "crm", "arguments": "{}"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "note", "input": "hi"},
        {"type": "function_call_output", "call_id": "c1", "output": "Ada"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": "ok"},
    ]
    tools = [ns, {"type": "custom", "name": "note"}]
    turn = responses_turn(parse(ResponsesRequest, {"input": items, "tools": tools}), None)
    answer = lambda who, t: (
        Message.from_author_and_content(Author.new(Role.TOOL, who), t)
        .with_channel("commentary")
        .with_recipient("assistant")
    )
    assert turn.messages == [
        user("x"),
        asst("{}", "commentary").with_recipient("crm.lookup").with_content_type("<|constrain|>json"),
        asst("hi", "commentary").with_recipient("functions.note"),
        answer("crm.lookup", "Ada"),
        answer("functions.note", "ok"),
    ]
    # the parser makes tool calls of the offered namespace's functions, with the namespace
    p = OutputParser(namespaces=list(turn.namespaces))
    for t in encode(
        "<|channel|>commentary to=crm.forget <|constrain|>json<|message|>{}<|call|>", allowed_special="all"
    ):
        p.feed(t)
    p.finish()
    assert [(c.namespace, c.name) for c in p.tool_calls] == [("crm", "forget")]
    assert parts_to_messages(p.parts) == [
        asst("{}", "commentary").with_recipient("crm.forget").with_content_type("<|constrain|>json")
    ]


@pytest.mark.parametrize(
    "tools, param",
    [
        ([{"type": "namespace", "name": "a", "tools": [{"type": "web_search"}]}], "tools[0].tools[0].type"),
        ([{"type": "namespace", "name": "a", "tools": [{"type": "namespace", "name": "b", "tools": []}]}],
         "tools[0].tools[0].type"),
        ([{"type": "namespace", "name": "a", "tools": CRM_FUNCTIONS}] * 2, "tools[1].name"),
        ([{"type": "namespace", "name": "functions", "tools": CRM_FUNCTIONS}], "tools[0].name"),
        ([{"type": "namespace", "name": "a", "tools": CRM_FUNCTIONS[:1] * 2}], "tools[0].tools[1].name"),
        ([{"type": "namespace", "name": "a", "tools": []}], "tools[0].tools"),
        ([{"type": "custom", "name": "bad name!"}], "tools[0].name"),
        ([{"type": "custom", "name": "x", "format": {"type": "grammar", "syntax": "ebnf"}}], "tools[0].format.syntax"),
        ([{"type": "frobnicate"}], "tools[0].type"),
    ],
)  # fmt: skip
def test_bad_namespace_and_custom_tools_are_400s_naming_the_field(tools, param):
    with pytest.raises(APIError) as e:
        responses_turn(parse(ResponsesRequest, {"input": "x", "tools": tools}), None)
    assert e.value.param == param and e.value.status == 400, str(e.value)


def test_hosted_tools_are_left_out_logged_once_or_refused(caplog):
    from gptoss_jax.api import hosted

    hosted._logged.discard("file_search")
    body = {"input": "x", "tools": [RTOOL, {"type": "file_search", "vector_store_ids": ["v"]}]}
    with caplog.at_level("WARNING", logger="gptoss_jax.api"):
        for _ in range(2):
            turn = responses_turn(parse(ResponsesRequest, body), None)
            assert turn.prompt_tokens() == expected([user("x")], tools=[TOOL])
    assert sum("'file_search' is not available" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(APIError) as e:
        responses_turn(parse(ResponsesRequest, body), None, strict_tools=True)
    assert e.value.param == "tools[1].type" and "file_search" in str(e.value)


def test_encrypted_reasoning_is_restored_and_a_bad_blob_is_a_400():
    from gptoss_jax.api.sealed import ReasoningSealer

    sealer = ReasoningSealer("k1")
    blob = sealer.seal("The user wants the weather.")
    assert "weather" not in blob and sealer.open(blob, "x") == "The user wants the weather."
    items = [
        {"role": "user", "content": "x"},
        {"type": "reasoning", "summary": [], "encrypted_content": blob},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
    ]
    turn = responses_turn(parse(ResponsesRequest, {"input": items, "tools": [RTOOL]}), None, sealer=sealer)
    assert turn.messages[1] == asst("The user wants the weather.", "analysis")
    assert asst("The user wants the weather.", "analysis") in turn.harmony_messages()  # kept in the tool loop
    done = [*items, {"type": "function_call_output", "call_id": "c1", "output": "sun"},
            {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]  # fmt: skip
    turn = responses_turn(parse(ResponsesRequest, {"input": done, "tools": [RTOOL]}), None, sealer=sealer)
    assert turn.messages[1].channel == "analysis"
    assert all(m.channel != "analysis" for m in turn.harmony_messages())  # dropped after the final answer
    for bad, other in ((blob[:-6] + "AAAAAA", sealer), (blob, ReasoningSealer("k2")), ("nonsense", sealer)):
        items[1]["encrypted_content"] = bad
        with pytest.raises(APIError) as e:
            responses_turn(parse(ResponsesRequest, {"input": items, "tools": [RTOOL]}), None, sealer=other)
        assert e.value.param == "input[1].encrypted_content" and e.value.status == 400
    assert (
        ReasoningSealer("same").open(ReasoningSealer("same").seal("t"), "x") == "t"
    )  # a fixed key survives restarts
