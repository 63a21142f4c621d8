"""Generate the demo domain corpus and instruction set (a ride-hailing and food-delivery company).

The files in ``configs/demo_data/`` were written by ``pipeline demo-data``; regenerating them with
the same seed gives the same bytes. The text is templated, so a tiny model learns it within a few
dozen steps, which lets tests assert that losses fall. A few documents repeat on purpose (the
dedup step must drop them) and some carry e-mail addresses and phone numbers (PII scrubbing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = ["Lisbon", "Austin", "Nairobi", "Jakarta", "Warsaw", "Bogota", "Osaka", "Lagos", "Leeds"]
ITEMS = ["pad thai", "burrito bowl", "ramen", "falafel wrap", "pizza", "poke bowl", "biryani"]
VEHICLES = ["economy", "comfort", "xl", "moto", "green"]
ISSUES = [
    ("late delivery", "the courier was delayed by traffic", "a credit of {credit} was applied"),
    ("missing item", "the restaurant forgot the {item}", "the {item} was refunded in full"),
    ("wrong route", "the driver took a longer route", "the fare was adjusted to the quoted price"),
    ("lost item", "the rider left a bag in the car", "the driver was contacted to return it"),
    ("double charge", "the payment was captured twice", "the duplicate charge was reversed"),
]


def _domain_doc(rng: random.Random) -> str:
    city, item, vehicle = rng.choice(CITIES), rng.choice(ITEMS), rng.choice(VEHICLES)
    issue, cause, fix = rng.choice(ISSUES)
    credit = f"${rng.randint(2, 15)}.00"
    minutes = rng.randint(5, 45)
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"Support ticket from {city}: the customer reported a {issue} on an order of {item}. "
            f"Investigation showed that {cause.format(item=item)}. Resolution: "
            f"{fix.format(credit=credit, item=item)}. The ticket was closed after {minutes} minutes."
        )
    if kind == 1:
        surge = round(rng.uniform(1.1, 2.5), 1)
        return (
            f"Trip summary in {city}: a {vehicle} ride was requested at {rng.randint(6, 23)}:00 "
            f"with a surge multiplier of {surge}. The estimated pickup time was {minutes % 12 + 2} "
            f"minutes and the rider rated the driver {rng.randint(3, 5)} stars."
        )
    return (
        f"Courier policy for {city}: orders of {item} must be picked up within {minutes} minutes "
        f"of the restaurant marking them ready. If a courier reports a {issue}, support checks "
        f"that {cause.format(item=item)} and, where confirmed, {fix.format(credit=credit, item=item)}."
    )


def _pii_suffix(rng: random.Random) -> str:
    name = rng.choice(["ana", "bo", "chidi", "dewi", "eryk"])
    return (
        f" Contact {name}.{rng.randint(10, 99)}@example.com or call "
        f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)} for follow-up."
    )


def _instruction(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    city, item = rng.choice(CITIES), rng.choice(ITEMS)
    issue, cause, fix = rng.choice(ISSUES)
    credit = f"${rng.randint(2, 15)}.00"
    user = f"My order of {item} in {city} had a {issue}. What happened?"
    answer = (
        f"I am sorry about the {issue}. It looks like {cause.format(item=item)}. "
        f"I have made sure that {fix.format(credit=credit, item=item)}."
    )
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(
            0, {"role": "system", "content": "You are a concise support agent for the app."}
        )
    if rng.random() < 0.2:
        messages += [
            {"role": "user", "content": "Thanks. Will this happen again?"},
            {"role": "assistant", "content": f"We flagged the {issue} so the team can prevent it."},
        ]
    return {"messages": messages}


def write_demo_data(
    out_dir: Path, n_docs: int = 1500, n_chats: int = 600, seed: int = 1234
) -> None:
    """Write ``domain.jsonl`` and ``instructions.jsonl`` under ``out_dir``."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        doc = _domain_doc(rng)
        if rng.random() < 0.1:
            doc += _pii_suffix(rng)
        docs.append(doc)
    docs += docs[:40]  # exact duplicates the dedup step must remove
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "domain.jsonl").open("w") as handle:
        for doc in docs:
            handle.write(json.dumps({"text": doc}) + "\n")
    with (out_dir / "instructions.jsonl").open("w") as handle:
        for _ in range(n_chats):
            handle.write(json.dumps(_instruction(rng)) + "\n")
