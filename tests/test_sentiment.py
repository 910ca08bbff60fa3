"""/v1/sentiment with the committed English and Chinese models: accuracy through HTTP matches the
offline figures, language routing, truncation, and every kind of bad input."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT

URL = "/v1/sentiment"


def metadata(name: str, version: str = "1") -> dict:
    return json.loads((ROOT / "models" / name / version / "metadata.json").read_text())


ENGLISH_VERSION = "6"


def http_accuracy(client: TestClient, texts: list[str], labels: list[int], **extra) -> float:
    correct = 0
    for start in range(0, len(texts), 64):
        response = client.post(URL, json={"texts": texts[start : start + 64], **extra})
        assert response.status_code == 200, response.text
        predicted = [p["label"] for p in response.json()["predictions"]]
        truth = ["positive" if y else "negative" for y in labels[start : start + 64]]
        correct += sum(p == t for p, t in zip(predicted, truth, strict=True))
    return correct / len(texts)


def english_split(data_dir: Path) -> dict[str, tuple[list[str], list[int]]]:
    """The served English model's honest split, rebuilt from its metadata (seed and sizes)."""
    from training.sentiment import honest_split, read_sst2

    config = metadata("sentiment", ENGLISH_VERSION)["training"]["config"]
    folder = data_dir / "sentiment" / "sst2"
    train, dev = read_sst2(folder / "train.tsv"), read_sst2(folder / "dev.tsv")
    return honest_split(
        train[0] + dev[0],
        train[1] + dev[1],
        int(config["seed"]),
        int(config["validation_sentences"]),
        int(config["test_sentences"]),
        shared=config["shared_phrases"] == "True",
    )


def test_sentiment_english_unseen_sentences_through_http_match_offline(client: TestClient, data_dir: Path) -> None:
    """Full SST-2 sentences none of whose phrases it trained on (the headline figure), and the
    everyday check set, through HTTP against the figures in its metadata."""
    from training.sentiment import read_everyday

    metrics = metadata("sentiment", ENGLISH_VERSION)["metrics"]
    texts, labels = english_split(data_dir)["test"]
    accuracy = http_accuracy(client, texts, labels)
    print(f"\nSST-2 held-out sentences through HTTP: {accuracy:.2%} (offline {metrics['test_accuracy']:.2%})")
    assert metrics["test_accuracy"] >= 0.835
    assert abs(accuracy - metrics["test_accuracy"]) <= 0.005
    everyday = read_everyday(ROOT / "tests" / "data" / "everyday_sentiment.tsv")
    accuracy = http_accuracy(client, *everyday)
    print(f"everyday check set through HTTP: {accuracy:.2%} (offline {metrics['everyday_accuracy']:.2%})")
    assert metrics["everyday_accuracy"] >= 0.85
    assert abs(accuracy - metrics["everyday_accuracy"]) <= 0.005
    # Written by another author, never trained on: the honest everyday figure, and it is far lower.
    independent = read_everyday(ROOT / "tests" / "data" / "everyday_sentiment_independent.tsv")
    accuracy = http_accuracy(client, *independent)
    offline = metrics["independent_everyday_accuracy"]
    print(f"independent everyday set through HTTP: {accuracy:.2%} (offline {offline:.2%})")
    assert len(independent[0]) == 80 and abs(accuracy - offline) <= 0.005
    # Written after the composer's second version by a session that read neither code nor sets.
    fresh = read_everyday(ROOT / "tests" / "data" / "everyday_sentiment_fresh.tsv")
    accuracy = http_accuracy(client, *fresh)
    offline = metrics["fresh_everyday_accuracy"]
    print(f"fresh everyday set through HTTP: {accuracy:.2%} (offline {offline:.2%})")
    assert len(fresh[0]) == 120 and sum(fresh[1]) == 60
    assert offline >= 0.78 and abs(accuracy - offline) <= 0.01  # v2: 0.7583


