"""`nvlm-d web` in a real browser: headless Chromium from the system's packages (Debian `chromium` and
`chromium-driver`, which .ci/run installs), driven with Selenium. What a user sees must be what `model.chat` says.

Set NVLM_D_WEB_SCREENSHOT=path.png to keep the screenshot (docs/web.png is made so)."""

from __future__ import annotations

import os
import shutil

import pytest
from web_helpers import MAX_NEW_TOKENS, MAX_TILES, chat_answers, launched, square_image

pytest.importorskip("gradio", reason="the web extra (gradio) is not installed: pip install -e '.[web]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Chromium and its driver from the system's packages (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from nvlm_d.web import InProcessBackend, Settings, build_app  # noqa: E402

PAGE_WAIT = 600  # seconds: an outer limit for a busy machine; every wait ends on what the page shows


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser_images")
    (directory / "notes.txt").write_text("a text file, not an image\n")
    return {
        "red": square_image(directory, "red.png", (220, 30, 30)),
        "green": square_image(directory, "green.png", (30, 180, 60)),
        "text": directory / "notes.txt",
    }


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    defaults = Settings(max_tiles=MAX_TILES, max_new_tokens=MAX_NEW_TOKENS)
    with launched(build_app(InProcessBackend(tiny_model, tokenizer), defaults=defaults, title="NVLM-D chat")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition):
    return WebDriverWait(driver, PAGE_WAIT).until(condition)


def open_page(driver, url):
    driver.get(url)
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))


def text_of(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def answers_shown(driver):
    return [" ".join(e.text.split()) for e in driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")]


def attach(driver, path):
    file_input = driver.find_element(By.CSS_SELECTOR, "#question input[type=file]")
    driver.execute_script("arguments[0].value = '';", file_input)  # chromedriver adds to a multiple input's files
    file_input.send_keys(str(path))
    wait(driver, lambda d: path.name in text_of(d, "tiling"))  # the tiling preview names each attached file


def ask(driver, question, expected_answers):
    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)
    wait(driver, lambda d: len(answers_shown(d)) == expected_answers and "tokens/s" in text_of(d, "stats"))
    return answers_shown(driver)[-1]


def test_in_a_browser_the_answers_equal_chats_and_the_tiling_is_previewed(browser, url, tiny_model, tokenizer, images):
    open_page(browser, url)
    attach(browser, images["red"])
    assert "red.png 64x64: 1 tile (no thumbnail), 256 image tokens" in text_of(browser, "tiling")
    questions = ["What colour is it?", "Is it a square?"]
    shown = [ask(browser, questions[0], 1), ask(browser, questions[1], 2)]
    expected = chat_answers(tiny_model, tokenizer, images["red"], questions)
    assert shown == [" ".join(answer.split()) for answer in expected]
    assert "prompt" in text_of(browser, "stats") and "256 image tokens" in text_of(browser, "stats")
    attach(browser, images["green"])  # the preview of a next image, for the screenshot
    path = os.environ.get("NVLM_D_WEB_SCREENSHOT") or str(images["red"].parent / "web.png")
    assert browser.save_screenshot(path)


def test_in_a_browser_a_text_file_gets_a_message(browser, url, images):
    open_page(browser, url)
    attach(browser, images["text"])
    assert "notes.txt is not an image" in text_of(browser, "tiling")
    box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys("What is this?")
    box.send_keys(Keys.ENTER)
    wait(browser, lambda d: "notes.txt is not an image" in text_of(d, "status"))
    assert answers_shown(browser) == []


def test_two_browser_tabs_see_only_their_own_conversation(browser, url, images):
    open_page(browser, url)
    first = browser.current_window_handle
    attach(browser, images["red"])
    ask(browser, "First tab asks.", 1)
    browser.switch_to.new_window("tab")
    open_page(browser, url)
    attach(browser, images["green"])
    ask(browser, "Second tab asks.", 1)
    second_chat = text_of(browser, "chat")
    browser.switch_to.window(first)
    first_chat = text_of(browser, "chat")
    assert "Second tab asks." in second_chat and "First tab" not in second_chat
    assert "First tab asks." in first_chat and "Second tab" not in first_chat
