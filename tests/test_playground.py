"""The playground page of `foundry serve`, in a real headless Chromium driven by Selenium, against a real
server process on 127.0.0.1 (API key on). What the page shows is checked against what the official openai
client gets from the same server for the same request. Screenshots go to test-artifacts/playground/."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
import tomllib
import types
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import openai
import pytest
import uvicorn

from foundry.infer import Engine
from foundry.serve import ServeConfig
from foundry.serve.app import create_app
from foundry.serve.backend import Backend
from foundry.serve.page import playground_files
from tests.test_serve import KEY, ROOT, Server, build_serve_model, free_port, http, metrics, raw_request, wait_for
from tests.test_serve_structured import PERSON

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("FOUNDRY_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "playground"
LONG = 8000  # tokens: a generation still running when the test acts on it
PAGE_FILES = ROOT / "foundry" / "serve" / "playground"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_serve_model(tmp_path_factory.mktemp("playground") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # Two sequences at a time (one slot is then free to keep a finished chat's prefix) and one waiting: the
    # 429 test fills the server with three requests.
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-tokens", "9000",
               "--max-batch-size", "2", "--max-queued-requests", "1", env={"FOUNDRY_API_KEY": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


# ---- the page as files and routes (no browser needed) -----------------------------------------

def test_the_page_and_its_files_are_public_with_a_strict_policy(server):
    for path in ("/", "/playground", "/playground/"):
        status, body, headers = http(server, "GET", path)
        assert status == 200 and '<script type="module" src="/playground/js/main.js">' in body["text"]
        assert headers["Content-Type"].startswith("text/html")
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
    for name, (_, media_type) in playground_files().items():
        status, _, headers = http(server, "GET", f"/playground/{name}")
        assert status == 200 and headers["Content-Type"] == media_type, name
    assert {"index.html", "playground.css", "js/main.js", "js/api.js", "js/schema.js"} <= set(playground_files())
    # Only the page is public: the routes it calls still need the key.
    assert http(server, "GET", "/v1/models")[0] == 401
    for path in ("/playground/js/nothing.js", "/playground/../app.py", "/playground/%2e%2e/app.py"):
        status, body, _ = http(server, "GET", path)
        assert status == 404 and body["error"]["code"] == "not_found", path


def test_every_page_file_ships_in_the_package():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["foundry.serve"]
    for path in PAGE_FILES.rglob("*"):
        if path.is_file():
            relative = path.relative_to(PAGE_FILES.parent).as_posix()
            assert any(fnmatch(relative, g) for g in globs), f"{relative} is not in pyproject's package-data"


@contextmanager
def in_process(config: ServeConfig):
    """An app on uvicorn in this process (its backend not started: the test loads the model when it likes)."""
    backend = Backend(max_queued=1)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(config, backend), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.01)
        yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", backend=backend)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        backend.close()


def test_no_playground_serves_only_the_api():
    with in_process(ServeConfig("tiny", playground=False)) as here:
        for path in ("/", "/playground", "/playground/js/main.js"):
            status, body, _ = http(here, "GET", path)
            assert status == 404 and body["error"]["code"] == "not_found"


# ---- in the browser ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser tests need selenium (pip install -e '.[dev]')")
    if not (CHROMIUM and DRIVER):
        pytest.skip("browser tests need Chromium and chromedriver (Debian: apt-get install chromium "
                    "chromium-driver; make test installs them where it may)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_script_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def until(driver, condition, what: str, timeout: float = 60):
    """Wait for condition(driver) to be truthy; return it (failing after `timeout`, which only a hang reaches)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: condition(d), f"never saw {what}")


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def set_field(driver, element_id: str, value: str) -> None:
    """Set an input's value as typing would end (input and change events fire)."""
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, value)


def open_page(driver, server, key: str | None = KEY) -> None:
    """Load the playground in a fresh session; enter `key` in the dialog it opens (the server needs one)."""
    driver.get(server.url + "/playground")
    driver.execute_script("sessionStorage.clear(); localStorage.clear();")
    driver.refresh()
    until(driver, lambda d: by_id(d, "key-dialog").get_attribute("open") is not None, "the key dialog")
    if key is not None:
        enter_key(driver, key)
        until(driver, lambda d: by_id(d, "model").text == "tiny", "the model's name")


