"""javascript/ela.js and style.css in a real browser against the real WebUI (with its Gradio UI).

Headless Chromium, driven by Selenium through chromedriver, opens the txt2img page, opens the
"Entity Anchoring (ELA)" accordion, types a prompt and checks what a user sees: the token chips
from POST /ela/v1/tokens, a chip click toggling its word in Entities, "Detect from prompt", the
route's 422 reason for a bad spec, the tooltips, and a pasted infotext refreshing the chips. It
takes a screenshot of the accordion (into pytest's temp dir; ``ELA_UI_SCREENSHOT=<file.png>``
copies it there too, which is how docs/ui.png is made). One test opens the page on A1111's tiny SD3
(test_mmdit_a1111.py's server and files; it skips without them): the accordion, its MM-DiT blocks
dropdown and the chips in the columns SD3 reads.

Skips (saying why) without ELA_WEBUI (see conftest.py), without the ``selenium`` package, or
without Chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``; or name
them with ELA_CHROMIUM and ELA_CHROMEDRIVER). None of that is in requirements-test.txt: CI does
not run tests/webui.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from ela_ext.config import JOINT_BLOCK_CHOICES, ElaConfig
from test_mmdit_a1111 import sd3_root, start_sd3  # noqa: F401 (sd3_root: a fixture, skips without the SD3 files)
from webui_host import WebUI, checkout_in_extensions

webdriver = pytest.importorskip("selenium.webdriver", exc_type=ImportError,
                                reason="selenium cannot be imported (pip install selenium): browser UI tests skipped")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPT = "a black cat and a green frog"
DETECTED = "black cat | green frog"
ELA = "script_{tab}_entity_anchoring_ela_{name}"
WAIT_S = 30
# Without the networking flags Chromium keeps calling out into the closed network.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,2400"]


def ela_id(name: str, tab: str = "txt2img") -> str:
    return ELA.format(tab=tab, name=name)


def _tool(variable: str, *names: str) -> str | None:
    """The program ``variable`` names, else the first of ``names`` on PATH; None where there is none."""
    if os.environ.get(variable):
        return os.environ[variable] if os.access(os.environ[variable], os.X_OK) else None
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser_tools() -> tuple[str, str]:
    """Chromium and chromedriver, looked for before a WebUI is started for nothing."""
    chromium = _tool("ELA_CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    driver_path = _tool("ELA_CHROMEDRIVER", "chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"Chromium ({chromium}) or chromedriver ({driver_path}) not found: "
                    "apt-get install chromium chromium-driver, or set ELA_CHROMIUM and ELA_CHROMEDRIVER")
    return chromium, driver_path


@pytest.fixture(scope="module", params=["sd1"])
def ui_host(request, webui_root, browser_tools, workdir):
    """The WebUI with its UI and the checkout linked (left alone when someone else linked it), on
    tiny SD1; a test parametrised with "sd3" gets it on tiny SD3, started as test_mmdit_a1111.py
    starts it. One fixture with two params, so pytest stops one server before starting the other."""
    if request.param == "sd3":
        start = lambda: start_sd3(request.getfixturevalue("sd3_root"), workdir, "ui-browser-sd3", {}, with_ui=True)
    else:
        start = lambda: WebUI(webui_root, workdir, "ui-browser", {}, with_ui=True)
    with checkout_in_extensions(webui_root), start() as server:
        # Extensions' routes come last (on_app_started); the UI needs POST /ela/v1/tokens.
        deadline = time.monotonic() + 60
        while server.request("POST", "/ela/v1/tokens", {"prompt": PROMPT})[0] != 200:
            assert time.monotonic() < deadline, f"POST /ela/v1/tokens never answered:\n{server.log_tail()}"
            time.sleep(0.5)
        yield server


@pytest.fixture(scope="module")
def browser(browser_tools, ui_host, tmp_path_factory):
    """Headless Chromium on the txt2img page, the UI's JavaScript loaded (onUiLoaded has run)."""
    chromium, driver_path = browser_tools
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given: Selenium Manager has nothing to look up or download.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(ui_host.url + "/")
        wait(driver, lambda d: d.execute_script(
            "return typeof gradioApp === 'function' && !!gradioApp().querySelector('#txt2img_prompt textarea')"
            " && !!gradioApp().getElementById(arguments[0] + '-visible-checkbox')", ela_id("enabled")),
            "the WebUI page with the ELA accordion")
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; now: {view(driver)}") from None


