"""Labelled everyday English about products, apps and services, composed from parts, for sentiment training.

SST-2 is movie reviews: a model trained on it alone reads plain statements about phones, deliveries or
waiters as negative (the shipped CNN: 62.5 % on ``tests/data/everyday_sentiment.tsv``) because their
words never occur in its training data. These sentences teach that vocabulary and the everyday ways of
saying it: a subject of some domain (a phone's battery, an app's update, a hotel's staff) with an
opinion (adjective or verb phrase), negated opinions ("is not bad", "never crashes", "didn't like"),
contrasts whose second half decides ("Great price, but the quality is poor."), first-person verdicts
("I would buy it again", "Never ordering from them again.") and short fragments. Every part was written
for this module; no dataset is read. The composition is seeded, so the same seed gives the same sentences.

Check sets are kept apart by the caller: :func:`generate` takes sentences to exclude (compared after
lower-casing and stripping punctuation), and ``training.sentiment`` passes both everyday check sets.
"""

from __future__ import annotations

import random
import re

# Domains: subjects that belong together (what a review of one thing talks about).
DOMAINS: dict[str, list[str]] = {
    "phone": ["phone", "battery", "screen", "camera", "charger", "speaker", "case", "touchscreen", "microphone"],
    "laptop": ["laptop", "keyboard", "trackpad", "display", "fan", "hinge", "power supply", "webcam"],
    "audio": ["headphones", "earbuds", "sound", "bass", "noise cancelling", "volume", "bluetooth connection"],
    "app": ["app", "update", "interface", "login", "website", "checkout", "search", "notifications", "sync"],
    "restaurant": ["food", "waiter", "waitress", "service", "pizza", "burger", "soup", "coffee", "dessert", "menu"],
    "cafe": ["latte", "croissant", "barista", "cake", "tea", "sandwich", "bakery"],
    "hotel": ["room", "bed", "staff", "breakfast", "pool", "shower", "reception", "location", "view"],
    "delivery": ["delivery", "package", "courier", "order", "parcel", "driver", "tracking"],
    "support": ["customer service", "support team", "agent", "refund", "helpline", "manager", "chat support"],
    "clothes": ["shirt", "shoes", "jacket", "jeans", "dress", "fabric", "boots", "sweater", "zipper"],
    "home": ["vacuum", "blender", "kettle", "washing machine", "fridge", "mattress", "chair", "desk", "lamp"],
    "travel": ["flight", "crew", "seats", "airline", "train", "bus", "taxi", "rental car", "luggage service"],
    "services": ["plumber", "electrician", "mechanic", "hairdresser", "dentist", "doctor", "bank", "gym"],
    "learning": ["course", "teacher", "lessons", "tutorial", "instructor", "textbook", "exam prep"],
    "games": ["game", "graphics", "controls", "multiplayer", "story mode", "console", "controller"],
    "shopping": ["store", "shop", "seller", "product", "price", "quality", "packaging", "instructions", "warranty"],
}

DETERMINERS = ["The", "This", "My", "Our", "Their", "The new", "This new", "My old"]

