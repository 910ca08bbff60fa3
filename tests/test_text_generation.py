"""Text generation: the OpenAI-compatible completions API and /v1/text-generation, on a tiny LSTM
language model with random weights built here (so every behaviour is checked against the graphs
themselves), and the official ``openai`` client against the app."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openai
import pytest
from fastapi.testclient import TestClient

from bench.harness import neuroserve
from service.api.app import create_app
from service.config import Settings
from tests.conftest import wait_ready
from tests.onnx_models import lstm_language_model

MODEL = "tiny-lm"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    folder = lstm_language_model(root, MODEL)
    spec = json.loads((folder / "model.json").read_text())
    spec["default"] = True
    (folder / "model.json").write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="module")
def lm(repo: Path) -> TestClient:
    with TestClient(create_app(Settings(repository=repo, log_json=False))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def graphs(repo: Path):
    version = repo / MODEL / "1"
    prefill = ort.InferenceSession(str(version / "prefill.onnx"), providers=["CPUExecutionProvider"])
    from tokenizers import Tokenizer

    return prefill, Tokenizer.from_file(str(version / "tokenizer.json"))


def complete(client: TestClient, **body) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def every_position(prefill, seq: list[int]) -> np.ndarray:
    """The prefill graph's log-probabilities at every position of one sequence, ``[T, vocab]``."""
    n = len(seq)
    feeds = {"ids": np.asarray([seq], np.int64), "lengths": np.asarray([n]), "positions": np.arange(n)[None, :]}
    return prefill.run(None, feeds)[0][0]


def greedy_reference(prefill, ids: list[int], steps: int, never=(0, 1, 3)) -> list[int]:
    """Greedy decoding by re-running the prefill graph over the whole growing sequence."""
    out = []
    seq = list(ids)
    for _ in range(steps):
        log_probs = every_position(prefill, seq)[-1].copy()
        log_probs[list(never)] = -np.inf
        token = int(log_probs.argmax())
        out.append(token)
        if token == 2:
            break
        seq.append(token)
    return out


def test_greedy_text_is_what_the_graphs_give_when_rerun_over_the_whole_sequence(lm: TestClient, graphs) -> None:
    # The service runs the prompt through prefill once, then one step per token with the carried
    # state: the same tokens as re-running the whole sequence each time.
    prefill, tokenizer = graphs
    ids = [1, *tokenizer.encode("I think that", add_special_tokens=False).ids]
    want = greedy_reference(prefill, ids, 20)
    got = complete(lm, prompt="I think that", max_tokens=20, temperature=0)["choices"][0]
    text = tokenizer.decode([t for t in want if t != 2])
    assert got["text"] == text
    assert got["finish_reason"] == ("stop" if want[-1] == 2 else "length")


def test_the_same_seed_and_prompt_give_the_same_text_whatever_shares_the_batch(lm: TestClient) -> None:
    body = {"prompt": "Tom is", "max_tokens": 30, "seed": 1234, "temperature": 1.0}
    alone = complete(lm, **body)["choices"][0]["text"]
    with ThreadPoolExecutor(8) as pool:
        crowd = [pool.submit(complete, lm, prompt=p, max_tokens=40) for p in ("Can you", "The weather", "I'm", "")]
        same = [pool.submit(complete, lm, **body) for _ in range(4)]
        assert [f.result()["choices"][0]["text"] for f in same] == [alone] * 4
        for f in crowd:
            f.result()
    other = complete(lm, **{**body, "seed": 99})["choices"][0]["text"]
    assert other != alone  # the seed matters (30 tokens from a random model: a tie is vanishingly rare)


def test_n_choices_differ_and_the_first_is_the_single_choice_with_that_seed(lm: TestClient) -> None:
    one = complete(lm, prompt="Tom is", max_tokens=20, seed=5)["choices"]
    three = complete(lm, prompt="Tom is", max_tokens=20, seed=5, n=3)["choices"]
    assert [c["index"] for c in three] == [0, 1, 2]
    assert three[0]["text"] == one[0]["text"]
    assert len({c["text"] for c in three}) == 3


