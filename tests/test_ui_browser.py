"""
The chat page in a real headless Chromium: it sends a message (?q=), the streamed reply is rendered
(markdown-ish, safely), regenerate and edit work, it asks once for the key of a server that needs one,
and screenshots are saved (desktop and phone width).

Needs Debian's chromium (`apt-get install -y chromium`); skipped with a reason when it is missing.
Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on fd 3,
replies on fd 4, NUL-terminated JSON), so no extra Python package is needed.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest

from helpers import scripted_server_app, serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT_COPY = "/tmp/nanochat_ui.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (apt-get install -y chromium)"),
]

REPLY = ("Hello **world**, here is `code` and caf\u00e9 \u65e5\u672c.\n\n- item one\n- item two\n\n"
         "```python\nprint(1 < 2)\n```\n<img src=x onerror=alert(1)>")


def above_4(fd):
    """The same pipe end on a descriptor >= 10, so the redirections `3<&X 4>&Y` cannot clobber X or Y."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Chromium:
    """A headless Chromium with one page, controlled through DevTools protocol commands."""

    def __init__(self, user_data_dir):
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        to_browser_r, from_browser_w = above_4(to_browser_r), above_4(from_browser_w)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe"]
        # bash (dash cannot name fds >= 10) puts our pipe ends on the fds 3 and 4 that --remote-debugging-pipe expects
        command = " ".join([CHROMIUM, *flags, "about:blank", f"3<&{to_browser_r}", f"4>&{from_browser_w}"])
        self.process = subprocess.Popen(["bash", "-c", f"exec {command}"], pass_fds=(to_browser_r, from_browser_w),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.next_id, self.buffer, self.session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank", session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True, session=False)["sessionId"]

    def send(self, method, session=True, timeout=30, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # skip events until our reply arrives
            reply = self.read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply["result"]

    def read_message(self, deadline):
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.from_browser], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.from_browser, 1 << 16) if ready else b""
            if not chunk:
                raise TimeoutError("chromium did not answer (it exited or hung)")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)


@pytest.fixture
def chat_url(tiny_tokenizer):
    """A server whose scripted model answers the first message "hi" with REPLY."""
    with serve(scripted_server_app(tiny_tokenizer, REPLY)[0]) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    chromium = Chromium(profile)
    yield chromium
    chromium.close()


DONE = "document.body?.dataset.state === 'idle' && !!document.querySelector('.message.assistant[data-state=done]')"

RENDERED = """(() => {
  const bubble = document.querySelector('.message.assistant .bubble');
  return {
    text: bubble.textContent,
    strong: [...bubble.querySelectorAll('strong')].map(e => e.textContent),
    inlineCode: [...bubble.querySelectorAll('p code')].map(e => e.textContent),
    items: [...bubble.querySelectorAll('ul li')].map(e => e.textContent),
    codeBlocks: [...bubble.querySelectorAll('pre code')].map(e => e.textContent),
    images: document.querySelectorAll('#messages img').length,
    messages: [...document.querySelectorAll('.message')].map(e => e.className),
    error: !!document.querySelector('.error'),
  };
})()"""


def test_chat_page_streams_and_renders_a_reply(chat_url, browser, tmp_path):
    browser.send("Emulation.setDeviceMetricsOverride", width=1100, height=800, deviceScaleFactor=1, mobile=False)
    browser.send("Page.navigate", url=f"{chat_url}/?q=hi")
    browser.wait_for(DONE)
    page = browser.evaluate(RENDERED)
    assert page["messages"] == ["message user", "message assistant"] and not page["error"]
    assert page["strong"] == ["world"] and page["inlineCode"] == ["code"]
    assert page["items"] == ["item one", "item two"]
    assert page["codeBlocks"] == ["print(1 < 2)"]
    assert page["images"] == 0 and "<img src=x onerror=alert(1)>" in page["text"]  # shown as text, never as HTML
    assert "caf\u00e9 \u65e5\u672c." in page["text"]
    desktop = tmp_path / "nanochat_ui.png"
    browser.screenshot(desktop)
    shutil.copy(desktop, SCREENSHOT_COPY)

    # regenerate the last reply: same conversation length, the reply streams again
    browser.evaluate("document.querySelector('.regenerate').click()")
    browser.wait_for(DONE)
    assert browser.evaluate(RENDERED)["items"] == ["item one", "item two"]

    # edit the user message: the conversation is cut there and answered anew
    browser.evaluate("document.querySelector('.message.user .edit').click()")
    browser.evaluate("document.querySelector('.edit-box textarea').value = 'hello again'; "
                     "document.querySelector('.edit-box .primary').click()")
    browser.wait_for(DONE)
    assert browser.evaluate("[...document.querySelectorAll('.message')].map(e => e.textContent.slice(0, 11))")[0] == "hello again"
    assert len(browser.evaluate(RENDERED)["messages"]) == 2

    # new conversation clears the page
    browser.evaluate("document.getElementById('new-chat').click()")
    assert browser.evaluate("document.querySelectorAll('.message').length") == 0


