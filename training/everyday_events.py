"""The composer's third version: what happened, told the way people tell it, often without an opinion word.

The English model read plain accounts of what happened by their words, not by what they mean for the
writer: "The plumber fixed the leak in twenty minutes" as negative (a leak), "Paid for express shipping
and it still took ten days" as positive (no bad word), "Oh great, another update" as praise (measured on
``tests/data/everyday_sentiment_fresh.tsv``, read as a development set for this version). These
sentences pair the two sides over the same words: a problem named and solved against one named and
left, a time earlier or later than promised, lasting or breaking, a recurring failure or none, money
back or a fee, hopes met or let down, hooked or giving up, sarcasm against the same words said
plainly. Every part was written for this module; no dataset is read.
"""

from __future__ import annotations

import random

ITEMS = [
    "phone", "laptop", "kettle", "vacuum", "blender", "headphones", "earbuds", "jacket", "boots", "backpack",
    "mattress", "sofa", "fridge", "washing machine", "charger", "printer", "router", "watch", "suitcase", "desk chair",
    "running shoes", "coffee machine", "air fryer", "tablet", "phone case", "umbrella", "tent", "bike", "car seat",
]  # fmt: skip
APPS = [
    "the app", "the banking app", "this game", "the new update", "the website", "my streaming app",
    "the delivery app", "the fitness tracker", "the wifi", "our internet", "the mobile network", "the printer",
]  # fmt: skip
ARRIVALS = [
    "The parcel", "My order", "The food", "The plumber", "The engineer", "The taxi", "The courier", "The delivery",
    "The technician", "Our train", "The electrician", "The sofa", "The replacement", "The pizza", "The groceries",
]  # fmt: skip
PROMISES = ["they promised", "the app said", "they said", "expected", "the tracking said", "quoted", "booked"]
UNITS = {"minutes": (5, 50), "hours": (2, 6), "days": (2, 9)}
SHORT_TIMES = ["a week", "two weeks", "a month", "three days", "two washes", "one trip", "a fortnight", "ten days"]
LONG_TIMES = ["two years", "three years", "five years", "a year", "eighteen months", "four years", "ages"]
PROBLEMS = {  # a problem, named: (the noun, what the fixer did to it)
    "the leak": "fixed",
    "my back pain": "fixed",
    "the rattling noise": "got rid of",
    "the battery drain": "fixed",
    "our dead zones": "sorted out",
    "the dripping tap": "fixed",
    "my neck pain": "cured",
    "the crashes": "fixed",
    "the lag": "got rid of",
    "my sleepless nights": "ended",
    "the damp in the bathroom": "sorted out",
    "the billing mistake": "sorted out",
    "the broken screen": "replaced",
    "my slow wifi": "fixed",
}
FIXERS = [
    "The plumber", "The mechanic", "The new router", "This pillow", "The update", "The technician",
    "The support team", "This mattress", "The electrician", "The repair shop", "Customer service", "The landlord",
]  # fmt: skip
QUICK = ["in twenty minutes", "in ten minutes", "the same day", "on the first visit", "within an hour", "in one go"]
BREAK_VERBS = [
    "stopped working", "fell apart", "cracked", "died", "started leaking", "stopped charging", "ripped",
    "broke", "stopped turning on", "lost its colour", "came apart at the seams", "started peeling",
]  # fmt: skip
FLAWS = ["scratch", "crash", "issue", "dropped call", "hiccup", "glitch", "leak", "problem", "complaint", "tear"]
FAILS = {  # recurring failure: (every-time form, past participle for "hasn't ... once")
    "crashes": "crashed",
    "logs me out": "logged me out",
    "drops the connection": "dropped",
    "freezes": "frozen",
    "loses my progress": "lost my progress",
    "forgets my settings": "forgotten my settings",
    "cuts out": "cut out",
    "buffers": "buffered",
}
PERIODS = ["every time I open it", "every single day", "every evening", "every few minutes", "twice a day"]
SINCE = ["since the update", "in months", "since we switched", "all year", "since I bought it", "in six months"]
MISMATCHES = [
    ("a blue shirt", "a green one"), ("a large", "a small"), ("a double room", "two single beds"),
    ("a vegetarian pizza", "one covered in ham"), ("six eggs", "four"), ("the 128 GB model", "the 64 GB one"),
    ("a window seat", "the middle seat by the toilets"), ("oat milk", "a cup of regular milk"),
]  # fmt: skip
PREMIUMS = [
    ("Paid for express shipping", "it still took ten days"),
    ("Paid extra for a sea view", "we got a view of the car park"),
    ("Paid for the premium plan", "the ads are still there"),
    ("Booked the fast track", "we queued for an hour anyway"),
    ("Paid for priority boarding", "we boarded last"),
    ("Paid for next-day delivery", "it came a week later"),
]
WORRIES = [
    "I was nervous",
    "I was skeptical",
    "I was dreading it",
    "I had my doubts",
    "I was worried",
    "I was terrified",
]
GOOD_OUTCOMES = [
    "it turned out to be the easiest appointment I've ever had",
    "the staff made it completely painless",
    "it was over in five minutes",
    "it works even better than they claimed",
    "it fixed the problem in one go",
    "everyone was lovely from start to finish",
]
BAD_OUTCOMES = [
    "it broke within a week",
    "nobody turned up",
    "they lost my booking",
    "it was cancelled an hour before",
    "the food came out cold",
    "it made the problem worse",
]
HOOKED = [
    "couldn't put it down",
    "stayed up till 2am to finish it",
    "watched the whole season in one weekend",
    "forgot I was even wearing them",
    "already ordered a second one",
    "told all my friends about it",
    "use it every single day",
    "wish I'd switched years ago",
    "haven't looked at another one since",
    "play it every night",
]
GAVE_UP = [
    "gave up after ten minutes",
    "returned it the next day",
    "switched it off halfway through",
    "deleted the app after one day",
    "uninstalled it within an hour",
    "am already looking for a new provider",
    "walked out before the main course",
    "stopped using it after a week",
    "cancelled my subscription the same night",
    "sent it back the next morning",
]
SARCASM_OPENERS = ["Oh great", "Wonderful", "Fantastic", "Just brilliant", "Oh perfect", "Amazing", "Lovely"]
SARCASM_ENDS = [
    "Love that for me",
    "Thanks a lot",
    "Great job, guys",
    "Just what I needed",
    "Brilliant stuff",
    "Cheers",
]
PLAIN_OPENERS = ["Great news", "So happy", "Wonderful", "Brilliant", "Finally", "Amazing"]
PLAIN_ENDS = ["Love it", "Thanks so much", "Great job, guys", "Just what I needed", "Really impressed", "Cheers"]
BAD_NEWS = [
    "another update that moves every button I use",
    "the app crashes every time I open it",
    "my parcel went to the wrong city again",
    "the train is cancelled for the third day running",
    "my jacket soaked through in light drizzle",
    "the printer jammed on page one",
    "they charged me twice",
]
GOOD_NEWS = [
    "the update finally brought back the old layout",
    "the app hasn't crashed once since the fix",
    "my parcel came a day early",
    "the train was on time all week",
    "my jacket kept me dry through a whole day of rain",
    "the printer did a hundred pages without a jam",
    "they refunded me the same day",
]
TOUGH = [
    "in my basement flat", "in heavy rain", "on a slow connection", "with gloves on", "after a full day",
    "on the underground", "at full volume", "in the middle of nowhere",
]  # fmt: skip


