"""`corolla monitor` against a live swarm of its own: the JSON state, then the page in headless Chromium.

A fresh swarm (bootstrap + two tiny-llama servers, [0:4) and [4:8)), because the test stops servers: first
SIGTERM on one (it announces offline before exiting, so the gap shows at the next read), then SIGKILL on
the other (its records just expire). The page is checked through the data-* attributes the dashboard
puts on its elements (data-coverage on block cells, data-state on server bars). Screenshots go to
tests/artifacts/ (gitignored). Without chromium/chromedriver the JSON part still runs and the test is
then skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from swarm_harness import Swarm

from corolla.wire.records import ServerState

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
GUARD = 120  # seconds; only catches a hang
PREFIX = "tiny-llama"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes via a proxy


def fetch_state(url: str) -> dict:
    with NO_PROXY.open(url + "api/v1/state", timeout=30) as response:
        return json.load(response)


def wait_for(what: str, check, timeout: float = GUARD):
    """Poll ``check()`` until it returns something truthy; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def model_of(state: dict) -> dict | None:
    return next((m for m in state["models"] if m["dht_prefix"] == PREFIX), None)


def states_by_name(model: dict) -> dict[str, str]:
    return {s["name"]: s["info"]["state"] for s in model["servers"]}


def start_browser(tmp_path: Path):
    """Headless Debian Chromium through its own chromedriver, or None when either is not installed."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(
        service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")), options=options
    )


def page_view(driver) -> dict:
    """What the page shows now, read from the dashboard's data-* attributes in one script call."""
    return driver.execute_script(
        """
        const section = document.querySelector(`section.model[data-model="${arguments[0]}"]`);
        if (!section) return null;
        return {
          gaps: section.getAttribute("data-gaps"),
          coverage: [...section.querySelectorAll(".cell[data-block]")].map((c) => c.getAttribute("data-coverage")),
          bars: Object.fromEntries([...section.querySelectorAll(".bar[data-server-name]")].map(
            (b) => [b.getAttribute("data-server-name"), b.getAttribute("data-state")])),
          rows: [...section.querySelectorAll("table.servers tbody tr")].map((r) => r.getAttribute("data-server-name")),
          gapNote: (section.querySelector(".gap-note") || {}).textContent || null,
          status: document.getElementById("status").getAttribute("data-status"),
          swarm: document.getElementById("swarm").textContent,
          headers: [...section.querySelectorAll("table.servers thead th")].map((h) => h.textContent),
          cells: [...section.querySelectorAll("table.servers tbody tr")].map((r) => [...r.children].map((c) => c.textContent)),
        };
        """,
        PREFIX,
    )


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "Chromium did not write a screenshot"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    print(f"dashboard screenshot: {ARTIFACTS / name}")
    return ARTIFACTS / name


@pytest.fixture
def swarm(processes, tiny_llama, tmp_path):
    swarm = Swarm(processes, tmp_path)
    swarm.start_dht()
    for name, blocks in (("a", "0:4"), ("b", "4:8")):
        swarm.start_server(name, tiny_llama, "--block_indices", blocks, wait=False)
    for proc in swarm.servers.values():
        swarm.wait_state(proc, ServerState.ONLINE, PREFIX)
    yield swarm
    swarm.close()


