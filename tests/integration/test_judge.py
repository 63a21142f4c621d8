"""The pairwise judge against a local OpenAI-compatible endpoint started by the test.

The endpoint checks the bearer token (answering 401 with the wrong key echoed back, as real
providers partly do) and judges deterministically by the requested model name:
``keyword`` prefers the answer that mentions Lisbon (A when both or neither do), ``always-a``
always answers "A" (pure position bias), and ``flaky`` fails its first two requests with
503 and 429 before judging like ``keyword``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from pipeline.config import JudgeConfig
from pipeline.eval.judge import JudgeError, judge_pairwise

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
KEY = "sk-test-judge-0123456789abcdef"
KEY_ENV = "PIPELINE_TEST_JUDGE_KEY"
KEYWORD = "lisbon"

PROMPTS = ["Where is the depot?", "Where do riders start?", "Name the city.", "Say hi.", "City?"]
CANDIDATE = ["In Lisbon.", "At the depot.", "Lisbon.", "Hi.", "Lisbon, Portugal."]
CHAMPION = ["At the depot.", "In Lisbon, near the river.", "It is Lisbon.", "Hello.", "Porto."]
# keyword judge: candidate only mentions Lisbon -> 1; champion only -> 0; both or neither -> the
# judge says A in both orders -> 0.5.
KEYWORD_WINS = [1.0, 0.0, 0.5, 0.5, 1.0]


class JudgeHandler(BaseHTTPRequestHandler):
    requests_seen: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests_seen.append(body)
        auth = self.headers.get("Authorization", "")
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": f"no route {self.path}"}})
        if auth != f"Bearer {KEY}":
            given = auth.removeprefix("Bearer ")
            return self.reply(401, {"error": {"message": f"Incorrect API key provided: {given}"}})
        if body["model"] == "flaky" and len(type(self).requests_seen) <= 2:
            status = 503 if len(type(self).requests_seen) == 1 else 429
            return self.reply(status, {"error": {"message": "try again"}})
        assert body["temperature"] == 0 and 1 <= body["max_tokens"] <= 5
        system, user = body["messages"]
        assert system["role"] == "system" and user["role"] == "user"
        return self.reply(200, {"choices": [{"message": {"content": judge(body["model"], user)}}]})

    def reply(self, status: int, payload: dict[str, object]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output to what the judge itself logs


def judge(model: str, user: dict[str, str]) -> str:
    if model == "always-a":
        return "A"
    answer_a, answer_b = user["content"].split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n")
    a_has, b_has = KEYWORD in answer_a.lower(), KEYWORD in answer_b.split("\n\n")[0].lower()
    return "B" if b_has and not a_has else "A"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def fresh_requests(caplog: pytest.LogCaptureFixture) -> None:
    JudgeHandler.requests_seen = []
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included: the key must not show there


def config(endpoint: str, model: str, **extra: object) -> JudgeConfig:
    return JudgeConfig(endpoint=endpoint, model=model, api_key_env=KEY_ENV, **extra)


def test_keyword_judge_wins_are_exact_and_key_stays_secret(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    result = judge_pairwise(config(endpoint, "keyword"), PROMPTS, CANDIDATE, CHAMPION)
    assert [e["win"] for e in result["examples"]] == KEYWORD_WINS
    assert result["win_rate"] == pytest.approx(3.0 / 5)
    assert result["examples"][0]["verdicts"] == [
        {"candidate_as": "A", "verdict": "A", "winner": "candidate"},
        {"candidate_as": "B", "verdict": "B", "winner": "candidate"},
    ]
    assert len(JudgeHandler.requests_seen) == 10  # each request twice, positions swapped
    first, swapped = (r["messages"][1]["content"] for r in JudgeHandler.requests_seen[:2])
    assert "[Answer A]\nIn Lisbon.\n\n[Answer B]\nAt the depot." in first
    assert "[Answer A]\nAt the depot.\n\n[Answer B]\nIn Lisbon." in swapped
    assert KEY not in json.dumps(result) and KEY not in caplog.text
    assert "win rate 0.600 over 5 requests" in caplog.text


def test_position_biased_judge_gives_ties(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = config(endpoint, "always-a", max_examples=3)
    result = judge_pairwise(cfg, PROMPTS, CANDIDATE, CHAMPION)
    assert [e["win"] for e in result["examples"]] == [0.5, 0.5, 0.5]
    assert result["win_rate"] == 0.5
    assert [v["winner"] for v in result["examples"][1]["verdicts"]] == ["candidate", "champion"]
    assert len(JudgeHandler.requests_seen) == 6


def test_transient_errors_are_retried(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = config(endpoint, "flaky")
    result = judge_pairwise(cfg, PROMPTS, CANDIDATE, CHAMPION, backoff_s=0.01)
    assert [e["win"] for e in result["examples"]] == KEYWORD_WINS
    assert len(JudgeHandler.requests_seen) == 12  # 10 verdicts + the 503 and the 429
    assert "HTTP 503" in caplog.text and "HTTP 429" in caplog.text


def test_wrong_key_names_endpoint_and_status_but_not_the_key(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "sk-wrong-key-9876543210fedcba"
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(JudgeError) as raised:
        judge_pairwise(config(endpoint, "keyword"), PROMPTS, CANDIDATE, CHAMPION, backoff_s=0)
    message = str(raised.value)
    assert f"{endpoint}/chat/completions" in message and "HTTP 401" in message
    assert f"${KEY_ENV}" in message
    assert wrong not in message and wrong not in caplog.text
    assert "Incorrect API key provided: ***" in message
    assert len(JudgeHandler.requests_seen) == 1  # 401 is not retried


def test_an_airflow_connection_is_refused_naming_the_way_that_works(endpoint: str) -> None:
    with pytest.raises(ValueError) as raised:
        config(endpoint, "keyword", airflow_conn_id="judge_test")
    message = str(raised.value)
    assert "eval.judge.airflow_conn_id is not supported" in message
    assert "set eval.judge.api_key_env (default JUDGE_API_KEY) on the Ray workers" in message


def test_no_key_names_the_variable_to_set_on_the_ray_workers(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(JudgeError) as raised:
        judge_pairwise(config(endpoint, "keyword"), PROMPTS, CANDIDATE, CHAMPION, backoff_s=0)
    assert str(raised.value).endswith(
        f'HTTP 401: {{"error": {{"message": "Incorrect API key provided: "}}}}; no API key '
        f"was sent: set ${KEY_ENV} on the Ray workers (from a Kubernetes Secret) and "
        f"eval.judge.api_key_env: {KEY_ENV}"
    )


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://api.openai.com/v1", True),
        ("http://127.0.0.1:8000/v1", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000/v1", True),
        ("http://judge.internal:8000/v1", False),
        ("http://10.0.0.7/v1", False),
        ("http://localhost.example.com/v1", False),
        ("ftp://127.0.0.1/v1", False),
    ],
)
def test_a_plain_http_endpoint_is_refused_unless_loopback(url: str, accepted: bool) -> None:
    if accepted:
        assert config(url, "keyword").endpoint == url
        return
    with pytest.raises(ValueError) as raised:
        config(url, "keyword")
    assert f"eval.judge.endpoint {url!r} must be https://" in str(raised.value)