POSITIVE_ADJ = [
    "great",
    "excellent",
    "amazing",
    "fantastic",
    "wonderful",
    "perfect",
    "reliable",
    "fast",
    "quick",
    "clean",
    "comfortable",
    "friendly",
    "helpful",
    "polite",
    "delicious",
    "fresh",
    "sturdy",
    "solid",
    "easy to use",
    "intuitive",
    "bright",
    "sharp",
    "quiet",
    "spacious",
    "affordable",
    "reasonable",
    "responsive",
    "smooth",
    "stylish",
    "durable",
    "accurate",
    "convenient",
    "professional",
    "good",
    "nice",
    "lovely",
    "superb",
    "brilliant",
    "outstanding",
    "impressive",
    "well made",
    "worth it",
    "spotless",
    "cozy",
    "tasty",
    "fair",
    "efficient",
    "patient",
    "knowledgeable",
    "awesome",
    "flawless",
    "pleasant",
    "clear",
    "crisp",
    "generous",
]
NEGATIVE_ADJ = [
    "terrible",
    "awful",
    "horrible",
    "useless",
    "broken",
    "slow",
    "dirty",
    "noisy",
    "rude",
    "cold",
    "stale",
    "flimsy",
    "overpriced",
    "confusing",
    "buggy",
    "unreliable",
    "uncomfortable",
    "late",
    "damaged",
    "disappointing",
    "poor",
    "weak",
    "blurry",
    "dim",
    "cramped",
    "greasy",
    "bland",
    "unhelpful",
    "unprofessional",
    "bad",
    "faulty",
    "defective",
    "loud",
    "sticky",
    "smelly",
    "expensive",
    "tiny",
    "laggy",
    "clunky",
    "mediocre",
    "dreadful",
    "pathetic",
    "lousy",
    "worthless",
    "a joke",
    "a mess",
    "a nightmare",
    "a rip-off",
    "inedible",
    "filthy",
    "shabby",
    "scratched",
    "outdated",
    "frustrating",
    "annoying",
]
# Adjectives whose negation reads as the opposite ("not bad" is praise, "not good" is not).
NEGATABLE_NEGATIVE = [
    "bad",
    "terrible",
    "slow",
    "expensive",
    "noisy",
    "dirty",
    "rude",
    "difficult",
    "complicated",
    "loud",
    "uncomfortable",
    "overpriced",
    "disappointing",
    "a problem",
    "an issue",
]
NEGATABLE_POSITIVE = [
    "good",
    "great",
    "worth it",
    "worth the money",
    "comfortable",
    "clean",
    "reliable",
    "fast",
    "helpful",
    "easy to use",
    "fresh",
    "what I expected",
    "as described",
    "accurate",
    "friendly",
]

POSITIVE_VP = [
    "works perfectly",
    "works great",
    "works like a charm",
    "arrived early",
    "arrived on time",
    "lasts all day",
    "exceeded my expectations",
    "does exactly what it promises",
    "fixed my problem",
    "was worth the money",
    "keeps me warm",
    "fits perfectly",
    "charges quickly",
    "loads instantly",
    "saved me a lot of time",
    "made my day",
    "is worth every penny",
    "feels solid",
    "runs smoothly",
    "still works like new",
    "answered all my questions",
    "sorted everything out quickly",
    "went above and beyond",
    "was ready in minutes",
    "holds up really well",
    "looks even better in person",
    "is a joy to use",
]
NEGATIVE_VP = [
    "stopped working",
    "broke after a week",
    "keeps crashing",
    "never arrived",
    "arrived late",
    "arrived damaged",
    "died after an hour",
    "fell apart",
    "freezes all the time",
    "doesn't work",
    "didn't fit",
    "wasted my time",
    "charged me twice",
    "never answered",
    "takes forever to load",
    "drains the battery",
    "leaks",
    "overheats",
    "smells like smoke",
    "ripped after one wash",
    "shrank in the wash",
    "cracked on the first day",
    "lost my order",
    "ignored my emails",
    "keeps disconnecting",
    "gave me a headache",
    "made me wait an hour",
    "is a waste of money",
    "ruined our evening",
    "let me down",
    "broke the first time I used it",
]
# Things that, said never to happen, are praise: "it never crashes".
NEVER_BAD = [
    "crashes",
    "lags",
    "breaks",
    "overheats",
    "disconnects",
    "lets me down",
    "leaks",
    "freezes",
    "fails",
    "runs out of battery",
    "gets in the way",
    "disappoints",
]
# Things that, said never to happen, are complaints: "it never works".
NEVER_GOOD = [
    "works",
    "arrives on time",
    "loads",
    "answers",
    "charges properly",
    "connects",
    "stays clean",
    "responds",
    "syncs",
    "shows up",
]

