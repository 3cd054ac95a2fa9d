"""Every page of the built book, checked as a reader sees it in a real (headless) browser."""

from __future__ import annotations

import base64
import contextlib
import json
import pathlib
import re
import time
import urllib.request
from urllib.parse import urlparse

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from celib.book import plot
from tests.browser.conftest import HTML, SCREENSHOTS
from tests.toc import toc_pages

PAGES = toc_pages()
NETWORK_SCHEMES = ("http", "https", "ws", "wss", "ftp")
OVERFLOW_JS = (pathlib.Path(__file__).parent / "overflow.js").read_text()
TITLE = "Cross-Entropy, Executed"
FIGURE_DPI = plot.STYLE["figure.dpi"]


def _foreign(urls: list[str]) -> list[str]:
    """Requests that went over the network to a host other than 127.0.0.1 (data:, blob: and the
    browser's own chrome:// pages are not network requests)."""
    return [u for u in urls if urlparse(u).scheme in NETWORK_SCHEMES and urlparse(u).hostname != "127.0.0.1"]


def _drain_logs(driver) -> tuple[list[dict], list[str]]:
    """(console entries, requested URLs) since the last call."""
    console = driver.get_log("browser")
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return console, urls


def _load(driver, url: str) -> None:
    driver.get(url)
    # Wait for MathJax (when the page has it) to finish typesetting.
    driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
            MathJax.startup.promise.then(() => done(true), () => done(false));
        } else { done(true); }"""
    )


@contextlib.contextmanager
def _viewport(driver, width: int, height: int = 844):
    """Emulate a window of ``width`` CSS px (a phone, with touch and its viewport, below 500 px)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _set_mode(driver, mode: str) -> None:
    """Light or dark, as the theme's switch sets it."""
    driver.execute_script("document.documentElement.dataset.theme = arguments[0];"
                          "document.documentElement.dataset.mode = arguments[0];", mode)


def _screenshot(driver, name: str) -> None:
    size = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True,
         "clip": {"x": 0, "y": 0, "width": size[0], "height": min(size[1], 16000), "scale": 1}},
    )
    (SCREENSHOTS / f"{name.replace('/', '_')}.png").write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.parametrize("page", PAGES)