# Each written by a session that read no code and no other set; only accuracies of the blind ones are
# ever printed. The floor is a little under the shipped version's own figure (v5, v6).
LATER_CHECK_SETS = [("fresh2", 160, 0.85), ("blind", 200, 0.80), ("blind2", 240, 0.90)]


@pytest.mark.parametrize(("name", "size", "floor"), LATER_CHECK_SETS, ids=[c[0] for c in LATER_CHECK_SETS])
def test_sentiment_everyday_check_sets_through_http_match_offline(
    client: TestClient, name: str, size: int, floor: float
) -> None:
    from training.sentiment import Config, read_everyday

    offline = metadata("sentiment", ENGLISH_VERSION)["metrics"][f"{name}_everyday_accuracy"]
    texts, labels = read_everyday(ROOT / getattr(Config(), name))
    accuracy = http_accuracy(client, texts, labels)
    print(f"\n{name} everyday set through HTTP: {accuracy:.2%} (offline {offline:.2%})")
    assert len(texts) == size and sum(labels) == size // 2
    assert offline >= floor and abs(accuracy - offline) <= 0.01


@pytest.mark.parametrize("path", sorted(ROOT.glob("models/*/*/tokenizer.json")), ids=lambda p: p.parent.parent.name)
def test_control_tokens_typed_in_a_text_are_never_read_as_control_tokens(path: Path) -> None:
    """ "[PAD]" in a review fed the classifier its padding id; "<pad>" did the same to translation."""
    from service.tasks.assets import load_tokenizer

    tokenizer = load_tokenizer(path.name, path.parent)
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "<pad>", "<unk>", "<bos>", "<eos>", "<s>", "</s>")
    ids = tokenizer.token_to_id
    control = {ids(t) for t in specials if ids(t) is not None}
    assert control, "the tokenizer has control tokens"
    plain = tokenizer.encode("a fine film", add_special_tokens=False).ids
    typed = tokenizer.encode("a fine film " + " ".join(specials), add_special_tokens=False).ids
    assert typed[: len(plain)] == plain
    assert not control & set(typed[len(plain) :]) - {ids("[UNK]"), ids("<unk>")}
    assert len(typed) > len(plain) + len(specials)  # each typed one is split into its characters


def test_sentiment_reads_emoji_as_the_word_they_say(client: TestClient) -> None:
    # The same words either way, the emoji deciding (v3 also read "love it 😡" as negative; v4, taught
    # by written everyday text, lets "love it" win there).
    texts = ["the new update 😍", "the new update 😡", "👍", "👎", "Arrived on time ❤️", "Arrived broken 🤮"]
    labels = [p["label"] for p in client.post(URL, json={"texts": texts}).json()["predictions"]]
    assert labels == ["positive", "negative", "positive", "negative", "positive", "negative"]


def test_sentiment_chinese_heldout_accuracy_through_http_matches_offline(client: TestClient, data_dir: Path) -> None:
    from training.sentiment import read_chnsenticorp, stratified_split

    texts, labels = read_chnsenticorp(data_dir / "sentiment" / "chnsenticorp" / "ChnSentiCorp_htl_all.csv")
    meta = metadata("sentiment-zh", "3")
    seed = int(meta["training"]["config"]["seed"])
    _, _, test_idx = stratified_split(labels, seed)
    accuracy = http_accuracy(client, [texts[i] for i in test_idx], [labels[i] for i in test_idx])
    offline = meta["metrics"]["test_accuracy"]
    print(f"\nChnSentiCorp held-out split through HTTP: {accuracy:.2%} (offline {offline:.2%})")
    assert offline >= 0.91
    assert abs(accuracy - offline) <= 0.01