POSITIVE_VERDICTS = [
    "I love it",
    "I really like it",
    "I would buy it again",
    "I'd definitely order again",
    "Highly recommended",
    "I highly recommend it",
    "Five stars",
    "Ten out of ten",
    "Money well spent",
    "Worth every penny",
    "Best purchase I've made this year",
    "I'm very happy with it",
    "I'm so glad I bought it",
    "I will definitely come back",
    "We'll be back",
    "Couldn't be happier",
    "Would recommend to anyone",
    "Absolutely love it",
    "Very satisfied",
    "Totally worth it",
    "Exactly what I needed",
    "A great experience",
    "Thank you so much",
    "I have nothing bad to say",
    "It never disappoints",
]
NEGATIVE_VERDICTS = [
    "I hate it",
    "I really regret buying it",
    "I would not buy it again",
    "Never ordering from them again",
    "Avoid at all costs",
    "One star",
    "Zero stars if I could",
    "Total waste of money",
    "Worst purchase ever",
    "I'm very disappointed",
    "I want my money back",
    "I will never come back",
    "Never again",
    "Stay away",
    "Do not buy this",
    "Don't waste your money",
    "What a rip-off",
    "A terrible experience",
    "I'm returning it",
    "I expected much better",
    "It's a scam",
    "Not what I ordered",
    "Really not impressed",
    "I regret this purchase",
]

# First person: "I didn't like it at all" is a complaint, "I didn't mind it at all" is not. Every
# negation ("not", "never", "didn't", "at all") occurs in both labels, so none of them alone decides.
LIKING_VERBS = ["like", "love", "enjoy", "recommend", "trust", "appreciate", "care for"]
DISLIKING_VERBS = ["hate", "regret", "mind", "dislike", "regret buying", "regret ordering"]
OBJECTS = [
    "it",
    "this",
    "this one",
    "the food",
    "the app",
    "the new update",
    "the service",
    "this place",
    "this phone",
    "the design",
    "the ending",
    "the hotel",
    "the course",
    "the game",
    "them",
    "the staff",
]
NEGATIONS = ["didn't", "did not", "don't", "do not", "really didn't", "honestly didn't", "never", "can't say I"]
AFFIRMATIONS = ["", "really ", "absolutely ", "honestly ", "totally ", "kind of ", "still "]
NEGATED_ENDS = ["", "", " at all", " one bit", " much", " in the end"]
# Short verdicts with a negation, both ways.
NEGATED_VERDICTS = {
    True: [
        "It's not bad at all",
        "Not bad at all",
        "Not bad for the price",
        "I can't complain",
        "I have no complaints at all",
        "Nothing to complain about",
        "Nothing went wrong at all",
        "Not a single problem",
        "No regrets at all",
        "Never had a problem with it",
        "Not disappointed at all",
    ],
    False: [
        "It's not good at all",
        "Not good at all",
        "Not worth it at all",
        "Not worth the price",
        "I can't recommend it",
        "Nothing worked at all",
        "Not a single thing worked",
        "Not happy at all",
        "I wouldn't recommend it to anyone",
        "Never had a good experience with it",
        "Not impressed at all",
    ],
}

INTENSIFIERS = ["", "", "", "very ", "really ", "extremely ", "super ", "so ", "incredibly ", "quite ", "pretty "]
ENDINGS = [".", ".", ".", "!", "!!", "", "."]
LINKS_BUT = [", but ", " but ", ". But ", ", although ", ", though ", ", however ", ", yet "]


def _np(rng: random.Random, domain: list[str]) -> str:
    return f"{rng.choice(DETERMINERS)} {rng.choice(domain)}".replace("  ", " ")


def _be(subject: str, past: bool) -> str:
    plural = subject.split()[-1].endswith("s") and not subject.split()[-1].endswith(("ss", "us"))
    if past:
        return "were" if plural else "was"
    return "are" if plural else "is"