def test_page(browser, site, page):
    _drain_logs(browser)
    _load(browser, f"{site}/{page}.html")
    console, urls = _drain_logs(browser)

    errors = [e["message"] for e in console if e["level"] == "SEVERE"]
    assert errors == [], f"console errors on {page}: {errors}"
    assert _foreign(urls) == [], f"{page} requested other hosts: {_foreign(urls)}"

    # Math: every display equation typeset, no TeX left in the text, no MathJax error.
    display = browser.find_elements(By.CSS_SELECTOR, "div.math")
    untypeset = [d.text[:60] for d in display if not d.find_elements(By.CSS_SELECTOR, "mjx-container")]
    assert untypeset == [], f"{page}: display math not typeset: {untypeset}"
    assert browser.find_elements(By.CSS_SELECTOR, "mjx-merror, [data-mjx-error]") == [], f"{page}: MathJax error"
    prose = browser.execute_script(
        """const main = document.querySelector('main') || document.body;
        const clone = main.cloneNode(true);
        clone.querySelectorAll('pre, code, script, style, mjx-container, .cell_output').forEach(n => n.remove());
        return clone.innerText;"""
    )
    for raw in ("$$", "\\frac", "\\begin{", "\\sum"):
        assert raw not in prose, f"{page}: raw TeX {raw!r} left in the text"

    # No empty code blocks (a solution whose inner code fence closed its directive leaves one behind).
    empty = browser.execute_script(
        "return Array.from(document.querySelectorAll('main div.highlight pre')).filter(p => !p.textContent.trim()).length;"
    )
    assert empty == 0, f"{page}: {empty} empty code block(s)"

    # Code and outputs fit the page at 1280 px: no block scrolls sideways, and no line of code or printed
    # output is longer than the 76 characters a block shows (hidden solutions included; tracebacks, shown as
    # Python prints them, wrap instead: _static/celib.css).
    wide = browser.execute_script(
        """return Array.from(document.querySelectorAll('main div.highlight pre')).flatMap(p => {
            const out = [];
            if (p.clientWidth > 0 && p.scrollWidth > p.clientWidth + 1) out.push('scrolls: ' + p.textContent.slice(0, 60));
            if (!p.closest('.traceback')) p.textContent.split('\\n').filter(l => l.length > 76)
                .forEach(l => out.push(l.length + ': ' + l.slice(0, 80)));
            return out;
        });"""
    )
    assert wide == [], f"{page}: {len(wide)} code or output line(s) wider than the page: {wide}"

    # Images: all loaded, each with alt text or a caption.
    images = browser.execute_script(
        """return Array.from(document.querySelectorAll('main img')).map(img => ({
            src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0,
            alt: (img.getAttribute('alt') || '').trim(),
            caption: !!(img.closest('figure') && img.closest('figure').querySelector('figcaption'))}));"""
    )
    broken = [i["src"] for i in images if not i["ok"]]
    assert broken == [], f"{page}: images failed to load: {broken}"
    unlabelled = [i["src"][-60:] for i in images if not i["alt"] and not i["caption"]]
    assert unlabelled == [], f"{page}: images without alt text or caption: {unlabelled}"
    file_names = [i["alt"] for i in images
                  if re.search(r"\.(png|svg|jpe?g|gif)$|_images/|^[0-9a-f]{16,}", i["alt"]) or len(i["alt"]) < 20]
    assert file_names == [], f"{page}: alt text that is a file name, or too short to describe a figure: {file_names}"
    figures = browser.execute_script(
        "return Array.from(document.querySelectorAll('main div.cell_output img')).filter("
        "img => !(img.closest('figure') && img.closest('figure').querySelector('figcaption'))).length;")
    assert figures == 0, f"{page}: {figures} figure(s) without a caption"

    # Notebook pages offer their .ipynb, and the link works.
    if page.startswith("chapters/"):
        links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a[href$='.ipynb']")]
        assert links, f"{page}: no download link for the notebook"
        with urllib.request.urlopen(links[0]) as response:
            notebook = json.loads(response.read())
        assert notebook["nbformat"] == 4 and notebook["cells"]
        # ... and the book's source, next to it in the same menu
        source = browser.find_elements(By.CSS_SELECTOR, ".dropdown-download-buttons a.celib-source")
        assert source, f"{page}: the download menu does not offer the book's source"
        assert source[0].get_attribute("href") == f"{site}/_static/crossentropy-book-src.tar.gz"

    # The page title names the page, then the book, once.
    title = browser.title
    if page == "intro":
        assert title == TITLE, title
    else:
        assert title.endswith(f" — {TITLE}") and title.count(TITLE) == 1, title

    _screenshot(browser, page)


