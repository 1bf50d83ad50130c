"""The dashboard in a real browser (Debian's headless Chromium through Selenium), run by
tests/ui.rs against a `vgrid up` where alice runs the sample VM and bob has none.

Environment: VGRID_URL, VM_NAME, VM_ID, ALICE_TOKEN, BOB_TOKEN (from `vgrid login
--print-token`), SHOTS (a directory for the screenshots). Prints one `ok: ...` line per check
and exits 0; any failed check raises (exit status 1) after a screenshot of the page.
Selenium uses /usr/bin/chromedriver and /usr/bin/chromium, and never downloads anything.
"""

import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL = os.environ["VGRID_URL"].rstrip("/")
VM_NAME = os.environ["VM_NAME"]
VM_ID = os.environ["VM_ID"]
SHOTS = os.environ["SHOTS"]
# Generous bounds for waiting on a shared, loaded machine: they are not measurements.
WAIT = 120

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-sync",
    "--disable-component-update",
    "--disable-background-networking",
    "--metrics-recording-only",
    "--no-first-run",
    "--disable-default-apps",
    "--window-size=1400,1000",
]


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = "/usr/bin/chromium"
    for f in FLAGS:
        o.add_argument(f)
    # The grid's certificate is signed by its own CA, which this fresh profile does not know.
    o.accept_insecure_certs = True
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=o, service=Service(executable_path="/usr/bin/chromedriver"))


def ok(msg):
    print(f"ok: {msg}", flush=True)


def shot(d, name):
    path = os.path.join(SHOTS, f"{name}.png")
    d.save_screenshot(path)
    print(f"screenshot: {path}", flush=True)


def wait(d, what, cond, timeout=WAIT):
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.25).until(lambda _: cond())
    except TimeoutException:
        shot(d, "failed-" + "".join(c if c.isalnum() else "-" for c in what)[:40])
        for line in d.get_log("browser")[-20:]:
            print(f"browser: {line}", flush=True)
        raise AssertionError(f"timed out waiting for {what}; page: {d.find_element(By.TAG_NAME, 'body').text[:2000]}")


def text(d, css):
    try:
        els = d.find_elements(By.CSS_SELECTOR, css)
        return els[0].text if els else ""
    except StaleElementReferenceException:
        # Replaced while read (the page re-renders live): read again at the next poll.
        return ""


def login(d, token, user):
    d.get(f"{URL}/ui/")
    wait(d, "the login page", lambda: d.find_elements(By.ID, "token"))
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.ID, "login-button").click()
    wait(d, f"being logged in as {user}", lambda: text(d, "#who").startswith(user))
    cookies = {c["name"]: c for c in d.get_cookies()}
    c = cookies.get("vgrid_session")
    assert c and c["httpOnly"] and c.get("sameSite") == "Strict" and c["secure"], f"session cookie: {c}"
    # The page's scripts cannot read it.
    assert "vgrid_session" not in d.execute_script("return document.cookie"), "the cookie is readable by scripts"
    ok(f"logged in as {user}: HttpOnly, Secure, SameSite=Strict cookie")


def vm_state(d):
    return text(d, f'#vms tr[data-vm="{VM_NAME}"] .state')


def alice_lists_and_refusals(d):
    wait(d, f"{VM_NAME} running in the VM list", lambda: vm_state(d) == "running")
    row = text(d, f'#vms tr[data-vm="{VM_NAME}"]')
    ok(f"vm {VM_NAME} listed as running: {row!r}")
    shot(d, "vms")
    # A refusal, shown as the API words it.
    d.find_element(By.ID, "run-image").send_keys("no-such-image")
    d.find_element(By.ID, "run-button").click()
    wait(d, "the refusal", lambda: d.find_element(By.ID, "error").is_displayed())
    err = text(d, "#error")
    assert "no-such-image" in err and "(HTTP 404)" in err, err
    ok(f"refusal shown: {err}")
    shot(d, "refusal")
    d.get(f"{URL}/ui/#/hosts")
    wait(d, "a host", lambda: d.find_elements(By.CSS_SELECTOR, "#hosts tr[data-host] .state"))
    ok(f"hosts: {text(d, '#hosts tbody tr')!r}")
    shot(d, "hosts")
    d.get(f"{URL}/ui/#/images")
    wait(d, "the sample image", lambda: d.find_elements(By.CSS_SELECTOR, '#images tr[data-image^="sample@"]'))
    ok(f"images: {text(d, '#images tbody tr')!r}")
    shot(d, "images")


