"""/v1/translation with the committed English-French model: BLEU through HTTP matches decoding the
ONNX graphs directly, everyday sentences, beam search, streaming, step-level batching, deadlines
and every kind of bad input."""

from __future__ import annotations

import concurrent.futures
import json
import logging
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT, make_client, wait_ready

URL = "/v1/translation"
MODEL = "translation-en-fr"
VERSION_DIR = ROOT / "models" / MODEL / "1"


def metadata() -> dict:
    return json.loads((VERSION_DIR / "metadata.json").read_text())


@pytest.fixture(scope="module")
def validation(data_dir: Path) -> tuple[list[str], list[list[str]]]:
    """The committed model's validation split, rebuilt from its recorded seed and size."""
    from training.translation import normalise_reference, read_pairs, split_by_english

    config = metadata()["training"]["config"]
    _, held = split_by_english(
        read_pairs(data_dir / "translation"), int(config["validation_sentences"]), int(config["seed"])
    )
    english = list(held)
    return english, [[normalise_reference(r) for r in held[en]] for en in english]


def translate(client: TestClient, texts: list[str], **extra) -> list[dict]:
    response = client.post(URL, json={"texts": texts, **extra})
    assert response.status_code == 200, response.text
    return response.json()["translations"]


def test_committed_model_meets_the_bleu_target() -> None:
    meta = metadata()
    assert meta["metrics"]["validation_bleu"] >= 40.0
    assert meta["metrics"]["validation_sentences"] == 2000
    assert "training.translation" in meta["training"]["command"]


def test_bleu_through_http_matches_decoding_the_graphs_directly(client: TestClient, validation) -> None:
    from training.translation import bleu, onnx_greedy_batched

    english, refs = validation[0][:300], validation[1][:300]
    hyps = []
    for start in range(0, len(english), 64):
        hyps += [t["text"] for t in translate(client, english[start : start + 64])]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(VERSION_DIR / "tokenizer.json"))
    sources = [e.ids[:64] for e in tokenizer.encode_batch(english)]
    offline_ids = onnx_greedy_batched(VERSION_DIR / "encoder.onnx", VERSION_DIR / "model.onnx", sources, 64)
    offline = bleu(tokenizer.decode_batch(offline_ids), refs)
    served = bleu(hyps, refs)
    print(f"\nBLEU on 300 validation sentences: through HTTP {served:.2f}, graphs directly {offline:.2f}")
    assert abs(served - offline) <= 1.0
    assert served >= 35.0  # the whole split's figure is in the metadata; 300 sentences vary a little


def test_everyday_sentences(client: TestClient) -> None:
    cases = {
        "I'm hungry.": "faim",
        "Thank you very much.": "merci",
        "Where is the train station?": "gare",
        "I love my dog.": "chien",
        "It is raining today.": "pleut",
    }
    out = translate(client, list(cases))
    for (english, word), t in zip(cases.items(), out, strict=True):
        assert word in t["text"].lower(), f"{english!r} -> {t['text']!r}"
        assert t["finished"] and not t["truncated"] and t["unknown_characters"] == []
        assert "▁" not in t["text"] and "<" not in t["text"] and t["text"] == t["text"].strip()


def test_beam_search_is_at_least_as_good_as_greedy(client: TestClient, validation) -> None:
    from training.translation import bleu

    english, refs = validation[0][300:364], validation[1][300:364]
    greedy = translate(client, english)
    beam = translate(client, english, beam_size=4)
    assert all(t["finished"] and t["text"] for t in beam)
    greedy_bleu, beam_bleu = bleu([t["text"] for t in greedy], refs), bleu([t["text"] for t in beam], refs)
    print(f"\nBLEU on 64 validation sentences: greedy {greedy_bleu:.2f}, beam 4 {beam_bleu:.2f}")
    assert beam_bleu >= greedy_bleu - 1.0


def test_max_new_tokens_cuts_and_says_so(client: TestClient) -> None:
    text = "I would like to buy a ticket for the train to Paris tomorrow morning."
    (t,) = translate(client, [text], max_new_tokens=3)
    assert t["generated_tokens"] == 3 and t["finished"] is False


