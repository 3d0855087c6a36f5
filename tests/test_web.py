"""The page of `twofile serve` (twofile/static/index.html) in a real browser: Debian's chromium
driven by Playwright against a real server on the default model. test_serve.py checks the API;
this checks what a person sees: replies stream in token by token, Stop really frees the
server's slot, the probability shading and its popover, regenerate and new chat, a phone-sized
screen, and dream mode. Oracle for the text: the same request sent to the API at temperature 0.

    python -m pytest -q tests/test_web.py
    TWOFILE_SCREENSHOTS=docs python -m pytest -q tests/test_web.py   # also keep the screenshots
"""

import io
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import served
from PIL import Image
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
TIMEOUT = 60_000  # ms: a reply on a slow shared CPU
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
expect.set_options(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def server(smollm2_path):
    with served(str(smollm2_path), "--parallel", "2") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the page is tested in Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, server):
    """open_page(phone=False, **settings): a fresh browser context (empty localStorage) on the
    page, connected to the model, with settings such as temperature=0, max_tokens=40 typed into
    the settings panel. The contexts close when the test ends, stopping anything still running."""
    contexts = []

    def open_(phone=False, **settings):
        viewport = PHONE if phone else DESKTOP
        contexts.append(browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone))
        page = contexts[-1].new_page()
        page.set_default_timeout(TIMEOUT)
        page.goto(server.url)
        expect(page.locator("#status")).to_have_text("ready")
        if settings:
            if phone:  # the settings are in a drawer
                page.click("#menu")
            page.evaluate("document.getElementById('settings').open = true")
            for key, value in settings.items():
                page.fill(f"#{key.replace('_', '-')}", str(value))
            if phone:  # a tap beside the drawer closes it
                page.mouse.click(viewport["width"] - 10, viewport["height"] // 2)
                expect(page.locator("body")).not_to_have_class(re.compile(r"\bdrawer\b"))
                page.wait_for_function("document.querySelector('aside').getAnimations().length === 0")
        return page

    yield open_
    for context in contexts:
        context.close()


def record_growth(page, selector):
    """From now on, note the text length of `selector` (the last match) and #status at every
    change of the page; recorded() returns the (length, status) pairs seen."""
    page.evaluate("""(selector) => {
        window.seen = [];
        const note = () => {
            const els = document.querySelectorAll(selector);
            const text = els.length ? els[els.length - 1].textContent : "";
            window.seen.push([text.length, document.getElementById("status").textContent]);
        };
        new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""", selector)
    return lambda: [tuple(x) for x in page.evaluate("window.seen")]


def wait_for_generation(page):
    """After a click that starts generating: the page says so, then says it is done."""
    expect(page.locator("#status")).to_have_text("generating")
    expect(page.locator("#status")).to_have_text("ready")


def send(page, text):
    page.fill("#input", text)
    page.click("#send")
    wait_for_generation(page)


def reply_text(page) -> str:
    # The metadata line is drawn by CSS (::after), so textContent is exactly the model's text.
    return page.locator(".msg.assistant .body").last.text_content()


def api_chat(server, content, max_tokens) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens})
    return r.json()["choices"][0]["message"]["content"]


