"""The playground and the API in a real browser (Debian's Chromium, driven by Playwright): the page
loads with no console error and no request off this machine, a drawn digit is classified, a
translation streams in, every panel answers; a page on another, allowed origin calls the API with a
key, a foreign origin cannot. Screenshots at desktop and phone width go to $NEUROSERVE_SCREENSHOTS
(default: the test's temporary folder)."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from bench.harness import free_port, neuroserve
from service.api.auth import add_key
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with neuroserve(ROOT / "models") as running:
        yield running


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("NEUROSERVE_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, server, width: int, height: int):  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": width, "height": height})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: problems.append(f"off-machine request {r.url}") if "127.0.0.1" not in r.url else None)
    page.goto(server.url("/"))
    return page, problems


def draw_a_one(page) -> None:  # type: ignore[no-untyped-def]
    box = page.locator("#pad").bounding_box()
    x = box["x"] + box["width"] * 0.5
    page.mouse.move(x, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x, box["y"] + box["height"] * (0.15 + 0.07 * i))
    page.mouse.up()


def two_photos_of_one_person(data_dir: Path, folder: Path) -> list[str]:
    """The first two LFW photos of the first person with two (files for the page's file inputs)."""
    import tarfile

    seen: dict[str, bytes] = {}
    with tarfile.open(data_dir / "face_recognition" / "lfw-deepfunneled-part1.tar.gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                person, data = member.name.split("/")[-2], tar.extractfile(member).read()  # type: ignore[union-attr]
                if person in seen:
                    paths = [folder / "a.jpg", folder / "b.jpg"]
                    paths[0].write_bytes(seen[person])
                    paths[1].write_bytes(data)
                    return [str(p) for p in paths]
                seen[person] = data
    raise AssertionError("no LFW person with two photos")


def test_the_playground_works_in_a_browser_at_desktop_and_phone_width(browser, server, shots: Path, data_dir) -> None:
    faces = two_photos_of_one_person(data_dir, shots)
    from PIL import Image, ImageDraw

    page_of_digits = Image.new("RGB", (480, 320), "white")
    ImageDraw.Draw(page_of_digits).text((60, 100), "4 1 7", fill="black", font_size=90)
    page_of_digits.save(shots / "digits.png")
    for name, width, height in (("desktop", 1280, 900), ("phone", 375, 812)):
        page, problems = open_page(browser, server, width, height)
        draw_a_one(page)
        page.click("#digit-classify")
        page.wait_for_selector("#digit-result li")
        assert page.locator("#digit-result li").first.inner_text().startswith("1"), page.inner_text("#digit-result")
        assert "inference" in page.inner_text("#digit-meta")

        page.fill("#translate-text", "Where is the train station?\nI'm hungry.")  # a text per line
        page.click("#translate-run")
        page.wait_for_function("document.getElementById('translate-meta').textContent.includes('tokens')")
        translated = page.inner_text("#translate-result").split("\n")
        assert len(translated) == 2 and "gare" in translated[0] and "faim" in translated[1], translated
        assert "first token" in page.inner_text("#translate-meta") and "request" in page.inner_text("#translate-meta")

        page.fill("#sentiment-text", "What a wonderful film!\nThe app crashes all the time.")
        page.click("#sentiment-run")
        page.wait_for_function("document.getElementById('sentiment-result').textContent.includes('positive')")
        judged = page.inner_text("#sentiment-result").split("\n")  # each line with its own text
        assert len(judged) == 2 and judged[0].endswith("What a wonderful film!"), judged

        page.fill("#write-text", "I think that")
        page.fill("#write-seed", "3")
        page.click("#write-run")
        page.wait_for_function("document.getElementById('write-meta').textContent.includes('tokens')")
        assert "first token" in page.inner_text("#write-meta")
        written = page.inner_text("#write-result")
        assert written.startswith("I think that") and len(written) > len("I think that "), written

        page.click("#recommend-run")
        page.wait_for_function("document.querySelectorAll('#recommend-result li').length === 5")

        page.set_input_files("#faces-a", faces[0])
        page.set_input_files("#faces-b", faces[1])
        page.click("#faces-run")
        page.wait_for_function("document.getElementById('faces-meta').textContent.includes('inference')")
        assert "the same person" in page.inner_text("#faces-result"), page.inner_text("#faces-result")

        page.fill("#generate-digits", "42")
        page.fill("#generate-seed", "7")
        page.click("#generate-run")
        page.wait_for_function("document.querySelectorAll('#generate-result img').length === 4")
        assert "seeds 7-10" in page.inner_text("#generate-meta")
        loaded = page.evaluate("[...document.querySelectorAll('#generate-result img')].map(i => i.naturalWidth)")
        assert all(w > 0 for w in loaded), loaded  # the PNGs decoded in the browser

        page.set_input_files("#detect-file", str(shots / "digits.png"))
        page.wait_for_function("document.getElementById('detect-meta').textContent.includes('inference')")
        assert "found" in page.inner_text("#detect-meta")  # what was found, or that nothing was, in words

        assert problems == [], problems  # before the deliberate mistake below (its 415 is logged too)
        page.set_input_files("#detect-file", str(ROOT / "models" / "mnist" / "1" / "metadata.json"))
        page.wait_for_function("document.getElementById('detect-meta').classList.contains('error')")
        assert "not an image" in page.inner_text("#detect-meta")  # the error in words, not a code

        page.screenshot(path=str(shots / f"playground-{name}.png"), full_page=True)
        width_used = page.evaluate("document.documentElement.scrollWidth")
        assert width_used <= width, f"the page is wider than the {name} screen ({width_used} px)"
        page.close()


def test_the_docs_render_with_no_internet(browser, server, shots: Path) -> None:
    page, problems = open_page(browser, server, 1280, 900)
    page.goto(server.url("/docs"))
    page.wait_for_selector(".swagger-ui .information-container", timeout=20_000)
    assert "neuroserve" in page.inner_text(".swagger-ui .information-container")
    page.screenshot(path=str(shots / "docs.png"))
    assert problems == [], problems
    page.close()


def test_redoc_renders_with_no_request_off_this_machine(browser, server, shots: Path) -> None:
    # Its footer asked Redocly's CDN for a logo: a failed request on a machine with no internet.
    page, problems = open_page(browser, server, 1280, 900)
    page.goto(server.url("/redoc"))
    page.wait_for_selector("h1", timeout=20_000)
    page.wait_for_timeout(1_000)  # the footer's logo is asked for after the first render
    assert "neuroserve" in page.inner_text("h1")
    page.screenshot(path=str(shots / "redoc.png"))
    assert problems == [], problems
    page.close()


def serve_page(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_the_playground_on_another_allowed_origin_works_with_a_key_and_a_foreign_origin_is_refused(
    browser, tmp_path: Path
) -> None:
    # The playground's own files, hosted by a second web server (another origin), calling the API
    # server named by ?api=; the API needs a key and allows only the first of two such origins.
    repo = tmp_path / "models"
    for model in ("mnist", "translation-en-fr"):
        (repo / model).parent.mkdir(parents=True, exist_ok=True)
        (repo / model).symlink_to(ROOT / "models" / model)
    key = add_key(tmp_path / "keys.json", "web-app", ["infer"], None)
    site = tmp_path / "site"
    shutil.copytree(ROOT / "service" / "static" / "playground", site / "static" / "playground")
    shutil.copy(site / "static" / "playground" / "index.html", site / "index.html")
    allowed, allowed_origin = serve_page(site)
    foreign, foreign_origin = serve_page(site)
    try:
        env = {"NEUROSERVE_API_KEYS_FILE": str(tmp_path / "keys.json"), "NEUROSERVE_CORS_ALLOW_ORIGINS": allowed_origin}
        with neuroserve(repo, **env) as api:
            page = browser.new_page()
            page.goto(f"{allowed_origin}/index.html?api={api.url('')}")
            page.click("#digit-classify")  # no key yet: refused, in words
            page.wait_for_function("document.getElementById('digit-result').classList.contains('error')")
            assert "unauthenticated" in page.inner_text("#digit-result")
            page.fill("#api-key", key)
            page.dispatch_event("#api-key", "change")
            draw_a_one(page)
            page.click("#digit-classify")
            page.wait_for_selector("#digit-result li")
            assert page.locator("#digit-result li").first.inner_text().startswith("1")
            page.fill("#translate-text", "Where is the train station?")
            page.click("#translate-run")
            page.wait_for_function("document.getElementById('translate-meta').textContent.includes('tokens')")
            assert "gare" in page.inner_text("#translate-result")
            page.close()

            page = browser.new_page()
            page.goto(f"{foreign_origin}/index.html?api={api.url('')}")
            page.fill("#api-key", key)
            page.dispatch_event("#api-key", "change")
            page.click("#digit-classify")
            page.wait_for_function("document.getElementById('digit-result').classList.contains('error')")
            assert "could not be reached" in page.inner_text("#digit-result")  # the browser refused it
            page.close()
    finally:
        for httpd in (allowed, foreign):
            httpd.shutdown()
            httpd.server_close()