def test_penalty_of_confidence_slider(browser, site):
    _load(browser, f"{site}/intro.html")
    widget = browser.find_element(By.ID, "penalty-of-confidence")
    slider = widget.find_element(By.CSS_SELECTOR, "input[type=range]")
    marker = widget.find_element(By.CSS_SELECTOR, ".marker")
    readout = lambda: (widget.find_element(By.CSS_SELECTOR, ".p-value").text,  # noqa: E731
                       widget.find_element(By.CSS_SELECTOR, ".loss-value").text)
    assert readout() == ("0.60", "0.51")
    before = float(marker.get_attribute("cx"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
    slider.click()  # a real click moves the thumb to the middle
    slider.send_keys(Keys.HOME)  # the left end: confident and wrong
    assert readout() == ("0.01", "4.61")
    left = float(marker.get_attribute("cx"))
    assert left < before, "the slider's left end must put the marker at the left of the plot"
    slider.send_keys(*([Keys.ARROW_RIGHT] * 9))  # p = (9 + 1) / 100
    assert readout() == ("0.10", "2.30")
    assert float(marker.get_attribute("cx")) > left, "moving the slider right must move the marker right"
    slider.send_keys(Keys.END)
    assert readout() == ("1.00", "0.00")
    assert float(marker.get_attribute("cx")) > before
    labels = widget.find_element(By.TAG_NAME, "svg").text
    for mark in ("p = 0.99: 0.01", "p = 0.6: 0.51", "p = 0.1: 2.30", "p = 0.01: 4.61"):
        assert mark in labels


def test_navigation_reaches_every_page(browser, site):
    _load(browser, f"{site}/intro.html")
    sidebar = {a.get_attribute("href").split("#")[0] for a in browser.find_elements(By.CSS_SELECTOR, "nav.bd-links a")}
    for page in PAGES[1:]:
        assert f"{site}/{page}.html" in sidebar, f"{page} is not in the table of contents"
    # Next links walk the book in order, previous links walk it back.
    visited = [browser.current_url]
    for _ in PAGES[1:]:
        browser.find_element(By.CSS_SELECTOR, "a.right-next").click()
        visited.append(browser.current_url.split("#")[0])
    assert visited == [f"{site}/{p}.html" for p in PAGES]
    for expected in reversed(PAGES[:-1]):
        browser.find_element(By.CSS_SELECTOR, "a.left-prev").click()
        assert browser.current_url.split("#")[0] == f"{site}/{expected}.html"


def test_search_works_offline(browser, site):
    _drain_logs(browser)
    browser.get(f"{site}/search.html?q=entropy")
    deadline = time.time() + 30
    results = []
    while time.time() < deadline and not results:
        results = browser.find_elements(By.CSS_SELECTOR, "#search-results li, ul.search li")
        time.sleep(0.2)
    assert results, "search for 'entropy' found nothing"
    _, urls = _drain_logs(browser)
    assert _foreign(urls) == []


WIDTHS = (390, 1280)


@pytest.mark.parametrize("mode", ("light", "dark"))
@pytest.mark.parametrize("width", WIDTHS)
def test_pages_fit_their_column(browser, site, width, mode):
    """No text, code, equation, table or figure wider than its column unless it sits in a scroll box;
    on a laptop no equation needs to scroll at all; on a phone every figure keeps at least 55 CSS px per
    inch of its Matplotlib size (12-point text about 9 px tall) and a wide one scrolls."""
    problems = {}
    with _viewport(browser, width):
        for page in PAGES:
            _load(browser, f"{site}/{page}.html")
            _set_mode(browser, mode)
            time.sleep(0.2)  # images decoded, the page's script run
            found = browser.execute_script(OVERFLOW_JS)
            if width >= 1024:
                found += browser.execute_script(
                    "return Array.from(document.querySelectorAll('main div.math')).filter("
                    "d => d.scrollWidth > d.clientWidth + 1).map(d => 'equation scrolls: ' + "
                    "d.textContent.trim().slice(0, 50));")
            else:
                per_inch = browser.execute_script(
                    "return Array.from(document.querySelectorAll('main div.cell_output img')).map("
                    "img => [img.getBoundingClientRect().width / (img.naturalWidth / arguments[0]), "
                    "img.currentSrc.slice(-30)]);", FIGURE_DPI)
                found += [f"figure at {px:.0f} px per inch: {src}" for px, src in per_inch if px < 54.5]
            if found:
                problems[page] = found[:8]
            if page in ("intro", "chapters/03_binary_cross_entropy", "chapters/05_fused_kernel") and width < 500:
                _screenshot(browser, f"{page}-{width}-{mode}")
    assert problems == {}, f"at {width} px, {mode}: {problems}"


SIDEBAR_STATE = """
const side = document.getElementById('pst-primary-sidebar');
const drawer = document.getElementById('pst-primary-sidebar-modal');
const contents = document.getElementById('pst-secondary-sidebar-modal');
return {inline: getComputedStyle(side).display !== 'none' && side.getBoundingClientRect().width > 0,
        drawer: !!(drawer && drawer.open), contents: !!(contents && contents.open)};
"""


def _visible(browser, selector: str):
    buttons = [b for b in browser.find_elements(By.CSS_SELECTOR, selector) if b.is_displayed()]
    assert buttons, f"no visible {selector}"
    return buttons[0]


@pytest.mark.parametrize("width", (390, 1024, 1280))
def test_sidebar_buttons_open_and_close(browser, site, width):
    """The menu button opens the navigation drawer on a phone and collapses / restores the sidebar on a
    wide window; the contents button opens the page's contents where it is shown."""
    with _viewport(browser, width, 900):
        _load(browser, f"{site}/chapters/03_binary_cross_entropy.html")
        state = lambda: browser.execute_script(SIDEBAR_STATE)  # noqa: E731
        if width < 960:
            assert not state()["drawer"]
            _visible(browser, ".primary-toggle").click()
            time.sleep(0.3)
            assert state()["drawer"], "the menu button did not open the navigation drawer"
            links = browser.execute_script(
                "return document.querySelectorAll('#pst-primary-sidebar-modal nav.bd-links a').length;")
            assert links >= len(PAGES) - 1, "the drawer does not hold the table of contents"
            ActionChains(browser).send_keys(Keys.ESCAPE).perform()  # to the focused drawer
            time.sleep(0.2)
            assert not state()["drawer"], "Escape did not close the navigation drawer"
        else:
            assert state()["inline"]
            _visible(browser, ".primary-toggle").click()
            time.sleep(0.2)
            assert not state()["inline"], "the menu button did not hide the sidebar"
            _visible(browser, ".primary-toggle").click()
            time.sleep(0.2)
            assert state()["inline"], "the menu button did not bring the sidebar back"
        contents = [b for b in browser.find_elements(By.CSS_SELECTOR, ".secondary-toggle") if b.is_displayed()]
        if width < 1200:
            assert contents, "no contents button where the page's contents are not shown"
            contents[0].click()
            time.sleep(0.3)
            assert state()["contents"], "the contents button did not open the page's contents"


def test_search_snippets_and_one_field(browser, site):
    """Result snippets quote the text around the match, with no raw TeX and no navigation; a page has one
    search field (the header's button)."""
    _load(browser, f"{site}/chapters/01_definition.html")
    fields = browser.execute_script(
        "return Array.from(document.querySelectorAll('input[type=search], .search-button-field'))"
        ".filter(e => e.offsetParent !== null).length;")
    assert fields == 1, f"{fields} search fields on a chapter page"
    browser.get(f"{site}/search.html?q=perplexity")
    deadline, snippets = time.time() + 30, []
    while time.time() < deadline and not snippets:
        snippets = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "#search-results li p.context")]
        time.sleep(0.3)
    assert snippets, "no search snippets for 'perplexity'"
    for snippet in snippets:
        for raw in ("\\(", "\\)", "\\[", "$$", "\\log", "\\frac"):
            assert raw not in snippet, f"raw TeX {raw!r} in a search snippet: {snippet[:120]}"
        assert "What you will be able to do" not in snippet[:40] and not snippet.startswith("Contents")
    assert any("perplexity" in s.lower() for s in snippets), snippets


