"""Pairwise LLM judge: the candidate's answers against the champion's, through any
OpenAI-compatible chat completions endpoint (``POST {endpoint}/chat/completions``).

Each held-out request is judged twice, with the two answers in swapped positions, because
judges prefer a position: the candidate wins an example (1.0) only when it wins in both
orders, loses it (0.0) only when it loses both, and anything else (a position-biased or
unreadable verdict) counts as a tie (0.5). ``win_rate`` is the mean over examples.

The API key comes from the environment variable ``judge.api_key_env`` of the process the judge
runs in: the evaluate stage's Ray job, so the variable is set on the Ray worker pods from a
Kubernetes Secret. An Airflow connection is not a source: the job cannot read Airflow's
connection store, and handing the key over from the Airflow side would put it in the job's
``runtime_env``, which the Ray dashboard's job API shows (the config refuses
``judge.airflow_conn_id`` saying so). The key is sent only as the ``Authorization`` header, and
only over https (or http to a loopback host, for local endpoints): never logged, never
returned, and cut out of every error text.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from pipeline.config import JudgeConfig
from pipeline.redact import REDACTED, redact_text

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

MAX_VERDICT_TOKENS = 4
"""A one-letter verdict needs one token; a few more tolerate "A." or a leading space."""
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
VERDICT = re.compile(r"\b([AB])\b")


class JudgeError(RuntimeError):
    """The judge endpoint could not be used (HTTP error, bad answer, missing key source)."""


def api_key(cfg: JudgeConfig) -> str | None:
    """The judge's API key, ``$<api_key_env>`` in this process's environment; ``None`` when
    ``api_key_env`` is ``None`` or the variable is unset or empty (a local endpoint without
    authentication)."""
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        return os.environ[cfg.api_key_env]
    return None


def redact(text: str, key: str | None) -> str:
    """``text`` with every occurrence of ``key`` replaced (error bodies may echo the key)."""
    return text.replace(key, REDACTED) if key else text


def judge_message(request: str, answer_a: str, answer_b: str) -> str:
    """The user turn: the request and the two answers, labelled A and B."""
    return (
        f"[Request]\n{request}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}\n\n"
        "Which answer is better? Reply with A or B."
    )


def post_with_retries(
    client: httpx.Client,
    url: str,
    body: dict[str, Any],
    *,
    key: str | None,
    key_source: str,
    attempts: int,
    backoff_s: float,
) -> dict[str, Any]:
    """POST ``body``; connection errors, timeouts, 429 and 5xx are retried ``attempts`` times
    in all with exponential backoff. Returns the decoded JSON answer. ``key_source`` says
    where the key came from, for the message of an authentication error.

    Raises:
        JudgeError: a non-transient HTTP error, or the transient ones outlasted the attempts;
            the message names the URL and status, never the key.
    """
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    shown = redact_text(url)  # an endpoint may carry credentials in its URL, as a query key
    problem, status = "", None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            response = client.post(url, json=body, headers=headers)
        except httpx.TransportError as err:
            problem, status = f"{type(err).__name__}: {redact(str(err), key)}", None
        else:
            status = response.status_code
            if status == 200:
                try:
                    answer: dict[str, Any] = response.json()
                except ValueError:
                    raise JudgeError(
                        f"judge endpoint {shown} answered HTTP 200 with a body that is not JSON: "
                        f"{redact(response.text, key)[:200]}"
                    ) from None
                return answer
            # Redact before cutting: a key straddling the cut would leak its first part.
            problem = f"HTTP {status}: {redact(response.text, key)[:300]}"
            if status not in TRANSIENT_STATUS:
                break
        log.warning("judge endpoint %s: %s (attempt %d/%d)", shown, problem, attempt + 1, attempts)
    if status in (401, 403):
        problem += f"; {key_source}"
    raise JudgeError(f"judge endpoint {shown} failed: {problem}")


def describe_key_source(cfg: JudgeConfig, key: str | None) -> str:
    """Where the key came from, for an authentication error (names, never the value)."""
    if key is None:
        env = cfg.api_key_env or "JUDGE_API_KEY"
        return (
            f"no API key was sent: set ${env} on the Ray workers (from a Kubernetes Secret) "
            f"and eval.judge.api_key_env: {env}"
        )
    return f"the key was read from ${cfg.api_key_env}"


def verdict(answer: dict[str, Any]) -> str | None:
    """ "A" or "B" from a chat completion, ``None`` when the judge said neither."""
    try:
        content = answer["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return None
    found = VERDICT.search(content.strip().upper())
    return found.group(1) if found else None


def judge_example(
    cfg: JudgeConfig,
    ask: Callable[[dict[str, Any]], dict[str, Any]],
    request: str,
    ours: str,
    theirs: str,
) -> dict[str, Any]:
    """One request judged in both orders: the candidate's answer (``ours``) as A, then as B."""
    verdicts: list[dict[str, Any]] = []
    for candidate_as, (first, second) in (("A", (ours, theirs)), ("B", (theirs, ours))):
        said = verdict(
            ask(
                {
                    "model": cfg.model,
                    "messages": [
                        {"role": "system", "content": cfg.rubric},
                        {"role": "user", "content": judge_message(request, first, second)},
                    ],
                    "temperature": 0,
                    "max_tokens": MAX_VERDICT_TOKENS,
                }
            )
        )
        winner = None if said is None else "candidate" if said == candidate_as else "champion"
        verdicts.append({"candidate_as": candidate_as, "verdict": said, "winner": winner})
    winners = {v["winner"] for v in verdicts}
    win = 1.0 if winners == {"candidate"} else 0.0 if winners == {"champion"} else 0.5
    return {"win": win, "verdicts": verdicts}


def judge_pairwise(
    cfg: JudgeConfig,
    prompts: list[str],
    candidate: list[str],
    champion: list[str],
    *,
    attempts: int = 4,
    backoff_s: float = 1.0,
) -> dict[str, Any]:
    """Judge the first ``cfg.max_examples`` requests, candidate answer against champion answer,
    each twice with the positions swapped.

    Returns:
        ``{"examples": [{"win": 1.0|0.5|0.0, "verdicts": [...]}], "win_rate": float}``; each
        verdict records where the candidate stood (``candidate_as``), what the judge said
        (``"A"``, ``"B"`` or ``None``) and who that made the winner.

    Raises:
        ValueError: the three lists differ in length.
        JudgeError: the endpoint failed (see ``post_with_retries``).
    """
    import httpx

    if not len(prompts) == len(candidate) == len(champion):
        raise ValueError(
            f"judge needs one candidate and one champion answer per request; got "
            f"{len(prompts)} requests, {len(candidate)} and {len(champion)} answers"
        )
    if not prompts:
        raise ValueError("judge needs at least one request; eval.max_generations is 0?")
    key = api_key(cfg)
    source = describe_key_source(cfg, key)
    url = f"{cfg.endpoint.rstrip('/')}/chat/completions"
    requests = list(zip(prompts, candidate, champion, strict=True))[: cfg.max_examples]
    with httpx.Client(timeout=cfg.timeout_s) as client:
        ask = partial(
            post_with_retries,
            client,
            url,
            key=key,
            key_source=source,
            attempts=attempts,
            backoff_s=backoff_s,
        )
        examples = [judge_example(cfg, ask, *request) for request in requests]
    win_rate = sum(e["win"] for e in examples) / len(examples)
    log.info(
        "judge %s: candidate win rate %.3f over %d requests", cfg.model, win_rate, len(examples)
    )
    return {"examples": examples, "win_rate": win_rate}