def test_long_text_is_truncated_and_flagged(client: TestClient) -> None:
    text = " ".join(["I think that he is right and that we should go home now."] * 10)
    (t,) = translate(client, [text])
    assert t["truncated"] is True and t["source_tokens"] > 64 and t["text"]


def test_unknown_characters_are_reported(client: TestClient) -> None:
    (t,) = translate(client, ["I like tea 茶."])
    assert t["unknown_characters"] == ["茶"] and t["text"]


def test_streaming_sends_tokens_then_the_whole_answer(client: TestClient) -> None:
    response = client.post(URL, json={"texts": ["I'm hungry.", "Good morning!"], "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.strip().split("\n\n"):
        name, data = block.split("\n", 1)
        events.append((name.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    assert events[-1][0] == "done" and all(name == "token" for name, _ in events[:-1])
    final = events[-1][1]["translations"]
    for index in (0, 1):
        tokens = [e for name, e in events[:-1] if e["index"] == index]
        assert tokens[-1]["end"] is True and tokens[-1]["text"] == final[index]["text"]
        assert len(tokens) == final[index]["generated_tokens"] + 1  # + the end-of-sentence event
    assert final[0]["text"] == translate(client, ["I'm hungry."])[0]["text"]  # same as without streaming


def test_a_streamed_translation_is_admitted_once_before_its_200(client: TestClient, monkeypatch) -> None:
    # Admitted before the 200 and then again inside the stream: when the line filled in between (30
    # concurrent streams of 32 texts), 5 of them answered "200" and then an "overloaded" error event.
    from service.errors import Overloaded

    served = client.app.state.registry.for_task("translation", None)
    real, calls = served.engine.scheduler.admit, []

    def admit(rows: int) -> None:
        calls.append(rows)
        if len(calls) > 1:  # the line is full for any check after the first
            raise Overloaded("full")
        real(rows)

    monkeypatch.setattr(served.engine.scheduler, "admit", admit)
    response = client.post(URL, json={"texts": ["I'm hungry.", "Good morning!"], "stream": True})
    assert response.status_code == 200
    assert "event: error" not in response.text and "event: done" in response.text
    assert calls == [2]


def test_text_in_capitals_is_translated_as_the_same_sentence_in_sentence_case(client: TestClient) -> None:
    # "WHERE IS THE BATHROOM?" came back as "TrEEESA, j'ai le Terre « O OVNI ?" (19 rare pieces).
    shouted = translate(client, ["WHERE IS THE BATHROOM?", "I LOVE YOU.", "I'M HUNGRY."])
    plain = translate(client, ["Where is the bathroom?", "I love you.", "I'm hungry."])
    assert [t["text"] for t in shouted] == [t["text"] for t in plain]
    assert [t["source_tokens"] for t in shouted] == [t["source_tokens"] for t in plain]
    # characters it cannot read are named as they were sent, not lower-cased
    (odd,) = translate(client, ["HELLO ΚΑΛΗΜΕΡΑ"])
    assert all(c.isupper() for c in "".join(odd["unknown_characters"])), odd["unknown_characters"]


def test_concurrent_requests_share_decoder_steps(client: TestClient) -> None:
    texts = [
        "Hi.",
        "I'm hungry.",
        "Where is the train station?",
        "I would like to buy a ticket for the train to Paris tomorrow morning, please.",
    ] * 6

    def one(text: str) -> tuple[str, int]:
        response = client.post(URL, json={"texts": [text]})
        assert response.status_code == 200, response.text
        return response.json()["translations"][0]["text"], int(response.headers["x-batch-size"])

    alone = {t: translate(client, [t])[0]["text"] for t in set(texts)}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, texts))
    assert max(rows for _, rows in results) >= 2  # steps were shared across requests
    # Sharing a step does not change a translation (padding is masked); float sums over a different
    # batch may still flip a near-tie, hence one allowed difference.
    differ = [text for text, (translated, _) in zip(texts, results, strict=True) if translated != alone[text]]
    assert len(differ) <= 1, differ


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"texts": []}, 422, "schema_error"),
        ({"texts": ["  "]}, 400, "invalid_input"),
        ({"texts": [3]}, 422, "schema_error"),
        ({"texts": "I'm hungry."}, 422, "schema_error"),
        ({"texts": ["a"] * 65}, 413, "too_many_items"),
        ({"texts": ["a" * 20_001]}, 413, "text_too_long"),
        ({"texts": ["Hi."], "beam_size": 0}, 422, "schema_error"),
        ({"texts": ["Hi."], "beam_size": 6}, 422, "schema_error"),
        ({"texts": ["Hi."], "max_new_tokens": 65}, 422, "schema_error"),
        ({"texts": ["Hi."], "max_new_tokens": 0}, 422, "schema_error"),
        ({"texts": ["Hi."], "stream": True, "beam_size": 2}, 422, "schema_error"),
        ({"texts": ["我饿了。"]}, 400, "unsupported_text"),
        ({"texts": ["Hi."], "model": "nope"}, 404, "model_not_found"),
        ({"texts": ["Hi."], "model": "mnist"}, 404, "model_not_found"),
        ({"texts": ["Hi."], "temperature": 2}, 422, "schema_error"),
    ],
)
def test_bad_input_gets_a_clear_4xx(client: TestClient, body: dict, status: int, error_type: str) -> None:
    response = client.post(URL, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type and response.json()["error"]


def test_invalid_json_and_utf8(client: TestClient) -> None:
    for raw in (b"{not json", b'{"texts": ["\xff"]}'):
        response = client.post(URL, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error_type"] == "invalid_json"


def test_deadline_mid_decode_is_a_504(tmp_path: Path) -> None:
    (tmp_path / MODEL).symlink_to(ROOT / "models" / MODEL)
    with make_client(repository=tmp_path, warmup=False, decode_timeout_ms=30) as c:
        wait_ready(c)
        texts = ["I would like to buy a ticket for the train to Paris tomorrow morning, please."] * 8
        response = c.post(URL, json={"texts": texts, "beam_size": 5})
        assert response.status_code == 504, response.text
        assert response.json()["error_type"] == "deadline_exceeded"
        scheduler = c.app.state.registry.get(MODEL).engine.scheduler
        assert scheduler.active == 0 and scheduler.waiting == 0  # nothing left decoding for nobody
        assert c.post(URL, json={"texts": ["Hi."], "max_new_tokens": 1}).status_code == 200


def test_a_stream_past_its_deadline_ends_with_an_error_event_and_is_logged_as_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / MODEL).symlink_to(ROOT / "models" / MODEL)
    with make_client(repository=tmp_path, warmup=False, decode_timeout_ms=30) as c:
        wait_ready(c)
        texts = ["I would like to buy a ticket for the train to Paris tomorrow morning, please."] * 8
        with caplog.at_level(logging.INFO):
            response = c.post(URL, json={"texts": texts, "stream": True})
    assert response.status_code == 200  # sent before the decoding began
    last = response.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error") and '"error_type":"deadline_exceeded"' in last
    failed = [r for r in caplog.records if getattr(r, "stream_error", None)]
    assert [(r.status, r.stream_error, r.stream_error_status, r.levelname) for r in failed] == [
        (200, "deadline_exceeded", 504, "WARNING")
    ]


@pytest.mark.parametrize(
    "settings",
    [{"decode_batching": "request"}, {"decode_kv_cache": False}],
    ids=["request-level batching", "full-prefix decoder step"],
)
def test_other_decoding_paths_give_the_same_translations(client: TestClient, tmp_path: Path, settings: dict) -> None:
    texts = ["I'm hungry.", "Where is the train station?", "She has been living here for ten years."]
    want_greedy = [t["text"] for t in translate(client, texts)]
    want_beam = [t["text"] for t in translate(client, texts, beam_size=4)]
    (tmp_path / MODEL).symlink_to(ROOT / "models" / MODEL)
    with make_client(repository=tmp_path, warmup=False, **settings) as c:
        wait_ready(c)
        engine = c.app.state.registry.get(MODEL).engine
        assert engine.kv_cache is settings.get("decode_kv_cache", True)
        assert engine.scheduler.mode == settings.get("decode_batching", "step")
        assert [t["text"] for t in translate(c, texts)] == want_greedy
        assert [t["text"] for t in translate(c, texts, beam_size=4)] == want_beam
        meta = c.get(f"/v2/models/{MODEL}").json()
        assert [t["name"] for t in meta["inputs"]] == ["tgt_ids", "memory", "src_ids"]
