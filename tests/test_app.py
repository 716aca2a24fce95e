"""The Space (app.py) end to end against localhub: a real browser, and gradio_client.

The app runs as a subprocess (`python app.py`), exactly as a Space or a workstation runs it, with
HF_ENDPOINT pointing at a LocalHub served from this process and alice's token in HF_TOKEN.

Browser: Debian's /usr/bin/chromium driven by Playwright (never `playwright install`); set up by
.ci/setup_browser.sh. Under $CI a missing browser, Playwright or gradio fails the test; locally
it skips. STREAMER_SCREENSHOT=1 also writes the mid-conversion screenshot to docs/screenshot.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.errors import SETTINGS, Hint
from streamer.localhub import LocalHub

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TOKEN = "hf_alice_secret_token_0123456789"
SOURCE = "acme/tiny-llama"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(what: str):
    """Fail under CI (the setup scripts must provide it), skip on a workstation."""
    msg = f"{what} (run .ci/setup_browser.sh and pip install -e '.[app,test]')"
    if _in_ci():
        pytest.fail(f"missing under CI: {msg}")
    pytest.skip(f"missing: {msg}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# fixtures: one hub and one app for the module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("app-hub")
    with LocalHub(root) as h:
        h.add_user("alice", TOKEN, orgs=["acme"])
        h.add_user("mallory", "hf_mallory_token", orgs=["evil"])
        h.seed_repo(SOURCE, checkpoint("llama"))
        h.seed_repo("acme/odd", checkpoint("odd"))
        h.seed_repo("evil/gated-model", checkpoint("llama"), gated=True)
        yield h


@contextlib.contextmanager
def _running_app(hub, work: Path, **extra_env):
    """`python app.py` against HUB, as a workstation runs it; yields its URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "OAUTH_", "SPACE_", "GRADIO_"))}  # fmt: skip
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=TOKEN,
        HF_HOME=str(work / "hf-home"),  # no login cache from this machine
        HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_ANALYTICS_ENABLED="False",
        STREAMER_DEFAULT_SCHEME="FP8_DYNAMIC",
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    log_path = work / "app.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py")], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not start in 120 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # The user's token never reaches the server's log.
    assert TOKEN not in log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def app_work(tmp_path_factory) -> Path:
    """The app's working folder; its HF_HOME is app_work / "hf-home"."""
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def app_url(hub, app_work):
    try:
        import gradio  # noqa: F401
        import gradio_client  # noqa: F401
    except ImportError:
        _missing("gradio / gradio_client")
    with _running_app(hub, app_work) as url:
        yield url


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _form(source=SOURCE, revision="", scheme="FP8_DYNAMIC", ignore="lm_head\nre:.*embed_tokens$",
          namespace="alice", repo_name="", private=False, create_pr=False):  # fmt: skip
    return [source, revision, scheme, ignore, namespace, repo_name, private, create_pr]


def _app_error(client, *args, api_name):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    message = str(info.value)
    assert "Traceback" not in message and TOKEN not in message
    return message


def _check_published(hub: LocalHub, repo_id: str, scheme: str) -> None:
    files = hub.files(repo_id)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == 6, files
    assert {"config.json", "README.md", "model.safetensors.index.json", "tokenizer.json"} <= set(files)
    config = json.loads(hub.read_file(repo_id, "config.json"))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert "lm_head" in qc["ignore"]
    assert scheme in hub.read_file(repo_id, "README.md").decode()
    commits = hub.commits(repo_id)
    assert "Quantize" in commits[0].message and set(shards) <= set(commits[0].added)


# --------------------------------------------------------------------------------------------
# the browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package")
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _missing(CHROMIUM)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shoot(page, tmp_path, name: str) -> None:
    """A screenshot; with STREAMER_SCREENSHOT=1 it also refreshes docs/NAME (the README's)."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("STREAMER_SCREENSHOT") == "1":
        (REPO_ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO_ROOT / "docs" / name)


def _pick_scheme(page, name: str) -> None:
    scheme = page.locator("#scheme input")
    scheme.click()
    scheme.fill(name)
    # options read "NAME · the GPUs that serve it"
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} ·")).click()


def test_browser_plan_convert(browser, app_url, hub, tmp_path):
    from playwright.sync_api import expect

    target = "alice/tiny-llama-NVFP4A16"
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, color_scheme="light")
    page.set_default_timeout(30_000)
    page.goto(app_url + "?__theme=light")
    expect(page.locator("#account")).to_contain_text("alice")

    # idle: nothing to cancel, no elapsed time
    expect(page.locator('#progress [data-state="Idle"]')).to_contain_text("nothing is converting")
    expect(page.locator("#progress")).not_to_contain_text("elapsed")
    expect(page.locator("#cancel-btn")).to_be_disabled()

    # source -> suggestions (ignore list, repo name); scheme picker -> blurb and name
    page.locator("#source textarea").fill(SOURCE)
    page.locator("#source textarea").press("Enter")
    expect(page.locator("#repo-name textarea")).to_have_value("tiny-llama-FP8_DYNAMIC")
    _pick_scheme(page, "NVFP4A16")
    expect(page.locator("#scheme-blurb")).to_contain_text("Blackwell")
    expect(page.locator("#repo-name textarea")).to_have_value("tiny-llama-NVFP4A16")
    expect(page.locator("#suggest-notes")).to_contain_text("LlamaForCausalLM")
    expect(page.locator("#ignore textarea")).to_have_value("lm_head\nre:.*embed_tokens$")

    # Plan: tables, not a log
    page.locator("#plan-btn").click()
    expect(page.locator("#plan-overview")).to_contain_text("14 weights quantized")
    shards = page.locator("#plan-shards")
    expect(shards).to_contain_text("model-00001-of-00006.safetensors")
    expect(shards).to_contain_text("model-00006-of-00006.safetensors")
    expect(page.locator("#plan-tensors")).to_contain_text("model.layers.{0..1}.mlp.gate_proj.weight")
    expect(page.locator("#plan-tensors")).to_contain_text("ignored (lm_head)")
    expect(page.locator("#plan-fused")).to_contain_text("q_proj + k_proj + v_proj")
    expect(page.locator("#plan-fused")).to_contain_text("gate_proj + up_proj")
    assert not hub.repo_exists(target)  # a plan writes nothing

    # Convert, slowly enough to see the progress
    hub.set_throttle(down_bytes_per_s=700_000, up_bytes_per_s=300_000)
    try:
        page.locator("#convert-btn").click()
        expect(page.locator('#progress [data-state="Converting"]')).to_be_visible()
        expect(page.locator("#cancel-btn")).to_be_enabled()
        # some bytes read and quantized, uploads still going: the bars are mid-way
        expect(page.locator('#progress [data-stage="quantize"] .sp-nums')).not_to_have_text(
            re.compile(r"^(0 B|waiting)"), timeout=20_000)  # a loaded 2-core runner can take a while
        state = page.locator("#progress [data-state]").get_attribute("data-state")
        _shoot(page, tmp_path, "screenshot.png")
        assert state == "Converting"
        expect(page.locator("#log textarea")).to_have_value(_contains("converting acme/tiny-llama"))
    finally:
        hub.set_throttle(None, None)

    result = page.locator("#result")
    expect(result).to_contain_text("Published", timeout=60_000)
    link = result.locator("a").first
    assert link.get_attribute("href") == f"{hub.url}/{target}"
    card = result.get_by_text("model card", exact=True)
    assert card.get_attribute("href") == f"{hub.url}/{target}/blob/main/README.md"
    expect(result.locator(".streamer-cmd")).to_have_text(f"vllm serve {target}")
    expect(page.locator('#progress [data-state="Done"]')).to_be_visible()
    expect(page.locator("#cancel-btn")).to_be_disabled()
    assert TOKEN not in page.content()
    page.close()
    _check_published(hub, target, "NVFP4A16")


def test_browser_never_overwrites_edits(browser, app_url):
    """Suggestions fill only fields the user has not edited, and only when the source, revision
    or scheme really changed: leaving a field unchanged suggests nothing."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(app_url)
    expect(page.locator("#account")).to_contain_text("alice")
    source, revision = page.locator("#source textarea"), page.locator("#revision textarea")
    name, ignore = page.locator("#repo-name textarea"), page.locator("#ignore textarea")
    source.fill("acme/odd")
    source.press("Enter")
    expect(name).to_have_value("odd-FP8_DYNAMIC")
    expect(page.locator("#suggest-notes")).to_contain_text("Detected")
    name.fill("my-own-name")
    ignore.fill("lm_head")
    # focus in and out of Source and Revision without changing them: nothing is re-suggested
    for _ in range(2):
        source.click()
        revision.click()
        page.locator("#ignore textarea").click()
    page.wait_for_timeout(1500)
    expect(name).to_have_value("my-own-name")
    expect(ignore).to_have_value("lm_head")
    # another scheme: its notes come, the edited fields stay as typed
    _pick_scheme(page, "W4A16")
    expect(page.locator("#suggest-notes")).to_contain_text("W4A16 cannot quantize any weight")
    page.wait_for_timeout(500)
    expect(name).to_have_value("my-own-name")
    expect(ignore).to_have_value("lm_head")
    # a field emptied by the user is the app's to fill again
    name.fill("")
    source.fill(SOURCE)
    source.press("Enter")
    expect(name).to_have_value("tiny-llama-W4A16")
    expect(ignore).to_have_value("lm_head")
    page.close()