def enter_key(driver, key: str) -> None:
    field = by_id(driver, "key-input")
    field.clear()
    field.send_keys(key)
    by_id(driver, "key-save").click()


@pytest.fixture
def page(browser, server):
    open_page(browser, server)
    set_field(browser, "temperature", "0")
    return browser


def replies(driver) -> list:
    return driver.find_elements("css selector", "#messages li[data-role=assistant]")


def send(driver, text: str, max_tokens: int) -> None:
    set_field(driver, "max-tokens", str(max_tokens))
    count = len(replies(driver))
    box = by_id(driver, "prompt")
    box.send_keys(text)
    from selenium.webdriver.common.keys import Keys

    box.send_keys(Keys.ENTER)
    until(driver, lambda d: len(replies(d)) > count, "the reply's message")


def finished(driver, element=None):
    """The last reply (or `element`) once it is no longer streaming."""
    li = element or replies(driver)[-1]
    return until(driver, lambda d: li if li.get_attribute("data-state") not in (None, "streaming") else None,
                 "the reply to end")


def reply_text(driver, li) -> str:
    return driver.execute_script("return arguments[0].querySelector('.body').textContent", li)


def watch_lengths(driver) -> None:
    """Record the last reply's text length at every DOM change (a MutationObserver in the page)."""
    driver.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const all = document.querySelectorAll('#messages li[data-role=assistant] .body');
          if (all.length) window.lengths.push(all[all.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / name))