def test_index_and_source_are_reachable(browser, site):
    _load(browser, f"{site}/intro.html")
    index = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "main a[href$='genindex.html']")]
    assert index, "the intro does not link the index"
    _load(browser, index[0])
    assert browser.find_elements(By.CSS_SELECTOR, "main h1"), "the index page did not load"
    _load(browser, f"{site}/intro.html")
    built = (HTML / "_static" / "crossentropy-book.pdf").is_file()
    pdf_links = browser.find_elements(By.CSS_SELECTOR, "main a.celib-pdf")
    if built:  # make pdf ran: the link works and the download menu offers the PDF
        assert pdf_links and browser.find_elements(By.CSS_SELECTOR, ".dropdown-download-buttons a.celib-book-pdf")
        with urllib.request.urlopen(pdf_links[0].get_attribute("href")) as response:
            assert response.read(5) == b"%PDF-"
    else:  # no dead link: the intro says the PDF was not built with this copy
        assert not pdf_links and "not built with this copy" in browser.find_element(By.TAG_NAME, "main").text
    archive = browser.find_element(By.CSS_SELECTOR, "main a[href$='crossentropy-book-src.tar.gz']")
    with urllib.request.urlopen(archive.get_attribute("href")) as response:
        data = response.read()
    # the link serves the archive the build wrote (its contents: tests/test_source_archive.py)
    assert data[:2] == b"\x1f\x8b" and data == (HTML / "_static" / "crossentropy-book-src.tar.gz").read_bytes()