def _colors(page, selector: str) -> tuple[float, float]:
    """Relative luminance (0 black … 1 white) of the element's background and text colour."""
    return page.eval_on_selector(selector, """el => {
        // "rgb(r, g, b)" in 0..255, or "color(srgb r g b)" in 0..1 (what color-mix computes to)
        const lum = c => { const scale = c.startsWith('color(') ? 1 : 255;
            const m = c.match(/[\\d.]+/g).map(Number);
            const [r, g, b] = m.slice(0, 3).map(v => { v /= scale; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
            return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        let bg = el, c = getComputedStyle(el).backgroundColor;
        while (c === 'rgba(0, 0, 0, 0)' && bg.parentElement) { bg = bg.parentElement; c = getComputedStyle(bg).backgroundColor; }
        return [lum(c), lum(getComputedStyle(el).color)];
    }""")


def _readable(page, selector: str, dark: bool) -> None:
    bg, fg = _colors(page, selector)
    contrast = (max(bg, fg) + 0.05) / (min(bg, fg) + 0.05)
    assert contrast >= 4.5, (selector, bg, fg)
    assert (bg < fg) == dark, (selector, "dark" if dark else "light", bg, fg)


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_browser_error_cancel_phone(browser, app_url, hub, tmp_path, theme):
    """On a 390 px phone, in each theme: an error shows once (no badge on every output), Cancel
    stops a slow run within about a second and its message is not wiped, stale ETAs go, and
    every box is readable (the theme's colours, none hard-coded)."""
    from playwright.sync_api import expect

    dark = theme == "dark"
    page = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme=theme, device_scale_factor=1)
    page.set_default_timeout(30_000)
    page.goto(f"{app_url}?__theme={theme}")
    expect(page.locator("#account")).to_contain_text("alice")
    expect(page.locator("#cancel-btn")).to_be_disabled()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone

    # one error, shown once, where the user looks
    page.locator("#source textarea").fill("acme/no-such-model")
    page.locator("#plan-btn").click()
    alert = page.locator("#status .streamer-error")
    expect(alert).to_contain_text("acme/no-such-model not found")
    page.wait_for_timeout(500)
    assert page.get_by_text("not found, or it is private").count() == 1
    assert page.locator(".toast-body").count() == 0  # no gr.Error toast
    assert page.get_by_text("Error", exact=True).count() == 0  # no badge stamped on the outputs
    _readable(page, "#status .streamer-error", dark)

    # a slow conversion, cancelled mid-transfer
    target = f"alice/cancel-{theme}"
    page.locator("#source textarea").fill(SOURCE)
    page.locator("#repo-name textarea").fill(f"cancel-{theme}")
    hub.set_throttle(down_bytes_per_s=150_000, up_bytes_per_s=150_000)
    try:
        page.locator("#convert-btn").click()
        expect(page.locator('#progress [data-state="Converting"]')).to_be_visible()
        expect(page.locator('#progress [data-stage="read"] .sp-nums')).to_contain_text(" / ")
        page.wait_for_timeout(1500)  # range reads in flight (each takes many seconds at this rate)
        # the rows reflow on the phone: the bar gets the width, nothing runs off the screen
        bar = page.locator('#progress [data-stage="read"] .sp-bar').bounding_box()
        assert bar["width"] > 250 and bar["x"] + bar["width"] <= 390, bar
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        _readable(page, "#progress .sp-head", dark)
        t0 = time.monotonic()
        page.locator("#cancel-btn").click()
        expect(page.locator("#status")).to_contain_text("Cancelling the conversion to " + target)
        expect(page.locator('#progress [data-state="Cancelled"]')).to_be_visible(timeout=10_000)
        took = time.monotonic() - t0
        read = page.locator('#progress [data-stage="read"] .sp-nums').inner_text()
    finally:
        hub.set_throttle(None, None)
    # whole shards take ~4 s each at this rate: the transfers in flight were cut, not finished
    assert took < 2.5, f"cancel took {took:.1f} s"
    total = read.split(" / ")[1]
    assert not read.startswith(total), read  # the reads were cut, not run to the end
    result = page.locator("#result .streamer-cancelled")
    expect(result).to_contain_text("nothing was committed")
    expect(page.locator("#progress")).not_to_contain_text("ETA")  # no stale promises
    expect(page.locator("#progress")).not_to_contain_text("left")
    expect(page.locator("#cancel-btn")).to_be_disabled()
    _readable(page, "#result .streamer-cancelled", dark)
    assert not hub.repo_exists(target)  # created for the run, removed with it
    _shoot(page, tmp_path, f"screenshot-phone-{theme}.png")
    page.close()



def _pick_extra(page, name: str) -> None:
    box = page.locator("#extra-schemes input")
    box.click()
    box.fill(name)
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} ·")).click()
    page.locator("#scheme-blurb").click()  # close the list
    expect_chip = page.locator("#extra-schemes").get_by_text(re.compile(rf"^{re.escape(name)} ·"))
    expect_chip.first.wait_for()


