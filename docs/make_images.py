"""Regenerate the pictures of the docs with the same commands the guides show.

    python docs/make_images.py                    # loss, report, confusion, chat (~6 min on 2 CPU cores)
    python docs/make_images.py --only exposure    # the canary run of data-quality.md (~13 min)

Runs happen in a scratch directory (--workdir, default a temporary one); only the PNGs are copied
into docs/images/. The chat page is photographed in headless Chromium through Playwright, as
tests/test_serve.py drives it (Debian's `chromium`, which .ci/run installs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


def lmkiln(workdir: Path, *args: str) -> None:
    print("$ lmkiln " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "lmkiln", *args], cwd=workdir, check=True)


def default_run(workdir: Path) -> Path:
    """The main job of the README (`lmkiln train`), trained once per workdir."""
    run = workdir / "runs" / "default"
    if not (run / "plots" / "loss.png").exists():
        lmkiln(workdir, "train")
    return run


def loss(workdir: Path) -> None:
    shutil.copyfile(default_run(workdir) / "plots" / "loss.png", IMAGES / "loss.png")


def confusion(workdir: Path) -> None:
    lmkiln(workdir, "train", "--recipe", "digits-mlp", "--train.run_dir", "runs/digits-mlp")
    shutil.copyfile(workdir / "runs/digits-mlp/plots/confusion_matrix.png", IMAGES / "confusion.png")


def exposure(workdir: Path) -> None:
    args = [
        "--data.corpus",  # 8 passes over the reference manual: enough repeats to memorize canaries
        "builtin:pydoc",
        "--data.canaries",
        "6",
        "--data.canary_repeats",
        "1,10,100",
        "--train.run_dir",
        "runs/default-canaries",
    ]
    lmkiln(workdir, "train", *args)
    lmkiln(workdir, "eval", "runs/default-canaries", "--task", "memorization")
    shutil.copyfile(workdir / "runs/default-canaries/plots/exposure.png", IMAGES / "exposure.png")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lmkiln serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if json.load(response)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"lmkiln serve did not answer {url}/health in {timeout:.0f} s")


def chat(workdir: Path) -> None:
    """Two greedy turns of 40 tokens with the default run on the chat page of `lmkiln serve`."""
    from playwright.sync_api import sync_playwright  # the dev extra; only this picture needs it

    run = default_run(workdir)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "lmkiln", "serve", str(run), "--port", str(port)], cwd=workdir
    )
    try:
        _wait_healthy(url, server)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 980, "height": 600})
            page.goto(url + "/")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")
            for turn, prompt in enumerate(['The "for" statement', " is used to"], start=1):
                page.fill("#input", prompt)
                page.press("#input", "Enter")
                page.wait_for_function(
                    f"[...document.querySelectorAll('.assistant .stats')].filter(s => s.textContent.includes('tokens/s')).length === {turn}",
                    timeout=120_000,
                )
            page.screenshot(path=str(IMAGES / "chat.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=90)


def report(workdir: Path) -> None:
    """The default run's report.html, with the plan of the same config set next to the run."""
    from playwright.sync_api import sync_playwright

    run = default_run(workdir)
    lmkiln(workdir, "plan", "--save", str(run / "plan.json"))
    lmkiln(workdir, "report", str(run))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto((run / "report.html").as_uri())
        page.screenshot(path=str(IMAGES / "report.png"), full_page=True)
        browser.close()


PICTURES: dict[str, Callable[[Path], None]] = {
    "loss": loss,
    "report": report,
    "confusion": confusion,
    "chat": chat,
    "exposure": exposure,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="loss,report,confusion,chat", help=f"comma-separated, of {', '.join(PICTURES)}"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the runs go (kept); default: a temporary directory"
    )
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [name for name in names if name not in PICTURES]
    if unknown:
        parser.error(f"unknown picture {unknown[0]!r}; choose from {', '.join(PICTURES)}")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            PICTURES[name](workdir.resolve())
            print(f"wrote {IMAGES / (name + '.png')}")


if __name__ == "__main__":
    main()