def test_a_reply_streams_in_many_updates_and_is_what_the_client_gets(page, server, client):
    set_field(page, "system", "You are terse.")
    watch_lengths(page)
    send(page, "Hello there", max_tokens=48)
    li = finished(page)
    lengths = page.execute_script("return window.lengths")
    assert len(set(lengths)) > 5, lengths  # the text grew in many steps, not at once
    ask = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    want = client.chat.completions.create(model="tiny", messages=ask, max_tokens=48, temperature=0, top_p=1)
    first = want.choices[0].message.content
    assert reply_text(page, li) == first
    assert li.get_attribute("data-tokens") == "48" and li.get_attribute("data-finish") == "length"
    assert re.search(r"48 tokens · TTFT \d+ ms · [\d.]+ tok/s · finish: length", li.text)

    # A second turn sends the whole history (the system prompt included), whose keys and values the server's
    # prefix cache still holds from the first.
    hits = metrics(server)["foundry_prefix_cache_hit_tokens_total"]
    send(page, "And then?", max_tokens=16)
    li = finished(page)
    assert metrics(server)["foundry_prefix_cache_hit_tokens_total"] > hits
    ask += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    want = client.chat.completions.create(model="tiny", messages=ask, max_tokens=16, temperature=0, top_p=1)
    assert reply_text(page, li) == want.choices[0].message.content
    shot(page, "chat.png")

    # Regenerate replaces the last reply (greedy: the same text again); Copy puts it on the clipboard.
    page.execute_cdp_cmd("Browser.grantPermissions", {"origin": page.current_url.split("/playground")[0],
                                                       "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    li.find_element("css selector", "button.regenerate").click()
    until(page, lambda d: len(replies(d)) == 2 and replies(d)[-1] != li, "the regenerated reply")
    again = finished(page)
    assert reply_text(page, again) == want.choices[0].message.content
    again.find_element("xpath", ".//button[text()='Copy']").click()
    until(page, lambda d: again.find_element("xpath", ".//button[starts-with(text(), 'Cop')]").text == "Copied",
          "the copy")
    pasted = page.execute_async_script("navigator.clipboard.readText().then(arguments[0])")
    assert pasted == want.choices[0].message.content


def test_escape_stops_a_generation_and_the_server_frees_it(page, server):
    before = metrics(server)
    watch_lengths(page)
    send(page, "Go on forever", max_tokens=LONG)
    until(page, lambda d: int(replies(d)[-1].get_attribute("data-chunks")) >= 5, "some streamed text")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(page).send_keys(Keys.ESCAPE).perform()
    li = finished(page)
    assert li.get_attribute("data-state") == "stopped" and "finish: stopped" in li.text
    after = wait_for(server, lambda m: m["foundry_requests_running"] == 0, "the generation stop")
    assert after["foundry_requests_aborted"] == before["foundry_requests_aborted"] + 1
    text = reply_text(page, li)
    assert 0 < len(text) and int(li.get_attribute("data-tokens")) < LONG
    assert reply_text(page, li) == text  # nothing arrives after the stop
    assert by_id(page, "send").is_enabled() and not by_id(page, "stop").is_enabled()


def test_json_schema_mode_gives_json_that_validates(page):
    by_id(page, "format-section").find_element("tag name", "summary").click()
    set_field(page, "format", "json_schema")
    set_field(page, "schema", json.dumps(PERSON, indent=2))
    set_field(page, "temperature", "1")
    set_field(page, "seed", "3")
    assert "constrained to this schema" in by_id(page, "schema-status").text
    send(page, "Describe a person in JSON.", max_tokens=300)
    li = finished(page)
    card = li.find_element("css selector", ".json-check")
    assert card.get_attribute("data-valid") == "true" and "valid JSON, matches the schema" in card.text
    jsonschema.validate(json.loads(reply_text(page, li)), PERSON)  # the page's verdict, checked independently
    page.execute_script("document.getElementById('settings').scrollIntoView()")
    shot(page, "settings.png")

    # JSON object mode: the reply opens as an object (a random model may not close it within 12 tokens: then
    # the page says the reply was cut short).
    set_field(page, "format", "json_object")
    send(page, "Any JSON object.", max_tokens=12)
    li = finished(page)
    assert reply_text(page, li).lstrip().startswith("{")
    card = li.find_element("css selector", ".json-check")
    if li.get_attribute("data-finish") == "length":
        assert card.get_attribute("data-valid") == "false" and "cut short at max tokens" in card.text
    else:
        assert card.get_attribute("data-valid") == "true"

    set_field(page, "format", "json_schema")
    set_field(page, "schema", "{not json")
    assert "not valid JSON" in by_id(page, "schema-status").text
    send(page, "Again", max_tokens=10)
    error = until(page, lambda d: d.find_elements("css selector", "#messages li.error"), "the settings error")[0]
    assert "the JSON schema is not valid JSON" in error.text


CASES = [  # (schema, instances): each instance's validity is decided by the jsonschema package
    (PERSON, [{"name": "ab", "age": 3, "member": True, "role": None, "tags": ["x"]},
              {"name": "abcdefg", "age": 3, "member": True, "role": None, "tags": []},
              {"name": "a", "age": 121, "member": True, "role": "admin", "tags": []},
              {"name": "a", "age": 1.5, "member": True, "role": "user", "tags": []},
              {"name": "a", "age": 1, "member": "yes", "role": "user", "tags": []},
              {"name": "a", "age": 1, "member": True, "role": "guest", "tags": []},
              {"name": "a", "age": 1, "member": True, "role": "user", "tags": ["a", "b", "c"]},
              {"name": "a", "age": 1, "member": True, "role": "user", "tags": [], "extra": 1},
              {"name": "a", "age": 1, "member": True, "tags": []}, [], "x", None]),
    ({"type": ["string", "null"], "minLength": 2, "pattern": "^a"}, ["ab", "b", "a", None, 3, "añ"]),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]}, [1, "x", "xy", 2.5, 2.0]),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, [1, 1.5, "a"]),
    ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.25}, [0, 0.25, 0.3, 1]),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}, "minItems": 1,
      "uniqueItems": True}, [["a", 1, 2], [], ["a", 1, 1], [1], ["a", "b"]]),
    ({"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"},
                                                          "v": {"const": 1}}, "required": ["v"]}},
      "$ref": "#/$defs/node"}, [{"v": 1}, {"v": 1, "next": {"v": 1}}, {"v": 1, "next": {"v": 2}}, {}]),
    ({"not": {"type": "string"}, "allOf": [{"minProperties": 1}]}, [{"a": 1}, {}, "s", 3]),
]


