"""The OpenAI connector against a real OpenAI-compatible server on 127.0.0.1: the request it
sends, the answers it parses, and every failure, through /hooks and the seed's /api/chat."""

from __future__ import annotations

import json

import pytest

from hub.services.routes import RouteInvalid
from tests.rows import attempts, events, summary
from tests.servers import FakeOpenAI, Reply


@pytest.fixture
def chat(seed_routes, fake_openai):
    """The seed's chat route, pointed at the fake server."""
    return fake_openai


def post_chat(client, key, message="Hello there"):
    return client.post("/api/chat", json={"message": message}, headers={"X-API-Key": key})


def test_request_matches_the_chat_completions_api_and_usage_is_parsed(
    client, key, add_route, fake_openai, db
):
    add_route(
        "summarise",
        [
            {
                "connector": "openai",
                "config": {
                    "base_url": fake_openai.base_url + "/",
                    "model": "gpt-4o",
                    "system_prompt": "You are terse.",
                    "user_message": "Summarise: {{ payload.text }}",
                    "temperature": 0.2,
                    "max_tokens": 50,
                },
            }
        ],
    )
    response = client.post(
        "/hooks/summarise", json={"text": "a long story"}, headers={"X-API-Key": key}
    )

    assert response.status_code == 200, response.json
    [sent] = fake_openai.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == "Bearer sk-test-key"
    assert sent.headers["content-type"] == "application/json"
    assert sent.json() == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarise: a long story"},
        ],
        "temperature": 0.2,
        "max_tokens": 50,
    }
    # The fake counts words: prompt 3 + 4, completion "echo: Summarise: a long story" 5.
    assert response.json["result"] == {
        "assistant_message": "echo: Summarise: a long story",
        "model": "gpt-4o",
        "finish_reason": "stop",
        "tokens_used": 12,
    }
    [attempt] = attempts(db)
    assert (attempt.connector, attempt.outcome, attempt.http_status) == ("openai", "ok", 200)
    assert ["Authorization", "[redacted]"] in attempt.request_headers
    stored = json.dumps([attempt.request, attempt.response, attempt.request_headers])
    assert "sk-test-key" not in stored + json.dumps(attempt.response_headers)
    assert '"total_tokens": 12' in attempt.response
    assert events(db)[0].status == "delivered"


def test_optional_fields_are_left_out_of_the_request(client, key, add_route, fake_openai):
    add_route("plain", [{"connector": "openai", "config": {"base_url": fake_openai.base_url}}])
    client.post("/hooks/plain", json={"message": "hi"}, headers={"X-API-Key": key})
    body = fake_openai.requests[0].json()
    assert body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
    }


def test_api_chat_end_to_end_has_the_articles_shape(client, key, chat, db):
    response = post_chat(client, key, "What is a webhook?")
    assert response.status_code == 200
    assert response.json == {
        "success": True,
        "user_message": "What is a webhook?",
        "assistant_message": "echo: What is a webhook?",
        "tokens_used": 4 + 5,
    }
    assert summary(db) == [(0, "openai", 1, "ok", 200)]


def test_api_chat_without_message_is_400_and_calls_nobody(client, key, chat):
    response = client.post("/api/chat", json={"text": "hi"}, headers={"X-API-Key": key})
    assert (response.status_code, response.json["error"]) == (400, "Message is required")
    assert chat.requests == []


