"""The chat page at / of `perfxlm serve`, driven in headless Chromium (Debian's chromium and
chromium-driver, selenium from PyPI): a streamed greedy reply equals /v1/chat/completions, the
history is sent on the next turn, errors are shown, and Stop aborts the request on the server."""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from tests.server_util import DEFAULT_MODEL, RemoteServer

log = logging.getLogger(__name__)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    SELENIUM = True
except ImportError:
    SELENIUM = False


def _missing_browser() -> str | None:
    if not SELENIUM:
        return "selenium is not installed (pip install selenium)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "chromium or chromedriver is missing (apt-get install chromium chromium-driver, or sh .ci/toolchains.sh)"
    return None


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    """Skips the module without a browser; CI (PXL_REQUIRE_TOOLCHAINS=1) installs one, so there it fails."""
    missing = _missing_browser()
    if missing and os.environ.get("PXL_REQUIRE_TOOLCHAINS") == "1":
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)


@pytest.fixture(scope="module")
def server(browser_present, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("chat_page") / "server.log"
    with RemoteServer(["--dtype", "float32", "--max-model-len", "2048"], log_path=log_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def driver(browser_present):
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield drv
    drv.quit()


def open_page(driver, server: RemoteServer) -> None:
    driver.get(server.url_for(""))
    driver.execute_script("localStorage.clear()")  # settings persist per origin; every test starts bare
    driver.refresh()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.getElementById('model').value"))


def fill(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def text_of(driver, el) -> str:
    """The raw text of an element (WebElement.text would normalise its whitespace)."""
    return driver.execute_script("return arguments[0].textContent", el)


def replies(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def idle(driver) -> bool:
    return (driver.find_element(By.ID, "send").is_enabled()
            and not driver.find_element(By.ID, "stop").is_enabled())


def say(driver, message: str, timeout: float = 120) -> str:
    """Types `message` (its newlines with Shift+Enter), sends it with Enter and returns the
    finished reply's text."""
    before = len(driver.find_elements(By.CSS_SELECTOR, "#messages .meta"))
    prompt = driver.find_element(By.ID, "prompt")
    for i, line in enumerate(message.split("\n")):
        if i:
            prompt.send_keys(Keys.SHIFT + Keys.ENTER)
        prompt.send_keys(line)
    assert prompt.get_attribute("value") == message
    prompt.send_keys(Keys.ENTER)
    WebDriverWait(driver, timeout).until(
        lambda d: idle(d) and len(d.find_elements(By.CSS_SELECTOR, "#messages .meta")) > before)
    return text_of(driver, replies(driver)[-1])


def api_chat(server: RemoteServer, messages: list[dict], max_tokens: int) -> str:
    resp = requests.post(server.url_for("v1/chat/completions"), timeout=120,
                         json={"model": DEFAULT_MODEL, "messages": messages, "temperature": 0,
                               "max_tokens": max_tokens})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def metrics(server: RemoteServer) -> tuple[float, float]:
    """(vllm:num_requests_running, vllm:request_success_total{finished_reason="abort"}) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    running = aborted = 0.0
    for family in text_string_to_metric_families(requests.get(server.url_for("metrics"), timeout=10).text):
        for s in family.samples:
            if s.name == "vllm:num_requests_running":
                running += s.value
            elif s.name == "vllm:request_success_total" and s.labels.get("finished_reason") == "abort":
                aborted += s.value
    return running, aborted


def screenshot_path(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PERFXLM_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "chat_page.png"


def test_page_is_served_offline_and_shows_the_model(driver, server):
    html = requests.get(server.url_for(""), timeout=10)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    open_page(driver, server)
    # Offline on a board: everything the page loaded came from the server itself.
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert server.url_for("v1/models") in loaded
    assert all(url.startswith(server.url_root + "/") for url in loaded), loaded
    assert driver.find_element(By.ID, "model").get_attribute("value") == DEFAULT_MODEL
    assert DEFAULT_MODEL in driver.title


def test_streamed_greedy_replies_match_the_api_and_carry_the_history(driver, server):
    open_page(driver, server)
    fill(driver, "temperature", "0")
    fill(driver, "max-tokens", "32")
    first = "What is the capital of France?"
    reply = say(driver, first)
    assert reply and reply == api_chat(server, [{"role": "user", "content": first}], 32)
    stats = driver.find_element(By.ID, "stats").text
    assert "tokens/s" in stats and "TTFT" in stats, stats

    second = "And of Germany?\nAnswer in one sentence."
    reply2 = say(driver, second)
    convo = [{"role": "user", "content": first}, {"role": "assistant", "content": reply},
             {"role": "user", "content": second}]
    assert reply2 == api_chat(server, convo, 32)
    # The same question without the first turn gets another answer, so the history did matter.
    assert reply2 != api_chat(server, [{"role": "user", "content": second}], 32)
    assert [text_of(driver, m) for m in driver.find_elements(By.CSS_SELECTOR, "#messages .msg.user")] == [first, second]

    driver.find_element(By.ID, "new-chat").click()
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .msg")


def test_a_rejected_request_shows_the_servers_message(driver, server):
    open_page(driver, server)
    fill(driver, "max-tokens", "4096")  # more than --max-model-len 2048: the server answers 400
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("Hello", Keys.ENTER)
    error = WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .msg.error"))[0]
    resp = requests.post(server.url_for("v1/chat/completions"), timeout=30,
                         json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hello"}],
                               "max_tokens": 4096, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 400
    assert text_of(driver, error) == resp.json()["error"]["message"]
    assert not replies(driver)
    WebDriverWait(driver, 10).until(idle)
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == "Hello"  # ready to send again


def test_stop_aborts_the_request_on_the_server(driver, server, tmp_path):
    open_page(driver, server)
    fill(driver, "temperature", "0")
    fill(driver, "max-tokens", "24")
    say(driver, "What is the capital of France?")
    fill(driver, "max-tokens", "1000")
    _, aborted_before = metrics(server)

    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("Write a long story about a dragon who learns to cook.", Keys.ENTER)
    WebDriverWait(driver, 120).until(lambda d: len(text_of(d, replies(d)[-1])) > 40)
    driver.find_element(By.ID, "stop").click()
    WebDriverWait(driver, 10).until(idle)
    partial = text_of(driver, replies(driver)[-1])
    assert "finish: stopped" in driver.find_element(By.ID, "stats").text

    deadline = time.monotonic() + 30
    while True:
        running, aborted = metrics(server)
        if (running, aborted) == (0, aborted_before + 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert running == 0 and aborted == aborted_before + 1, (running, aborted_before, aborted)
    assert partial and driver.find_element(By.ID, "send").is_enabled()

    shot = screenshot_path(tmp_path)
    assert driver.save_screenshot(str(shot))
    log.info("chat page screenshot: %s", shot)


def test_api_key_is_asked_for_and_sent(driver, tmp_path):
    with RemoteServer(["--dtype", "float32", "--max-model-len", "512"], api_key="chat-page-key",
                      log_path=tmp_path / "server.log") as keyed:
        driver.get(keyed.url_for(""))
        driver.execute_script("localStorage.clear()")
        driver.refresh()
        key = driver.find_element(By.ID, "api-key")
        WebDriverWait(driver, 30).until(lambda d: key.is_displayed())  # v1/models said 401: the field opens
        assert driver.find_element(By.ID, "model").get_attribute("value") == ""
        assert "API key" in driver.find_element(By.ID, "stats").text
        key.send_keys("chat-page-key", Keys.TAB)
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.ID, "model").get_attribute("value") == DEFAULT_MODEL)
        fill(driver, "temperature", "0")
        fill(driver, "max-tokens", "8")
        reply = say(driver, "Hi")
        resp = requests.post(keyed.url_for("v1/chat/completions"), timeout=60,
                             headers={"Authorization": "Bearer chat-page-key"},
                             json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                   "temperature": 0, "max_tokens": 8})
        assert reply == resp.json()["choices"][0]["message"]["content"]


def test_chat_page_talks_to_a_server_under_qemu_riscv64(driver, smol_deploy_dir, tmp_path):
    """The board demo: `perfxlm serve DIR --hw-plugin rvv` in the riscv64 sysroot's Python
    (no torch, transformers or tokenizers there) under qemu-user; the page streams a greedy
    reply that equals the API's streamed one. Short replies: under qemu (on 2 shared cores) the
    chat prompt's prefill takes about 30 s and each token a few seconds."""
    from tests.test_rvv_qemu import QEMU, SYSROOT, build_rv64_lib
    if QEMU is None or not (SYSROOT / "usr/bin/python3.13").exists() or shutil.which("clang-16") is None:
        pytest.skip("needs qemu-user-static, clang-16 and the riscv64 sysroot (make -C csrc rv64-sysroot)")
    cpu = "rv64,v=true,vext_spec=v1.0,vlen=256,elen=64,rvv_ta_all_1s=true,rvv_ma_all_1s=true"
    command = [QEMU, "-L", str(SYSROOT), "-cpu", cpu, str(SYSROOT / "usr/bin/python3.13"), "-m",
               "perfxlm.entrypoints.openai.api_server"]
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PERFXLM_KERNELS_LIB": str(build_rv64_lib())}
    name = "smollm2-rv64"
    args = ["--hw-plugin", "rvv", "--max-model-len", "256", "--served-model-name", name,
            "--kv-cache-memory-bytes", str(16 << 20)]
    with RemoteServer(args, model=str(smol_deploy_dir), command=command, env=env, timeout=400,
                      log_path=tmp_path / "server.log") as srv:
        open_page(driver, srv)
        assert driver.find_element(By.ID, "model").get_attribute("value") == name
        fill(driver, "temperature", "0")
        fill(driver, "max-tokens", "4")
        reply = say(driver, "Hi", timeout=240)
        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4,
                "stream": True}
        with requests.post(srv.url_for("v1/chat/completions"), json=body, stream=True, timeout=240) as resp:
            assert resp.status_code == 200
            chunks = [line for line in resp.iter_lines() if line.startswith(b"data: {")]
        streamed = "".join(json.loads(c[6:])["choices"][0]["delta"].get("content") or "" for c in chunks
                           if json.loads(c[6:])["choices"])
        assert len(chunks) > 2 and reply and reply == streamed
    log_text = (tmp_path / "server.log").read_text()
    assert "nodes on rvv," in log_text, log_text[-3000:]
