"""/console in headless Chromium: it asks for the key, lists the experts and streams a chat answer by expert."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.api_helpers import api_mesh, client

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "console-key-123456"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
           "apt-get install -y chromium chromium-driver")


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def _drive_console(url: str, profile: Path, names: list[str], shot: Path) -> dict:
    """Blocking browser session (run in a thread: the API serves on the test's event loop)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(profile)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        wait.until(ec.visibility_of_element_located((By.ID, "keybox")))  # status answered 401: ask for the key
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "save-key").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#experts tbody tr")) == len(names))
        table = driver.find_element(By.ID, "experts").text
        summary = driver.find_element(By.ID, "summary").text
        state = driver.find_element(By.ID, "state").text

        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("12")
        driver.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done], "
                                                              ".msg.assistant[data-state=error]"))
        answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        spans = answer.find_elements(By.CSS_SELECTOR, "span.tok")
        result = {
            "table": table, "summary": summary, "state": state, "answer_state": answer.get_attribute("data-state"),
            "answer_text": answer.find_element(By.CSS_SELECTOR, ".body").text,
            "span_text": "".join(s.get_attribute("textContent") for s in spans),
            "titles": [s.get_attribute("title") for s in spans],
            "experts": [s.get_attribute("data-experts") for s in spans],
            "legend": driver.find_element(By.ID, "legend").text,
            "errors": answer.text if answer.get_attribute("data-state") == "error" else "",
        }
        driver.save_screenshot(str(shot))
        return result
    finally:
        driver.quit()


async def test_console_shows_experts_and_streams_a_chat_answer_by_expert(tiny_loaded, tmp_path):
    async with api_mesh([tiny_loaded] * 2, tmp_path, keys=(KEY,), console=True) as (mesh, api):
        names = [e.link.name for e in mesh.experts]
        ids = sorted(e.link.expert_id for e in mesh.experts)
        page = await asyncio.to_thread(_drive_console, f"{api.origin}/console", tmp_path / "chromium-profile",
                                       names, tmp_path / "console.png")
        reference = await client(api, KEY).chat.completions.create(
            model="mesh", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=12)

    assert page["answer_state"] == "done", page["errors"]
    assert page["state"] == "running" and "K=2" in page["summary"] and "policy random" in page["summary"]
    for name in names:
        assert name in page["table"]
    assert page["table"].count("online") == 2 and "cpu" in page["table"]
    assert page["span_text"] == reference.choices[0].message.content
    assert page["titles"] and all(t.startswith("mixed from ") for t in page["titles"] if t)
    mixed = [e for e in page["experts"] if e]
    assert mixed and all(sorted(e.split(",")) == ids for e in mixed)  # k=2 of 2: both experts on every token
    assert all(name in page["titles"][0] for name in names)
    assert " + ".join(names) in page["legend"] or " + ".join(reversed(names)) in page["legend"]
    assert (tmp_path / "console.png").stat().st_size > 0  # left beside the test's temp files for a person
