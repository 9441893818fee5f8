"""The demo family's two skills: training examples and held-out probes, generated in code.

- json: "Make a record: Ana is 31 and lives in Lima." -> {"person": "Ana", "years": 31, "home": "Lima"}
  (one line, these keys in this order; the base model answers in prose or pretty-printed JSON)
- reverse: "Reverse the words: red lamp quiet" -> "quiet lamp red"

Probes use names, cities and words that never appear in training, so they test the
skill, not memory. Everything is seeded: the same call gives the same examples.
"""

from __future__ import annotations

import random

from .evaluate import Probe

NAMES = ["Ana", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca",
         "Maya", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Xena",
         "Yusuf", "Zoe", "Amir", "Bea", "Cyrus", "Dana", "Emil", "Fay", "Gil", "Hana", "Ivo", "Jade"]
CITIES = ["Lima", "Oslo", "Cairo", "Quito", "Perth", "Tunis", "Lyon", "Porto", "Kyoto", "Dakar", "Riga",
          "Bern", "Accra", "Hanoi", "Malmo", "Turin", "Basra", "Cusco", "Dubai", "Essen", "Fez", "Graz",
          "Hue", "Izmir", "Jena", "Kiel", "Lagos", "Minsk", "Nice", "Omsk"]
WORDS = ["red", "lamp", "quiet", "river", "stone", "green", "table", "bright", "cloud", "apple", "window",
         "silver", "music", "paper", "garden", "winter", "orange", "pencil", "forest", "candle", "yellow",
         "bridge", "pocket", "summer", "little", "rabbit", "castle", "dinner", "planet", "blue", "coffee",
         "mirror", "travel", "violet", "basket", "honey", "island", "jacket", "kettle", "ladder", "magnet",
         "needle", "ocean", "pepper", "rocket", "saddle", "tunnel", "velvet", "walnut", "zebra", "anchor",
         "button", "cotton", "desert", "engine", "feather", "glove", "harbor", "insect", "jungle"]
HELD_OUT = 0.25  # the last quarter of each list appears only in probes

JSON_TEMPLATES = ["{name} is {age} and lives in {city}.", "{name}, aged {age}, from {city}.",
                  "Meet {name} from {city}, who is {age} years old.", "{city} is home to {name}, {age}."]


def _split(items: list) -> tuple[list, list]:
    cut = int(len(items) * (1 - HELD_OUT))
    return items[:cut], items[cut:]


def json_example(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    pick = 1 if held_out else 0
    name = rng.choice(_split(NAMES)[pick])
    city = rng.choice(_split(CITIES)[pick])
    age = rng.randint(18, 90)
    text = rng.choice(JSON_TEMPLATES).format(name=name, age=age, city=city)
    return f"Make a record: {text}", f'{{"person": "{name}", "years": {age}, "home": "{city}"}}'


def reverse_example(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    train, test = _split(WORDS)
    count = rng.randint(3, 4)
    if held_out:  # at least one word never seen in training
        words = [rng.choice(test)] + rng.sample(train + test, count - 1)
        rng.shuffle(words)
    else:
        words = rng.sample(train, count)
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


SKILLS = {"json": json_example, "reverse": reverse_example}


def training_examples(skill: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(f"train-{skill}-{seed}")
    return [SKILLS[skill](rng) for _ in range(count)]


def probes(skill: str, count: int = 30, seed: int = 1000) -> list[Probe]:
    """Held-out probes: unseen names, cities or words, another random stream."""
    rng = random.Random(f"probe-{skill}-{seed}")
    return [Probe(*SKILLS[skill](rng, held_out=True)) for _ in range(count)]


def moe_recipe(family: dict, prompts_per_expert: int = 4) -> str:
    """An MoE of the two skills (mergekit-moe YAML): one expert per child, routed by
    training prompts of its skill; attention from the reverse child, one expert per token
    (the best of the variants measured in docs/demo.md)."""
    import yaml

    experts = [{"source_model": str(family[skill]),
                "positive_prompts": [prompt for prompt, _ in training_examples(skill, prompts_per_expert, seed=7)]}
               for skill in ("json", "reverse")]
    return yaml.safe_dump({"base_model": str(family["reverse"]), "gate_mode": "hidden", "experts_per_token": 1,
                           "dtype": "bfloat16", "experts": experts}, sort_keys=False, width=100)
