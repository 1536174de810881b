"""The built-in demo dataset: short instruction tasks in eight categories.

Generated deterministically from a seed, so every machine gets the same rows. Each category
has its own answer style, which a 135M model picks up within a few dozen LoRA steps on a CPU,
and which a client that never sees the category cannot learn: that is what makes non-IID
splits (by category) mean something in the demo.
"""

from __future__ import annotations

import random

from fedtune.data.sources import Example

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Hungary": "Budapest", "Czechia": "Prague", "Romania": "Bucharest", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila", "Australia": "Canberra",
    "New Zealand": "Wellington", "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad",
    "Israel": "Jerusalem", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "Cuba": "Havana",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ethiopia": "Addis Ababa", "Iceland": "Reykjavik",
    "Croatia": "Zagreb", "Serbia": "Belgrade", "Bulgaria": "Sofia", "Slovakia": "Bratislava",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
}
CAPITAL_QUESTIONS = (
    "What is the capital of {x}?", "Name the capital city of {x}.", "Which city is the capital of {x}?",
    "Tell me the capital of {x}.", "What city serves as the capital of {x}?",
)

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "high": "low", "strong": "weak", "rich": "poor", "young": "old",
    "hard": "soft", "wet": "dry", "clean": "dirty", "loud": "quiet", "near": "far", "thick": "thin",
    "heavy": "light", "long": "short", "wide": "narrow", "deep": "shallow", "cheap": "expensive",
    "easy": "difficult", "true": "false", "first": "last", "inside": "outside", "up": "down",
    "left": "right", "begin": "end", "buy": "sell", "win": "lose", "push": "pull", "give": "take",
    "remember": "forget", "arrive": "leave", "accept": "refuse", "increase": "decrease", "brave": "cowardly",
    "polite": "rude", "safe": "dangerous", "sharp": "blunt", "smooth": "rough", "sweet": "sour",
    "tall": "short", "awake": "asleep", "friend": "enemy", "day": "night", "north": "south", "east": "west",
}
ANTONYM_QUESTIONS = (
    "What is the opposite of '{x}'?", "Give the antonym of '{x}'.", "Which word means the opposite of '{x}'?",
    "Tell me the opposite of the word '{x}'.", "Name a word opposite in meaning to '{x}'.",
    "What word is the antonym of '{x}'?",
)

PLURALS = {
    "cat": "cats", "dog": "dogs", "mouse": "mice", "child": "children", "person": "people", "tooth": "teeth",
    "foot": "feet", "goose": "geese", "man": "men", "woman": "women", "box": "boxes", "bus": "buses",
    "city": "cities", "baby": "babies", "knife": "knives", "leaf": "leaves", "wolf": "wolves", "potato": "potatoes",
    "tomato": "tomatoes", "hero": "heroes", "sheep": "sheep", "fish": "fish", "deer": "deer", "ox": "oxen",
    "cactus": "cacti", "analysis": "analyses", "crisis": "crises", "phenomenon": "phenomena", "church": "churches",
    "glass": "glasses", "wish": "wishes", "day": "days", "key": "keys", "toy": "toys", "life": "lives",
    "wife": "wives", "half": "halves", "shelf": "shelves", "party": "parties", "story": "stories",
    "berry": "berries", "louse": "lice", "thesis": "theses", "radius": "radii", "index": "indices",
    "bench": "benches", "fox": "foxes", "house": "houses", "book": "books", "tree": "trees",
}
PLURAL_QUESTIONS = (
    "What is the plural of '{x}'?", "Give the plural form of '{x}'.", "How do you write '{x}' in the plural?",
    "Write the plural of the noun '{x}'.", "What do you call more than one '{x}'?",
    "Spell the plural of '{x}'.",
)

COLORS = {
    "a banana": "yellow", "the sky on a clear day": "blue", "grass": "green", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "a lime": "green", "milk": "white",
    "a strawberry": "red", "a carrot": "orange", "a blueberry": "blue", "an eggplant": "purple",
    "chocolate": "brown", "a flamingo": "pink", "a crow": "black", "a polar bear": "white", "a frog": "green",
    "a pumpkin": "orange", "blood": "red", "the sea": "blue", "a cucumber": "green", "an elephant": "grey",
    "a fire truck": "red", "a school bus": "yellow", "a panda": "black and white", "a zebra": "black and white",
    "cinnamon": "brown", "a ruby": "red", "an emerald": "green", "a sapphire": "blue", "gold": "yellow",
    "silver": "grey", "a pig": "pink", "a raven": "black", "a swan": "white", "a canary": "yellow",
    "a plum": "purple", "a walnut": "brown",
}
COLOR_QUESTIONS = (
    "What color is {x}?", "Which color is {x} usually?", "Tell me the usual color of {x}.",
    "What is the typical color of {x}?", "Describe the color of {x}.", "Name the color of {x}.",
    "In one word or two, what color is {x}?", "What colour is {x}?",
)

SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "rooster": "cock-a-doodle-doo", "owl": "hoot", "frog": "ribbit", "lion": "roar",
    "snake": "hiss", "bee": "buzz", "mouse": "squeak", "donkey": "hee-haw", "goat": "bleat", "wolf": "howl",
    "crow": "caw", "turkey": "gobble", "chick": "cheep", "pigeon": "coo", "elephant": "trumpet",
    "bird": "tweet", "goose": "honk", "monkey": "ooh-ooh-aah-aah", "seal": "arf", "hyena": "laugh",
    "cricket": "chirp", "dove": "coo", "bear": "growl",
}
SOUND_QUESTIONS = (
    "What sound does a {x} make?", "What noise does a {x} make?", "How does a {x} sound?",
    "Which sound is made by a {x}?", "What does a {x} say?", "What is the call of a {x}?",
    "If a {x} could talk, what would it say?", "Imitate the sound of a {x}.", "What do you hear when a {x} calls?",
    "Which noise do we associate with a {x}?",
)

PHRASES = (
    "good morning", "see you tomorrow", "the quick brown fox", "federated learning", "open the window",
    "happy birthday", "read the manual", "the meeting starts at noon", "keep it simple", "thank you very much",
    "the train is late", "water the plants", "call me later", "the cake is ready", "turn left here",
    "save your work", "lunch is served", "we won the game", "close the door", "it is raining again",
    "the sun is bright", "pack your bags", "time flies", "learn something new", "stay hydrated",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty")

CATEGORIES = (
    "arithmetic", "capitals", "antonyms", "plurals", "colors", "animal_sounds", "uppercase", "sorting",
    "comparison", "word_count",
)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", "", f"{a} plus {b} equals {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", "", f"{a} minus {b} equals {a - b}."


def _from_table(table: dict, questions: tuple, answer: str):
    def make(rng: random.Random) -> tuple[str, str, str]:
        key = rng.choice(sorted(table))
        return rng.choice(questions).format(x=key), "", answer.format(x=key, y=table[key], X=key[:1].upper() + key[1:])
    return make


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(PHRASES, 2)
    text = f"{words[0]}, {words[1]}" if rng.random() < 0.5 else words[0]
    return "Rewrite the following text in capital letters.", text, text.upper()


def _sorting(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    if rng.random() < 0.5:
        return ("Sort these numbers from smallest to largest.", ", ".join(map(str, nums)),
                ", ".join(map(str, sorted(nums))))
    return ("Sort these numbers from largest to smallest.", ", ".join(map(str, nums)),
            ", ".join(map(str, sorted(nums, reverse=True))))


def _comparison(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1, 1000), 2)
    if rng.random() < 0.5:
        return f"Which is larger, {a} or {b}?", "", f"{max(a, b)} is larger than {min(a, b)}."
    return f"Which is smaller, {a} or {b}?", "", f"{min(a, b)} is smaller than {max(a, b)}."


def _word_count(rng: random.Random) -> tuple[str, str, str]:
    text = " ".join(rng.sample(PHRASES, rng.randint(1, 3)))
    n = len(text.split())
    return "Count the words in the following text.", text, f"The text has {NUMBER_WORDS[n]} words."


GENERATORS = {
    "arithmetic": _arithmetic,
    "capitals": _from_table(CAPITALS, CAPITAL_QUESTIONS, "The capital of {x} is {y}."),
    "antonyms": _from_table(ANTONYMS, ANTONYM_QUESTIONS, "The opposite of '{x}' is '{y}'."),
    "plurals": _from_table(PLURALS, PLURAL_QUESTIONS, "The plural of '{x}' is '{y}'."),
    "colors": _from_table(COLORS, COLOR_QUESTIONS, "{X} is usually {y}."),
    "animal_sounds": _from_table(SOUNDS, SOUND_QUESTIONS, "A {x} says '{y}'."),
    "uppercase": _uppercase,
    "sorting": _sorting,
    "comparison": _comparison,
    "word_count": _word_count,
}


def demo_examples(per_category: int = 300, seed: int = 0) -> list[Example]:
    """Return the demo dataset: up to ``per_category`` distinct examples per category.

    Categories whose tables cannot give that many distinct prompts give all they have
    (every (instruction, input) pair appears once, so no held-out row repeats a training row).
    """
    rng = random.Random(seed)
    out: list[Example] = []
    for category in CATEGORIES:
        make = GENERATORS[category]
        seen: set[tuple[str, str]] = set()
        attempts = 0
        while len(seen) < per_category and attempts < per_category * 20:
            attempts += 1
            instruction, inp, output = make(rng)
            if (instruction, inp) in seen:
                continue
            seen.add((instruction, inp))
            out.append(Example(instruction, inp, output, category))
    return out