def test_the_pages_schema_check_agrees_with_jsonschema(page):
    got = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/playground/js/schema.js').then(({validate}) =>
          done(arguments[0].map(([schema, values]) => values.map((v) => validate(v, schema).errors.length === 0))));
    """, CASES)
    want = [[jsonschema.Draft202012Validator(s).is_valid(v) for v in values] for s, values in CASES]
    assert got == want


def test_tool_calls_are_cards_and_a_result_goes_back(page):
    by_id(page, "tools-section").find_element("tag name", "summary").click()
    by_id(page, "tools-example").click()
    set_field(page, "tool-choice", "fn:get_weather")
    assert by_id(page, "tools-status").text == "1 function"
    send(page, "Weather in Paris?", max_tokens=120)
    li = finished(page)
    card = li.find_element("css selector", ".tool-call")
    assert card.get_attribute("data-name") == "get_weather" and card.get_attribute("data-valid") == "true"
    schema = json.loads(by_id(page, "tools").get_attribute("value"))[0]["function"]["parameters"]
    jsonschema.validate(json.loads(card.find_element("css selector", ".arguments").text), schema)
    assert li.get_attribute("data-finish") == "tool_calls"
    set_field(page, "tool-choice", "none")
    card.find_element("tag name", "textarea").send_keys('{"temperature": 21}')
    card.find_element("xpath", ".//button[text()='Send result']").click()
    until(page, lambda d: d.find_elements("css selector", "#messages li[data-role=tool]"), "the tool message")
    until(page, lambda d: len(replies(d)) == 2, "the reply after the result")
    assert finished(page).get_attribute("data-state") == "done"


def test_top_logprobs_colour_each_token_with_its_alternatives(page, client):
    set_field(page, "logprobs", "3")
    send(page, "Hi", max_tokens=12)
    li = finished(page)
    spans = li.find_elements("css selector", ".tok")
    want = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                          temperature=0, top_p=1, logprobs=True, top_logprobs=3)
    entries = want.choices[0].logprobs.content
    assert [s.text for s in spans] == [e.token.removeprefix("bytes:") for e in entries]
    # Equal to fp32 rounding: one of the two may have reused the other's prompt from the prefix cache.
    assert [float(s.get_attribute("data-logprob")) for s in spans] == pytest.approx([e.logprob for e in entries],
                                                                                    abs=1e-5)
    assert all(len(s.get_attribute("data-tip").splitlines()) >= 3 for s in spans)  # the token + 2 alternatives
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page).move_to_element(spans[0]).perform()
    tip = by_id(page, "tip")
    assert tip.is_displayed() and tip.text == spans[0].get_attribute("data-tip")  # the hover shows the alternatives
    alternative = entries[0].top_logprobs[1] if entries[0].top_logprobs[0].token == entries[0].token else \
        entries[0].top_logprobs[0]
    p = math.exp(alternative.logprob)
    assert f"{100 * p:.{1 if p > 0.995 or p < 0.005 else 0}f}%" in tip.text
    shot(page, "logprobs.png")


def test_completions_mode_streams_raw_text_and_stops(page, client):
    by_id(page, "tab-complete").click()
    set_field(page, "max-tokens", "20")
    by_id(page, "raw-prompt").send_keys("Once upon")
    by_id(page, "raw-send").click()
    li = until(page, lambda d: d.find_elements("css selector", "#raw-output li"), "the completion")[0]
    finished(page, li)
    want = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20, temperature=0, top_p=1)
    text = want.choices[0].text
    assert reply_text(page, li) == "Once upon" + text  # the prompt, then the completion
    # A stop string (one per line in the settings) ends it just before the string.
    stop = next(text[i:i + 3] for i in range(1, len(text) - 3) if re.fullmatch(r"[!-~]{3}", text[i:i + 3]))
    set_field(page, "stops", f"{stop}\nnever-there")
    by_id(page, "raw-send").click()
    li = until(page, lambda d: len(d.find_elements("css selector", "#raw-output li")) == 2
               and d.find_elements("css selector", "#raw-output li")[0], "the stopped completion")
    assert finished(page, li).get_attribute("data-finish") == "stop"
    assert reply_text(page, li) == "Once upon" + text[:text.index(stop)]
    set_field(page, "stops", "")
    set_field(page, "max-tokens", str(LONG))
    by_id(page, "raw-send").click()
    li = until(page, lambda d: len(d.find_elements("css selector", "#raw-output li")) == 3
               and d.find_elements("css selector", "#raw-output li")[0], "the third completion")
    until(page, lambda d: int(li.get_attribute("data-chunks")) >= 3, "some streamed text")
    by_id(page, "raw-stop").click()
    assert finished(page, li).get_attribute("data-state") == "stopped"


def test_server_errors_are_messages_in_the_page(page, server, client):
    send(page, "Too long", max_tokens=8192)
    error = finished(page)
    assert error.get_attribute("data-status") == "400" and error.get_attribute("data-code") == "context_length_exceeded"
    assert "400 context_length_exceeded" in error.text and error.get_attribute("role") == "alert"
    # A full server: two requests running, one waiting, so the page's is refused with Retry-After.
    running, waiting = [], None
    try:
        for _ in range(2):  # each admitted and generating (its first text read) before the next is sent
            running.append(client.completions.create(model="tiny", prompt="long", max_tokens=LONG, temperature=0,
                                                     stream=True))
            next(iter(running[-1]))
        waiting = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4})
        wait_for(server, lambda m: m["foundry_requests_waiting"] == 1, "one waiting")
        send(page, "Am I queued?", max_tokens=4)
        error = finished(page)
        assert error.get_attribute("data-status") == "429" and "queue_full" in error.text
        assert "retry after 1 s" in error.text
    finally:
        for stream in running:
            stream.close()
        if waiting is not None:
            waiting.close()
    wait_for(server, lambda m: m["foundry_requests_running"] + m["foundry_requests_waiting"] == 0, "an idle server")
    error.find_element("xpath", ".//button[text()='Retry']").click()  # the same turn again, now served
    assert finished(page).get_attribute("data-state") == "done"


def test_the_page_waits_for_a_loading_model(browser, model_dir):
    with in_process(ServeConfig("tiny")) as here:
        browser.get(here.url + "/")
        until(browser, lambda d: by_id(d, "health").text == "loading", "the loading state")
        here.backend.start(Engine.load(model_dir))
        until(browser, lambda d: by_id(d, "health").text == "ready" and by_id(d, "model").text == "tiny",
              "the page to connect once the model is loaded")
        send(browser, "Hello", max_tokens=4)
        assert finished(browser).get_attribute("data-state") == "done"


def test_a_wrong_key_shows_the_401_and_the_key_stays_out_of_urls(browser, server):
    open_page(browser, server, key=None)
    enter_key(browser, "sk-wrong")
    until(browser, lambda d: "401" in by_id(d, "key-error").text, "the 401 message")
    assert "not one this server accepts" in by_id(browser, "key-error").text
    enter_key(browser, KEY)
    until(browser, lambda d: by_id(d, "key-dialog").get_attribute("open") is None, "the dialog to close")
    assert by_id(browser, "model").text == "tiny"
    assert browser.execute_script("return sessionStorage.getItem('foundry.apiKey')") == KEY
    assert browser.execute_script("return JSON.stringify(localStorage)").find(KEY) < 0
    assert KEY not in browser.current_url and "sk-wrong" not in browser.current_url
    # A key that stops working mid-session: the reply is the 401, and the dialog asks again.
    browser.execute_script("sessionStorage.setItem('foundry.apiKey', 'sk-revoked')")
    send(browser, "Hello", max_tokens=4)
    error = finished(browser)
    assert error.get_attribute("data-status") == "401" and "invalid_api_key" in error.text
    assert by_id(browser, "key-dialog").get_attribute("open") is not None
    assert KEY not in server.log.read_text()


def test_keyboard_labels_and_both_colour_schemes(page):
    from selenium.webdriver.common.keys import Keys

    box = by_id(page, "prompt")
    box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line two")
    assert box.get_attribute("value") == "line one\nline two" and not replies(page)  # Shift+Enter: no send
    unlabelled = page.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
          .map((e) => e.id || e.outerHTML);""")
    assert unlabelled == []
    by_id(page, "tab-chat").send_keys(Keys.ARROW_RIGHT)  # the mode tabs follow the arrow keys
    assert by_id(page, "panel-complete").is_displayed() and not by_id(page, "panel-chat").is_displayed()
    assert page.switch_to.active_element == by_id(page, "tab-complete")
    by_id(page, "tab-complete").send_keys(Keys.ARROW_LEFT)
    assert by_id(page, "panel-chat").is_displayed()

    def luminances() -> list[float]:
        """Relative luminance (WCAG 2) of the body's text and background colours."""
        colours = page.execute_script("""
            const s = getComputedStyle(document.body);
            return [s.color, s.backgroundColor].map((c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number));""")
        out = []
        for colour in colours:
            r, g, b = ((c / 255) / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in colour)
            out.append(0.2126 * r + 0.7152 * g + 0.0722 * b)
        return out

    for scheme in ("light", "dark"):
        page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                          "value": scheme}]})
        text, background = luminances()
        ratio = (max(text, background) + 0.05) / (min(text, background) + 0.05)
        assert ratio >= 7, (scheme, ratio)  # WCAG AAA for body text
        assert (background > text) == (scheme == "light")
    box.clear()
    send(page, "Dark mode", max_tokens=24)
    finished(page)
    shot(page, "dark.png")
    # The theme button overrides the system's choice (still dark here): light, then dark.
    by_id(page, "theme-button").click()
    assert by_id(page, "theme-button").text == "Theme: light" and luminances()[1] > 0.8
    by_id(page, "theme-button").click()
    assert by_id(page, "theme-button").text == "Theme: dark" and luminances()[1] < 0.05
    page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_the_server_panel_shows_the_servers_metrics(page, server):
    send(page, "Count me", max_tokens=8)
    finished(page)
    capacity = int(metrics(server)["foundry_kv_cache_capacity_tokens"])
    until(page, lambda d: f"/ {capacity} tokens" in by_id(d, "m-kv").text, "the KV-cache figures")
    until(page, lambda d: re.fullmatch(r"\d+ ms \(\d+ requests?\)", by_id(d, "m-ttft").text), "the mean TTFT")
    until(page, lambda d: re.fullmatch(r"[\d.]+", by_id(d, "m-rate").text), "a tokens/s figure")
    until(page, lambda d: by_id(d, "m-running").text == "0" and by_id(d, "m-waiting").text == "0", "an idle server")
    hits = int(metrics(server)["foundry_prefix_cache_hit_tokens_total"])
    assert hits > 0  # the chat tests' second turns
    until(page, lambda d: by_id(d, "m-prefix").text == f"{hits} tokens", "the prefix-cache hits")
    # Everything the page asked for in every test went to this server's page files and public routes.
    urls = {json.loads(e["message"])["message"]["params"]["request"]["url"] for e in page.get_log("performance")
            if '"Network.requestWillBeSent"' in e["message"]}
    paths = {re.sub(r"^http://127\.0\.0\.1:\d+", "", u) for u in urls if not u.startswith("data:")}
    routes = {"/", "/playground", "/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"}
    assert paths and {p for p in paths if not p.startswith("/playground/")} <= routes, paths
    assert all(u.startswith(("http://127.0.0.1:", "data:")) for u in urls), urls
    # No script errors and no missing files in any test (the API's own error answers were asked for).
    log = page.get_log("browser")
    assert [e for e in log if e["level"] == "SEVERE" and (e["source"] != "network" or "/playground" in e["message"])
            ] == []
