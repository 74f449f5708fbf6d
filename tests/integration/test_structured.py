"""Structured output end to end: response_format json_object / json_schema and the grammar
extension, against the `jsonschema` package (code ebb does not share).

  - 50 schemas (nested objects, arrays with bounds, enums and consts with escapes and
    unicode, numbers, integers, booleans, nulls, type lists, anyOf, $ref to $defs with
    recursion, optional members): the output of each, greedy and sampled, must parse and
    validate (and end with finish_reason "stop": the schemas bound every string and array,
    so a model cannot run out of tokens inside one);
  - the official client's structured-output helper (chat.completions.parse with a Pydantic
    model) round-trips;
  - json_object always gives a JSON object; a GBNF grammar on /v1/completions is followed;
  - batching and speculative decoding leave the constrained text unchanged;
  - a schema keyword the compiler cannot honour is refused naming its path.
"""
import concurrent.futures
import json

import pytest
import requests

from daemon import start_ready

jsonschema = pytest.importorskip("jsonschema")
IO = 300
S = {"type": "string", "maxLength": 24}


@pytest.fixture(scope="module")
def srv(ebb_bin, model_path, tmp_path_factory):
    s = start_ready(ebb_bin, "--max-running", "8", catalog=tmp_path_factory.mktemp("so") / "so.db",
                    model_path=model_path, start_timeout=120)
    yield s
    s.stop_clean()


def obj(props, required=None, **extra):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


def arr(items, lo=0, hi=3):
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


# $refs chained through $defs (recursive references are covered by tests/unit/test_json_schema.c:
# nothing bounds a recursive document's depth, so a small model may nest until max_tokens).
CHAIN_DEFS = {"leaf": obj({"name": S}), "branch": obj({"name": S, "leaves": arr({"$ref": "#/$defs/leaf"}, 0, 2)})}

