"""Write the demo training set: short chat examples of six distinct skills, so routing has something to specialise on.

    python examples/make_data.py            # -> examples/data/train.jsonl, examples/data/eval.jsonl
    remix-train --preset demo --out examples/demo-adapter   # train the demo adapter on them (its model card's command)
    python examples/make_data.py --study DIR [--train 2400 --dev 60 --test 300 --seed 0]
                                            # the method study's larger, harder set (bench/method_study.py);
                                            # with the defaults and DIR = examples/data/study: the committed copy

Skills: arithmetic, capitals, reversing a word, upper-casing, English -> French words, tiny Python functions.
All content is generated here from small tables (written for this project); a fixed seed makes it reproducible.
The eval set uses prompts that do not occur in the training set.
"""

from __future__ import annotations

import argparse
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


# ---- The method study's set (bench/method_study.py): the same six skills, larger and harder. ----
# Every answer is one exact string, so a greedy completion is right or wrong. Where the demo's skills are small tables,
# these draw from spaces large enough that 2,000+ training examples rarely repeat: three-digit arithmetic, pseudo-words
# of 5-8 letters to reverse, 2-4 word phrases to upper-case, Python one-liners built from a small expression grammar.
# Capitals and French words stay table lookups; their held-out prompts use phrasings never seen in training, so the
# facts are learnable but the wording is new.

MORE_CAPITALS = {
    "Bolivia": "Sucre", "Ecuador": "Quito", "Venezuela": "Caracas", "Uruguay": "Montevideo", "Paraguay": "Asuncion",
    "Jamaica": "Kingston", "Iceland": "Reykjavik", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Czechia": "Prague", "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Croatia": "Zagreb", "Serbia": "Belgrade",
    "Bulgaria": "Sofia", "Albania": "Tirana", "Cyprus": "Nicosia", "Malta": "Valletta", "Luxembourg": "Luxembourg",
    "Pakistan": "Islamabad", "Nepal": "Kathmandu", "Bangladesh": "Dhaka", "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "South Korea": "Seoul", "Mongolia": "Ulaanbaatar", "Saudi Arabia": "Riyadh",
    "Jordan": "Amman", "Syria": "Damascus", "Lebanon": "Beirut", "Israel": "Jerusalem", "Ethiopia": "Addis Ababa",
    "Tanzania": "Dodoma", "Uganda": "Kampala", "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli",
    "Sudan": "Khartoum", "Zimbabwe": "Harare", "Zambia": "Lusaka", "Angola": "Luanda", "New Zealand": "Wellington",
}  # fmt: skip
MORE_FRENCH = {
    "bird": "oiseau", "fish": "poisson", "mountain": "montagne", "river": "rivière", "forest": "forêt",
    "garden": "jardin", "kitchen": "cuisine", "bed": "lit", "shoe": "chaussure", "hat": "chapeau", "key": "clé",
    "letter": "lettre", "word": "mot", "song": "chanson", "time": "temps", "year": "année", "week": "semaine",
    "morning": "matin", "evening": "soir", "rain": "pluie", "snow": "neige", "wind": "vent", "fire": "feu",
    "earth": "terre", "sky": "ciel", "star": "étoile", "boy": "garçon", "girl": "fille", "man": "homme",
    "woman": "femme", "child": "enfant", "mother": "mère", "father": "père", "brother": "frère", "sister": "sœur",
    "egg": "œuf", "meat": "viande", "wine": "vin", "salt": "sel", "sugar": "sucre", "butter": "beurre",
    "train": "train", "boat": "bateau", "road": "route", "money": "argent", "work": "travail", "love": "amour",
    "yes": "oui", "no": "non", "good": "bon", "bad": "mauvais", "new": "nouveau", "old": "vieux", "hot": "chaud",
    "cold": "froid", "happy": "heureux", "sad": "triste", "fast": "rapide", "slow": "lent", "yellow": "jaune",
}  # fmt: skip
STUDY_CAPITALS = {**CAPITALS, **MORE_CAPITALS}
STUDY_FRENCH = {**FRENCH, **MORE_FRENCH}
# (train phrasings, held-out phrasings)
CAPITAL_ASK = (
    ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"],
    ["Tell me the capital of {}.", "{}: what is its capital city?"],
)
FRENCH_ASK = (
    ["Translate '{}' into French.", "What is the French word for '{}'?", "Give the French for '{}'."],
    ["How do you say '{}' in French?", "In French, '{}' is what word?"],
)
ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "l", "m", "n", "p", "pl", "r", "s", "st", "t", "tr", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m"]
VOCAB = sorted(set(WORDS) | {w for w in STUDY_FRENCH if " " not in w})
FUNC_NAMES = ["f", "g", "h", "calc", "score", "value", "step", "scale", "shift", "combine", "apply", "compute"]
# (description with {a}, {b} for small constants and {v} for the variable, expression)
EXPRESSIONS = [
    ("{v} plus {a}", "{v} + {a}"),
    ("{v} minus {a}", "{v} - {a}"),
    ("{a} times {v}", "{a} * {v}"),
    ("{a} times {v} plus {b}", "{a} * {v} + {b}"),
    ("{a} times {v} minus {b}", "{a} * {v} - {b}"),
    ("{v} squared", "{v} * {v}"),
    ("{v} squared plus {a}", "{v} * {v} + {a}"),
    ("the remainder of {v} divided by {a}", "{v} % {a}"),
    ("{v} divided by {a}, rounded down", "{v} // {a}"),
    ("{v} to the power {a}", "{v} ** {a}"),
    ("True when {v} is larger than {a}", "{v} > {a}"),
    ("True when {v} equals {a}", "{v} == {a}"),
]