def alice_consoles(d):
    d.get(f"{URL}/ui/#/vms")
    wait(d, "the VM's link", lambda: d.find_elements(By.LINK_TEXT, VM_NAME))
    d.find_element(By.LINK_TEXT, VM_NAME).click()
    wait(d, "the serial console", lambda: text(d, "#console-status") == "connected")
    term = d.find_element(By.CSS_SELECTOR, "#terminal .xterm-screen")
    term.click()
    rows = lambda: d.execute_script("return document.querySelector('#terminal .xterm-rows').innerText")  # noqa: E731
    # A fresh prompt first (the shell may be busy printing), then the command.
    ActionChains(d).send_keys("\n").perform()
    ActionChains(d).send_keys("echo vgrid-ui-$((6*7))\n").perform()
    wait(d, "the guest's answer in the terminal", lambda: "vgrid-ui-42" in rows())
    ok("serial console answered: vgrid-ui-42")
    shot(d, "console")
    d.find_element(By.ID, "vnc-connect").click()
    wait(d, "the graphical console", lambda: text(d, "#vnc-status") == "connected")
    pixels = """
        const c = document.querySelector('#vnc canvas');
        if (!c || !c.width || !c.height) return null;
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) if (px[i] | px[i + 1] | px[i + 2]) n++;
        return [c.width, c.height, n];
    """
    frame = wait(d, "a non-blank frame", lambda: (lambda f: f if f and f[2] > 0 else None)(d.execute_script(pixels)))
    ok(f"graphical console: canvas {frame[0]}x{frame[1]}, {frame[2]} non-blank pixels")
    d.execute_script("document.getElementById('vnc').scrollIntoView()")
    shot(d, "vnc")
    d.execute_script("window.scrollTo(0, 0)")


def alice_stops(d):
    d.find_element(By.CSS_SELECTOR, '#vm-actions button[data-action="stop"]').click()
    wait(d, "the VM stopped", lambda: text(d, "#vm-head .state") == "stopped")
    ok(f"stopped from the page: {text(d, '#vm-head')!r}")
    wait(d, "the console closed", lambda: text(d, "#console-status") == "disconnected")
    shot(d, "stopped")
    d.find_element(By.ID, "logout").click()
    wait(d, "the login page after logging out", lambda: d.find_elements(By.ID, "token"))
    assert not [c for c in d.get_cookies() if c["name"] == "vgrid_session"], "the cookie outlived the logout"
    status = d.execute_script("return fetch('/api/v1/whoami').then(r => r.status)")
    assert status == 401, status
    ok("logged out: cookie cleared, whoami 401")


def bob_is_refused(d):
    login(d, os.environ["BOB_TOKEN"], "bob")
    wait(d, "bob's (empty) VM list", lambda: "No VMs yet" in text(d, "#vms"))
    assert not d.find_elements(By.CSS_SELECTOR, f'#vms tr[data-vm="{VM_NAME}"]')
    ok(f"bob's list does not show {VM_NAME}")
    d.get(f"{URL}/ui/#/vm/{VM_ID}")
    wait(d, "the refusal of alice's VM", lambda: text(d, "#vm-refused"))
    refused = text(d, "#vm-refused")
    assert "(HTTP 403)" in refused and "another user" in refused, refused
    ok(f"bob's page of alice's VM: {refused}")
    shot(d, "bob-refused")
    # Alice's streams, opened from bob's page with bob's cookie, never open.
    probe = """
        const done = arguments[arguments.length - 1];
        const ws = new WebSocket(arguments[0]);
        ws.onopen = () => done('opened');
        ws.onclose = (e) => done('closed ' + e.code);
    """
    for stream in ["console", "vnc"]:
        ws = URL.replace("https://", "wss://") + f"/api/v1/vms/{VM_ID}/{stream}/ws"
        r = d.execute_async_script(probe, ws)
        assert r.startswith("closed"), r
        why = d.execute_script(
            "return fetch(arguments[0]).then(async r => r.status + ' ' + (await r.json()).error)",
            f"/api/v1/vms/{VM_ID}/{stream}/ws",
        )
        assert why.startswith("403 "), why
        ok(f"bob's {stream} WebSocket to alice's VM refused ({r}): {why}")


def main():
    d = browser()
    d.set_script_timeout(30)
    try:
        login(d, os.environ["ALICE_TOKEN"], "alice")
        alice_lists_and_refusals(d)
        alice_consoles(d)
        alice_stops(d)
        bob_is_refused(d)
    except Exception:
        shot(d, "failed")
        raise
    finally:
        d.quit()
    print("dashboard: all checks passed", flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"dashboard: {time.time() - t0:.1f} s", file=sys.stderr)