def _n(rng: random.Random, unit: str) -> int:
    low, high = UNITS[unit]
    return rng.randint(low, high)


def _timing(rng: random.Random, positive: bool) -> str:
    who, unit = rng.choice(ARRIVALS), rng.choice(list(UNITS))
    kind = rng.random()
    if kind < 0.4:
        side = "earlier" if positive else "later"
        return f"{who} arrived {_n(rng, unit)} {unit} {side} than {rng.choice(PROMISES)}"
    if kind < 0.6:
        return f"{who} turned up " + (
            rng.choice(["early", "right on time", "ten minutes early", "exactly when they said"])
            if positive
            else f"{_n(rng, 'hours')} hours late"
        )
    if kind < 0.8:
        day, next_day = rng.choice([("Monday", "Tuesday"), ("Friday", "Saturday"), ("Sunday", "Monday")])
        if positive:
            return f"Ordered on {day}, arrived {next_day}, exactly as described"
        return f"Ordered on {day}, still nothing {rng.choice(['two weeks later', 'a month later', 'ten days on'])}"
    promised, waited = rng.randint(2, 7), rng.randint(3, 8)
    if positive:
        return f"They said {waited} weeks, it took {promised} days"
    return f"The refund was promised in {promised} days, it's been {waited} weeks"


def _durability(rng: random.Random, positive: bool) -> str:
    item = rng.choice(ITEMS)
    kind = rng.random()
    if positive:
        if kind < 0.4:
            return f"My {item} still works like new after {rng.choice(LONG_TIMES)}"
        if kind < 0.7:
            return f"Been using this {item} for {rng.choice(LONG_TIMES)} and not a single {rng.choice(FLAWS)}"
        return f"{rng.choice(LONG_TIMES).capitalize()} in and the {item} is still going strong"
    if kind < 0.5:
        return f"The {item} {rng.choice(BREAK_VERBS)} after {rng.choice(SHORT_TIMES)}"
    if kind < 0.75:
        return f"Had this {item} for {rng.choice(SHORT_TIMES)} and it already {rng.choice(BREAK_VERBS)}"
    return f"My {item} {rng.choice(BREAK_VERBS)} the {rng.choice(['second', 'third', 'first'])} time I used it"