def view(driver, tab: str = "txt2img") -> dict:
    """What the user sees of ELA: the spec, the chips (text, role), the messages, the checkbox."""
    return driver.execute_script("""
        const id = (name) => arguments[0].replace('{name}', name);
        const app = gradioApp();
        const preview = app.getElementById(id('tokens'));
        return {
            spec: app.querySelector('#' + id('entities') + ' textarea').value,
            prompt: app.querySelector('#' + arguments[1] + '_prompt textarea').value,
            chips: [...preview.querySelectorAll('.ela-chip')].map((chip) => [chip.textContent,
                chip.classList.contains('ela-entity') ? 'entity' : chip.classList.contains('ela-attribute') ? 'attribute' : '']),
            messages: [...preview.querySelectorAll('.ela-message')].map((m) => [m.textContent, m.classList.contains('ela-error')]),
            enabled: app.getElementById(id('enabled') + '-visible-checkbox').checked,
        };""", ELA.format(tab=tab, name="{name}"), tab)


def type_into(element, text: str) -> None:
    """Replace the field's text by typing, as a user does (input events included)."""
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE)
    if text:
        element.send_keys(text)


def spec_box(driver, tab: str = "txt2img"):
    return driver.find_element(By.CSS_SELECTOR, f"#{ela_id('entities', tab)} textarea")


def chip(driver, text: str, tab: str = "txt2img"):
    chips = [c for c in driver.find_elements(By.CSS_SELECTOR, f"#{ela_id('tokens', tab)} .ela-chip") if c.text == text]
    assert chips, (text, view(driver, tab))
    return chips[0]


def chips_are(driver, expected: list[list[str]], tab: str = "txt2img"):
    return lambda d: view(d, tab)["chips"] == expected


# The prompt's chips with the roles of DETECTED (the spec the route detects from PROMPT).
DETECTED_CHIPS = [["a", ""], ["black", "attribute"], ["cat", "entity"], ["and", ""], ["a", ""],
                  ["green", "attribute"], ["frog", "entity"]]


@pytest.fixture(scope="module")
def page(browser):
    """The accordion opened (which enables ELA) and PROMPT typed into the txt2img prompt."""
    header = browser.find_element(By.CSS_SELECTOR, f"#{ela_id('enabled')} > .label-wrap")
    header.click()
    wait(browser, lambda d: view(d)["enabled"] and spec_box(d).is_displayed(), "the accordion to open, enabled")
    prompt = browser.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea")
    type_into(prompt, PROMPT)
    # Empty Entities: the route detects them, so the chips already carry the detected roles.
    wait(browser, chips_are(browser, DETECTED_CHIPS), "the prompt's chips")
    return browser


def test_accordion_checkbox_enables_ela(page):
    checkbox = page.find_element(By.ID, ela_id("enabled") + "-visible-checkbox")
    assert checkbox.is_displayed() and checkbox.is_selected()
    # The Gradio checkbox behind it, the value that generation receives, follows.
    assert page.execute_script("return gradioApp().querySelector('#' + arguments[0] + '-checkbox input').checked",
                               ela_id("enabled"))


def test_chips_show_the_prompt_tokens(page):
    state = view(page)
    assert [text for text, _ in state["chips"]] == PROMPT.split()
    assert state["messages"] == []
    for element in page.find_elements(By.CSS_SELECTOR, f"#{ela_id('tokens')} .ela-chip"):
        assert element.is_displayed() and element.size["height"] >= 14 and element.size["width"] >= 8
    assert "click to add or remove \"frog\"" in chip(page, "frog").get_attribute("title")