def test_top_k_of_one_and_temperature_zero_are_greedy(lm: TestClient) -> None:
    greedy = complete(lm, prompt="Can you", max_tokens=15, temperature=0)["choices"][0]["text"]
    assert complete(lm, prompt="Can you", max_tokens=15, top_k=1, seed=3)["choices"][0]["text"] == greedy
    assert complete(lm, prompt="Can you", max_tokens=15, top_p=1e-6, seed=4)["choices"][0]["text"] == greedy


def test_a_stop_sequence_ends_the_text_before_it(lm: TestClient) -> None:
    full = complete(lm, prompt="The weather", max_tokens=30, temperature=0)["choices"][0]["text"]
    assert len(full) > 6
    stop = full[3:6]
    cut = complete(lm, prompt="The weather", max_tokens=30, temperature=0, stop=[stop, "never-there"])
    choice = cut["choices"][0]
    assert choice["text"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_max_tokens_cuts_with_finish_reason_length_and_usage_counts(lm: TestClient, graphs) -> None:
    _, tokenizer = graphs
    body = complete(lm, prompt=["Tom is", "Where is the"], max_tokens=3, temperature=0, logit_bias={"2": -100})
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    prompt_tokens = sum(len(tokenizer.encode(p).ids) for p in ("Tom is", "Where is the"))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}