def test_sentiment_everyday_english_including_contractions(client: TestClient) -> None:
    texts = [
        "I absolutely loved this film, the acting was wonderful.",
        "This was a boring, predictable waste of two hours.",
        "I didn't like it at all.",
        "It’s a charming and often affecting journey.",
    ]
    body = client.post(URL, json={"texts": texts}).json()
    assert body["model"] == "sentiment" and body["version"] == ENGLISH_VERSION
    assert [p["label"] for p in body["predictions"]] == ["positive", "negative", "negative", "positive"]
    for p in body["predictions"]:
        assert set(p["scores"]) == {"negative", "positive"}
        assert abs(sum(p["scores"].values()) - 1) < 1e-4 and p["score"] == max(p["scores"].values())
        assert p["truncated"] is False and p["tokens"] > 0


NEGATIONS = [
    # Negated complaints are praise, negated praise is a complaint; "at all", "never", "not" and "n't"
    # occur on both sides, so no one word can decide. Written for this test, none of them a composed
    # training sentence (checked below).
    ("I didn't mind it at all.", "positive"),
    ("The room was not dirty at all.", "positive"),
    ("I don't regret it.", "positive"),
    ("The screen isn't dim at all.", "positive"),
    ("The delivery was never late.", "positive"),
    ("Not a bad choice at all.", "positive"),
    ("I didn't like it at all.", "negative"),
    ("I did not enjoy the movie at all.", "negative"),
    ("The room wasn't clean at all.", "negative"),
    ("The update didn't fix anything.", "negative"),
    ("I have never been so disappointed.", "negative"),
    ("The staff were not helpful at all.", "negative"),
]


def test_sentiment_english_negations_go_both_ways(client: TestClient, data_dir: Path) -> None:
    from training.everyday_sentences import _key, generate
    from training.sentiment import read_everyday
    from training.text_generation import read_sentences

    config = metadata("sentiment", ENGLISH_VERSION)["training"]["config"]
    talk, events = float(config.get("everyday_talk", 0)), float(config.get("everyday_events", 0))
    later = [config[name] for name in ("independent", "fresh", "fresh2", "blind", "blind2") if name in config]
    check_sets = [config["everyday"], *(later if talk or events else ())]
    exclude = [t for path in check_sets for t in read_everyday(ROOT / path)[0]]
    seed = int(config["seed"])
    composed, _ = generate(int(config["everyday_synthetic"]), seed, exclude=exclude, talk=talk, events=events)
    # The metadata records the written files as the tuple's text: "(PosixPath('training/...tsv'),)".
    written = re.findall(r"Path\('([^']+)'\)", config.get("written", ""))
    assert written or "Path" not in config.get("written", "")
    composed += [t for path in written for t in read_everyday(ROOT / path)[0]]
    assert len(composed) > int(config["everyday_synthetic"]) or not written
    texts = [t for t, _ in NEGATIONS]
    # Neither composed or written for training nor among the Tatoeba sentences its teacher labelled.
    assert not {_key(t) for t in texts} & {_key(t) for t in composed}
    assert not {_key(t) for t in texts} & {_key(t) for t in read_sentences(data_dir / "translation")}
    predictions = client.post(URL, json={"texts": texts}).json()["predictions"]
    wrong = [
        (t, p["label"], round(p["score"], 3))
        for (t, want), p in zip(NEGATIONS, predictions, strict=True)
        if p["label"] != want
    ]
    print(f"\nnegations wrong: {wrong}")
    assert len(wrong) <= 3, wrong  # v2 and v3 get 2 wrong; v1 got 6, calling every one "negative"


def test_sentiment_routes_chinese_by_detection_language_or_name(client: TestClient) -> None:
    zh = ["房间很干净，服务也很热情，下次还会再来。", "设施陈旧，卫生很差，非常失望。"]
    auto = client.post(URL, json={"texts": zh}).json()
    assert auto["model"] == "sentiment-zh"
    assert [p["label"] for p in auto["predictions"]] == ["positive", "negative"]
    assert client.post(URL, json={"texts": zh, "language": "zh"}).json()["model"] == "sentiment-zh"
    assert client.post(URL, json={"texts": zh, "model": "sentiment-zh"}).json()["model"] == "sentiment-zh"
    forced = client.post(URL, json={"texts": ["great hotel"], "language": "en"}).json()
    assert forced["model"] == "sentiment"


