"""The chat page in headless Chromium (Debian's chromium + chromium-driver), against a live
server with a tiny random model: a message streams in token by token, regenerate gives the
same greedy answer, thinking mode fills the collapsible reasoning block. A screenshot is
saved under the test's tmp_path."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine
from nanoseek.serve import ServerSettings, create_app

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver"


def browser(tmp_path: Path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing or shutil.which("chromium") is None:
        pytest.fail(
            f"the chat page test needs headless Chromium ({', '.join(missing)} missing): {INSTALL}"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the chat page test needs selenium: pip install -e '.[dev]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1000,800",
    ):
        opts.add_argument(flag)
    # an explicit driver path: selenium then never looks for (or downloads) a driver
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def server_url():
    import uvicorn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = Tokenizer.train(
        ["the cat sat on the mat. " * 40, "a dog ran far away. " * 40], vocab_size=300
    )
    torch.manual_seed(0)
    model = nanoseek.Transformer(
        nanoseek.get_preset("tiny").replace(vocab_size=tok.vocab_size)
    ).eval()
    engine = Engine(model, tok, max_batch=2, max_len=256)
    app = create_app(engine, ServerSettings(model_name="tiny"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    torch.set_num_threads(threads)


# records every length the last reply's text takes as it streams in
WATCH = """
window.lengths = [];
new MutationObserver(() => {
  const c = document.querySelectorAll('.msg.assistant .content');
  if (c.length) window.lengths.push(c[c.length - 1].textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def test_chat_page_streams_a_reply(server_url, tmp_path):
    import openai
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    client = openai.OpenAI(base_url=server_url + "/v1", api_key="-", max_retries=0)
    user = "the cat"
    want = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": user}], temperature=0, max_tokens=40
    ).choices[0]
    assert want.message.content

    driver = browser(tmp_path)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(server_url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        for field, value in (("temperature", "0"), ("max-tokens", "40")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.execute_script(WATCH)

        def reply_done(n: int):
            def done(d) -> bool:
                replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                return (
                    len(replies) == n
                    and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
                )

            wait.until(done)
            return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]

        driver.find_element(By.ID, "input").send_keys(user)
        driver.find_element(By.ID, "send").click()
        reply = reply_done(1)
        content = reply.find_element(By.CSS_SELECTOR, ".content")
        assert content.get_attribute("textContent") == want.message.content
        lengths = driver.execute_script("return window.lengths")
        assert len(set(lengths)) > 2, lengths  # it grew piece by piece: streamed
        assert not driver.find_element(By.ID, "regenerate").get_attribute("disabled")
        assert "tokens" in driver.find_element(By.ID, "status").text

        driver.find_element(By.ID, "regenerate").click()  # greedy: the same reply again
        reply = reply_done(1)
        assert (
            reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
            == want.message.content
        )

        # thinking on: the prompt opens <think>, so the reply is reasoning (collapsible)
        Select(driver.find_element(By.ID, "thinking")).select_by_value("on")
        driver.find_element(By.ID, "input").send_keys("a dog")
        driver.find_element(By.ID, "send").click()
        reply = reply_done(2)
        details = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
        assert details.get_attribute("hidden") is None
        assert details.find_element(By.CSS_SELECTOR, ".thought").get_attribute("textContent")
        details.find_element(By.TAG_NAME, "summary").click()  # opens the collapsed block
        assert details.get_attribute("open") is not None
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2  # the conversation kept

        shot = tmp_path / "chat_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