def test_echo_with_no_new_tokens_scores_the_prompt_from_begin_of_text(lm: TestClient, graphs) -> None:
    prefill, tokenizer = graphs
    prompt = "Where is the station?"
    ids = tokenizer.encode(prompt).ids
    choice = complete(lm, prompt=prompt, max_tokens=0, echo=True, logprobs=2)["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    want = every_position(prefill, [1, *ids])
    expected = [float(want[p, t]) for p, t in enumerate(ids)]  # the first conditioned on <bos>
    lp = choice["logprobs"]
    assert np.allclose(lp["token_logprobs"], expected, atol=1e-4)
    assert "".join(lp["tokens"]) == prompt
    assert lp["text_offset"][0] == 0 and all(len(d) in (2, 3) for d in lp["top_logprobs"])
    # As OpenAI: each position lists its own token beside the 2 best, so a 3rd entry when it is not one.
    for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top[token] == pytest.approx(chosen, abs=1e-6)
        assert len(top) == 2 or chosen < min(v for k, v in top.items() if k != token)


def test_control_tokens_typed_in_a_prompt_are_text_and_do_not_cut_its_scores_short(lm: TestClient) -> None:
    """ "<eos>" typed by a user was read as the end-of-text token: the echo lost it and the prompt's
    log-probabilities stopped there; streamed and whole answers disagreed."""
    prompt = "Tom said <eos> and <pad> then <unk> left."
    choice = complete(lm, prompt=prompt, max_tokens=0, echo=True, logprobs=1)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) and all(v < 0 for v in lp["token_logprobs"])
    r = lm.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True},
    )
    streamed = [json.loads(e)["choices"][0] for e in sse(r.text)[:-1] if json.loads(e)["choices"]]
    tokens = [t for c in streamed if c["logprobs"] for t in c["logprobs"]["tokens"]]
    scores = [v for c in streamed if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert tokens == lp["tokens"] and np.allclose(scores, lp["token_logprobs"], atol=1e-6)
    # An end-of-text id inside a prompt of ids is scored like any other prompt token, at the end too.
    for ids in ([5, 2], [2, 2, 2], [5, 2, 7]):
        scored = complete(lm, prompt=ids, max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]
        assert len(scored["token_logprobs"]) == len(ids) and all(v <= 0 for v in scored["token_logprobs"]), ids


def test_every_token_is_found_in_its_own_alternatives_under_the_same_string(lm: TestClient, graphs) -> None:
    """A control token in a prompt of ids, or a piece of a character, showed as "" in ``tokens`` but
    under its own text ("<eos>", U+FFFD) in ``top_logprobs``: a client's lookup of the chosen token failed."""
    _, tokenizer = graphs
    pieces = tokenizer.encode("Café über naïve 日本").ids
    for ids in ([5, 2, 7], pieces, [0, 3, *pieces[:3]]):
        for max_tokens in (0, 4):
            body = {"prompt": ids, "max_tokens": max_tokens, "echo": True, "logprobs": 2, "temperature": 0}
            lp = complete(lm, **body)["choices"][0]["logprobs"]
            for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
                assert token in top, (ids, token, top)
                assert top[token] >= chosen - 1e-6


def test_logprobs_of_generated_tokens_are_the_models_and_their_alternatives_rank_them(lm: TestClient) -> None:
    choice = complete(lm, prompt="Tom is", max_tokens=8, temperature=0, logprobs=3)["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy took the best
        assert all(v <= 0 for v in top.values())


def sse(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


def test_stream_sends_openai_chunks_that_add_up_to_the_same_text_then_done(lm: TestClient) -> None:
    body = {"model": MODEL, "prompt": ["Tom is", "Can you"], "max_tokens": 25, "seed": 8}
    whole = complete(lm, **{k: v for k, v in body.items() if k != "model"})
    r = lm.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        assert chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-")
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    assert texts == [c["text"] for c in whole["choices"]]
    assert reasons == [c["finish_reason"] for c in whole["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "model_not_found", "model"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 49}, 400, "schema_error", "max_tokens"),
        ({"model": MODEL, "prompt": "Tom is " * 30, "max_tokens": 10}, 400, "context_length_exceeded", "prompt"),
        ({"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400, "schema_error", "temperature"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "schema_error", "temperature"),
        ({"model": MODEL, "prompt": "hi", "n": 65}, 400, "too_many_items", "n"),
        ({"model": MODEL, "prompt": [5, 99999]}, 400, "invalid_input", "prompt"),
        ({"model": MODEL, "prompt": []}, 400, "schema_error", "prompt"),
        ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "schema_error", "stop"),
        ({"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "schema_error", "stop"),
        ({"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "schema_error", "suffix"),
        ({"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "schema_error", "best_of"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "schema_error", "logprobs"),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "schema_error", "logit_bias"),
        (
            {"model": MODEL, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}},
            400,
            "schema_error",
            "logit_bias",
        ),
        ({"model": MODEL, "prompt": "hi", "frobnicate": True}, 400, "schema_error", "frobnicate"),
        ({"prompt": "hi"}, 400, "schema_error", "model"),
    ],
)
def test_bad_requests_get_a_4xx_in_openais_error_shape(lm: TestClient, body: dict, status: int, code: str, param):
    r = lm.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_openai_paths_this_server_lacks_answer_in_openais_shape(lm: TestClient) -> None:
    r = lm.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/completions" in r.json()["error"]["message"]  # where to go instead, not a bare "Not Found"


def test_a_tiny_temperature_is_greedy_not_garbage(lm: TestClient) -> None:
    greedy = complete(lm, prompt="Tom is", max_tokens=10, temperature=0)["choices"][0]["text"]
    for temperature in (1e-39, 1e-46, 1e-6):
        assert complete(lm, prompt="Tom is", max_tokens=10, temperature=temperature)["choices"][0]["text"] == greedy
    assert complete(lm, prompt="Tom is", max_tokens=10, top_p=0, seed=1)["choices"][0]["text"] == greedy


def stream_of(lm: TestClient, **body) -> dict:
    """A streamed completion put back together: text, finish reason and log-probabilities per choice."""
    r = lm.post("/v1/completions", json={"model": MODEL, **body, "stream": True})
    assert r.status_code == 200, r.text
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    out: dict[int, dict] = {}
    for event in events[:-1]:
        for c in json.loads(event)["choices"]:
            got = out.setdefault(c["index"], {"text": "", "finish_reason": None, "tokens": [], "lp": [], "offsets": []})
            got["text"] += c["text"]
            got["finish_reason"] = c["finish_reason"] or got["finish_reason"]
            if c["logprobs"]:
                got["tokens"] += c["logprobs"]["tokens"]
                got["lp"] += c["logprobs"]["token_logprobs"]
                got["offsets"] += c["logprobs"]["text_offset"]
    return out


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "I think", "max_tokens": 30, "seed": 4, "logprobs": 2},
        {"prompt": ["I think", "Tom"], "n": 2, "stop": [" the", " a", "e"], "logprobs": 1, "seed": 4, "max_tokens": 30},
        {"prompt": "Tom is", "max_tokens": 12, "echo": True, "logprobs": 2, "seed": 2},
        {"prompt": "Tom is", "max_tokens": 0, "echo": True, "logprobs": 1},
    ],
)
def test_streamed_log_probabilities_are_the_unstreamed_ones(lm: TestClient, body: dict) -> None:
    whole = complete(lm, **body)["choices"]
    streamed = stream_of(lm, **body)
    for choice in whole:
        got = streamed[choice["index"]]
        assert got["text"] == choice["text"] and got["finish_reason"] == choice["finish_reason"]
        assert got["tokens"] == choice["logprobs"]["tokens"]
        assert got["lp"] == choice["logprobs"]["token_logprobs"]
        assert got["offsets"] == choice["logprobs"]["text_offset"]


def test_invalid_json_on_an_openai_route_is_a_400_in_its_shape(lm: TestClient) -> None:
    r = lm.post("/v1/completions", content=b'{"model": "tiny-lm", "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert lm.post("/v1/completions", json={"model": MODEL, "prompt": None, "max_tokens": 2}).status_code == 200


def test_models_lists_the_generation_models_only(lm: TestClient) -> None:
    listed = lm.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [MODEL]
    assert lm.get(f"/v1/models/{MODEL}").json()["object"] == "model"
    missing = lm.get("/v1/models/mnist")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_openai_client_works_unchanged(lm: TestClient) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=lm, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    made = client.completions.create(model=MODEL, prompt="Tom is", max_tokens=12, seed=42, temperature=0.9)
    again = client.completions.create(model=MODEL, prompt="Tom is", max_tokens=12, seed=42, temperature=0.9)
    assert made.choices[0].text == again.choices[0].text and made.usage.completion_tokens <= 12
    streamed = client.completions.create(
        model=MODEL, prompt="Tom is", max_tokens=12, seed=42, temperature=0.9, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == made.choices[0].text
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="x")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="word " * 100, max_tokens=16)
    assert caught.value.code == "context_length_exceeded"


def test_house_style_text_generation(lm: TestClient) -> None:
    r = lm.post("/v1/text-generation", json={"prompts": ["Tom is", ""], "max_new_tokens": 10, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and len(body["generations"]) == 2
    assert all(g["generated_tokens"] <= 10 for g in body["generations"])
    again = lm.post("/v1/text-generation", json={"prompts": ["Tom is", ""], "max_new_tokens": 10, "seed": 3}).json()
    assert again["generations"] == body["generations"]
    bad = lm.post("/v1/text-generation", json={"prompts": ["x"], "max_new_tokens": 0})
    assert bad.status_code == 422 and bad.json()["error_type"] == "schema_error"  # the house shape and status here


def test_an_api_key_error_on_an_openai_route_is_in_openais_shape(repo: Path, tmp_path: Path) -> None:
    from service.api.auth import add_key

    keys = tmp_path / "keys.json"
    key = add_key(keys, "app", ["infer"], None)
    with TestClient(create_app(Settings(repository=repo, log_json=False, api_keys_file=keys))) as c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=c, max_retries=0)
        assert client.completions.create(model=MODEL, prompt="Tom", max_tokens=2).choices


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_stops_its_decoding(tmp_path: Path) -> None:
    # Hidden 384 and 4,000 new tokens: tens of seconds of decoding if nobody stopped it.
    lstm_language_model(tmp_path, "long-lm", hidden=384, max_context_tokens=4100, max_new_tokens=4000)
    with neuroserve(tmp_path) as server:
        body = json.dumps(
            {"model": "long-lm", "prompt": "Tom", "max_tokens": 4000, "stream": True, "logit_bias": {"2": -100}}
        ).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        assert b" 200 " in received.split(b"\r\n")[0]
        sock.close()
        deadline = time.monotonic() + 5
        gauge = 'neuroserve_active_sequences{model="long-lm"}'
        while server.metric(gauge) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric(gauge) == 0
        steps = server.metric('neuroserve_batch_size_count{model="long-lm"}')
        time.sleep(0.5)
        assert server.metric('neuroserve_batch_size_count{model="long-lm"}') == steps  # nothing decodes on
        assert steps < 2000
        # what it generated before it was cancelled is counted (it was not, before)
        assert 2 <= server.metric('neuroserve_generated_tokens_total{model="long-lm"}') <= steps + 1
        server.stop_cleanly()


@pytest.mark.slow
def test_a_stream_that_fails_after_its_200_is_logged_as_failed(tmp_path: Path) -> None:
    # The deadline passes mid-way through 4,000 tokens: the client has its 200 and some chunks, then
    # OpenAI's error chunk. The access line said a plain 200 before (and none with the access log off).
    lstm_language_model(tmp_path, "long-lm", hidden=384, max_context_tokens=4100, max_new_tokens=4000)
    with neuroserve(tmp_path, NEUROSERVE_DECODE_TIMEOUT_MS="400") as server:
        body = {"model": "long-lm", "prompt": "Tom", "max_tokens": 4000, "stream": True, "logit_bias": {"2": -100}}
        request = urllib.request.Request(
            server.url("/v1/completions"), json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            status, events = r.status, r.read().decode().split("\n\n")
        log = server.stop_cleanly()
    assert status == 200
    assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "deadline_exceeded"
    lines = [json.loads(line) for line in log.splitlines() if '"stream_error"' in line]
    assert [(x["status"], x["stream_error"], x["stream_error_status"], x["level"]) for x in lines] == [
        (200, "deadline_exceeded", 504, "warning")
    ]


@pytest.mark.parametrize("batching", ["request", "static"])
def test_request_level_batching_modes_give_the_same_texts(repo: Path, lm: TestClient, batching: str) -> None:
    # The comparison modes of the benchmark change only when sequences join (and, static, what
    # padding is computed), never what a sequence generates.
    body = {"model": MODEL, "prompt": ["Tom is", "Can you", "I"], "max_tokens": 12, "seed": 4}
    want = [c["text"] for c in complete(lm, **{k: v for k, v in body.items() if k != "model"})["choices"]]
    settings = Settings(repository=repo, log_json=False, decode_batching=batching)
    with TestClient(create_app(settings)) as other:
        wait_ready(other)
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(other.post, "/v1/completions", json=body) for _ in range(4)]
            for answer in answers:
                assert [c["text"] for c in answer.result().json()["choices"]] == want


@pytest.mark.parametrize("first", [True, False])
def test_a_stop_sequence_at_a_token_boundary_leaves_that_token_out_of_the_log_probabilities(
    lm: TestClient, first: bool
) -> None:
    # The token that starts a stop sequence was listed after the cut text: in a stream's last
    # chunk, and without streaming when it was the first token generated.
    found = None
    for prompt in ("Tom is", "I think", "Can you", "The weather", "Where", "My", "It"):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1, "logit_bias": {"2": -100}}
        full = complete(lm, **body)["choices"][0]["logprobs"]
        tokens, offsets = full["tokens"], full["text_offset"]
        text = "".join(tokens)
        for k, piece in enumerate(tokens):
            # a whole-character piece whose text first appears where that token begins
            if piece and "\ufffd" not in piece and text.find(piece) == offsets[k] and (k == 0) == first:
                found = body, tokens, offsets, text, k
                break
        if found:
            break
    assert found, "no prompt gave a token to stop at"
    body, tokens, offsets, text, cut = found
    cut_body = {**body, "stop": [tokens[cut]]}
    choice = complete(lm, **cut_body)["choices"][0]
    assert choice["text"] == text[: offsets[cut]] and choice["finish_reason"] == "stop"
    # the tokens that begin before the cut (a byte of the stop's first character is past it)
    kept = [k for k in range(cut) if offsets[k] < offsets[cut]]
    assert choice["logprobs"]["tokens"] == [tokens[k] for k in kept]
    assert choice["logprobs"]["text_offset"] == [offsets[k] for k in kept]
    streamed = stream_of(lm, **cut_body)[0]
    assert streamed["text"] == choice["text"] and streamed["tokens"] == [tokens[k] for k in kept]


def test_refused_completions_are_refused_before_their_prompts_are_tokenised(lm: TestClient, monkeypatch) -> None:
    """Tokenising holds the interpreter lock: 64 prompts of 20,000 characters sent with ``suffix`` (always
    refused) took 0.9 s of the event loop each, and every other client waited (health 1 ms -> 406 ms)."""
    served = lm.app.state.registry.for_task("text-generation", MODEL)
    calls: list[str] = []
    real = served.engine.encode
    monkeypatch.setattr(served.engine, "encode", lambda text: calls.append(text) or real(text))
    long = ["the cat sat on the mat " * 800] * 64  # 18,400 characters each
    for extra, status in (({"suffix": "x"}, 400), ({"n": 2}, 400), ({"best_of": 3}, 400), ({"max_tokens": 10**6}, 400)):
        r = lm.post("/v1/completions", json={"model": MODEL, "prompt": long, **extra})
        assert r.status_code == status, r.text
    # longer than the context can hold whatever the tokens: refused from its length alone
    r = lm.post("/v1/completions", json={"model": MODEL, "prompt": long[:1], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = lm.post("/v1/text-generation", json={"model": MODEL, "prompts": long[:1]})
    assert r.status_code == 400 and r.json()["error_type"] == "context_length_exceeded", r.text
    assert calls == []
    # a prompt that may fit is tokenised and measured as before
    assert complete(lm, prompt="the cat sat", max_tokens=2)["usage"]["prompt_tokens"] >= 1
    assert len(calls) == 1


def test_long_prompts_are_tokenised_a_few_at_a_turn_of_the_event_loop(lm: TestClient, monkeypatch) -> None:
    import asyncio

    from service.api.routes import text_generation as routes

    monkeypatch.setattr(routes, "_CHARS_PER_TURN", 200)  # this model's context is short: 64 tokens
    served = lm.app.state.registry.for_task("text-generation", MODEL)
    texts = ["the cat sat on the mat. " * 2] * 32  # 48 characters each: 1,536 in all
    turns = 0

    async def run() -> list[list[int]]:
        nonlocal turns
        done = asyncio.Event()

        async def count() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count())
        ids = await routes._prompts(texts, served.engine, served.assets.max_context_tokens, MODEL)
        done.set()
        await counter
        return ids

    ids = asyncio.run(run())
    assert ids == [served.engine.encode(t) for t in texts]
    assert turns >= 1_536 // 248 - 1  # the loop ran between the pieces of work


def test_a_bound_is_said_without_the_other_branch_and_a_full_context_blames_max_tokens(lm: TestClient) -> None:
    # "temperature: Input should be less than or equal to 2 or Input should be a valid integer" for 2.5
    r = lm.post("/v1/completions", json={"model": MODEL, "prompt": "Tom", "temperature": 2.5})
    assert r.json()["error"]["message"] == "temperature: Input should be less than or equal to 2", r.text
    r = lm.post("/v1/completions", json={"model": MODEL, "prompt": "Tom", "max_tokens": 64})  # the whole context
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    # the house route names its own fields
    r = lm.post("/v1/text-generation", json={"model": MODEL, "prompts": ["the cat " * 500]})
    assert r.status_code == 400 and r.json()["error"].startswith("prompts[0] has"), r.text


def test_a_million_validation_errors_are_described_from_the_first_few() -> None:
    import time

    from service.errors import describe_validation

    errors = [
        {"loc": ("body", "prompt", 0, 0), "msg": "Input should be a valid integer", "type": "int_type"}
    ] * 1_000_000
    started = time.perf_counter()
    message = describe_validation(errors, skip=("body",))
    assert time.perf_counter() - started < 0.1 and message.startswith("prompt.0.0: ")
