"""Writes the sample files in this folder (run from the repo root: python data_samples/make_samples.py).

The chosen answer is always clearly better: correct, direct and polite, where the
rejected one is wrong, evasive or rude. Deterministic: the same files every time.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = [
    ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"), ("Brazil", "Brasilia", "Rio de Janeiro"), ("Italy", "Rome", "Milan"),
    ("Germany", "Berlin", "Munich"), ("Spain", "Madrid", "Barcelona"), ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"), ("India", "New Delhi", "Mumbai"), ("Turkey", "Ankara", "Istanbul"),
    ("Morocco", "Rabat", "Casablanca"), ("Switzerland", "Bern", "Zurich"), ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Nigeria", "Abuja", "Lagos"), ("Norway", "Oslo", "Bergen"), ("Peru", "Lima", "Cusco"),
    ("Chile", "Santiago", "Valparaiso"), ("Portugal", "Lisbon", "Porto"),
]

ADVICE = [
    ("How can I sleep better?", "Keep a regular bedtime, avoid screens and caffeine in the evening, and keep your bedroom dark and cool."),
    ("How do I make my code easier to read?", "Use clear names, keep functions short and focused, and add comments that explain why, not what."),
    ("What should I pack for a day hike?", "Water, snacks, a map, sun protection, a light jacket and a charged phone."),
    ("How can I learn a new language faster?", "Practise a little every day, speak with native speakers early, and review vocabulary with spaced repetition."),
    ("How do I keep houseplants alive?", "Give them the right amount of light, water only when the top of the soil is dry, and use pots that drain."),
    ("How should I prepare for a job interview?", "Research the company, practise answers to common questions aloud, and prepare a few questions of your own."),
    ("How can I save money on groceries?", "Plan meals for the week, shop with a list, buy staples in bulk and cook at home more often."),
    ("What is a good way to start running?", "Start with short run-walk intervals three times a week and increase the running time gradually."),
    ("How do I write a good email subject line?", "Make it short and specific, say what you need, and put the most important words first."),
    ("How can I reduce stress at work?", "Break big tasks into small steps, take short breaks, and talk to your manager about priorities."),
]

RUDE = [
    "Figure it out yourself.", "Why would I know that?", "That's a boring question.", "Just search for it.",
    "I don't care.", "Ask someone else.", "Not my problem.", "Whatever, it doesn't matter.",
]

SYSTEM = "You are a helpful assistant."


def triples(rng: random.Random) -> list[tuple[str, str, str]]:
    out = []
    for country, capital, wrong in CAPITALS:
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                    f"The capital of {country} is {wrong}."))
    for _ in range(20):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        op = rng.choice(["+", "*"])
        right = a + b if op == "+" else a * b
        wrong = right + rng.choice([-3, -2, -1, 1, 2, 5])
        out.append((f"What is {a} {op} {b}?", f"{a} {op} {b} = {right}.", f"{a} {op} {b} = {wrong}."))
    for question, answer in ADVICE:
        out.append((question, answer, rng.choice(RUDE)))
    rng.shuffle(out)
    return out


def write_jsonl(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(1234)
    data = triples(rng)  # 50 prompts
    write_jsonl("standard.jsonl", [{"prompt": q, "chosen": " " + c, "rejected": " " + r} for q, c, r in data])
    write_jsonl(
        "conversational.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for q, c, r in data[:40]
        ],
    )
    hh = []
    for i, (q, c, r) in enumerate(data[:40]):
        opener = "\n\nHuman: Hi, can you help me with something?\n\nAssistant: Of course, what do you need?" if i % 2 else ""
        hh.append({"chosen": f"{opener}\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"{opener}\n\nHuman: {q}\n\nAssistant: {r}"})
    write_jsonl("hh_style.jsonl", hh)
    unpaired = []
    for i, (q, c, r) in enumerate(data):
        # Unbalanced on purpose (as unpaired data usually is): every prompt has its good answer,
        # 3 in 5 also have the bad one.
        unpaired.append({"prompt": q, "completion": " " + c, "label": True})
        if i % 5 < 3:
            unpaired.append({"prompt": q, "completion": " " + r, "label": False})
    write_jsonl("unpaired.jsonl", unpaired)
    write_jsonl("arithmetic.jsonl", arithmetic(random.Random(7)))
    write_jsonl("feedback_logs.jsonl", feedback_logs(random.Random(11), data[:40]))


def arithmetic(rng: random.Random) -> list[dict]:
    """Prompt-only: every single-digit addition 1+1 .. 9+9 (81), asked as a chat turn; `answer` for exact_match."""
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
        for a in range(1, 10)
        for b in range(1, 10)
    ]
    rng.shuffle(rows)
    return rows


POSITIVE = [
    "Thanks!", "Great, thank you.", "Perfect, that's what I needed.", "That's right, thanks.", "Got it, thanks!",
    "Cool.", "Awesome, appreciate it.", "Nice, that makes sense.",
]
NEGATIVE = [
    "That's wrong.", "No, that's not right.", "Hmm, I don't think so.", "That's not helpful at all.",
    "Wrong, try again.", "Are you sure? That doesn't look right.", "Rude.", "That's not what I asked.",
]
NEUTRAL = ["Ok.", "Hm.", "I see."]


def feedback_logs(rng: random.Random, data: list) -> list[dict]:
    """Conversation logs with the users' reactions, for `prefopt data feedback` (48 logs).

    Each log holds 1-3 exchanges on the questions of `data` (taken in turn); an answer is the
    good one 60% of the time, else the bad one. The user's next message is a reaction:
    after a good answer mostly positive, after a bad one mostly negative, sometimes neither (a
    bare next question, or "Ok."); when another exchange follows, the next question comes in
    the same message. A quarter of the logs end on the assistant's answer (no reaction), and
    two logs have no assistant turn at all (the user left). Some reactions carry no cue word
    ("Cool.", "Are you sure?"), as real ones often do.
    `annotation` is the reaction each reacted-to answer got ("positive", "negative",
    "neither"), written here for measuring a classifier; `prefopt data feedback` ignores it.
    """
    logs, at = [], 0
    for n in range(48):
        messages = [{"role": "system", "content": SYSTEM}] if n % 3 == 0 else []
        annotation = []
        exchanges = rng.choice([1, 1, 2, 2, 3])
        ends_on_answer = rng.random() < 0.25
        question = None
        for k in range(exchanges):
            q, good, bad = data[at % len(data)]
            at += 1
            messages.append({"role": "user", "content": q if question is None else question})
            right = rng.random() < 0.6
            messages.append({"role": "assistant", "content": good if right else bad})
            last = k == exchanges - 1
            if last and ends_on_answer:
                break
            kind = rng.choices(["positive", "negative", "neither"], [0.8, 0.05, 0.15] if right else [0.05, 0.8, 0.15])[0]
            annotation.append(kind)
            nxt = None if last else data[at % len(data)][0]
            if kind == "neither":
                reaction = nxt or rng.choice(NEUTRAL)
            else:
                reaction = rng.choice(POSITIVE if kind == "positive" else NEGATIVE)
                reaction = reaction if nxt is None else f"{reaction} {nxt}"
            if last:
                messages.append({"role": "user", "content": reaction})
            else:
                question = reaction
        logs.append({"messages": messages, "annotation": annotation})
    for q, _, _ in data[:2]:
        logs.insert(rng.randint(0, len(logs)), {"messages": [{"role": "user", "content": q}], "annotation": []})
    return logs


if __name__ == "__main__":
    main()