SCHEMAS = [
    obj({"name": S, "age": {"type": "integer"}}),
    obj({"city": S, "population": {"type": "integer"}, "capital": {"type": "boolean"}}),
    obj({"title": S, "year": {"type": "integer"}, "rating": {"type": "number"}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"nothing": {"type": "null"}, "label": S}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"size": {"enum": ["S", "M", "L", "XL"]}, "count": {"type": "integer"}}),
    obj({"quote": {"enum": ["say \"hi\"", "back\\slash", "tab\there", "line\nbreak"]}}),
    obj({"city": {"enum": ["Zürich", "São Paulo", "東京", "Kraków"]}}),
    obj({"emoji": {"const": "🙂"}, "word": S}),
    obj({"version": {"const": 2}, "name": S}),
    obj({"kind": {"const": "point"}, "x": {"type": "number"}, "y": {"type": "number"}}),
    obj({"temperature": {"type": "number"}, "unit": {"enum": ["C", "F"]}}),
    obj({"delta": {"type": "integer"}, "ratio": {"type": "number"}}),
    obj({"tags": arr(S, 1, 3)}),
    obj({"numbers": arr({"type": "integer"}, 2, 4)}),
    obj({"flags": arr({"type": "boolean"}, 0, 3)}),
    obj({"matrix": arr(arr({"type": "integer"}, 1, 2), 1, 2)}),
    obj({"people": arr(obj({"name": S, "age": {"type": "integer"}}), 1, 2)}),
    obj({"owner": obj({"name": S, "email": S})}),
    obj({"a": obj({"b": obj({"c": obj({"d": S})})})}),
    obj({"name": S, "nickname": S}, required=["name"]),
    obj({"id": {"type": "integer"}, "note": S, "done": {"type": "boolean"}}, required=["id"]),
    obj({"first": S, "middle": S, "last": S}, required=["first", "last"]),
    obj({"x": S, "y": S, "z": S}, required=[]),
    obj({"value": {"type": ["integer", "null"]}}),
    obj({"value": {"type": ["string", "boolean"], "maxLength": 12}}),
    obj({"answer": {"anyOf": [{"type": "integer"}, S]}}),
    obj({"shape": {"anyOf": [obj({"radius": {"type": "number"}}), obj({"w": {"type": "number"},
                                                                      "h": {"type": "number"}})]}}),
    obj({"result": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}}),
    obj({"code": {"type": "string", "minLength": 3, "maxLength": 3}}),
    obj({"short": {"type": "string", "maxLength": 4}, "long": {"type": "string", "minLength": 5, "maxLength": 30}}),
    obj({"when": {"type": "string", "format": "date"}}),
    obj({"at": {"type": "string", "format": "date-time"}}),
    obj({"id": {"type": "string", "format": "uuid"}}),
    obj({"clock": {"type": "string", "format": "time"}}),
    {"$defs": {"pt": obj({"x": {"type": "integer"}, "y": {"type": "integer"}})},
     **obj({"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}})},
    {"$defs": CHAIN_DEFS, **obj({"root": {"$ref": "#/$defs/branch"}})},
    {"definitions": {"name": S}, **obj({"who": {"$ref": "#/definitions/name"}})},
    obj({"items": arr(obj({"sku": S, "qty": {"type": "integer"}, "price": {"type": "number"}}), 1, 2),
         "total": {"type": "number"}}),
    obj({"steps": arr(obj({"n": {"type": "integer"}, "text": S}), 1, 3)}),
    obj({"pair": {"type": "array", "prefixItems": [S, {"type": "integer"}], "items": False}}),
    obj({"lang": {"enum": ["en", "fr", "de"]}, "text": S, "confidence": {"type": "number"}}),
    obj({"q": S, "a": S, "sources": arr(S, 0, 2)}),
    obj({"error": {"anyOf": [{"type": "null"}, obj({"code": {"type": "integer"}, "message": S})]}}),
    obj({"event": S, "attendees": arr(obj({"name": S, "rsvp": {"enum": ["yes", "no", "maybe"]}}), 0, 2)}),
    arr(S, 1, 3),
    arr(obj({"k": S, "v": {"type": "integer"}}), 1, 2),
    {"type": "integer"},
    {"enum": ["alpha", "beta", 3, None, True]},
]
assert len(SCHEMAS) == 50


def ask(srv, schema, i, **extra):
    body = {"messages": [{"role": "user", "content": f"Reply with JSON for item {i}: {json.dumps(schema)[:300]}"}],
            "max_tokens": 300, "response_format": {"type": "json_schema", "json_schema": {
                "name": f"s{i}", "schema": schema, "strict": True}}, **extra}
    r = requests.post(srv.url("/v1/chat/completions"), json=body, timeout=IO)
    assert r.status_code == 200, (i, r.text)
    return r.json()


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_fifty_schemas_validate(srv, mode):
    extra = {"temperature": 0} if mode == "greedy" else {"temperature": 1.0, "seed": 11}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        docs = list(pool.map(lambda a: ask(srv, a[1], a[0], **extra), enumerate(SCHEMAS)))
    grammar_ms = tokens = 0
    for i, (schema, doc) in enumerate(zip(SCHEMAS, docs)):
        ch = doc["choices"][0]
        text = ch["message"]["content"]
        assert ch["finish_reason"] == "stop", (i, schema, text)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        grammar_ms += doc["timings"].get("grammar_ms", 0)
        tokens += doc["usage"]["completion_tokens"]
    print(f"\n{mode}: {tokens} tokens, grammar masking {grammar_ms / tokens:.3f} ms per token")


def test_official_client_parse_with_pydantic(srv):
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")

    class Address(pydantic.BaseModel):
        city: str
        country: str

    class Answer(pydantic.BaseModel):
        name: str
        age: int
        address: Address
        student: bool

    client = openai.OpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0, timeout=IO)
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=client.models.list().data[0].id, response_format=Answer, max_tokens=400, temperature=0,
              messages=[{"role": "user", "content": "Invent a person: name, age, address, student or not."}])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", msg.content
    assert isinstance(msg.parsed, Answer), msg.content
    jsonschema.validate(json.loads(msg.content), Answer.model_json_schema())