def metric(server, name) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def save_png(page, tmp_path, name) -> Path:
    """Screenshot to tmp_path, checked to be a real picture; copied to $TWOFILE_SCREENSHOTS if set."""
    path = tmp_path / name
    page.screenshot(path=path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if os.environ.get("TWOFILE_SCREENSHOTS"):
        folder = Path(os.environ["TWOFILE_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def test_chat_streams_and_equals_the_api(open_page, server):
    question = "Name three colors."
    page = open_page(temperature=0, max_tokens=40)
    recorded = record_growth(page, ".msg.assistant .body")
    send(page, question)
    lengths = {n for n, status in recorded() if status == "generating" and n > 0}
    assert len(lengths) >= 2, f"the reply did not stream: lengths seen while generating {sorted(lengths)}"
    assert page.locator(".msg.user").text_content() == question
    assert reply_text(page) == api_chat(server, question, 40)


def test_stop_aborts_and_frees_the_slot(open_page, server):
    page = open_page(temperature=0, max_tokens=2000)
    page.fill("#input", "Write a very long story about a dragon who learns to bake bread.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .body')?.textContent.length > 20")
    assert metric(server, "twofile_active_sessions") == 1
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("ready")
    text = reply_text(page)
    page.wait_for_timeout(1000)
    assert reply_text(page) == text and len(text) > 20
    assert "stopped" in page.locator(".msg.assistant").get_attribute("data-meta")
    deadline = time.monotonic() + 5
    while metric(server, "twofile_active_sessions") != 0:
        assert time.monotonic() < deadline, "the server still generates for a browser that stopped"
        time.sleep(0.1)


def test_probability_shading_and_popover(open_page):
    page = open_page(temperature=0, max_tokens=24)
    send(page, "What is the capital of France?")
    tokens = page.locator(".msg.assistant span.tok")
    probabilities = [float(p) for p in tokens.evaluate_all("spans => spans.map(s => s.dataset.p)")]
    assert probabilities and all(0 < p <= 1 for p in probabilities)
    assert "".join(tokens.all_text_contents()) == reply_text(page)

    popover = page.locator("#alternatives")
    expect(popover).to_be_hidden()
    tokens.first.hover()
    expect(popover).to_be_visible()
    assert popover.locator(".alt").count() >= 1
    expect(popover.locator(".alt.chosen")).to_have_count(1)
    # Temperature 0 picks the most likely token, so the chosen row is the first.
    assert "chosen" in popover.locator(".alt").first.get_attribute("class")

    page.mouse.move(0, 0)
    expect(popover).to_be_hidden()
    page.click("#prob-toggle")
    expect(page.locator("body")).to_have_class(re.compile(r"\bplain\b"))
    tokens.first.hover()
    expect(popover).to_be_hidden()  # no shading, no popover
    page.click("#prob-toggle")
    expect(page.locator("body")).not_to_have_class(re.compile(r"\bplain\b"))
    tokens.first.hover()
    expect(popover).to_be_visible()


def test_regenerate_and_new_chat(open_page):
    page = open_page(temperature=1, max_tokens=16)
    send(page, "Tell me a joke.")
    first = page.locator(".msg.assistant").element_handle()
    page.click("#regenerate")
    wait_for_generation(page)
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator(".msg.user")).to_have_count(1)
    assert not first.evaluate("el => el.isConnected")  # replaced, not kept
    assert reply_text(page)

    page.click("#new-chat")
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#conversations .conv")).to_have_count(1)  # the old chat stays in the list


def test_phone_layout(open_page, tmp_path):
    page = open_page(phone=True, temperature=0, max_tokens=24)
    width = "document.scrollingElement.scrollWidth"
    assert page.evaluate(width) <= PHONE["width"]
    # The settings drawer, closed, is out of sight with its shadow: both edges are the background.
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    assert shot.getpixel((0, 200)) == shot.getpixel((PHONE["width"] - 1, 200))
    send(page, "What is the capital of France?")
    expect(page.locator(".msg.assistant")).to_have_count(1)
    assert reply_text(page)
    assert page.evaluate(width) <= PHONE["width"]
    save_png(page, tmp_path, "serve-phone.png")


def test_dream_mode_streams_a_continuation(open_page, server):
    prompt = "Once upon a time, in a small village,"
    page = open_page(temperature=0, max_tokens=32)
    page.click("#mode-toggle")
    expect(page.locator("#dream-view")).to_be_visible()
    expect(page.locator("#messages")).to_be_hidden()
    recorded = record_growth(page, "#dream-output")
    page.fill("#prompt", prompt)
    page.press("#prompt", "Control+Enter")
    wait_for_generation(page)
    lengths = {n for n, status in recorded() if status == "generating" and n > 0}
    assert len(lengths) >= 2, f"the continuation did not stream: lengths seen {sorted(lengths)}"

    output = page.locator("#dream-output")
    assert output.locator("span.tok").count() > 0
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"prompt": prompt, "temperature": 0, "max_tokens": 32})
    assert output.text_content() == r.json()["choices"][0]["text"]

    page.click("#continue")  # the output moves into the prompt, and the model goes on from there
    wait_for_generation(page)
    assert page.input_value("#prompt") == prompt + r.json()["choices"][0]["text"]
    assert output.locator("span.tok").count() > 0


def test_base_model_opens_in_dream_mode(browser, server):
    """A model without a chat template can only continue text: the page opens on that. The
    default model has a template, so /props is answered for this page as for a base model."""
    context = browser.new_context(viewport=DESKTOP)

    def base_model_props(route):
        props = route.fetch().json()
        route.fulfill(json={**props, "chat_template": False})

    context.route("**/props", base_model_props)
    page = context.new_page()
    page.goto(server.url)
    expect(page.locator("#status")).to_have_text("ready")
    expect(page.locator("#mode-toggle")).to_have_attribute("data-mode", "dream")
    expect(page.locator("#dream-view")).to_be_visible()
    expect(page.locator("#messages")).to_be_hidden()
    expect(page.locator("#send")).to_have_text("Generate")
    expect(page.locator("#model-info")).to_contain_text("no chat template")
    context.close()


def test_screenshots(open_page, tmp_path):
    """The chat and the probability popover as a person sees them (kept with TWOFILE_SCREENSHOTS)."""
    page = open_page(temperature=0, max_tokens=64)
    send(page, "What is the capital of France?")
    page.mouse.move(0, 0)
    save_png(page, tmp_path, "serve-chat.png")

    tokens = page.locator(".msg.assistant span.tok")
    paris = tokens.filter(has_text="Paris")
    (paris.first if paris.count() else tokens.first).hover()
    expect(page.locator("#alternatives")).to_be_visible()
    save_png(page, tmp_path, "serve-probabilities.png")