def _svg_colors(page) -> dict:
    """The chart's computed colours: its first label's luminance against the page behind it, and
    each series' bar colour (what the theme's variables resolved to)."""
    return page.eval_on_selector("#result .streamer-quality svg", """svg => {
        const lum = c => { const m = c.match(/[\\d.]+/g).map(Number);
            const [r, g, b] = m.slice(0, 3).map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
            return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        let bg = svg, c = getComputedStyle(svg).backgroundColor;
        while (c === 'rgba(0, 0, 0, 0)' && bg.parentElement) { bg = bg.parentElement; c = getComputedStyle(bg).backgroundColor; }
        const series = {};
        for (const g of svg.querySelectorAll('g[data-series]')) series[g.dataset.series] = getComputedStyle(g.querySelector('rect')).fill;
        return {text: lum(getComputedStyle(svg.querySelector('text')).fill), bg: lum(c), series};
    }""")


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_browser_fanout_result(browser, app_url, hub, tmp_path, theme):
    """Three schemes from one read, in each theme: the other schemes' names follow the main
    name (a typed one stays), one set of bars, a line per target with the one that failed next
    to those published, and the schemes side by side in the chart, all readable."""
    from playwright.sync_api import expect

    dark = theme == "dark"
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, color_scheme=theme)
    page.set_default_timeout(30_000)
    page.goto(f"{app_url}?__theme={theme}")
    expect(page.locator("#account")).to_contain_text("alice")
    names = page.locator("#extra-names textarea")
    expect(names).to_have_count(0)  # single scheme: the form is as it was
    page.locator("#source textarea").fill("acme/odd")
    page.locator("#source textarea").press("Enter")
    main = page.locator("#repo-name textarea")
    expect(main).to_have_value("odd-FP8_DYNAMIC")
    main.fill(f"odd-{theme}-FP8_DYNAMIC")
    main.press("Enter")
    _pick_extra(page, "INT8")
    _pick_extra(page, "W4A16")
    expect(names).to_have_value(f"INT8: odd-{theme}-INT8\nW4A16: odd-{theme}-W4A16")
    names.fill(f"INT8: odd-{theme}-int8-mine\nW4A16: odd-{theme}-W4A16")
    main.fill(f"odd2-{theme}-FP8_DYNAMIC")
    main.press("Enter")  # the pattern moves on; the typed INT8 name stays
    expect(names).to_have_value(f"INT8: odd-{theme}-int8-mine\nW4A16: odd2-{theme}-W4A16")
    # the dry run: one plan per target, the tables with a Scheme column
    page.locator("#plan-btn").click()
    overview = page.locator("#plan-overview")
    expect(overview).to_contain_text(f"INT8 → alice/odd-{theme}-int8-mine")
    expect(overview).to_contain_text("This target cannot be converted")
    expect(page.locator("#plan-shards")).to_contain_text("Scheme")
    expect(page.locator("#plan-shards")).to_contain_text("INT8")
    _shoot(page, tmp_path, f"screenshot-fanout-plan-{theme}.png")
    page.locator("#convert-btn").click()  # (it brings the Progress tab back)
    result = page.locator("#result")
    expect(result).to_contain_text("2 of 3 targets published", timeout=120_000)
    expect(page.locator('#progress [data-state="Done"]')).to_be_visible()
    assert page.locator('#progress [data-stage="read"]').count() == 1  # one set of bars
    expect(result.locator(".streamer-target")).to_have_count(3)
    ok_line = result.locator(f'[data-target="alice/odd2-{theme}-FP8_DYNAMIC"][data-status="published"]')
    expect(ok_line).to_contain_text("Published")
    expect(result.locator(f'[data-target="alice/odd-{theme}-int8-mine"][data-status="published"]')).to_be_visible()
    failed = result.locator(f'[data-target="alice/odd2-{theme}-W4A16"][data-status="failed"]')
    expect(failed).to_contain_text("not divisible by group_size 128")
    expect(result.locator("svg g[data-series]")).to_have_count(2)
    _readable(page, f'#result [data-target="alice/odd2-{theme}-FP8_DYNAMIC"] .streamer-done', dark)
    _readable(page, f'#result [data-target="alice/odd2-{theme}-W4A16"] .streamer-error', dark)
    _readable(page, "#result .streamer-quality li", dark)
    colors = _svg_colors(page)
    contrast = (max(colors["bg"], colors["text"]) + 0.05) / (min(colors["bg"], colors["text"]) + 0.05)
    assert contrast >= 4.5 and (colors["bg"] < colors["text"]) == dark, colors
    fills = colors["series"]
    assert set(fills) == {"FP8_DYNAMIC", "INT8"} and len(set(fills.values())) == 2, fills
    assert "rgb(0, 0, 0)" not in fills.values(), fills  # a variable that did not resolve draws black
    assert page.get_by_text("Error", exact=True).count() == 0 and page.locator(".toast-body").count() == 0
    assert page.locator("#status .streamer-error").count() == 0  # the failure is said once, on its line
    page.locator("#result .streamer-quality").scroll_into_view_if_needed()
    _shoot(page, tmp_path, f"screenshot-fanout-{theme}.png")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: the lines and the chart fit its width
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    chart = page.locator("#result .streamer-quality svg").bounding_box()
    assert chart["x"] + chart["width"] <= 390, chart
    page.close()
    assert hub.repo_exists(f"alice/odd2-{theme}-FP8_DYNAMIC") and hub.repo_exists(f"alice/odd-{theme}-int8-mine")
    assert not hub.repo_exists(f"alice/odd2-{theme}-W4A16")


def test_browser_queued_conversion_shows_its_place(browser, hub, tmp_path):
    """With every conversion slot taken, a conversion started on the page waits in the queue and
    the progress panel shows its place there."""
    from gradio_client import Client
    from playwright.sync_api import expect

    with _running_app(hub, tmp_path, STREAMER_MAX_CONVERSIONS="1") as url:
        hub.set_throttle(down_bytes_per_s=200_000)
        try:
            busy = Client(url, verbose=False).submit(*_form(repo_name="queue-first"), api_name="/convert")
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(url)
            expect(page.locator("#account")).to_contain_text("alice")
            deadline = time.monotonic() + 30
            while not any('data-state="Converting"' in (out[1] or "") for out in busy.outputs()):
                assert time.monotonic() < deadline, busy.status()
                time.sleep(0.1)
            page.locator("#source textarea").fill(SOURCE)
            page.locator("#repo-name textarea").fill("queue-second")
            page.locator("#convert-btn").click()
            expect(page.locator('#progress [data-state="Queued"]')).to_contain_text("waiting for a free conversion slot")
            expect(page.locator("#progress-tab")).to_contain_text(re.compile(r"queue:?\s*1\s*/\s*1", re.I))
            _shoot(page, tmp_path, "screenshot-queued.png")
            Client(url, verbose=False).predict(api_name="/cancel")  # the first one stops ...
            busy.result(timeout=60)
            # ... and the queued one starts (alice's one slot is free again), and is cancelled too
            expect(page.locator('#progress [data-state="Converting"]')).to_be_visible()
            page.locator("#cancel-btn").click()
            expect(page.locator('#progress [data-state="Cancelled"]')).to_be_visible()
            page.close()
        finally:
            hub.set_throttle(None, None)
    assert not hub.repo_exists("alice/queue-first") and not hub.repo_exists("alice/queue-second")


def _contains(text: str):
    return re.compile(".*" + re.escape(text) + ".*", re.S)


# --------------------------------------------------------------------------------------------
# gradio_client: the same endpoints
# --------------------------------------------------------------------------------------------