def test_monitor_shows_servers_then_the_gap(swarm, processes, tiny_llama, tmp_path):
    cmd = ["-m", "corolla.cli.main", "monitor", "--initial_peers", *swarm.initial_peers,
           "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--model", str(tiny_llama),
           "--host", "127.0.0.1", "--port", "0", "--refresh", "0.5"]  # fmt: skip
    monitor = processes.start(cmd, "monitor", stdout=subprocess.PIPE)
    url = monitor.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), f"monitor printed {url!r}; log:\n{monitor.log_path.read_text()}"

    # the JSON state: both servers online, every block covered once
    state = wait_for("both servers online in /api/v1/state", lambda: (m := model_of(fetch_state(url)))
                     and states_by_name(m) == {"a": "online", "b": "online"} and m)  # fmt: skip
    assert state["num_blocks"] == 8 and state["coverage"] == [1] * 8 and state["fully_covered"] is True
    assert fetch_state(url)["swarm"]["private"] is True  # the tests' swarms are private ($COROLLA_SWARM_KEY)
    a = next(s for s in state["servers"] if s["name"] == "a")
    assert a["peer_id"] == swarm.servers["a"].peer_id and a["found_blocks"] == [0, 1, 2, 3]
    assert (a["info"]["start"], a["info"]["end"]) == (0, 4) and a["info"]["software_version"]
    assert {"throughput", "free_cache_tokens", "torch_dtype", "quantization", "adapters", "relayed"} <= set(
        a["info"]
    )

    driver = start_browser(tmp_path)
    try:
        if driver is not None:
            driver.get(url)
            view = wait_for("the page to draw both servers online", lambda: (v := page_view(driver))
                            and v["bars"] == {"a": "online", "b": "online"} and v)  # fmt: skip
            assert view["coverage"] == ["1"] * 8 and view["gaps"] == "" and view["gapNote"] is None
            assert view["rows"] == ["a", "b"] and view["status"] == "ok"
            assert view["swarm"].startswith("private swarm (key ")
            reported = view["headers"].index("reported")
            assert [cells[reported] for cells in view["cells"]] == ["-", "-"]  # no client reported them
            screenshot(driver, tmp_path, "monitor-covered.png")

        # SIGTERM: the server announces offline before exiting, so blocks 4-7 lose their only server
        swarm.servers["b"].send_signal(signal.SIGTERM)
        state = wait_for("the gap in /api/v1/state", lambda: (m := model_of(fetch_state(url)))
                         and m["gaps"] == [4, 5, 6, 7] and m)  # fmt: skip
        assert state["coverage"] == [1, 1, 1, 1, 0, 0, 0, 0] and state["fully_covered"] is False
        assert states_by_name(state).get("b", "offline") == "offline"  # offline, or already expired

        if driver is not None:
            view = wait_for(
                "the page to show the gap", lambda: (v := page_view(driver)) and v["gaps"] == "4,5,6,7" and v
            )
            assert view["coverage"] == ["1"] * 4 + ["0"] * 4
            assert view["bars"]["a"] == "online" and view["bars"].get("b", "offline") == "offline"
            assert "4-7" in view["gapNote"]
            gap_cells = driver.find_elements(
                "css selector", f'section[data-model="{PREFIX}"] .cell[data-coverage="0"]'
            )
            assert [c.get_attribute("data-block") for c in gap_cells] == ["4", "5", "6", "7"]
            color = gap_cells[0].value_of_css_property("background-color")
            assert color in ("rgba(217, 48, 37, 1)", "rgb(217, 48, 37)"), color  # --gap red
            screenshot(driver, tmp_path, "monitor-gap.png")

        # SIGKILL: no goodbye; the server's records expire and it disappears from the state
        swarm.servers["a"].send_signal(signal.SIGKILL)
        state = wait_for("a's records to expire", lambda: (m := model_of(fetch_state(url)))
                         and "a" not in states_by_name(m) and m)  # fmt: skip
        assert state["gaps"] == list(range(8))
        if driver is not None:
            view = wait_for("the page to drop a", lambda: (v := page_view(driver)) and "a" not in v["bars"] and v)
            assert view["coverage"] == ["0"] * 8
    finally:
        if driver is not None:
            driver.quit()

    monitor.send_signal(signal.SIGTERM)
    assert monitor.wait(timeout=60) == 0, (
        f"monitor exit code {monitor.returncode}; log:\n{monitor.log_path.read_text()}"
    )
    log = monitor.log_path.read_text()
    assert "Dashboard at http://127.0.0.1:" in log
    assert "tiny-llama: server b [4:8): online -> offline" in log or "tiny-llama: server b [4:8) is gone" in log, (
        log
    )
    assert "tiny-llama: no online server for blocks 4-7" in log, log
    if driver is None:
        pytest.skip(f"JSON state checked; page not checked: {CHROMIUM} or {CHROMEDRIVER} is not installed")