def test_chat_page_fits_a_phone(chat_url, browser, tmp_path):
    browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
    browser.send("Page.navigate", url=f"{chat_url}/?q=hi")
    browser.wait_for(DONE)
    # nothing overflows sideways: the page is no wider than the phone
    assert browser.evaluate("document.documentElement.scrollWidth") <= 390
    browser.screenshot(tmp_path / "nanochat_ui_phone.png")
    shutil.copy(tmp_path / "nanochat_ui_phone.png", "/tmp/nanochat_ui_phone.png")


def test_chat_page_asks_once_for_the_key_of_a_guarded_server(tiny_tokenizer, browser):
    key_asked = "document.getElementById('key-form')?.hidden === false"
    label = "document.getElementById('key-label').textContent"

    def enter_key(key):
        browser.evaluate(f"document.getElementById('key-input').value = {json.dumps(key)}; "
                         "document.querySelector('#key-form button').click()")

    with serve(scripted_server_app(tiny_tokenizer, REPLY, api_key="k3y")[0]) as url:
        browser.send("Page.navigate", url=f"{url}/?q=hi")
        browser.wait_for(key_asked)
        assert "needs an API key" in browser.evaluate(label)
        assert browser.evaluate("document.querySelectorAll('.message').length") == 1  # the question waits, unanswered
        enter_key("wrong")
        browser.wait_for(f"{key_asked} && {label}.includes('refused')")
        enter_key("k3y")
        browser.wait_for(DONE)
        assert browser.evaluate(RENDERED)["items"] == ["item one", "item two"]
        assert browser.evaluate("document.querySelectorAll('.message').length") == 2
        # a new page in the same session: the key is remembered, nothing is asked
        browser.send("Page.navigate", url=f"{url}/?q=hi")
        browser.wait_for(DONE)
        assert browser.evaluate(key_asked) is False and not browser.evaluate(RENDERED)["error"]


def test_chat_page_keeps_going_past_the_context(tiny_tokenizer, browser):
    """A tiny real model with a 64-token context: after a few turns the server leaves the oldest messages out; the
    page says so, shows them dimmed, stops sending them, and the chat goes on without an error."""
    from helpers import make_gpt
    from scripts.chat_web import create_app
    model = make_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=64)
    with serve(create_app([(model, tiny_tokenizer)], max_tokens=12, temperature=0.0)) as url:
        browser.send("Page.navigate", url=f"{url}/?q=hello")
        browser.wait_for(DONE)
        for i in range(5):
            browser.evaluate(f"document.getElementById('input').value = 'Tell me about thing {i}'; "
                             "document.getElementById('send').click()")
            browser.wait_for(f"{DONE} && document.querySelectorAll('.message').length === {2 * i + 4}")
        page = browser.evaluate("""({
            unseen: document.querySelectorAll('.message.unseen').length, firstSent,
            notes: [...document.querySelectorAll('.note')].map(e => e.textContent),
            sent: requestBody().messages.length, total: conversation.length,
            firstSentIsUser: conversation[firstSent].role === 'user', error: !!document.querySelector('.error')})""")
    assert page["firstSent"] > 0 and page["unseen"] == page["firstSent"] and page["firstSentIsUser"]
    assert page["notes"] == ["The messages above no longer fit the model's context: it does not see them anymore."]
    assert page["sent"] == page["total"] - page["firstSent"] and not page["error"]