def test_chip_click_adds_and_removes_its_word(page):
    type_into(spec_box(page), "")
    wait(page, lambda d: view(d)["spec"] == "" and view(d)["chips"] == DETECTED_CHIPS, "an empty spec")
    chip(page, "frog").click()
    wait(page, lambda d: view(d)["spec"] == "frog", "the frog chip to add frog")
    # The preview follows the new spec: one entity, so only frog is marked and the route warns.
    wait(page, lambda d: ["frog", "entity"] in view(d)["chips"] and ["cat", ""] in view(d)["chips"],
         "the chips of the spec 'frog'")
    assert any("two entities" in text for text, _ in view(page)["messages"]), view(page)
    chip(page, "cat").click()
    wait(page, lambda d: view(d)["spec"] == "frog | cat", "the cat chip to add a second entity")
    chip(page, "frog").click()
    wait(page, lambda d: view(d)["spec"] == "cat", "the frog chip to remove frog")


def test_detect_from_prompt_fills_the_spec(page):
    type_into(spec_box(page), "cat")
    page.find_element(By.ID, ela_id("detect")).click()
    wait(page, lambda d: view(d)["spec"] == DETECTED, "Detect from prompt")
    wait(page, lambda d: view(d)["chips"] == DETECTED_CHIPS and view(d)["messages"] == [], "the detected roles")


def test_bad_spec_shows_the_route_reason_and_keeps_the_chips(page, ui_host):
    status, answer = ui_host.request("POST", "/ela/v1/tokens", {"prompt": PROMPT, "entities": "dog | cat"})
    assert status == 422
    type_into(spec_box(page), "dog | cat")
    wait(page, lambda d: view(d)["messages"] == [[answer["detail"], True]], "the 422 reason")
    error = page.find_element(By.CSS_SELECTOR, f"#{ela_id('tokens')} .ela-error")
    assert error.is_displayed() and error.size["height"] > 0
    # The prompt's words stay clickable (unmarked) so the spec can be fixed from them.
    wait(page, lambda d: [text for text, _ in view(d)["chips"]] == PROMPT.split(), "the chips under the reason")
    assert all(role == "" for _, role in view(page)["chips"])


def test_tooltips_are_set(page):
    for name in ("entities", "lambda_weight", "window_start", "window_end", "max_iterations", "loss_threshold",
                 "step_size", "objective", "save_masks", "layers", "binarization", "detect", "tokens"):
        title = page.find_element(By.ID, ela_id(name)).get_attribute("title")
        assert title and len(title) > 15, (name, title)
    header = page.find_element(By.CSS_SELECTOR, f"#{ela_id('enabled')} > .label-wrap")
    assert "anchor" in header.get_attribute("title").lower()
    # Only the header: a title on the whole panel would show over every field without one.
    assert not page.find_element(By.ID, ela_id("enabled")).get_attribute("title")


def test_pasted_infotext_refreshes_the_chips(page):
    """The WebUI's paste button sets the fields from the server, without the input events typing sends."""
    prompt = page.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea")
    infotext = (f"{PROMPT}\nSteps: 6, Sampler: Euler a, Seed: 1, Size: 64x64, "
                "ELA: entities=frog | cat;lambda=0.3;start=0;end=0.3;iters=5;threshold=0.05;step=0.1;"
                "objective=ela;layers=up_lowest;binarize=otsu")
    page.execute_script("arguments[0].value = arguments[1]; updateInput(arguments[0]);", prompt, infotext)
    page.find_element(By.ID, "paste").click()
    expected = [["a", ""], ["black", ""], ["cat", "entity"], ["and", ""], ["a", ""], ["green", ""], ["frog", "entity"]]
    wait(page, lambda d: view(d)["prompt"] == PROMPT and view(d)["spec"] == "frog | cat" and view(d)["chips"] == expected,
         "the pasted spec's chips")