def _clause(rng: random.Random, domain: list[str], positive: bool) -> str:
    """A clause about one thing of the domain whose sentiment is ``positive``."""
    subject = _np(rng, domain)
    past = rng.random() < 0.5
    be = _be(subject, past)
    kind = rng.random()
    if kind < 0.45:
        adjective = rng.choice(POSITIVE_ADJ if positive else NEGATIVE_ADJ)
        return f"{subject} {be} {rng.choice(INTENSIFIERS)}{adjective}"
    if kind < 0.75:
        return f"{subject} {rng.choice(POSITIVE_VP if positive else NEGATIVE_VP)}"
    if kind < 0.9:
        negated = rng.choice(NEGATABLE_NEGATIVE if positive else NEGATABLE_POSITIVE)
        positive_negations = ["not", "not", "never", "not at all"]
        neg = rng.choice(positive_negations if positive else [*positive_negations, "not very", "hardly"])
        if neg == "not at all":
            return f"{subject} {be} not {negated} at all"
        if rng.random() < 0.4 and neg == "not":
            return f"{subject} {be}n't {negated}"
        return f"{subject} {be} {neg} {negated}"
    never = rng.choice(NEVER_BAD if positive else NEVER_GOOD)
    verb = never if not past else {"crashes": "crashed", "works": "worked"}.get(never, never)
    return f"{subject} never {verb}"


def _sentence(rng: random.Random, positive: bool) -> str:
    domain = DOMAINS[rng.choice(sorted(DOMAINS))]
    form = rng.random()
    if form < 0.35:
        text = _clause(rng, domain, positive)
    elif form < 0.5:
        # Two clauses that agree.
        text = f"{_clause(rng, domain, positive)} and {_lower(_clause(rng, domain, positive))}"
    elif form < 0.7:
        # Contrast: the second half decides.
        text = f"{_clause(rng, domain, not positive)}{rng.choice(LINKS_BUT)}{_lower(_clause(rng, domain, positive))}"
    elif form < 0.78:
        # Concession first: "Although the room was small, the staff were lovely."
        text = f"Although {_lower(_clause(rng, domain, not positive))}, {_lower(_clause(rng, domain, positive))}"
    elif form < 0.84:
        # "I didn't like it at all." / "I didn't mind it at all." / "I really like it."
        negated = rng.random() < 0.6
        liking = positive != negated
        verb, thing = rng.choice(LIKING_VERBS if liking else DISLIKING_VERBS), rng.choice(OBJECTS)
        if negated:
            text = f"I {rng.choice(NEGATIONS)} {verb} {thing}{rng.choice(NEGATED_ENDS)}"
        else:
            text = f"I {rng.choice(AFFIRMATIONS)}{verb} {thing}"
    elif form < 0.88:
        text = rng.choice(NEGATED_VERDICTS[positive])
    elif form < 0.94:
        verdicts = POSITIVE_VERDICTS if positive else NEGATIVE_VERDICTS
        text = rng.choice(verdicts)
        if rng.random() < 0.5:
            text = f"{_clause(rng, domain, positive)}. {text}"
    else:
        # Fragments: "Great product, fast shipping."
        adjectives = POSITIVE_ADJ if positive else NEGATIVE_ADJ
        a, b = rng.sample([w for w in adjectives if " " not in w], 2)
        text = f"{a.capitalize()} {rng.choice(domain)}, {b} {rng.choice(domain)}"
    text = text[0].upper() + text[1:] + rng.choice(ENDINGS)
    if rng.random() < 0.08:
        text = text.lower()
    return text


def _lower(clause: str) -> str:
    return clause[0].lower() + clause[1:] if not clause.startswith("I ") else clause


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


def generate(n: int, seed: int, exclude: list[str] = ()) -> tuple[list[str], list[int]]:
    """``n`` distinct labelled sentences (half positive, label 1), none equal to an ``exclude`` sentence."""
    rng = random.Random(seed)
    excluded = {_key(t) for t in exclude}
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    attempts = 0
    while len(texts) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"only {len(texts)} distinct sentences after {attempts} attempts")
        positive = len(texts) % 2 == 0
        text = _sentence(rng, positive)
        key = _key(text)
        if key in seen or key in excluded:
            continue
        seen.add(key)
        texts.append(text)
        labels.append(int(positive))
    return texts, labels


if __name__ == "__main__":
    for text, label in zip(*generate(40, seed=1), strict=True):
        print(label, text)