def test_json_object_and_grammar(srv):
    r = requests.post(srv.url("/v1/chat/completions"), timeout=IO, json={
        "messages": [{"role": "user", "content": "Describe a cat in JSON."}], "max_tokens": 120, "temperature": 0.7,
        "seed": 3, "response_format": {"type": "json_object"}})
    text = r.json()["choices"][0]["message"]["content"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    # GBNF on completions: the text is one of the grammar's sentences.
    for seed in range(5):
        r = requests.post(srv.url("/v1/completions"), timeout=IO, json={
            "prompt": "Is the sky blue? Answer:", "max_tokens": 10, "temperature": 1.0, "seed": seed,
            "grammar": 'root ::= " " ("yes" | "no") ("." | "!")'})
        ch = r.json()["choices"][0]
        assert ch["text"] in (" yes.", " yes!", " no.", " no!") and ch["finish_reason"] == "stop", ch


def test_batching_and_speculation_leave_constrained_text_unchanged(srv):
    schema = SCHEMAS[40]
    alone = ask(srv, schema, 40, temperature=0, speculative=False)["choices"][0]["message"]["content"]
    spec = ask(srv, schema, 40, temperature=0, speculative="ngram")["choices"][0]["message"]["content"]
    assert spec == alone
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(ask, srv, SCHEMAS[i], i, temperature=0) for i in range(7)]
        batched = ask(srv, schema, 40, temperature=0)["choices"][0]["message"]["content"]
        [f.result() for f in futs]
    assert batched == alone


@pytest.mark.parametrize("body,param,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}}}},
     "response_format.json_schema.schema.properties.n.minimum", "minimum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "^a+$"}}}}, "response_format.json_schema.schema.pattern", "pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"grammar": "root ::= foo"}, "grammar", "foo"),
    ({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}, None, "not both"),
])
def test_refusals_name_the_keyword(srv, body, param, needle):
    r = requests.post(srv.url("/v1/chat/completions"), timeout=IO,
                      json={"messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if param:
        assert err["param"] == param, err
    assert needle in err["message"], err


# ---------------------------------------------------------------- tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"$defs": {"zone": {"type": "string", "maxLength": 32}},
                   "type": "object", "properties": {"zone": {"$ref": "#/$defs/zone"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_call_round_trip_with_the_official_client(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0, timeout=IO)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=120)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
    (call,) = ch.message.tool_calls
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.type == "function" and call.id.startswith("call_")
    # Streamed: the deltas add up to the same call (the client's helper accumulates them).
    name, args, finish = None, "", None
    for chunk in client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], stream=True,
                                                tool_choice="required", parallel_tool_calls=False, temperature=0,
                                                max_tokens=120):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            assert tc.index == 0
            name = tc.function.name or name
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, args, finish) == (call.function.name, call.function.arguments, "tool_calls")
    # The result goes back as a tool message; with tool_choice "none" the answer is text.
    history = ASK + [ch.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22, "sky": "clear"}'}]
    r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert not r.choices[0].message.content.startswith("<")
    # The history's call and result reached the prompt: it is longer than the question's.
    alone = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="none",
                                           temperature=0, max_tokens=1)
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_named_tool_and_auto(srv):
    for _ in range(1):
        r = requests.post(srv.url("/v1/chat/completions"), timeout=IO, json={
            "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 120,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "parallel_tool_calls": False})
        ch = r.json()["choices"][0]
        (call,) = ch["message"]["tool_calls"]
        assert call["function"]["name"] == "get_time" and ch["finish_reason"] == "tool_calls"
        jsonschema.validate(json.loads(call["function"]["arguments"]), TIME["function"]["parameters"])
    # auto: text or calls, each reported as what it is.
    for seed in range(4):
        r = requests.post(srv.url("/v1/chat/completions"), timeout=IO, json={
            "messages": ASK, "tools": [WEATHER], "temperature": 1.0, "seed": seed, "max_tokens": 60})
        ch = r.json()["choices"][0]
        if ch["message"].get("tool_calls"):
            assert ch["message"]["content"] is None and ch["finish_reason"] in ("tool_calls", "length")
        else:
            assert not ch["message"]["content"].startswith("<")


@pytest.mark.parametrize("body,param,needle", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "not in 'tools'"),
    ({"tool_choice": "required"}, "tool_choice", "'tools' is empty"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "a"}}}}}]},
     "tools[0].function.parameters.properties.x.pattern", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "repeats"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "assistant"),
])
def test_tool_refusals(srv, body, param, needle):
    r = requests.post(srv.url("/v1/chat/completions"), timeout=IO, json={"messages": ASK, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