def test_img2img_tab_has_its_own_preview(page):
    page.find_element(By.XPATH, "//div[@id='tabs']//button[normalize-space()='img2img']").click()
    header = wait(page, lambda d: next((e for e in d.find_elements(
        By.CSS_SELECTOR, f"#{ela_id('enabled', 'img2img')} > .label-wrap") if e.is_displayed()), None),
        "the img2img accordion")
    header.click()
    prompt = page.find_element(By.CSS_SELECTOR, "#img2img_prompt textarea")
    type_into(prompt, "a red fox")
    wait(page, lambda d: [text for text, _ in view(d, "img2img")["chips"]] == ["a", "red", "fox"], "img2img chips")
    page.find_element(By.XPATH, "//div[@id='tabs']//button[normalize-space()='txt2img']").click()
    wait(page, lambda d: spec_box(d).is_displayed(), "back on txt2img")


def save_screenshot(element, tmp_path_factory, name: str, env_var: str) -> None:
    """A screenshot of ``element`` in the test's tmp folder (checked not blank), copied to the path
    in ``env_var`` when set (how docs/ pictures are made)."""
    path = tmp_path_factory.mktemp("screenshots") / name
    element.screenshot(str(path))
    assert path.stat().st_size > 5000, path
    print(f"screenshot: {path}")
    if os.environ.get(env_var):
        target = Path(os.environ[env_var])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def test_accordion_screenshot(page, tmp_path_factory):
    """The accordion after "Detect from prompt": judged by eye once (docs/ui.png), checked for sanity here."""
    type_into(spec_box(page), "")
    prompt = page.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea")
    type_into(prompt, PROMPT)
    page.find_element(By.ID, ela_id("detect")).click()
    wait(page, lambda d: view(d)["spec"] == DETECTED and view(d)["chips"] == DETECTED_CHIPS, "the detected spec")
    page.execute_script("document.activeElement.blur();")
    time.sleep(0.3)  # the focus ring fades
    accordion = page.find_element(By.ID, ela_id("enabled"))
    # Layout: the chips sit below the Entities field, inside the accordion, their text not cut off.
    boxes = page.execute_script("""
        const rect = (e) => e.getBoundingClientRect().toJSON();
        const app = gradioApp();
        return {accordion: rect(app.getElementById(arguments[0])), spec: rect(app.getElementById(arguments[1])),
                chips: [...app.querySelectorAll('#' + arguments[2] + ' .ela-chip')].map((c) =>
                    ({...rect(c), clipped: c.scrollWidth > c.clientWidth || c.scrollHeight > c.clientHeight,
                      padding: parseFloat(getComputedStyle(c).paddingLeft)}))};""",
        ela_id("enabled"), ela_id("entities"), ela_id("tokens"))
    for box in boxes["chips"]:
        assert not box["clipped"], box
        # style.css's padding, not Gradio's button reset (padding 0): the chips read as chips.
        assert box["padding"] >= 4, box
        assert box["top"] >= boxes["spec"]["bottom"] - 1, (box, boxes["spec"])
        assert boxes["accordion"]["left"] <= box["left"] and box["right"] <= boxes["accordion"]["right"], box
    save_screenshot(accordion, tmp_path_factory, "ela-accordion.png", "ELA_UI_SCREENSHOT")


