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

from training import everyday_events

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

# Second composer version (v3 of the English model): how people write reviews and messages beyond one
# clause about one thing. Each list was written for this module.
# Things named in a review, with how they are said to be the best or the worst.
THINGS = [
    "phone",
    "laptop",
    "pair of headphones",
    "blender",
    "coffee machine",
    "vacuum",
    "mattress",
    "pillow",
    "jacket",
    "pair of boots",
    "backpack",
    "car",
    "bike",
    "app",
    "game",
    "website",
    "bank",
    "gym",
    "hotel",
    "airline",
    "pizza place",
    "coffee shop",
    "taco truck",
    "burger",
    "ramen",
    "dentist",
    "hairdresser",
    "plumber",
    "course",
    "book",
    "streaming service",
    "insurance company",
    "phone plan",
    "delivery service",
    "online shop",
    "keyboard",
    "monitor",
    "smartwatch",
    "tent",
    "stroller",
]
PLACES = ["restaurant", "hotel", "cafe", "shop", "clinic", "salon", "bakery", "gym", "bar", "garage"]
# Scores: positive from 8 up, negative up to 3 (4-7 is left out: not a clear verdict).
SCORE_FORMS = ["{n}/10", "{n} out of 10", "{n}/10 would {again}", "Solid {n}/10", "I'd give it {n}/10"]
STAR_FORMS = ["{s} stars", "{s} stars from me", "Giving it {s} stars", "{s} out of 5", "{s}/5"]
STARS_WORDS = {1: "One", 2: "Two", 4: "Four", 5: "Five"}
# Idioms and set phrases: mostly no word of sentiment a model learns from SST-2.
IDIOMS = {  # (what follows "is", what follows a subject, what stands alone)
    True: (
        [
            "worth every penny",
            "a game changer",
            "a lifesaver",
            "money well spent",
            "a total win",
            "better than I expected",
            "worth the wait",
            "a keeper",
            "an absolute gem",
            "a breath of fresh air",
            "top notch",
            "spot on",
            "a steal at this price",
            "everything I hoped for",
            "the real deal",
            "a must have",
            "a hidden gem",
        ],
        [
            "does the job",
            "hits the spot",
            "blew me away",
            "exceeded my expectations",
            "pays for itself",
            "does exactly what it says",
            "ticks every box",
            "works like a dream",
        ],
        ["No complaints here", "Couldn't ask for more", "Money well spent", "Worth every penny", "Game changer"],
    ),
    False: (
        [
            "a total letdown",
            "not worth the hype",
            "a waste of time",
            "total garbage",
            "a complete joke",
            "overrated",
            "a money pit",
            "more trouble than it's worth",
            "a nightmare from start to finish",
            "not worth a penny",
            "a huge disappointment",
            "nowhere near as good as the ads",
            "a scam",
            "falling apart already",
            "worse than my old one",
            "a step backwards",
            "dead on arrival",
            "a headache",
            "cheap in the worst way",
            "all hype",
            "a disaster",
        ],
        [
            "missed the mark",
            "fell flat",
            "let me down badly",
            "fell apart in a week",
            "died on day two",
            "ruined my weekend",
            "does nothing it promises",
            "never worked properly",
        ],
        ["Save your money", "Total letdown", "Complete waste of money", "Never again", "Avoid"],
    ),
}
# Informal and one-word verdicts, lowercase as typed.
POSITIVE_SLANG = [
    "slaps",
    "lowkey amazing",
    "hits different",
    "absolutely goated",
    "chef's kiss",
    "obsessed with it",
    "so good",
    "love love love",
    "10/10 no notes",
    "kinda perfect",
    "a vibe",
    "elite",
]
NEGATIVE_SLANG = [
    "kinda mid",
    "mid at best",
    "trash",
    "garbage",
    "meh",
    "yikes",
    "ugh",
    "hard pass",
    "nope",
    "not it",
    "big yikes",
    "so bad lol",
]
FILLERS = ["", "", "", "", "honestly ", "ngl ", "tbh ", "omg ", "seriously ", "lol "]
# Statements of what happened: no opinion word, the event says it (the reader knows what it means).
POSITIVE_EVENTS = [
    "arrived a day early",
    "was fixed in ten minutes",
    "walked me through every step",
    "remembered my name",
    "gave me a refund straight away",
    "replaced it for free",
    "sorted it out on the first call",
    "finally got me to save money",
    "still runs like new after two years",
    "lasts two days on one charge",
    "was ready before they said",
    "upgraded our room for free",
    "called back within the hour",
    "helped me carry everything to the car",
    "got me through my exam",
    "paid for itself in a month",
    "fit like it was made for me",
    "made the whole trip easy",
    "answered at two in the morning",
]
NEGATIVE_EVENTS = [
    "got hot enough to burn my hand",
    "took three weeks to arrive",
    "transferred me four times",
    "charged me for something I never ordered",
    "hung up on me",
    "lost my booking",
    "kept my deposit",
    "broke the second time I used it",
    "logged me out every five minutes",
    "deleted all my saved work",
    "made me wait forty minutes for a cold meal",
    "sent the wrong size twice",
    "never called back",
    "stopped charging after a month",
    "keeps asking me to rate it",
    "doesn't stay in my ears",
    "still hasn't refunded me",
    "cancelled my flight without telling me",
    "overcharged me again",
]
# Negations that turn the phrase around, both ways, so no negation word decides alone.
NEGATION_PAIRS = {
    True: [
        "I couldn't be happier with {x}",
        "I can't recommend {x} enough",
        "Nothing about {x} feels cheap",
        "{X} wasn't as bad as I feared",
        "{X} didn't disappoint",
        "No regrets buying {x}",
        "I have zero complaints about {x}",
        "Not bad for a {t}",
        "Never had a single issue with {x}",
        "I don't know how I lived without {x}",
        "Can't fault {x}",
        "Nothing beats {x}",
        "I wouldn't change a thing about {x}",
        "{X} never lets me down",
        "I'll definitely be back",
        "Can't wait to go back",
        "Would not hesitate to buy {x} again",
    ],
    False: [
        "I couldn't be more disappointed with {x}",
        "I can't recommend {x}",
        "Nothing about {x} works",
        "{X} wasn't as good as I hoped",
        "{X} didn't live up to the hype",
        "I regret buying {x}",
        "I have nothing good to say about {x}",
        "Not good even for a {t}",
        "Never had a good day with {x}",
        "I don't think I'll ever order from them again",
        "Can't believe I paid for {x}",
        "Nothing works the way it should",
        "I wouldn't wish {x} on anyone",
        "{X} always lets me down",
        "We will not be returning",
        "Won't be going back",
        "Would not buy {x} again",
    ],
}
OPENERS = {
    True: [
        "Best {t} I've ever owned",
        "Honestly the best {t} I have ever had",
        "Hands down the best {t} in town",
        "By far my favourite {t}",
        "My new favourite {t}",
        "Easily the best {t} I've tried",
    ],
    False: [
        "Worst {t} I've ever owned",
        "Honestly the worst {t} I have ever had",
        "Hands down the worst {t} in town",
        "By far the worst {t} I've used",
        "My least favourite {t}",
        "Easily the worst {t} I've tried",
    ],
}
STORY_OPENERS = [
    "We booked this {p} for our anniversary",
    "I bought this {t} for my mom",
    "Ordered the {t} last week",
    "I've had this {t} for a month now",
    "We went to this {p} on Friday",
    "Tried the new {t} yesterday",
    "Got this {t} as a gift",
    "I switched to this {t} in January",
]
POSITIVE_STORY_ENDS = [
    "and it was perfect from start to finish",
    "and she uses it every day",
    "and everything went smoothly",
    "and it has been great so far",
    "and we loved every minute",
    "and I'm already planning to go back",
    "and it's the best thing I've bought all year",
    "and I haven't looked back",
]
NEGATIVE_STORY_ENDS = [
    "and it was a disaster",
    "and it already broke",
    "and nothing went right",
    "and it has been one problem after another",
    "and we left after twenty minutes",
    "and I'm already trying to return it",
    "and I wish I hadn't",
    "and I've regretted it every day",
]


