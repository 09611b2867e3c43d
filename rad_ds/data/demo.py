"""A small chat dataset for demos and smoke runs, written for rad-ds (Apache-2.0, like the project).

``python -m rad_ds.data.demo OUT.jsonl`` writes it; ``demo_chat.jsonl`` next to this file is its output
(checked in, 160 conversations: short factual questions with one-sentence answers, plus generated
arithmetic and unit conversions). For self-distillation the answers need not be the teacher's own: the
teacher supplies the target distributions on every token.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DEMO_CHAT = Path(__file__).with_name("demo_chat.jsonl")

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for water?", "Water is H2O: two hydrogen atoms and one oxygen atom."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain on Earth."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("What language is spoken in Brazil?", "The official language of Brazil is Portuguese."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What is the main ingredient of guacamole?", "The main ingredient of guacamole is avocado."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second in a vacuum."),
    ("What is photosynthesis?",
     "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("What is a prime number?", "A prime number is a whole number above 1 whose only divisors are 1 and itself."),
    ("Give me a synonym for happy.", "A synonym for happy is cheerful."),
    ("Give me an antonym for cold.", "An antonym for cold is hot."),
    ("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("Translate 'good morning' into French.", "'Good morning' in French is 'bonjour'."),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("Name three primary colours.", "The three primary colours of paint are red, yellow and blue."),
]


def _generated(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(60):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["plus", "minus", "times"])
        val = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        out.append((f"What is {a} {op} {b}?", f"{a} {op} {b} is {val}."))
    for _ in range(30):
        km = rng.randint(1, 50)
        out.append((f"How many metres are in {km} kilometres?", f"There are {km * 1000} metres in {km} kilometres."))
    for _ in range(30):
        word = rng.choice(["planet", "river", "garden", "window", "pencil", "rocket", "forest", "silver"])
        out.append((f"Spell the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."))
    return out


def demo_conversations(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = FACTS + _generated(rng)
    rng.shuffle(pairs)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def write_demo(path: str | Path = DEMO_CHAT, seed: int = 0) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(c) + "\n" for c in demo_conversations(seed)))
    return path


if __name__ == "__main__":
    print(write_demo(sys.argv[1] if len(sys.argv) > 1 else DEMO_CHAT))