def script_errors(driver) -> list[dict]:
    """The console's errors since the last call; network failures (the WebUI's CDN script, this
    machine is offline) are not ours."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE" and entry["source"] != "network"]


def test_no_script_errors_in_the_console(page):
    assert script_errors(page) == []


def choose(driver, dropdown_id: str, *options: str) -> None:
    """Pick ``options`` in a Gradio dropdown as a user does: open it, type, press Enter."""
    field = driver.find_element(By.CSS_SELECTOR, f"#{dropdown_id} input")
    for option in options:
        field.click()
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(option)
        wait(driver, lambda d: any(item.text.strip() == option for item in d.find_elements(
            By.CSS_SELECTOR, f"#{dropdown_id} ul.options li")), f"{option!r} among {dropdown_id}'s options")
        next(item for item in driver.find_elements(By.CSS_SELECTOR, f"#{dropdown_id} ul.options li")
             if item.text.strip() == option).click()


def test_xyz_plot_with_ela_axes_from_the_ui(page, tmp_path_factory):
    """The X/Y/Z plot run from the UI with ELA's axes (ELA on/off against lambda, the accordion
    closed): a grid comes back whose legend names the axes. docs/xyz.png is this screenshot."""
    header = page.find_element(By.CSS_SELECTOR, f"#{ela_id('enabled')} > .label-wrap")
    if view(page)["enabled"]:
        header.click()  # closing the accordion turns ELA off: the X axis turns it on per cell
    wait(page, lambda d: not view(d)["enabled"], "ELA off")
    type_into(page.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea"), PROMPT)
    choose(page, "script_list", "X/Y/Z plot")
    choose(page, "script_txt2img_xyz_plot_x_type", "[ELA] Enabled")
    # The values of a dropdown axis: the plot's fill button puts in all of them (False, True).
    wait(page, lambda d: next((button for button in d.find_elements(By.ID, "xyz_grid_fill_x_tool_button")
                               if button.is_displayed()), None), "the X fill button").click()
    choose(page, "script_txt2img_xyz_plot_y_type", "[ELA] Lambda (attenuation weight)")
    type_into(page.find_element(By.CSS_SELECTOR, "#script_txt2img_xyz_plot_y_values textarea"), "0.2, 0.6")
    for name, value in (("steps", 12), ("width", 128), ("height", 128), ("seed", 1234)):
        field = page.find_element(By.CSS_SELECTOR, f"#txt2img_{name} input[type=number]")
        page.execute_script("arguments[0].value = arguments[1]; updateInput(arguments[0]);", field, str(value))
    page.find_element(By.ID, "txt2img_generate").click()
    try:  # four cells of 12 steps: longer than the UI's other waits
        WebDriverWait(page, 300, poll_frequency=0.5).until(
            lambda d: "Time taken" in d.find_element(By.ID, "html_log_txt2img").text)
    except TimeoutException:
        page.save_screenshot(str(tmp_path_factory.mktemp("screenshots") / "xyz-timeout.png"))
        raise AssertionError(f"no grid after 300 s: {view(page)}") from None
    # The generation's infotexts (the grid's, then each cell's) as the UI holds them.
    info = page.execute_script("return gradioApp().querySelector('#generation_info_txt2img textarea').value")
    assert "X Type: [ELA] Enabled" in info and "Y Type: [ELA] Lambda (attenuation weight)" in info, info
    assert "ELA: entities=black cat | green frog;lambda=0.6;" in info and "ELA log: steps=" in info, info
    gallery = page.find_element(By.ID, "txt2img_gallery")
    page.execute_script("arguments[0].scrollIntoView();", gallery)
    time.sleep(0.5)
    save_screenshot(gallery, tmp_path_factory, "ela-xyz.png", "ELA_XYZ_SCREENSHOT")


def test_presets_set_the_sliders(page):
    """"Fast" puts one pass per anchored step in the iterations slider; "Defaults" puts every
    slider back, the way the generation reads them."""
    def iterations(driver):
        return driver.find_element(By.CSS_SELECTOR, f"#{ela_id('max_iterations')} input[type=number]").get_attribute("value")

    if not view(page)["enabled"]:  # the X/Y/Z test closes the accordion
        page.find_element(By.CSS_SELECTOR, f"#{ela_id('enabled')} > .label-wrap").click()
        wait(page, lambda d: view(d)["enabled"], "the accordion to open")
    page.find_element(By.ID, ela_id("preset_fast")).click()
    wait(page, lambda d: iterations(d) == "1", "the Fast preset to set 1 iteration")
    page.find_element(By.ID, ela_id("preset_defaults")).click()
    wait(page, lambda d: iterations(d) == str(ElaConfig().max_iterations), "Defaults to restore the iterations")
    assert "1.3x" in page.find_element(By.ID, ela_id("preset_fast")).get_attribute("title")


# test_mmdit_a1111.py's token-route prompt: BREAK puts frog in SD3's second CLIP chunk (77 + 3).
SD3_PROMPT = "a (black:1.3) cat BREAK a green frog"


@pytest.mark.parametrize("ui_host", ["sd3"], indirect=True)
def test_sd3_accordion_blocks_dropdown_and_chips(ui_host, browser):
    """A1111 with its tiny SD3 loaded: the accordion is there and off; opened, its Advanced "MM-DiT
    blocks" dropdown holds the block choices (the default chosen); the chips are the prompt's
    words in the columns POST /ela/v1/tokens gives on SD3, the detected entities marked; no
    script error."""
    header = browser.find_element(By.CSS_SELECTOR, f"#{ela_id('enabled')} > .label-wrap")
    assert header.is_displayed() and "Entity Anchoring (ELA)" in header.text
    assert not view(browser)["enabled"] and not spec_box(browser).is_displayed()
    assert not browser.execute_script("return gradioApp().querySelector('#' + arguments[0] + '-checkbox input').checked",
                                      ela_id("enabled"))
    header.click()
    wait(browser, lambda d: view(d)["enabled"] and spec_box(d).is_displayed(), "the accordion to open, enabled")

    blocks = browser.find_element(By.ID, ela_id("joint_blocks"))
    browser.find_element(By.XPATH, f"//*[@id='{ela_id('enabled')}']//*[contains(@class, 'label-wrap')]"
                                   "[contains(., 'Advanced')]").click()
    wait(browser, lambda d: blocks.is_displayed(), "the Advanced settings to open")
    assert "MM-DiT blocks" in blocks.text
    field = blocks.find_element(By.CSS_SELECTOR, "input")
    assert field.get_attribute("value") == ElaConfig().joint_blocks
    field.click()
    options = wait(browser, lambda d: [item.text.strip() for item in blocks.find_elements(By.CSS_SELECTOR, "ul.options li")],
                   "the MM-DiT blocks choices")
    # Each option's text, the chosen one ticked ("\u2713" on a line before it).
    assert [option.split("\n")[-1] for option in options] == list(JOINT_BLOCK_CHOICES)
    assert [option.startswith("\u2713") for option in options] == [c == ElaConfig().joint_blocks for c in JOINT_BLOCK_CHOICES]
    field.send_keys(Keys.ESCAPE)

    answer = ui_host.post("/ela/v1/tokens", {"prompt": SD3_PROMPT, "entities": ""})
    type_into(browser.find_element(By.CSS_SELECTOR, "#txt2img_prompt textarea"), SD3_PROMPT)
    expected = [["a", ""], ["black", "attribute"], ["cat", "entity"], ["a", ""], ["green", "attribute"], ["frog", "entity"]]
    wait(browser, chips_are(browser, expected), "the prompt's chips")
    chips = browser.find_elements(By.CSS_SELECTOR, f"#{ela_id('tokens')} .ela-chip")
    # A chip's title starts "column 3 (entity): ..." ("columns 3, 4" for a word of two tokens).
    columns = [int(column) for element in chips
               for column in re.match(r"columns? ([\d, ]+)", element.get_attribute("title")).group(1).split(", ")]
    assert columns == [token["column"] for token in answer["tokens"]]
    for entity in answer["entities"]:
        assert chip(browser, entity["word"]).get_attribute("title").startswith(f"column {entity['columns'][0]} (entity)")
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == {"cat": [3], "frog": [77 + 3]}
    assert script_errors(browser) == []
