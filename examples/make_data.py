"""Write the demo training set: short chat examples of six distinct skills, so routing has something to specialise on.

    python examples/make_data.py            # -> examples/data/train.jsonl, examples/data/eval.jsonl
    remix-train --preset demo --out examples/demo-adapter   # train the demo adapter on them (its model card's command)

Skills: arithmetic, capitals, reversing a word, upper-casing, English -> French words, tiny Python functions.
All content is generated here from small tables (written for this project); a fixed seed makes it reproducible.
The eval set uses prompts that do not occur in the training set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra",
    "Austria": "Vienna", "Ireland": "Dublin", "Hungary": "Budapest", "Morocco": "Rabat", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Nigeria": "Abuja", "Ghana": "Accra", "Cuba": "Havana",
    "Iran": "Tehran", "Iraq": "Baghdad", "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Colombia": "Bogota", "Ukraine": "Kyiv", "Romania": "Bucharest", "Senegal": "Dakar",
}  # fmt: skip
FRENCH = {
    "cat": "chat", "dog": "chien", "house": "maison", "water": "eau", "bread": "pain", "apple": "pomme",
    "book": "livre", "tree": "arbre", "sun": "soleil", "moon": "lune", "car": "voiture", "friend": "ami",
    "school": "école", "city": "ville", "sea": "mer", "red": "rouge", "blue": "bleu", "green": "vert",
    "black": "noir", "white": "blanc", "big": "grand", "small": "petit", "hello": "bonjour", "thank you": "merci",
    "night": "nuit", "day": "jour", "cheese": "fromage", "milk": "lait", "flower": "fleur", "door": "porte",
    "window": "fenêtre", "chair": "chaise", "table": "table", "hand": "main", "head": "tête", "horse": "cheval",
}  # fmt: skip
WORDS = [
    "planet", "garden", "rocket", "silver", "window", "purple", "orange", "dragon", "little", "castle",
    "forest", "engine", "pencil", "summer", "winter", "button", "candle", "bridge", "marble", "turtle",
    "yellow", "basket", "mirror", "violin", "helmet", "jungle", "pepper", "rabbit", "stream", "tunnel",
    "cloud", "river", "stone", "light", "music", "paper", "table", "house", "green", "horse",
]  # fmt: skip
PHRASES = [
    "good morning", "see you soon", "open the door", "happy birthday", "the quick fox", "keep it simple",
    "hello world", "make it so", "time to go", "read the docs", "small steps", "fresh bread", "blue sky today",
    "train the router", "one two three", "slow and steady", "mind the gap", "all is well", "on the way",
]  # fmt: skip
CODE = [  # (name, args, description, body expression)
    ("add", "a, b", "the sum of a and b", "a + b"),
    ("sub", "a, b", "a minus b", "a - b"),
    ("mul", "a, b", "the product of a and b", "a * b"),
    ("square", "x", "the square of x", "x * x"),
    ("cube", "x", "the cube of x", "x ** 3"),
    ("is_even", "n", "True when n is even", "n % 2 == 0"),
    ("is_odd", "n", "True when n is odd", "n % 2 == 1"),
    ("first", "xs", "the first element of the list xs", "xs[0]"),
    ("last", "xs", "the last element of the list xs", "xs[-1]"),
    ("length", "xs", "the number of elements in xs", "len(xs)"),
    ("total", "xs", "the sum of the list xs", "sum(xs)"),
    ("largest", "xs", "the largest element of xs", "max(xs)"),
    ("smallest", "xs", "the smallest element of xs", "min(xs)"),
    ("reverse", "s", "the string s reversed", "s[::-1]"),
    ("shout", "s", "the string s in upper case", "s.upper()"),
    ("whisper", "s", "the string s in lower case", "s.lower()"),
    ("double", "x", "twice x", "2 * x"),
    ("half", "x", "half of x", "x / 2"),
    ("negate", "x", "minus x", "-x"),
    ("average", "xs", "the mean of the list xs", "sum(xs) / len(xs)"),
]


def pick(rng: random.Random, items: list, split: str):
    """Every fifth item is held out for eval, so eval prompts never occur in train."""
    pool = [x for i, x in enumerate(items) if (i % 5 == 4) == (split == "eval")]
    return rng.choice(pool)


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def arithmetic(rng: random.Random, split: str) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return chat(f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}.")


def capital(rng: random.Random, split: str) -> dict:
    country = pick(rng, sorted(CAPITALS), split)
    ask = rng.choice(["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"])
    return chat(ask.format(country), f"The capital of {country} is {CAPITALS[country]}.")


def reverse(rng: random.Random, split: str) -> dict:
    word = pick(rng, WORDS, split)
    return chat(f"Reverse the letters of the word '{word}'.", word[::-1])


def upper(rng: random.Random, split: str) -> dict:
    phrase = pick(rng, PHRASES + WORDS, split)
    return chat(f"Write '{phrase}' in capital letters.", phrase.upper())


def french(rng: random.Random, split: str) -> dict:
    word = pick(rng, sorted(FRENCH), split)
    ask = rng.choice(["Translate '{}' into French.", "What is the French word for '{}'?"])
    return chat(ask.format(word), FRENCH[word])


def code(rng: random.Random, split: str) -> dict:
    name, args, desc, body = pick(rng, CODE, split)
    return chat(
        f"Write a Python function {name}({args}) that returns {desc}.",
        f"```python\ndef {name}({args}):\n    return {body}\n```",
    )


SKILLS = [arithmetic, capital, reverse, upper, french, code]


def generate(n_train: int = 480, n_eval: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Balanced over skills. Eval uses held-out words, countries and functions, and unseen arithmetic prompts."""
    rng = random.Random(seed)
    train = [SKILLS[i % len(SKILLS)](rng, "train") for i in range(n_train)]
    seen = {ex["messages"][0]["content"] for ex in train}
    evals: list[dict] = []
    while len(evals) < n_eval:
        ex = SKILLS[len(evals) % len(SKILLS)](rng, "eval")
        if ex["messages"][0]["content"] not in seen:
            evals.append(ex)
    return train, evals


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    train, evals = generate()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {out / name} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