def study_arithmetic(rng: random.Random, split: str) -> dict:
    op = rng.choice(["+", "-", "*"])
    a, b = (rng.randint(100, 999), rng.randint(100, 999)) if op != "*" else (rng.randint(12, 99), rng.randint(3, 19))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return chat(f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}.")


def study_capital(rng: random.Random, split: str) -> dict:
    country = rng.choice(sorted(STUDY_CAPITALS))
    ask = rng.choice(CAPITAL_ASK[split != "train"])
    return chat(ask.format(country), f"The capital of {country} is {STUDY_CAPITALS[country]}.")


def pseudo_word(rng: random.Random) -> str:
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(2, 3)))
        if 5 <= len(word) <= 8:
            return word


def study_reverse(rng: random.Random, split: str) -> dict:
    word = pseudo_word(rng)
    return chat(f"Reverse the letters of the word '{word}'.", word[::-1])


def study_upper(rng: random.Random, split: str) -> dict:
    phrase = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(2, 4)))
    return chat(f"Write '{phrase}' in capital letters.", phrase.upper())


def study_french(rng: random.Random, split: str) -> dict:
    word = rng.choice(sorted(STUDY_FRENCH))
    ask = rng.choice(FRENCH_ASK[split != "train"])
    return chat(ask.format(word), STUDY_FRENCH[word])


def study_code(rng: random.Random, split: str) -> dict:
    name, v = rng.choice(FUNC_NAMES), rng.choice(["x", "n", "y", "k"])
    desc, expr = rng.choice(EXPRESSIONS)
    consts = {"a": rng.randint(2, 9), "b": rng.randint(1, 20), "v": v}
    return chat(
        f"Write a Python function {name}({v}) that returns {desc.format(**consts)}.",
        f"```python\ndef {name}({v}):\n    return {expr.format(**consts)}\n```",
    )


STUDY_SKILLS = {
    "arithmetic": study_arithmetic, "capital": study_capital, "reverse": study_reverse, "upper": study_upper,
    "french": study_french, "code": study_code,
}  # fmt: skip


def generate_study(n_train: int = 2400, n_dev: int = 60, n_test: int = 300, seed: int = 0) -> dict[str, list[dict]]:
    """The study's train / dev / test splits, balanced over skills (round-robin), from one seed.

    No prompt occurs in two splits or twice in dev or test. Dev chooses learning rates; test is reported. Each row
    carries its `skill` (remix-train ignores extra keys).
    """
    rng = random.Random(seed)
    names = list(STUDY_SKILLS)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        rows: list[dict] = []
        while len(rows) < n:
            skill = names[len(rows) % len(names)]
            row = STUDY_SKILLS[skill](rng, split)
            prompt = row["messages"][0]["content"]
            if split != "train" and prompt in seen:
                continue
            if split != "train":
                seen.add(prompt)
            rows.append({**row, "skill": skill})
        if split == "train":
            seen = {r["messages"][0]["content"] for r in rows}
        out[split] = rows
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(rows)} examples)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", metavar="DIR", help="write the study set (train/dev/test.jsonl) to DIR instead")
    p.add_argument("--train", type=int, default=2400)
    p.add_argument("--dev", type=int, default=60)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.study:
        out = Path(a.study)
        out.mkdir(parents=True, exist_ok=True)
        for split, rows in generate_study(a.train, a.dev, a.test, a.seed).items():
            write_jsonl(out / f"{split}.jsonl", rows)
        return
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    train, evals = generate()
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)


if __name__ == "__main__":
    main()
