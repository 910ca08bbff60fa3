"""The web and mobile edge: API keys with scopes and rates, CORS for allowed origins only,
request ids on every answer, compression of large JSON answers."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.auth import add_key
from service.api.schemas import SEVEN_PNG_BASE64
from service.config import Settings
from tests.conftest import ROOT, make_client, wait_ready

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("edge")
    repo = root / "models"
    shutil.copytree(ROOT / "models" / "mnist", repo / "mnist")
    keys = root / "keys.json"
    infer = add_key(keys, "app", ["infer"], None)
    ops = add_key(keys, "ops", ["metrics", "admin"], None)
    slow = add_key(keys, "slow", ["infer"], 3)
    assert json.loads(keys.read_text())[0]["sha256"] != infer  # only the hash is stored
    with make_client(repository=repo, api_keys_file=keys, cors_allow_origins=[ORIGIN]) as client:
        wait_ready(client)
        yield client, {"infer": infer, "ops": ops, "slow": slow}


def classify(client, **headers):  # type: ignore[no-untyped-def]
    return client.post("/v1/image-classification", json={"images": [SEVEN_PNG_BASE64]}, headers=headers)


def test_inference_needs_a_key_with_its_scope(edge) -> None:
    client, keys = edge
    assert classify(client).status_code == 401 and classify(client).json()["error_type"] == "unauthenticated"
    assert classify(client, **{"x-api-key": "ns_wrong"}).status_code == 401
    answer = classify(client, authorization=f"Bearer {keys['infer']}")
    assert answer.status_code == 200 and answer.json()["predictions"][0][0]["label"] == "7"
    assert classify(client, **{"x-api-key": keys["infer"]}).status_code == 200
    refused = classify(client, **{"x-api-key": keys["ops"]})
    assert refused.status_code == 403 and refused.json()["error_type"] == "forbidden"
    assert keys["ops"] not in refused.text


def test_probes_stay_open_and_operations_need_their_scopes(edge) -> None:
    client, keys = edge
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"x-api-key": keys["infer"]}).status_code == 403
    assert client.get("/metrics", headers={"x-api-key": keys["ops"]}).status_code == 200
    assert client.get("/v2/models", headers={"x-api-key": keys["ops"]}).status_code == 200
    assert client.get("/v2/models/mnist").status_code == 401  # file hashes, training commands


def test_a_key_over_its_rate_gets_429_with_ratelimit_headers(edge) -> None:
    client, keys = edge
    answers = [classify(client, **{"x-api-key": keys["slow"]}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-policy"] == '"slow";q=3;w=60'
    assert answers[0].headers["ratelimit"].startswith('"slow";r=2;t=')
    last = answers[3]
    assert last.json()["error_type"] == "rate_limited" and int(last.headers["retry-after"]) >= 1


def test_an_allowed_origin_gets_cors_and_a_foreign_one_does_not(edge) -> None:
    client, keys = edge
    preflight = client.options(
        "/v1/image-classification",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-api-key",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in preflight.headers["access-control-allow-headers"]
    answer = classify(client, origin=ORIGIN, **{"x-api-key": keys["infer"]})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"]
    refused = classify(client, origin=ORIGIN)  # an error is readable by the page too
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    foreign = classify(client, origin="https://evil.example", **{"x-api-key": keys["infer"]})
    assert "access-control-allow-origin" not in foreign.headers
    foreign_preflight = client.options(
        "/v1/image-classification", headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in foreign_preflight.headers
    # In the one error shape (Starlette's was a text/plain 400 "Disallowed CORS origin").
    assert foreign_preflight.status_code == 403, foreign_preflight.text
    assert foreign_preflight.json()["error_type"] == "cross_origin_refused"
    assert "origin" in foreign_preflight.json()["error"]


def test_every_answer_carries_a_request_id(edge) -> None:
    client, keys = edge
    mine = classify(client, **{"x-api-key": keys["infer"], "x-request-id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    made = classify(client)  # an error, and no id given
    assert made.status_code == 401 and len(made.headers["x-request-id"]) == 32
    odd = classify(client, **{"x-api-key": keys["infer"], "x-request-id": "bad id\twith tab"})
    assert odd.headers["x-request-id"] != "bad id\twith tab"
    # preflights too, allowed or refused (they never reach the request guard)
    for origin in (ORIGIN, "https://evil.example"):
        preflight = client.options(
            "/v1/image-classification",
            headers={"origin": origin, "access-control-request-method": "POST", "x-request-id": "pre-1"},
        )
        assert preflight.headers["x-request-id"] == "pre-1", (origin, preflight.status_code)


def test_a_refused_preflight_says_which_part_was_refused_and_speaks_openai_on_its_routes(edge) -> None:
    client, _ = edge
    method = client.options(
        "/v1/image-classification", headers={"origin": ORIGIN, "access-control-request-method": "PUT"}
    )
    assert method.status_code == 403 and "NEUROSERVE_CORS_ALLOW_ORIGINS" not in method.json()["error"]
    assert "answers only" in method.json()["error"] and "POST" in method.json()["error"]
    openai = client.options(
        "/v1/completions", headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
    )
    assert openai.status_code == 403 and openai.json()["error"]["code"] == "cross_origin_refused"
    assert "NEUROSERVE_CORS_ALLOW_ORIGINS" in openai.json()["error"]["message"]


def test_large_json_answers_are_compressed_for_clients_that_accept_it(edge) -> None:
    client, keys = edge
    body = {"images": [SEVEN_PNG_BASE64] * 40, "top_k": 10}
    headers = {"x-api-key": keys["infer"], "accept-encoding": "gzip"}
    answer = client.post("/v1/image-classification", json=body, headers=headers)
    assert answer.headers["content-encoding"] == "gzip" and len(answer.json()["predictions"]) == 40
    raw = client.post("/v1/image-classification", json=body, headers={**headers, "accept-encoding": "identity"})
    assert "content-encoding" not in raw.headers
    assert gzip.compress(raw.content) and int(answer.headers["content-length"]) < len(raw.content)


def test_without_a_keys_file_everything_stays_open(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "models" / "mnist", tmp_path / "mnist")
    with make_client(repository=tmp_path) as client:
        wait_ready(client)
        assert classify(client).status_code == 200
        preflight = client.options(
            "/v1/image-classification", headers={"origin": ORIGIN, "access-control-request-method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_a_forged_cross_site_post_is_refused_before_it_is_read_and_the_app_own_origin_passes(edge) -> None:
    """A page on another site can send a form or text/plain POST without a preflight; CORS only
    keeps it from reading the answer. Refused by Sec-Fetch-Site, or by Origin where a browser is
    too old to send it; allowed origins, same-origin pages and non-browser clients pass."""
    client, keys = edge
    key = {"x-api-key": keys["infer"]}
    forged = [
        {"origin": "https://evil.example", "sec-fetch-site": "cross-site"},
        {"origin": "https://evil.example"},
        {"sec-fetch-site": "same-site", "origin": "https://other.app.example.com"},
        {"origin": "null"},
    ]
    for headers in forged:
        r = client.post("/v1/image-classification", json={"images": [SEVEN_PNG_BASE64]}, headers={**key, **headers})
        assert r.status_code == 403, (headers, r.text)
        assert r.json()["error_type"] == "cross_origin_refused"
        assert "evil" not in r.text  # the origin is not echoed
    passes = [
        {},  # curl, SDKs, apps
        {"origin": ORIGIN, "sec-fetch-site": "cross-site"},  # an allowed origin
        {"origin": "http://testserver", "sec-fetch-site": "same-origin"},  # the playground
        {"origin": "http://testserver"},  # an older browser, same origin
        {"sec-fetch-site": "none"},  # typed in the address bar
    ]
    for headers in passes:
        assert classify(client, **key, **headers).status_code == 200, headers
    # Reading stays open to every origin: only what changes state is refused.
    assert client.get("/v2/health/live", headers={"origin": "https://evil.example"}).status_code == 200


def test_a_json_route_refuses_a_form_or_text_body_with_415(edge) -> None:
    client, keys = edge
    body = b'{"images": ["%s"]}' % SEVEN_PNG_BASE64.encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8"):
        r = client.post(
            "/v2/models/mnist/infer", content=b"{}", headers={"x-api-key": keys["infer"], "content-type": kind}
        )
        assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type", (kind, r.text)
        r = client.post(
            "/v1/image-classification", content=body, headers={"x-api-key": keys["infer"], "content-type": kind}
        )
        assert r.status_code == 415, (kind, r.text)
    for kind in ("", "application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        headers = {"x-api-key": keys["infer"], **({"content-type": kind} if kind else {})}
        assert client.post("/v1/image-classification", content=body, headers=headers).status_code == 200, kind


def test_allowed_hosts_take_names_with_any_port_and_subdomains_of_a_dotted_one(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "mnist", repo / "mnist")
    with make_client(repository=repo, allowed_hosts=[".example.com", "api.internal"]) as client:
        client.headers["host"] = "example.com"  # the test client's own "testserver" is not one of them
        wait_ready(client)
        for host, status in (
            ("example.com", 200),
            ("models.example.com:8443", 200),
            ("api.internal", 200),
            ("evil.com", 400),
            ("example.com.evil.com", 400),
            ("testserver", 400),
            ("example.com:abc", 400),
            ("[::1]x", 400),
        ):
            r = client.get("/v2/models/mnist", headers={"host": host})
            assert r.status_code == status, (host, r.text)
            if status == 400:
                assert r.json()["error_type"] == "invalid_host"
        # Two Host headers, an allowed one first: which one a proxy routed by is anyone's guess.
        for pair in (["example.com", "evil.com"], ["evil.com", "example.com"]):
            r = client.get("/v2/models/mnist", headers=[("host", pair[0]), ("host", pair[1])])
            assert r.status_code == 400 and "more than one Host" in r.json()["error"], (pair, r.text)


@pytest.mark.parametrize(
    "origins", ["null", "https://app.example.com,null", "https://app.example.com/page", "app.example"]
)
def test_an_origin_list_that_would_trust_any_site_or_names_no_origin_stops_the_start(origins: str) -> None:
    """ "null" listed admitted every sandboxed iframe and file:// page, on any site."""
    with pytest.raises(ValidationError, match="cors_allow_origins"):
        Settings(cors_allow_origins=origins)