def test_api_chat_without_the_key_is_500_not_configured(client, key, chat, db, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    response = post_chat(client, key)
    assert response.status_code == 500
    assert response.json["error"] == "API key not configured"
    assert response.json["code"] == "not_configured"
    assert chat.requests == []
    assert summary(db) == [(0, "openai", 1, "permanent", None)]


def test_rate_limit_with_retry_after_is_waited_then_retried(client, key, chat, db):
    chat.script(FakeOpenAI.rate_limited(retry_after=1))
    response = post_chat(client, key)

    assert response.status_code == 200, response.json
    assert response.json["assistant_message"] == "echo: Hello there"
    first, second = chat.wait_for(2)
    assert second.received_at - first.received_at >= 0.9  # Retry-After: 1 was honoured
    assert summary(db) == [(0, "openai", 1, "retryable", 429), (0, "openai", 2, "ok", 200)]
    rows = attempts(db)
    assert rows[0].error == (
        "OpenAI API error 429: Rate limit reached for requests. Please try again later."
    )
    assert events(db)[0].status == "delivered"


def test_retry_after_ms_wins_over_retry_after(client, key, chat, db):
    chat.script(FakeOpenAI.rate_limited(retry_after=30, retry_after_ms=50))
    response = post_chat(client, key)
    assert response.status_code == 200
    first, second = chat.requests
    assert second.received_at - first.received_at < 5  # not the 30 s of Retry-After
    assert [row[3] for row in summary(db)] == ["retryable", "ok"]


def test_three_server_errors_are_three_retryable_attempts_and_a_502(client, key, chat, db):
    chat.script(*[FakeOpenAI.server_error(500) for _ in range(3)])
    response = post_chat(client, key)

    assert response.status_code == 502
    assert response.json["code"] == "upstream_error"
    assert response.json["error"] == (
        "OpenAI API error 500: The server had an error while processing your request."
    )
    assert len(chat.requests) == 3
    assert summary(db) == [(0, "openai", n, "retryable", 500) for n in (1, 2, 3)]
    rows = attempts(db)
    # Backoff between tries: 0.5 s then 1 s, each less up to a quarter (jitter).
    gaps = [
        (b.started_at - a.started_at).total_seconds() for a, b in zip(rows, rows[1:], strict=False)
    ]
    assert gaps[0] >= 0.37 and gaps[1] >= 0.75
    [event] = events(db)
    assert (event.status, event.attempts) == ("failed", 1)
    assert event.last_error.startswith("OpenAI API error 500")


def test_unauthorized_is_permanent_and_not_retried(client, key, chat, db):
    chat.script(FakeOpenAI.unauthorized())
    response = post_chat(client, key)
    assert response.status_code == 502
    assert response.json["error"] == "OpenAI API error 401: Incorrect API key provided."
    assert "sk-test-key" not in response.get_data(as_text=True)
    assert len(chat.requests) == 1
    assert summary(db) == [(0, "openai", 1, "permanent", 401)]


def test_wrong_key_in_the_environment_reaches_the_server_and_fails_401(
    client, key, chat, db, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    response = post_chat(client, key)
    assert response.status_code == 502
    assert "401" in response.json["error"]
    assert chat.requests[0].headers["authorization"] == "Bearer sk-wrong"
    assert "sk-wrong" not in response.get_data(as_text=True)
    assert "sk-wrong" not in json.dumps([a.request for a in attempts(db)])


@pytest.mark.parametrize(
    "header, status, outcomes",
    [
        ("false", 500, ["permanent"]),  # the server says a retry will not help
        ("true", 400, ["retryable", "ok"]),  # the server says it will
    ],
)
def test_x_should_retry_overrides_the_status(client, key, chat, db, header, status, outcomes):
    chat.script(Reply(status, {"error": {"message": "nope"}}, {"x-should-retry": header}))
    post_chat(client, key)
    assert [row[3] for row in summary(db)] == outcomes


def test_slow_answer_past_the_timeout_is_retried(client, key, add_route, fake_openai, db):
    add_route(
        "chat",
        [{"connector": "openai", "config": {"base_url": fake_openai.base_url, "timeout": 0.3}}],
    )
    fake_openai.script(FakeOpenAI.slow(30))
    response = post_chat(client, key)
    assert response.status_code == 200
    assert summary(db) == [(0, "openai", 1, "retryable", None), (0, "openai", 2, "ok", 200)]
    first = attempts(db)[0]
    assert "timed out after 0.30s" in first.error
    assert 250 <= first.duration_ms < 10_000  # gave up long before the 30 s answer


def test_always_slow_is_a_504(client, key, add_route, fake_openai, db, app):
    app.config["STEP_TRIES"] = 2
    add_route(
        "chat",
        [{"connector": "openai", "config": {"base_url": fake_openai.base_url, "timeout": 0.2}}],
    )
    fake_openai.script(FakeOpenAI.slow(3), FakeOpenAI.slow(3))
    response = post_chat(client, key)
    assert (response.status_code, response.json["error"]) == (504, "API request timed out")
    assert [row[3] for row in summary(db)] == ["retryable", "retryable"]


@pytest.mark.parametrize(
    "reply",
    [
        FakeOpenAI.malformed(),
        FakeOpenAI.missing_choices(),
        Reply(200, {"choices": [{"message": {"role": "assistant", "content": None}}]}),
        Reply(200, {"choices": []}),
        Reply(200, [1, 2, 3]),
    ],
    ids=["not-json", "no-choices", "null-content", "empty-choices", "a-list"],
)
def test_a_malformed_answer_is_500_unexpected_format_and_not_retried(client, key, chat, db, reply):
    chat.script(reply)
    response = post_chat(client, key)
    assert response.status_code == 500
    assert response.json["error"] == "Unexpected API response format"
    assert response.json["code"] == "bad_response"
    assert summary(db) == [(0, "openai", 1, "permanent", 200)]


@pytest.mark.parametrize(
    "usage, tokens",
    [
        ({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, 10),
        ({"prompt_tokens": 7, "completion_tokens": 3}, 10),  # some servers omit the total
        (None, None),  # some compatible servers send no usage at all
    ],
)
def test_usage_shapes(client, key, chat, usage, tokens):
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "llama3",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "length",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    chat.script(Reply(200, body))
    response = post_chat(client, key)
    assert response.status_code == 200
    assert response.json["tokens_used"] == tokens
    assert response.json["assistant_message"] == "hi"


def test_hook_output_carries_model_and_finish_reason(client, key, add_route, fake_openai):
    fake_openai.model = "llama3:8b"  # a local server answers with its own model name
    add_route("ask", [{"connector": "openai", "config": {"base_url": fake_openai.base_url}}])
    result = client.post("/hooks/ask", json={"message": "hi"}, headers={"X-API-Key": key}).json[
        "result"
    ]
    assert result["model"] == "llama3:8b"
    assert result["finish_reason"] == "stop"


def test_api_key_env_names_another_variable(client, key, add_route, fake_openai, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("LOCAL_LLM_KEY", "sk-test-key")
    add_route(
        "ask",
        [
            {
                "connector": "openai",
                "config": {"base_url": fake_openai.base_url, "api_key_env": "LOCAL_LLM_KEY"},
            }
        ],
    )
    response = client.post("/hooks/ask", json={"message": "hi"}, headers={"X-API-Key": key})
    assert response.status_code == 200
    assert response.json["result"]["assistant_message"] == "echo: hi"


def test_missing_key_on_a_hook_is_500_not_configured(client, key, add_route, fake_openai, db):
    add_route(
        "ask",
        [
            {
                "connector": "openai",
                "config": {"base_url": fake_openai.base_url, "api_key_env": "NOPE"},
            }
        ],
    )
    response = client.post("/hooks/ask", json={"message": "hi"}, headers={"X-API-Key": key})
    assert response.status_code == 500
    assert (response.json["code"], response.json["error"]) == (
        "not_configured",
        "API key not configured",
    )
    assert fake_openai.requests == []


def test_a_template_that_fails_at_run_time_is_a_clear_500(client, key, add_route, fake_openai, db):
    add_route(
        "ask",
        [
            {
                "connector": "openai",
                "config": {"base_url": fake_openai.base_url, "user_message": "{{ payload.nope }}"},
            }
        ],
    )
    response = client.post("/hooks/ask", json={"message": "hi"}, headers={"X-API-Key": key})
    assert response.status_code == 500
    assert response.json["code"] == "bad_config"
    assert (
        response.json["error"]
        == "user_message: template failed: 'dict object' has no attribute 'nope'"
    )
    assert fake_openai.requests == []
    assert summary(db) == [(0, "openai", 1, "permanent", None)]
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"api_key_env": "sk-live-abc123"}, "api_key_env: String should match pattern"),
        ({"base_url": "ftp://example.com"}, "base_url: Value error, must start with http"),
        ({"temperature": 3}, "temperature: Input should be less than or equal to 2"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than 0"),
        ({"modle": "gpt-4o"}, "modle: Extra inputs are not permitted"),
        ({"user_message": "{{ payload.x "}, "user_message: template does not parse"),
    ],
)
def test_bad_config_is_refused_when_the_route_is_saved(add_route, config, reason):
    with pytest.raises(RouteInvalid) as info:
        add_route("ask", [{"connector": "openai", "config": config}])
    assert reason in str(info.value)
    assert "sk-live-abc123" not in str(info.value)  # a key pasted by mistake is not echoed


def test_without_user_message_an_input_lacking_message_is_a_clear_permanent_error(
    client, key, add_route, fake_openai, db
):
    add_route("ask", [{"connector": "openai", "config": {"base_url": fake_openai.base_url}}])
    response = client.post("/hooks/ask", json={"text": "hi"}, headers={"X-API-Key": key})
    assert response.status_code == 422
    assert response.json["code"] == "bad_input"
    assert "set user_message to a template" in response.json["error"]
    assert fake_openai.requests == []
    assert summary(db) == [(0, "openai", 1, "permanent", None)]


def test_api_chat_with_a_broken_template_is_the_seeds_500(client, key, add_route, fake_openai):
    add_route(
        "chat",
        [
            {
                "connector": "openai",
                "config": {"base_url": fake_openai.base_url, "user_message": "{{ payload.x.y }}"},
            }
        ],
    )
    response = post_chat(client, key)
    assert response.status_code == 500
    assert response.json == {
        "error": "Unknown error occurred",
        "code": "bad_config",
        "id": response.json["id"],
    }
    assert fake_openai.requests == []