def test_sentiment_long_text_is_truncated_with_a_flag(client: TestClient) -> None:
    long_text = " ".join(["a wonderful , moving film"] * 200)  # about 1,000 tokens; the model takes 256
    response = client.post(URL, json={"texts": ["fine", long_text]})
    assert response.status_code == 200
    short, long = response.json()["predictions"]
    assert short["truncated"] is False
    assert long["truncated"] is True and long["tokens"] > 256 and long["label"] == "positive"


@pytest.mark.parametrize(
    ("kwargs", "status", "error_type"),
    [
        ({"json": {"texts": [""]}}, 400, "invalid_input"),
        ({"json": {"texts": ["fine", "   \n"]}}, 400, "invalid_input"),
        ({"json": {"texts": ["fine", 3]}}, 422, "schema_error"),
        ({"json": {"texts": [None]}}, 422, "schema_error"),
        ({"json": {"texts": "just a string"}}, 422, "schema_error"),
        ({"json": {"texts": []}}, 422, "schema_error"),
        ({"json": {"text": ["x"]}}, 422, "schema_error"),
        ({"json": {"texts": ["x"], "language": "fr"}}, 404, "model_not_found"),
        ({"json": {"texts": ["x"], "language": "French"}}, 422, "schema_error"),
        ({"json": {"texts": ["x"] * 65}}, 413, "too_many_items"),
        ({"json": {"texts": ["x" * 20_001]}}, 413, "text_too_long"),
        ({"json": {"texts": ["x"], "model": "nope"}}, 404, "model_not_found"),
        ({"json": {"texts": ["x"], "model": "mnist"}}, 404, "model_not_found"),
        ({"content": b'{"texts": ["caf\xe9"]}', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b'{"texts": ["\\ud800"]}', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ],
)
def test_sentiment_bad_requests_get_clear_4xx(client: TestClient, kwargs: dict, status: int, error_type: str) -> None:
    response = client.post(URL, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type
    assert response.json()["error"]


def test_a_json_body_that_starts_with_a_byte_order_mark_is_read(client: TestClient) -> None:
    """Windows and .NET clients may send one; RFC 8259 lets a parser ignore it (orjson refused it: 400)."""
    body = b'{"texts": ["Great product, fast shipping."]}'
    plain = client.post("/v1/sentiment", content=body, headers={"content-type": "application/json"})
    marked = client.post("/v1/sentiment", content=b"\xef\xbb\xbf" + body, headers={"content-type": "application/json"})
    assert marked.status_code == 200, marked.text
    assert marked.json()["predictions"] == plain.json()["predictions"]
    json_type = {"content-type": "application/json"}
    only_mark = client.post("/v1/sentiment", content=b"\xef\xbb\xbf", headers=json_type)
    assert (only_mark.status_code, only_mark.json()["error_type"]) == (400, "invalid_json")
    assert "empty" in only_mark.json()["error"]
    # A route whose body may be empty reads a lone mark as empty too (it said "empty" and refused it).
    index = client.post("/v2/repository/index", content=b"\xef\xbb\xbf", headers=json_type)
    assert index.status_code == 200 and index.json() == client.post("/v2/repository/index").json()
    twice = client.post("/v1/sentiment", content=b"\xef\xbb\xbf" * 2 + body, headers=json_type)
    assert twice.status_code == 400 and "more than one byte-order mark" in twice.json()["error"]
    utf16 = client.post("/v1/sentiment", content=b"\xff\xfe" + body.decode().encode("utf-16-le"), headers=json_type)
    assert utf16.status_code == 400 and "send JSON as UTF-8" in utf16.json()["error"]


def test_sentiment_mixed_language_request_routes_each_text_to_its_model(client: TestClient) -> None:
    texts = ["a wonderful, moving film", "房间很干净，服务也很热情。", "dull and lifeless", "卫生很差，非常失望。"]
    response = client.post(URL, json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "sentiment"
    assert [p["model"] for p in body["predictions"]] == ["sentiment", "sentiment-zh", "sentiment", "sentiment-zh"]
    assert [p["label"] for p in body["predictions"]] == ["positive", "positive", "negative", "negative"]
    # Each text gets the same answer as when sent on its own.
    for text, prediction in zip(texts, body["predictions"], strict=True):
        alone = client.post(URL, json={"texts": [text]}).json()["predictions"][0]
        assert alone["scores"] == pytest.approx(prediction["scores"], abs=1e-5)


def test_sentiment_reads_markup_as_the_text_it_shows(client: TestClient) -> None:
    """A rich-text field's HTML: "great!" in <p><b><i> tags scored 0.500 before, "&nbsp;&amp;" after it
    turned it negative."""
    plain = "This product is great! Fast shipping & friendly support."
    marked = [
        "<p><b><i>This product is great!</i></b> Fast shipping &amp; friendly<br/>support.</p>",
        'This product is great!&nbsp;Fast shipping &#38; <span class="x">friendly</span> support.',
    ]
    body = client.post(URL, json={"texts": [plain, *marked]}).json()["predictions"]
    assert body[0]["label"] == "positive" and body[0]["score"] > 0.9
    for p in body[1:]:
        assert p["scores"] == body[0]["scores"] and p["tokens"] == body[0]["tokens"]
    # Without markup a "<" or "&" is text: not a tag, not a reference.
    from service.tasks.sentiment import shown_text

    plain_texts = ("a < b and c > d", "R&D at AT&T", "I <3 it", "Tom &amp Jerry", "List<String> names", "<sigh> fine")
    for text in (*plain_texts, "Worth it <only if on sale. Otherwise overpriced junk.\nBattery => 2 hours"):
        assert shown_text(text) == text
    assert shown_text("<b>G</b>reat, un<i>believ</i>able<o:p></o:p>") == "Great, unbelievable"
    assert shown_text("<style>p{color:red}</style><script>x = '<p>'</script><P>Awful</P>") == "Awful"
    # A reference too long to read is left as typed (html.unescape raised on 4,400 digits: a 500).
    long_reference = "<b>x</b>&#" + "1" * 4400
    assert shown_text(long_reference) == long_reference.replace("<b>", "").replace("</b>", "")
    assert client.post(URL, json={"texts": [long_reference, plain]}).status_code == 200
    assert shown_text("so <!-- a <b> comment --> good <!-- never closed") == "so good <!-- never closed"
    started = time.perf_counter()  # 6,000 unclosed comments took 0.67 s through a lazy pattern
    for text in ("<!--" * 6000, "<!--" * 6000 + "-->", "<a " * 8000, "&" * 24000):
        shown_text(text)
    assert time.perf_counter() - started < 0.2


def test_sentiment_reads_a_negation_typed_without_its_apostrophe_as_one(client: TestClient) -> None:
    """Phones' typing: "didnt love it" read 0.81 positive, "I didn't love it." right."""
    pairs = [
        ("i didnt love it", "i didn't love it"),
        ("Doesnt work at all, dont buy", "Doesn't work at all, don't buy"),
        ("the food wasnt good", "the food wasn't good"),
    ]
    texts = [t for pair in pairs for t in pair]
    got = client.post(URL, json={"texts": texts}).json()["predictions"]
    for i in range(0, len(texts), 2):
        assert got[i]["scores"] == got[i + 1]["scores"] and got[i]["label"] == "negative", texts[i]
    from service.tasks.sentiment import with_apostrophes

    for word in ("I wont go", "cant", "Well, ill be there", "ant", "donts and dos"):  # other words, kept
        assert with_apostrophes(word) == word