def test_an_app_origin_of_any_scheme_and_a_trailing_slash_are_taken() -> None:
    settings = Settings(cors_allow_origins="https://app.example.com/, capacitor://localhost, *")
    assert settings.cors_allow_origins == ["https://app.example.com", "capacitor://localhost", "*"]


def test_origins_are_written_as_browsers_send_them_so_the_cors_answer_matches() -> None:
    """Browsers send the scheme and host in lower case and no default port; the CORS answer compares
    strings, so "HTTPS://App.example.com:443" passed the forgery check but got no CORS headers."""
    settings = Settings(
        cors_allow_origins="HTTPS://App.Example.com:443, http://localhost:80, http://[::1]:8080, "
        "http://[2001:DB8:0:0::1], http://my_app.internal:3000"
    )
    assert settings.cors_allow_origins == [
        "https://app.example.com",
        "http://localhost",
        "http://[::1]:8080",
        "http://[2001:db8::1]",
        "http://my_app.internal:3000",
    ]


@pytest.mark.parametrize(
    "origin",
    ["https://a.com?x=1", "https://a.com#f", "https://a b.com", "https://a.com:99999", "https://*.example.com"],
)
def test_an_origin_no_browser_can_send_is_refused(origin: str) -> None:
    with pytest.raises(ValidationError, match="is not an origin"):
        Settings(cors_allow_origins=[origin])


def test_a_bad_setting_stops_the_cli_with_one_line_per_variable(monkeypatch, capsys) -> None:
    """pydantic's 16-line traceback named the field, not the NEUROSERVE_* variable an operator sets."""
    from service import cli

    monkeypatch.setenv("NEUROSERVE_CORS_ALLOW_ORIGINS", "null")
    monkeypatch.setenv("NEUROSERVE_PORT", "abc")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve"])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("neuroserve: NEUROSERVE_") for line in lines)
    assert any("NEUROSERVE_CORS_ALLOW_ORIGINS" in line and "null" in line for line in lines)