def test_client_endpoints(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/plan", "/convert", "/cancel", "/suggest", "/whoami"} <= set(api)
    assert client.predict(api_name="/whoami") == {"name": "alice", "namespaces": ["alice", "acme"]}


def test_client_suggest(client):
    ignore, notes, name = client.predict(SOURCE, "", "W4A16", api_name="/suggest")
    assert ignore.splitlines() == ["lm_head", "re:.*embed_tokens$"]
    assert "LlamaForCausalLM" in notes and name == "tiny-llama-W4A16"
    ignore, notes, name = client.predict("acme/odd", "", "W4A16", api_name="/suggest")
    assert "W4A16 cannot quantize any weight" in notes and name == "odd-W4A16"


def test_client_plan_and_convert(client, hub):
    status, overview, shards, tensors, fused, warnings = client.predict(*_form(), api_name="/plan")
    assert status == ""
    assert "14 weights quantized" in overview and "will be created" in overview
    assert [row[0] for row in shards["data"]][:1] == ["model-00001-of-00006.safetensors"]
    assert len(shards["data"]) == 6
    assert any(row[2] == "quantize" for row in tensors["data"])
    assert not any("q_proj" in str(cell) for row in fused["data"] for cell in row)  # FP8: no global scale
    target = "acme/tiny-llama-FP8_DYNAMIC"
    status, progress, log, result = client.predict(
        *_form(namespace="acme", repo_name=""), api_name="/convert"
    )
    assert status == ""
    assert 'data-state="Done"' in progress
    assert f'href="{hub.url}/{target}"' in result and "model card" in result
    assert f"vllm serve {target}</code>" in result
    assert "Model card preview" in result and "FP8_DYNAMIC" in result.split("Model card preview")[1]
    assert "private" not in result.split("Model card preview")[0]  # a public repo: no private note
    assert "converting acme/tiny-llama" in log
    _check_published(hub, target, "FP8_DYNAMIC")
    # again, as a pull request: main is left alone
    main_before = hub.commits(target)[0].sha
    # the same form again: the repo holds this conversion, so nothing is read or committed
    *_, result = client.predict(*_form(namespace="acme", repo_name=""), api_name="/convert")
    assert "Already up to date" in result and "nothing was converted" in result
    assert hub.commits(target)[0].sha == main_before
    *_, result = client.predict(*_form(namespace="acme", create_pr=True), api_name="/convert")
    assert "Already up to date" in result  # same settings, same bytes: nothing to propose
    *_, result = client.predict(*_form(namespace="acme", ignore="lm_head", create_pr=True), api_name="/convert")
    assert "Pull request opened" in result and "/discussions/" in result
    assert f"{hub.url}/{target}/blob/refs%2Fpr%2F" in result
    assert re.search(rf"vllm serve {re.escape(target)} --revision refs/pr/\d+", result)
    assert hub.commits(target)[0].sha == main_before
    prs = hub.refs(target)["prs"]
    assert prs
    # the same source commit and settings again: the open PR already proposes it, none is added
    *_, result = client.predict(*_form(namespace="acme", ignore="lm_head", create_pr=True), api_name="/convert")
    assert "Already proposed" in result and "/discussions/" in result
    assert hub.refs(target)["prs"] == prs


def test_client_fanout(client, hub):
    """Through the API, the extra schemes are plain text: each gets its repo and its result line."""
    status, progress, log, result = client.predict(
        *_form(source="acme/odd", repo_name="api-odd-FP8_DYNAMIC"), False, "int8", "", api_name="/convert")
    assert status == "" and "2 of 2 targets published" in result
    for repo in ("alice/api-odd-FP8_DYNAMIC", "alice/api-odd-INT8"):
        assert f'data-target="{repo}" data-status="published"' in result and hub.repo_exists(repo)
    msg = _app_error(client, *_form(source="acme/odd"), False, "FP9_MAGIC", "", api_name="/plan")
    assert "Unknown scheme “FP9_MAGIC”" in msg

def test_client_bad_source(client):
    msg = _app_error(client, *_form(source="acme/no-such-model"), api_name="/plan")
    assert "acme/no-such-model not found" in msg
    msg = _app_error(client, *_form(source="not a repo id"), api_name="/plan")
    assert "is not a Hub repo id" in msg
    msg = _app_error(client, *_form(source="../../etc"), api_name="/plan")
    assert "is not a Hub repo id" in msg


def test_client_unknown_scheme(client):
    """Through the API too, an unknown scheme gets the app's sentence, not gradio's choice check."""
    msg = _app_error(client, *_form(scheme="FP9_MAGIC"), api_name="/plan")
    assert "Unknown scheme “FP9_MAGIC”" in msg and "FP8_DYNAMIC" in msg
    assert "not in the list of choices" not in msg


def test_client_gated_source(client, hub):
    msg = _app_error(client, *_form(source="evil/gated-model"), api_name="/plan")
    assert "gated" in msg and f"{hub.url}/evil/gated-model" in msg


def test_client_shape_mismatch(client, hub):
    msg = _app_error(client, *_form(source="acme/odd", scheme="W4A16", ignore="lm_head"), api_name="/plan")
    assert "cannot be converted with these settings" in msg
    assert "in_features 160 is not divisible by group_size 128" in msg
    assert "ignore list" in msg and "--ignore" not in msg
    msg = _app_error(client, *_form(source="acme/odd", scheme="W4A16", ignore="lm_head"), api_name="/convert")
    assert "not divisible by group_size 128" in msg
    assert not hub.repo_exists("alice/odd-W4A16")


def test_client_no_write_access(client, hub):
    msg = _app_error(client, *_form(namespace="evil"), api_name="/plan")
    assert "cannot write to the namespace “evil”" in msg
    msg = _app_error(client, *_form(namespace="evil"), api_name="/convert")
    assert "cannot write" in msg
    assert not hub.repo_exists("evil/tiny-llama-FP8_DYNAMIC")


def test_client_cancel_leaves_target_untouched(app_url, client, hub):
    from gradio_client import Client

    target = "alice/cancel-me"
    hub.create_repo(target, owner_token=TOKEN)
    before = (hub.files(target), [c.sha for c in hub.commits(target)])
    hub.set_throttle(down_bytes_per_s=800_000)
    try:
        job = client.submit(*_form(repo_name="cancel-me"), api_name="/convert")
        deadline = time.monotonic() + 30
        while not any('data-state="Converting"' in (out[1] or "") for out in job.outputs()):
            assert time.monotonic() < deadline, job.status()
            time.sleep(0.1)
        # one conversion per user at a time
        other = Client(app_url, verbose=False)
        msg = _app_error(other, *_form(repo_name="second"), api_name="/convert")
        assert "already have a conversion running" in msg
        assert other.predict(api_name="/cancel").startswith("Cancelling the conversion to alice/cancel-me")
        status, progress, log, result = job.result(timeout=60)
    finally:
        hub.set_throttle(None, None)
    assert "Cancelled" in result and "nothing was committed" in result
    assert 'data-state="Cancelled"' in progress
    assert (hub.files(target), [c.sha for c in hub.commits(target)]) == before
    assert not hub.repo_exists("alice/second")
    # the slot is free again
    assert client.predict(api_name="/cancel") == "No conversion of yours is running."


def test_client_cancel_during_uploads_is_prompt(client, hub, app_work):
    """Cancel while shards are uploading on a slow uplink: the run ends within about a second
    (uploads in flight are stopped, not waited for), the repo created for it is removed, and no
    resume record of it stays on the server's disk."""
    from gradio_client import Client

    target = "alice/cancel-upload"
    records = app_work / "hf-home" / "streamer" / "uploads"
    earlier = set(records.glob("*.json"))  # another test's cancel may have kept its own record
    hub.set_throttle(up_bytes_per_s=100_000)
    try:
        # a scheme no other test here converts to: the Hub must not already hold these bytes
        # (uploads of content it has are skipped, and the run would end at once)
        job = client.submit(*_form(scheme="W8A16", repo_name="cancel-upload"), api_name="/convert")
        deadline = time.monotonic() + 40
        # every byte read and some quantized shards handed to the uploads, which crawl
        while not any(re.search(r'data-stage="read".*?done</span>', out[1] or "") for out in job.outputs()):
            assert time.monotonic() < deadline, job.status()
            time.sleep(0.1)
        # ... and at least one shard uploaded, so a resume record exists
        while not set(records.glob("*.json")) - earlier:
            assert time.monotonic() < deadline, job.status()
            time.sleep(0.1)
        t0 = time.monotonic()
        assert Client(client.src, verbose=False).predict(api_name="/cancel").startswith("Cancelling")
        status, progress, log, result = job.result(timeout=60)
        took = time.monotonic() - t0
    finally:
        hub.set_throttle(None, None)
    assert 'data-state="Cancelled"' in progress and "nothing was committed" in result
    assert took < 2.5, f"cancel took {took:.1f} s"
    assert not hub.repo_exists(target)
    # the record of what was uploaded (tensor names of a possibly private model) went with it
    assert not set(records.glob("*.json")) - earlier


# --------------------------------------------------------------------------------------------
# in-process: whose token, and the sentences
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web():
    """The package streamer.web, each of its modules imported (the app, short of launching it)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _missing("gradio")
    import streamer.web.layout  # imports every other module of the app

    return streamer.web


def test_token_resolution(web, monkeypatch):
    import gradio as gr

    auth, settings = web.auth, web.settings
    monkeypatch.setenv("HF_TOKEN", "hf_server_token")
    user = gr.OAuthToken(token="hf_user_token", scope="openid", expires_at=0)
    mock = gr.OAuthToken(token=settings.MOCK_TOKEN, scope="openid", expires_at=0)
    # a workstation / localhub: the machine's token, unless a caller brings their own
    monkeypatch.setattr(settings, "ON_SPACES", False)
    assert auth.resolve_token(None) == "hf_server_token"
    assert auth.resolve_token(mock) == "hf_server_token"  # gradio's local stand-in is never sent
    assert auth.resolve_token(user) == "hf_user_token"
    assert not web.layout.build_demo().expects_oauth
    # a Space: the signed-in user's token or nothing, never the Space's own secret
    monkeypatch.setattr(settings, "ON_SPACES", True)
    assert auth.resolve_token(user) == "hf_user_token"
    # False, not None: huggingface_hub sends HF_TOKEN (the Space's own secret) for a None token
    assert auth.resolve_token(None) is False
    with pytest.raises(web.wording.UserError, match="Sign in with Hugging Face"):
        auth.require_token(None)
    import gradio.routes

    # gradio would wire the real OAuth routes here (needs the Space's OAUTH_* variables)
    monkeypatch.setattr(gradio.routes, "attach_oauth", lambda fastapi_app: None)
    assert web.layout.build_demo().expects_oauth  # the LoginButton is there
    monkeypatch.setattr(settings, "ALLOW_SERVER_TOKEN", True)
    assert auth.resolve_token(None) == "hf_server_token"


BOB = "hf_bob_token_0123456789"


@pytest.fixture
def space(web, tmp_path, monkeypatch, checkpoint):
    """The app as a Space (SPACE_ID set) that holds alice's token as its own HF_TOKEN secret, in
    front of a localhub where acme/secret is private to alice's organization."""
    import huggingface_hub

    with LocalHub(tmp_path / "hub") as h:
        h.add_user("alice", TOKEN, orgs=["acme"])
        h.add_user("bob", BOB)
        h.seed_repo("acme/secret", checkpoint("llama"), private=True)
        monkeypatch.setenv("SPACE_ID", "acme/streamer")
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # the Space's secret, never a visitor's
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", h.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(web.settings, "ON_SPACES", True)
        monkeypatch.setattr(web.settings, "ALLOW_SERVER_TOKEN", False)
        web.auth.forget_accounts()
        yield web, h
        web.auth.forget_accounts()


def _visitor(token):
    import gradio as gr

    return None if token is None else gr.OAuthToken(token=token, scope="openid", expires_at=0)


def _call(fn, **kwargs) -> str:
    """Run an endpoint's generator to its end; everything it showed (and its error), as text."""
    import gradio as gr

    shown = []
    try:
        for out in fn(**kwargs):
            shown.append(str(out))
    except gr.Error as e:
        shown.append(str(e))
    return "\n".join(shown)


FORM = dict(source="acme/secret", revision="", scheme="FP8_DYNAMIC", ignore="lm_head", namespace="",
            repo_name="secret-copy", private=True, create_pr=False)  # fmt: skip


@pytest.mark.parametrize("visitor", [None, BOB], ids=["signed-out", "bob"])
@pytest.mark.parametrize("endpoint", ["suggest", "plan", "convert"])
def test_space_never_acts_with_its_own_token(space, visitor, endpoint):
    """/suggest, /plan and /convert on a private repo: a signed-out visitor sends no token, a
    signed-in one only theirs; neither learns anything the Space's own token could read."""
    web, hub = space
    hub.clear_log()
    if endpoint == "suggest":
        shown = _call(web.suggestions.suggest, source="acme/secret", revision="", scheme="FP8_DYNAMIC",
                      oauth_token=_visitor(visitor))  # fmt: skip
    else:
        fn = web.plan.plan if endpoint == "plan" else web.convert.run_convert
        shown = _call(fn, **FORM, oauth_token=_visitor(visitor))
    users = {r.user for r in hub.request_log}
    assert "alice" not in users, [(r.method, r.path, r.user) for r in hub.request_log]
    assert "LlamaForCausalLM" not in shown and "weights quantized" not in shown
    assert TOKEN not in shown
    if visitor is None:
        assert users <= {None}
        # planning needs no sign-in (anonymous reads: private repos stay invisible); converting does
        expected = "Sign in with Hugging Face" if endpoint == "convert" else "not found, or it is private"
    else:
        assert users <= {"bob", None} and "bob" in users
        expected = "not found, or it is private"
    assert expected in shown, shown
    assert not hub.repo_exists("bob/secret-copy")


def test_space_signed_out_may_plan_a_public_model(space, checkpoint):
    """A signed-out visitor plans a public model (read anonymously) and is told to sign in to
    convert it; converting it signed out is refused before anything is read or written."""
    web, hub = space
    hub.seed_repo("acme/open", checkpoint("llama"))
    hub.clear_log()
    shown = _call(web.plan.plan, **{**FORM, "source": "acme/open"}, oauth_token=None)
    assert "weights quantized" in shown and "Sign in with Hugging Face to convert it" in shown
    assert {r.user for r in hub.request_log} <= {None}
    hub.clear_log()
    shown = _call(web.convert.run_convert, **{**FORM, "source": "acme/open"}, oauth_token=None)
    assert "Sign in with Hugging Face" in shown and "weights quantized" not in shown
    assert not hub.request_log and not hub.repo_exists("acme/secret-copy")


def test_failed_run_says_the_created_repo_is_there(space, monkeypatch):
    """Every upload fails: the repo the run created stays (empty: nothing committed), and the one
    error says so plainly and that converting again resumes; the next run does publish."""
    import streamer.io.hub_http

    web, hub = space
    monkeypatch.setattr(streamer.io.hub_http, "ATTEMPTS", 1)  # the first server error is final: a fast test
    hub.set_faults(every=1, kinds=("500",), only_paths="preupload|info/lfs|xet|cas")
    try:
        shown = _call(web.convert.run_convert, **{**FORM, "repo_name": "fails-once"}, oauth_token=_visitor(TOKEN))
    finally:
        hub.set_faults(None)
    assert shown.count("streamer-error") == 1, shown
    assert "was created for this run and is still there, empty (nothing was committed)" in shown
    assert "Convert again with the same settings to resume" in shown
    assert hub.repo_exists("alice/fails-once") and not [f for f in hub.files("alice/fails-once") if f.endswith(".safetensors")]
    shown = _call(web.convert.run_convert, **{**FORM, "repo_name": "fails-once"}, oauth_token=_visitor(TOKEN))
    assert "Published" in shown and "streamer-error" not in shown
    assert "is <b>private</b>" in shown  # FORM asks for a private repo: the result says so


def test_too_small_a_budget_creates_nothing(space):
    """An error the headers already show (no tensor fits the memory budget) is refused before
    the target repo is created, so a failed run leaves no empty repo behind."""
    from streamer.engine.convert import convert
    from streamer.errors import StreamerError

    web, hub = space
    with pytest.raises(StreamerError, match="is too small"):
        convert("hub://acme/secret", "hub://alice/too-small", scheme="FP8_DYNAMIC", token=TOKEN, max_memory=1000)
    assert not hub.repo_exists("alice/too-small")


def test_space_token_negative_control(space, monkeypatch):
    """Off Spaces the app does use the machine's token (a workstation): the same /suggest then
    reads the private repo as alice, so the test above would see a leak if there were one."""
    web, hub = space
    monkeypatch.setattr(web.settings, "ON_SPACES", False)
    hub.clear_log()
    shown = _call(web.suggestions.suggest, source="acme/secret", revision="", scheme="FP8_DYNAMIC", oauth_token=None)
    assert "LlamaForCausalLM" in shown
    assert "alice" in {r.user for r in hub.request_log}


def test_sentences(web, monkeypatch):
    from streamer.errors import HubError, PlanError, SchemeError, StreamerError, TargetError

    wording, forms = web.wording, web.forms
    monkeypatch.setattr(web.settings, "ON_SPACES", True)
    msg = wording.sentence(TargetError("target a/b already holds files that streamer did not write (x…)",
                                       hints=(Hint("target"), Hint("overwrite"))))  # fmt: skip
    assert "--" not in msg and "pull request" in msg
    problems = [f"model.layers.{i}.mlp.down_proj.weight: weight of shape [64, 100]: in_features 100 is not "
                "divisible by group_size 16" for i in range(4)]  # fmt: skip
    msg = wording.sentence(PlanError(problems + ["x.weight: name clash between a and b"], hints=(Hint("ignore"),)))
    assert "model.layers.{0..3}.mlp.down_proj.weight" in msg and msg.count("in_features 100") == 1
    assert "add this module to the ignore list" in msg and "name clash" in msg
    # engine errors whose hints name command-line options or syntax, worded for the form (no flags)
    for engine, web in [
        (HubError("revision not found in a/b", hints=(Hint("revision"),)), "in “Revision”"),
        (SchemeError("the source is already quantized with FP8, which is what FP8_DYNAMIC writes: nothing to "
                     "convert", hints=(Hint("force"),)), "pick another scheme"),
        (PlanError(["2 weight(s) have shapes W4A16 cannot serve. To keep them unquantized, add these ignore "
                    "entries: 'a' 'b'"], hints=(Hint("ignore", ("a", "b")), Hint("skip_incompatible"))),
         "tick “Keep weights"),
        (StreamerError("x.weight holds 3 NaN value(s). Fix the checkpoint",
                       hints=(Hint("ignore", "x"), Hint("nonfinite", "passthrough"))), "Fix the checkpoint"),
        (StreamerError("the memory budget of 1 MB is too small: a piece needs 3 MB",
                       hints=(Hint("max_memory", "4 MB"),)), "too small"),
        (StreamerError("embeddings (2): a, b — lookup tables", hints=(Hint("default_ignore"),)), "lookup tables"),
    ]:  # fmt: skip
        msg = wording.sentence(engine)
        assert web in msg and "--" not in msg and "@" not in msg, msg
    # an engine note (not an error) carries its hint like an error: the Space words it itself
    from streamer.engine.progress import Progress
    from streamer.errors import Note

    said = []
    Progress(listeners=[lambda e: said.append(e.message)], hint_words=wording.web_words).note(
        Note("target a/b will be created as a private repo because the source is private or gated", (Hint("public"),))
    )
    assert "this Space keeps such a copy private" in said[0] and "--" not in said[0], said
    msg = wording.sentence(RuntimeError("secret internals /root/.cache"))
    assert "Something went wrong on our side (RuntimeError)" in msg and "secret" not in msg
    with pytest.raises(wording.UserError, match="not a Hub repo id"):
        forms.parse_source("/etc/passwd", "")
    assert forms.parse_source("acme/x@v1", "") == ("acme/x", "v1")
    assert forms.parse_source("acme/x@v1", "main") == ("acme/x", "main")
    assert forms.source_spec("acme/x", None) == "hub://acme/x"


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_hint_setting_has_words_on_the_form(web, monkeypatch, setting):
    """Each setting a hint can name is worded for the page (on a Space and off it), never as a flag."""
    for on_spaces in (True, False):
        monkeypatch.setattr(web.settings, "ON_SPACES", on_spaces)
        for hint in (Hint(setting), Hint(setting, "x"), Hint(setting, ("a", "b"))):
            words = web.wording.web_words(hint)
            assert words and "--" not in words, (hint, words)


def test_hints_in_the_forms_words(web, monkeypatch):
    from streamer.errors import PlanError, StreamerError

    wording = web.wording
    monkeypatch.setattr(web.settings, "ON_SPACES", True)
    e = StreamerError("the weight of model.x cannot be quantized", hints=(Hint("ignore", "model.x"), Hint("skip_incompatible")))
    assert wording.sentence(e) == (
        "the weight of model.x cannot be quantized: add “model.x” to the ignore list "
        "or tick “Keep weights the scheme cannot serve unquantized”"
    )
    assert wording.sentence(StreamerError("no access", hints=(Hint("token"),))) == "no access: sign in with Hugging Face"
    monkeypatch.setattr(web.settings, "ON_SPACES", False)
    assert "HF_TOKEN" in wording.sentence(StreamerError("no access", hints=(Hint("token"),)))
    # a plan's problems are listed first, the ways past them after
    msg = wording.sentence(PlanError(["a.weight: too wide"], hints=(Hint("ignore", "a"),)))
    assert msg.splitlines()[-2:] == ["- a.weight: too wide", "To convert it: add “a” to the ignore list"]
    msg = wording.sentence(PlanError(["a.weight: too wide"], hints=(Hint("ignore", ("a", "re:b.*")), Hint("scheme", ("W8A16", "INT8")))))
    assert msg.splitlines()[-1] == (
        "To convert it: add these lines to the ignore list: “a”, “re:b.*” or pick one of W8A16, INT8 as the scheme"
    )


def test_space_plan_of_a_shape_the_scheme_cannot_serve(space, checkpoint):
    """The engine's own error (MLP shapes W4A16 cannot serve), through the app's plan: the form's
    words for what to change, no command-line flag."""
    web, hub = space
    hub.seed_repo("acme/narrow", checkpoint("llama", intermediate_size=320))
    shown = _call(web.plan.plan, **{**FORM, "source": "acme/narrow", "scheme": "W4A16"}, oauth_token=_visitor(TOKEN))
    assert "cannot be converted with these settings" in shown and "mlp.down_proj" in shown
    assert "to the ignore list" in shown and "tick “Keep weights the scheme cannot serve unquantized”" in shown
    assert "--" not in shown, shown



# --------------------------------------------------------------------------------------------
# fan-out: several schemes from one read of the source
# --------------------------------------------------------------------------------------------


def _last(fn, **kwargs):
    """Run an endpoint's generator to its end: (its last outputs, the gr.Error it raised or None)."""
    import gradio as gr

    last = None
    try:
        for out in fn(**kwargs):
            last = out
    except gr.Error as e:
        return last, e
    return last, None


def _source_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _series(html: str) -> list[str]:
    return re.findall(r'<g data-series="([^"]+)"', html)


def test_space_fanout_publishes_each_scheme_from_one_read(space, checkpoint):
    """Two schemes through the app's convert handler: two repos, each its own commit and card,
    from one read of the source; one set of bars; a result line per target; the quality chart
    has a series per scheme, coloured by the theme's variables only."""
    web, hub = space
    hub.clear_log()
    (status, progress, log, result), error = _last(
        web.convert.run_convert, **{**FORM, "repo_name": "secret-FP8_DYNAMIC"}, extra_schemes=["W8A16"],
        extra_names="", oauth_token=_visitor(TOKEN))  # fmt: skip
    assert error is None and status == ""
    targets = {"alice/secret-FP8_DYNAMIC": "float-quantized", "alice/secret-W8A16": "pack-quantized"}
    for repo, fmt in targets.items():
        qc = json.loads(hub.read_file(repo, "config.json"))["quantization_config"]
        assert qc["format"] == fmt
        assert [c for c in hub.commits(repo) if "Quantize" in c.message][:1] and len(hub.commits(repo)) <= 2
        assert f'data-target="{repo}" data-status="published"' in result
        assert f"vllm serve {repo}</code>" in result
        assert f"Model card preview: {repo}" in result
    # each source byte read once, for both targets (two reads would be twice the files)
    fetched = sum(r.bytes_out for r in hub.request_log if r.method == "GET" and r.repo_id == "acme/secret"
                  and (r.file or "").endswith(".safetensors"))  # fmt: skip
    assert 0 < fetched <= _source_bytes(checkpoint("llama")), fetched
    assert "2 of 2 targets published" in result
    assert progress.count('data-stage="read"') == 1 and 'data-state="Done"' in progress  # one set of bars
    assert "alice/secret-W8A16: " in log and "hub://" not in log
    assert _series(result) == ["FP8_DYNAMIC", "W8A16"]
    chart = result[result.index("<svg"):]
    assert "var(--color-" in chart and "var(--body-text-color)" in chart
    assert not re.search(r"#[0-9a-fA-F]{3,8}\b", chart)  # no hard-coded colour: both themes read it


def test_space_fanout_one_failing_target_hides_no_other(space, checkpoint):
    """A scheme the model's shapes cannot take fails alone: its line says why in the form's
    words, next to the targets that were published; nothing is created for it. When every target
    fails, the API says each one's reason."""
    web, hub = space
    hub.seed_repo("acme/odd", checkpoint("odd"))
    form = {**FORM, "source": "acme/odd", "repo_name": "", "private": False}
    (status, progress, log, result), error = _last(
        web.convert.run_convert, **form, extra_schemes=["W4A16", "INT8"], extra_names="INT8: odd-int8",
        oauth_token=_visitor(TOKEN))  # fmt: skip
    assert error is None and status == ""  # the page's one place for errors stays clear: the lines say it
    assert 'data-target="alice/odd-FP8_DYNAMIC" data-status="published"' in result
    assert 'data-target="alice/odd-int8" data-status="published"' in result  # the name typed for INT8
    failed = re.search(r'data-target="alice/odd-W4A16" data-status="failed">(.*?)</div></div>', result, re.S)
    assert failed, result
    line = failed.group(1)
    assert "streamer-error" in line and "not divisible by group_size 128" in line
    assert "to the ignore list" in line and "--" not in line
    assert result.count("streamer-error") == 1 and "2 of 3 targets published" in result
    assert 'data-state="Done"' in progress
    assert _series(result) == ["FP8_DYNAMIC", "INT8"]
    assert hub.repo_exists("alice/odd-FP8_DYNAMIC") and hub.repo_exists("alice/odd-int8")
    assert not hub.repo_exists("alice/odd-W4A16")
    # every target failing: the API raises, with each target's reason
    (status, progress, log, result), error = _last(
        web.convert.run_convert, **{**form, "scheme": "W4A16"}, extra_schemes="FP8_BLOCK", extra_names="",
        oauth_token=_visitor(TOKEN))  # fmt: skip
    assert error is not None and 'data-state="Failed"' in progress
    assert "W4A16 → alice/odd-W4A16" in str(error) and "FP8_BLOCK → alice/odd-FP8_BLOCK" in str(error)
    assert not hub.repo_exists("alice/odd-W4A16") and not hub.repo_exists("alice/odd-FP8_BLOCK")


def test_space_fanout_plan_has_a_plan_per_target(space, checkpoint):
    """The dry run of a fan-out: a section per target (its plan, or why it cannot be converted)
    and the tables of every plan with a Scheme column; nothing is written."""
    web, hub = space
    hub.seed_repo("acme/odd", checkpoint("odd"))
    form = {**FORM, "source": "acme/odd", "repo_name": "odd-fp8_dynamic", "private": False}
    (status, overview, shards, tensors, fused, warnings), error = _last(
        web.plan.plan, **form, extra_schemes=["W4A16", "INT8"], extra_names="", oauth_token=_visitor(TOKEN))
    assert error is None and status == ""
    assert "#### FP8_DYNAMIC → alice/odd-fp8_dynamic" in overview and "#### INT8 → alice/odd-INT8" in overview
    assert "#### W4A16 → alice/odd-W4A16" in overview
    w4 = overview.split("#### W4A16")[1].split("####")[0]
    assert "This target cannot be converted" in w4 and "not divisible by group_size 128" in w4
    assert "\n\nTo convert it: pick one of" in w4  # its own paragraph, not glued to the last problem
    assert overview.count("will be created") == 2 and overview.count("weights quantized") == 2
    assert list(shards.columns)[0] == "Scheme" and set(shards["Scheme"]) == {"FP8_DYNAMIC", "INT8"}
    assert list(tensors.columns)[0] == "Scheme" and set(tensors["Scheme"]) == {"FP8_DYNAMIC", "INT8"}
    assert not any(hub.repo_exists(f"alice/odd-{s}") for s in ("fp8_dynamic", "INT8", "W4A16"))
    # the single-scheme plan is as it was: no Scheme column
    (status, overview, shards, *_), error = _last(web.plan.plan, **form, oauth_token=_visitor(TOKEN))
    assert error is None and "####" not in overview and list(shards.columns)[0] == "Output shard"
    # two targets named alike are refused before anything is read
    (status, *_), error = _last(web.plan.plan, **form, extra_schemes=["INT8"], extra_names="INT8: odd-fp8_dynamic",
                                oauth_token=_visitor(TOKEN))  # fmt: skip
    assert "would both publish to alice/odd-fp8_dynamic" in str(error)


def test_space_fanout_cancel_commits_nothing_anywhere(space):
    """Cancel stops every target of a fan-out: each line says nothing was committed, the repos
    created for the run are removed, and the panel reads Cancelled."""
    import threading

    web, hub = space
    outs: list = []
    form = {**FORM, "repo_name": "halt-FP8_DYNAMIC"}
    hub.set_throttle(down_bytes_per_s=150_000)
    try:
        run = threading.Thread(target=lambda: outs.extend(web.convert.run_convert(
            **form, extra_schemes=["INT8"], extra_names="", oauth_token=_visitor(TOKEN))))  # fmt: skip
        run.start()
        deadline = time.monotonic() + 30
        while not any('data-state="Converting"' in str(o[1]) for o in outs):
            assert time.monotonic() < deadline and run.is_alive(), outs[-1:]
            time.sleep(0.1)
        assert web.slots.cancel("alice").target == "alice/halt-FP8_DYNAMIC, alice/halt-INT8"
        run.join(30)
    finally:
        hub.set_throttle(None, None)
    assert not run.is_alive()
    status, progress, log, result = outs[-1]
    assert status == "" and 'data-state="Cancelled"' in progress
    for repo in ("alice/halt-FP8_DYNAMIC", "alice/halt-INT8"):
        assert f'data-target="{repo}" data-status="cancelled"' in result
        assert f"nothing was committed to {repo}. It was created for this run and has been removed." in result
        assert not hub.repo_exists(repo)
    assert "0 of 2 targets published" in result

def test_extra_names_follow_the_main_name_and_never_overwrite(web):
    """The other schemes' repo names follow the main target's pattern, line by line; a line the
    user typed is never rewritten (and comes back when its scheme is picked again); the field is
    hidden while no extra scheme is picked."""
    fill = web.suggestions.fill_extra_names
    update, memo = fill(SOURCE, "", "FP8_DYNAMIC", "", ["W4A16", "NVFP4A16", "FP8_DYNAMIC"], "", None)
    assert update["value"] == "W4A16: tiny-llama-W4A16\nNVFP4A16: tiny-llama-NVFP4A16" and update["visible"]
    typed = "W4A16: my-w4\nNVFP4A16: tiny-llama-NVFP4A16"
    update, memo = fill(SOURCE, "", "FP8_DYNAMIC", "Tiny-fp8_dynamic-v2", ["W4A16", "NVFP4A16"], typed, memo)
    assert update["value"] == "W4A16: my-w4\nNVFP4A16: Tiny-NVFP4A16-v2"  # the pattern of the typed main name
    update, memo = fill(SOURCE, "", "FP8_DYNAMIC", "", ["NVFP4A16"], update["value"], memo)
    assert update["value"] == "NVFP4A16: tiny-llama-NVFP4A16"
    update, memo = fill(SOURCE, "", "FP8_DYNAMIC", "", ["NVFP4A16", "W4A16"], update["value"], memo)
    assert update["value"] == "NVFP4A16: tiny-llama-NVFP4A16\nW4A16: my-w4"
    update, memo = fill(SOURCE, "", "FP8_DYNAMIC", "", [], update["value"], memo)
    assert update["visible"] is False and update["value"] == ""
    # a line still being typed is left alone
    update, _ = fill(SOURCE, "", "FP8_DYNAMIC", "", ["W4A16"], "W4A16 my", memo)
    assert update == {"__type__": "update"}
    assert web.forms.extra_target_name("plain", "FP8_DYNAMIC", "W4A16") == "plain-W4A16"


def test_scheme_picker_order(web):
    """The picker lists what people use first, each with the GPUs that serve it; every accepted
    preset appears once, and the rarely served ones come last, marked experimental."""
    from streamer.quant.schemes import accepted_presets

    choices = web.layout.scheme_choices()
    values = [v for _, v in choices]
    assert values[:7] == ["FP8_DYNAMIC", "FP8_BLOCK", "W4A16", "NVFP4A16", "MXFP4A16", "W8A16", "INT8"]
    assert sorted(values) == sorted(accepted_presets())
    labels = dict((v, label) for label, v in choices)
    assert "H100" in labels["FP8_DYNAMIC"] and "B200" in labels["NVFP4A16"]
    rare = [v for v in values if "experimental" in labels[v]]
    assert {"W2A4", "W3A8"} <= set(rare) and values[-len(rare):] == rare


def test_rates_over_a_window(web):
    """Rates come from the last seconds, not from the first burst, and decay when a transfer stalls."""
    from streamer.engine.progress import ProgressEvent

    w = web.progress.RateWindow()
    w.add(0.0, {"read": ProgressEvent("read", done=0, total=100)})
    w.add(0.5, {"read": ProgressEvent("read", done=50, total=100)})  # a first piece lands at once
    assert w.rates(0.5) == {}  # too short a span to say anything honest
    for t in range(1, 12):
        w.add(float(t), {"read": ProgressEvent("read", done=50 + t, total=100)})
    assert w.rates(11.0)["read"] == pytest.approx(1.0, rel=0.2)  # 1 B/s, the burst aged out
    html = web.progress.progress_html({"read": ProgressEvent("read", done=61, total=100)}, 11, "Converting", w.rates(11.0))
    assert "ETA" in html and "1 B/s" in html.replace(".00", "")
    assert "ETA" not in web.progress.progress_html({"read": ProgressEvent("read", 61, 100)}, 11, "Cancelled", w.rates(11.0))


def test_range_reads_report_bytes_as_they_arrive(hub, monkeypatch):
    """A range read tells the pipeline about its bytes as they arrive, not once per piece."""
    from streamer.io.hub_source import HubSource
    from streamer.io.source import Span

    monkeypatch.setattr(HubSource, "REPORT_BYTES", 64 << 10)
    with HubSource(SOURCE, token=TOKEN, endpoint=hub.url) as src:
        name, size = max(src.files().items(), key=lambda kv: kv[1] if kv[0].endswith(".safetensors") else 0)
        seen = []
        src.on_bytes = seen.append
        out = bytearray(size)
        src.read_into(name, Span(0, size), memoryview(out))
    assert sum(seen) == size and len(seen) >= 4  # in steps of about 64 kB, not once at the end


def test_space_files(tmp_path):
    """space/ + app.py make a Space: front matter, requirements, the app and the engine."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("space_deploy", REPO_ROOT / "space" / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    staged = deploy.stage(tmp_path / "space")
    readme = (staged / "README.md").read_text()
    assert readme.startswith("---\n")
    meta = yaml.safe_load(readme.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert re.fullmatch(r"6\.\d+\.\d+", str(meta["sdk_version"]))
    assert meta["hf_oauth"] is True
    assert {"read-repos", "write-repos", "manage-repos"} <= set(meta["hf_oauth_scopes"])
    assert meta["suggested_hardware"]
    assert (staged / "app.py").is_file() and (staged / "streamer" / "engine" / "convert.py").is_file()
    assert (staged / "streamer" / "engine" / "suggest.py").is_file()
    assert (staged / "streamer" / "web" / "layout.py").is_file()  # app.py is only the entry point
    reqs = (staged / "requirements.txt").read_text()
    for pkg in ("torch", "compressed-tensors", "safetensors", "huggingface_hub", "authlib", "itsdangerous"):
        assert re.search(rf"^{re.escape(pkg)}\b", reqs, re.M), pkg
    assert not list(staged.rglob("__pycache__"))
    # what a Space never runs is not shipped; the app still imports without it
    assert not (staged / "streamer" / "localhub").exists()
    assert not (staged / "streamer" / "demo.py").exists() and not (staged / "streamer" / "webhook.py").exists()
    check = subprocess.run([sys.executable, "-c", "import app"], cwd=staged, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(staged)}, timeout=120)  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
    # CPU hardware (the default): torch's CPU build; --gpu: PyPI's CUDA build on GPU hardware
    assert re.search(r"^--extra-index-url https://download.pytorch.org/whl/cpu$", reqs, re.M)
    gpu = deploy.stage(tmp_path / "gpu", gpu=True)
    assert "download.pytorch.org" not in (gpu / "requirements.txt").read_text()
    assert re.search(r"^torch\b", (gpu / "requirements.txt").read_text(), re.M)
    assert yaml.safe_load((gpu / "README.md").read_text().split("---\n")[1])["suggested_hardware"] == "l4x1"


def test_two_users_never_publish_to_one_repo_at_once():
    """Two conversions committing to one repo: the second would fail at its commit, and a cancel of
    the first would delete the repo under it. The page refuses the second one up front."""
    from streamer.web import slots
    from streamer.web.wording import UserError

    alice = slots.claim("alice", "acme/m-FP8, acme/m-W4A16", ["acme/m-FP8", "acme/m-W4A16"])
    try:
        with pytest.raises(UserError, match="Another conversion is publishing to acme/m-w4a16"):
            slots.claim("bob", "Acme/M-W4A16")  # repo ids are case-insensitive
        bob = slots.claim("bob", "acme/m-NVFP4A16")  # another repo of the same org: fine
        slots.release("bob", bob)
    finally:
        slots.release("alice", alice)
    slots.release("bob", slots.claim("bob", "acme/m-W4A16"))  # free once alice's run ended