def _score(rng: random.Random, positive: bool) -> str:
    if rng.random() < 0.5:
        n = rng.choice([8, 9, 10, 10] if positive else [0, 1, 2, 3])
        again = rng.choice(["recommend", "buy again", "go again"] if positive else ["not recommend", "avoid"])
        return rng.choice(SCORE_FORMS).format(n=n, again=again)
    s = rng.choice([4, 5, 5] if positive else [1, 1, 2])
    form = rng.choice(STAR_FORMS)
    star = STARS_WORDS[s] if rng.random() < 0.5 and form.startswith("{s} stars") else str(s)
    text = form.format(s=star)
    return text.replace("1 stars", "1 star").replace("One stars", "One star")


def _talk(rng: random.Random, positive: bool, depth: int = 0) -> str:
    """One review written as people write them (second composer version); ``depth`` 1 is a part of a
    longer one (no parts of its own)."""
    thing = rng.choice(THINGS)
    x = rng.choice(["it", "this", f"this {thing}", f"the {thing}", "them"])
    form = rng.random()
    if form < 0.18:
        text = rng.choice(NEGATION_PAIRS[positive]).format(x=x, X=x[0].upper() + x[1:], t=thing)
    elif form < 0.32:
        after_is, after_subject, alone = IDIOMS[positive]
        kind = rng.random()
        if kind < 0.5:
            subject = rng.choice([f"This {thing}", f"The {thing}", "It", "Honestly it", "This place"])
            be = "was" if rng.random() < 0.4 else "is"
            text = f"{subject} {be} {rng.choice(after_is)}"
        elif kind < 0.8:
            text = (
                f"{rng.choice([f'This {thing}', f'The {thing}', 'It', 'My new ' + thing])} {rng.choice(after_subject)}"
            )
        else:
            text = rng.choice(alone)
    elif form < 0.44:
        text = f"{rng.choice(OPENERS[positive]).format(t=thing)}"
        if rng.random() < 0.5:
            text += f". {_score(rng, positive)}"
    elif form < 0.58:
        events = POSITIVE_EVENTS if positive else NEGATIVE_EVENTS
        subject = rng.choice(
            [f"The {thing}", f"My {thing}", "They", "The support team", "The staff", "It", "The driver", "The app"]
        )
        text = f"{subject} {rng.choice(events)}"
    elif form < 0.7:
        text = _score(rng, positive)
        if depth == 0 and rng.random() < 0.7:
            text = f"{_talk(rng, positive, depth + 1).rstrip('.!')}. {text}"
    elif form < 0.8:
        slang = POSITIVE_SLANG if positive else NEGATIVE_SLANG
        text = f"{rng.choice(FILLERS)}{rng.choice(['this ' + thing + ' ', 'the ' + thing + ' is ', '', ''])}"
        text = (text + rng.choice(slang)).lower()
        return text + rng.choice(["", "", "!", " lol", "."])
    elif form < 0.9:
        opener = rng.choice(STORY_OPENERS).format(t=thing, p=rng.choice(PLACES))
        text = f"{opener} {rng.choice(POSITIVE_STORY_ENDS if positive else NEGATIVE_STORY_ENDS)}"
    elif depth == 0:
        # Two or three sentences whose verdict agrees: a statement, then more.
        parts = [_talk(rng, positive, depth + 1).rstrip(".!") for _ in range(rng.choice([2, 2, 3]))]
        text = ". ".join(p[0].upper() + p[1:] for p in parts)
    else:
        text = _score(rng, positive)
    return text[0].upper() + text[1:] + rng.choice(ENDINGS)


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


def _sentence(rng: random.Random, positive: bool, talk: float = 0.0, events: float = 0.0) -> str:
    """A labelled sentence: with probability ``events`` one of the third version's accounts of what
    happened (``training.everyday_events``), else with probability ``talk`` one of :func:`_talk`, else
    the first version's."""
    if events and rng.random() < events:
        return everyday_events.happening(rng, positive)
    if talk and rng.random() < talk:
        text = _talk(rng, positive)
        return text.lower() if rng.random() < 0.08 else text
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


def generate(
    n: int, seed: int, exclude: list[str] = (), talk: float = 0.0, events: float = 0.0
) -> tuple[list[str], list[int]]:
    """``n`` distinct labelled sentences (half positive, label 1), none equal to an ``exclude`` sentence;
    a share ``events`` of them drawn from the third version (accounts of what happened), of the rest a
    share ``talk`` from the second version's reviews as people write them (both 0: the first version's
    sentences only, as v2 of the English model was trained; ``events`` 0 draws exactly v3's)."""
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
        text = _sentence(rng, positive, talk, events)
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