def test_slider_follows_the_theme_and_fits_a_phone(browser, site):
    with _viewport(browser, 390):
        _load(browser, f"{site}/intro.html")
        _set_mode(browser, "dark")
        time.sleep(0.2)
        facts = browser.execute_script("""
            const w = document.getElementById('penalty-of-confidence');
            const svg = w.querySelector('svg'), slider = w.querySelector('input[type=range]');
            const scale = svg.getBoundingClientRect().width / 640;
            const sizes = Array.from(svg.querySelectorAll('text')).map(t => parseFloat(getComputedStyle(t).fontSize) * scale);
            const rgb = (c) => c.match(/[0-9.]+/g).slice(0, 3).map(Number);
            return {smallest: Math.min(...sizes), slider: slider.getBoundingClientRect().height,
                    caption: rgb(getComputedStyle(w.querySelector('figcaption')).color),
                    background: rgb(getComputedStyle(w).backgroundColor)};""")
    def luminance(rgb):
        channel = [(c / 255) / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * channel[0] + 0.7152 * channel[1] + 0.0722 * channel[2]
    light, dark = sorted((luminance(facts["caption"]), luminance(facts["background"])), reverse=True)
    contrast = (light + 0.05) / (dark + 0.05)
    assert luminance(facts["background"]) < 0.2, f"the widget stays light in dark mode: {facts}"
    assert contrast >= 4.5, f"caption contrast {contrast:.1f} in dark mode"
    assert facts["smallest"] >= 11, f"smallest label {facts['smallest']:.1f} px on a phone"
    assert facts["slider"] >= 24, f"slider {facts['slider']:.0f} px tall"


def test_citations_use_the_labels_of_the_reference_list(browser, site):
    """A citation reads "[Cover and Thomas, 2006]" in the text and the list labels the entry the same way;
    every entry with an identifier links it (DOI, arXiv or URL)."""
    _load(browser, f"{site}/bibliography.html")
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('main div.citation span.label, main .citation .label'))"
        ".map(l => l.textContent.replace(/[\\[\\]]/g, '').trim());")
    assert labels and all(re.fullmatch(r".+, (19|20)\d\d[a-z]?", label) for label in labels), labels
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('main div.citation')).map(c => c.querySelectorAll('a[href^=\"http\"]').length);")
    assert min(links) >= 1, "a reference without a DOI, arXiv id or URL"
    cited = set()
    for page in PAGES:
        _load(browser, f"{site}/{page}.html")
        cited |= set(browser.execute_script(
            "return Array.from(document.querySelectorAll('main a[href*=\"bibliography.html#\"]'))"
            ".map(a => a.textContent.trim()).filter(t => /, (19|20)\\d\\d/.test(t));"))
    assert cited, "no parenthetical citation found"
    assert cited <= set(labels), f"citations whose label is not in the list: {sorted(cited - set(labels))}"