def _recurring(rng: random.Random, positive: bool) -> str:
    app = rng.choice(APPS)
    fail, failed = rng.choice(list(FAILS.items()))
    if positive:
        return f"{app.capitalize()} hasn't {failed} once {rng.choice(SINCE)}"
    return f"{app.capitalize()} {fail} {rng.choice(PERIODS)}"


def _solved(rng: random.Random, positive: bool) -> str:
    problem, fixed = rng.choice(list(PROBLEMS.items()))
    fixer = rng.choice(FIXERS)
    kind = rng.random()
    if positive:
        if kind < 0.6:
            return f"{fixer} {fixed} {problem} {rng.choice(QUICK)}"
        bare = problem.removeprefix("the ").removeprefix("my ").removeprefix("our ")
        return f"No more {bare} since {fixer.lower()} came"
    if kind < 0.5:
        return f"{fixer} came twice and {problem} is still there"
    if kind < 0.8:
        return f"{fixer} was supposed to fix {problem} and made it worse"
    return f"Three visits later and nothing has changed with {problem}"


def _money(rng: random.Random, positive: bool) -> str:
    kind = rng.random()
    who = rng.choice(["They", "The bank", "The garage", "The airline", "The shop", "The landlord", "The insurer"])
    if positive:
        if kind < 0.35:
            return f"{who} charged less than {rng.choice(['the quote', 'they quoted', 'I expected', 'last time'])}"
        if kind < 0.7:
            return f"{who} refunded me {rng.choice(['the same day', 'without any questions', 'within an hour'])}"
        return f"{who} waived the fee {rng.choice(['without me even asking', 'when I explained', 'straight away'])}"
    if kind < 0.35:
        fee = rng.choice(["a fee for closing my own account", "for a bag I never checked", "twice for one order"])
        return f"{who} charged me {fee}"
    if kind < 0.7:
        return f"{who} refused my claim over a technicality after {rng.randint(3, 12)} years of paying them"
    return f"Still waiting for my refund after {rng.choice(['six weeks', 'three months', 'forty days'])}"


def _expectation(rng: random.Random, positive: bool) -> str:
    kind = rng.random()
    if positive:
        if kind < 0.6:
            return f"{rng.choice(WORRIES)}, but {rng.choice(GOOD_OUTCOMES)}"
        how = rng.choice(["arrived on time", "fits perfectly", "works out of the box"])
        return f"Exactly what I ordered, and it {how}"
    if kind < 0.3:
        return f"I had high hopes, but {rng.choice(BAD_OUTCOMES)}"
    if kind < 0.65:
        ordered, got = rng.choice(MISMATCHES)
        return f"Ordered {ordered} and got {got}"
    paid, result = rng.choice(PREMIUMS)
    return f"{paid} and {result}"


def _hooked(rng: random.Random, positive: bool) -> str:
    thing = rng.choice(["this book", "the show", "this game", "the new season", "the course", "the app"])
    did = rng.choice(HOOKED if positive else GAVE_UP)
    subject = rng.choice(["I", "Honestly I", "We", "My son"]) if "I " not in did else "I"
    if rng.random() < 0.5:
        return f"Tried {thing} last week and {subject.lower() if subject != 'I' else 'I'} {did}"
    return f"{subject} {did}"


def _tone(rng: random.Random, positive: bool) -> str:
    """Sarcasm (praise words, a bad event) against the same words said plainly about a good one."""
    if rng.random() < 0.3:
        if positive:
            return rng.choice(["Five stars isn't enough", "I'd give it ten stars if I could", "Six stars if I could"])
        return rng.choice(["Two stars is generous", "Zero stars if I could", "I'd give it zero stars if I could"])
    if positive:
        return f"{rng.choice(PLAIN_OPENERS)}, {rng.choice(GOOD_NEWS)}. {rng.choice(PLAIN_ENDS)}"
    return f"{rng.choice(SARCASM_OPENERS)}, {rng.choice(BAD_NEWS)}. {rng.choice(SARCASM_ENDS)}"


def _tough(rng: random.Random, positive: bool) -> str:
    item = rng.choice(["The signal", "The battery", "My new phone", "The sound", "The heater", "The wifi", "The torch"])
    if positive:
        return f"{item} works even {rng.choice(TOUGH)}"
    where = rng.choice(["in my own living room", "next to the router", "when it's fully charged"])
    return f"{item} doesn't even work {where}"


FORMS = [_timing, _durability, _recurring, _solved, _money, _expectation, _hooked, _tone, _tough]


def happening(rng: random.Random, positive: bool) -> str:
    """One account of what happened whose sentiment is ``positive``, with an ending as people type it."""
    text = rng.choice(FORMS)(rng, positive)
    text = text + rng.choice([".", ".", ".", "!", "", "."])
    return text.lower() if rng.random() < 0.1 else text


if __name__ == "__main__":
    rng = random.Random(1)
    for i in range(40):
        print(i % 2 == 0, happening(rng, i % 2 == 0))
