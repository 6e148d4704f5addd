"""A headless Chromium for browser tests, driven over the Chrome DevTools protocol (CDP).

Where the Chromium comes from, first found wins:
  1. `HILOMOE_CHROMIUM`: the path of a Chrome/Chromium executable;
  2. one on PATH (chromium, chromium-browser, google-chrome, headless_shell) or a browser
     Playwright installed (~/.cache/ms-playwright);
  3. the Chromium build that the npm package `@sparticuz/chromium` ships (brotli-compressed
     inside the package tarball), fetched from the npm registry once and unpacked into
     `$HILOMOE_CACHE/chromium/<version>` (default ~/.cache/hilomoe). Machines that reach
     package registries but not browser CDNs (where `playwright install` fails) get one this way.
     Unpacking needs brotli: the `brotli` Python module, or node's zlib.

`chromium()` returns the executable or raises `Unavailable` with a one-line reason, which the
test turns into a skip. The CDP client uses only the standard library (a minimal websocket), so
no browser-driving package is needed. Fetch by hand:  python tests/browser.py
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow_server import free_port

# The package's version is Chromium's major version; the digest is the registry's
# `dist.integrity` for that tarball, so a changed or truncated download is refused.
SPARTICUZ_VERSION = "153.0.0"
SPARTICUZ_URL = (f"https://registry.npmjs.org/@sparticuz/chromium/-/"
                 f"chromium-{SPARTICUZ_VERSION}.tgz")
SPARTICUZ_SHA512 = ("jiGWqSvPMdu4+P9TilYqAR7yEGPEHINx+lCvE/NqNO/EHYzF/x1hUiI5T6ioVIt7dEy7n88byy"
                    "T0vk+dnsgQwA==")
# The archives inside the package: the browser, then its libraries (NSS, expat), SwiftShader
# (software GL, which screenshots need) and a few fonts.
_PARTS = ("chromium", "al2023.tar", "swiftshader.tar", "fonts.tar")


class Unavailable(RuntimeError):
    """No Chromium can run here; the message is the one-line reason."""


def cache_root() -> Path:
    return Path(os.environ.get("HILOMOE_CACHE", Path.home() / ".cache" / "hilomoe")) / "chromium"


def _installed() -> str | None:
    if os.environ.get("HILOMOE_CHROMIUM"):
        return os.environ["HILOMOE_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        if found := shutil.which(name):
            return found
    playwright = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH",
                                     Path.home() / ".cache" / "ms-playwright"))
    for pattern in ("chromium_headless_shell-*/chrome-linux/headless_shell",
                    "chromium-*/chrome-linux/chrome"):
        if found := sorted(playwright.glob(pattern)):
            return str(found[-1])
    return None


def _unbrotli(data: bytes) -> bytes:
    try:
        import brotli
    except ImportError:
        brotli = None
    if brotli is not None:
        return brotli.decompress(data)
    node = shutil.which("node")
    if node is None:
        raise Unavailable("unpacking Chromium needs brotli: neither the `brotli` module nor node")
    proc = subprocess.run(
        [node, "-e", "process.stdout.write(require('zlib').brotliDecompressSync("
                     "require('fs').readFileSync(0)))"],
        input=data, capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise Unavailable(f"node could not unpack Chromium: {proc.stderr.decode()[-200:]}")
    return proc.stdout


def fetch_sparticuz(root: Path | None = None) -> Path:
    """Downloads and unpacks @sparticuz/chromium into `root/<version>` unless it is there
    already (idempotent: a finished unpack is marked by the executable, written last)."""
    dest = (root or cache_root()) / SPARTICUZ_VERSION
    exe = dest / "chromium"
    if exe.is_file():
        return exe
    try:
        with urllib.request.urlopen(SPARTICUZ_URL, timeout=60) as resp:
            tgz = resp.read()
    except (urllib.error.URLError, OSError) as e:
        raise Unavailable(f"cannot download Chromium from {SPARTICUZ_URL}: {e}") from None
    digest = base64.b64encode(hashlib.sha512(tgz).digest()).decode()
    if digest != SPARTICUZ_SHA512:
        raise Unavailable(f"{SPARTICUZ_URL} does not have the expected sha512")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpack-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(tgz)) as pkg:
            for part in _PARTS:
                data = _unbrotli(pkg.extractfile(f"package/bin/{part}.br").read())
                if part.endswith(".tar"):
                    with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                        inner.extractall(staging, filter="data")
                else:
                    (staging / part).write_bytes(data)
        # the package's own fonts.conf names AWS Lambda's directories
        (staging / "fonts.conf").write_text(
            '<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "fonts.dtd">\n<fontconfig>\n'
            f"  <dir>{dest / 'fonts'}</dir>\n  <dir>/usr/share/fonts</dir>\n"
            f"  <cachedir>{dest / 'fonts-cache'}</cachedir>\n</fontconfig>\n")
        (staging / "chromium").chmod(0o755)
        try:
            staging.rename(dest)
        except OSError:  # another process unpacked it first
            if not exe.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return exe


def chromium() -> str:
    """An executable Chromium (see the module docstring), or Unavailable with the reason."""
    return _installed() or str(fetch_sparticuz())


def _environment(exe: str) -> dict:
    """The Sparticuz build loads its libraries and fonts from beside itself."""
    env = dict(os.environ)
    here = Path(exe).parent
    if (here / "lib").is_dir() and (here / "fonts.conf").is_file():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(here / "lib"), str(here), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        env["FONTCONFIG_PATH"] = str(here)
    return env


# -- a minimal websocket client (RFC 6455: text frames, client-masked) -------------------------


class _WebSocket:
    def __init__(self, url: str, timeout: float):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the browser closed the DevTools connection")
        self.buf += chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        body = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + body)

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n >= 126:
                n = int.from_bytes(self._read(2 if n == 126 else 8), "big")
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode == 0x9:
                self._frame(0xA, data)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += data
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._frame(0x8, b"")
        self.sock.close()


class Page:
    """One browser tab: navigate, evaluate JavaScript, wait for a condition, screenshot."""

    def __init__(self, ws: _WebSocket):
        self.ws = ws
        self.last_id = 0
        self.errors: list[str] = []  # uncaught exceptions and console errors, for messages

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            self._event(msg)
            if msg.get("id") == self.last_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def _event(self, msg: dict) -> None:
        params = msg.get("params", {})
        if msg.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description")
                               or details.get("text", ""))
        elif msg.get("method") == "Runtime.consoleAPICalled" and params["type"] == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                        for a in params["args"]))

    def evaluate(self, expression: str, frame: str | None = None):
        """`expression`'s value in the page, or in the frame with id `frame` (an isolated
        world there: it shares the frame's DOM, and reaches into sandboxed iframes, which the
        page's own scripts cannot)."""
        where = {}
        if frame is not None:
            where["contextId"] = self.call("Page.createIsolatedWorld", frameId=frame,
                                           worldName="hilomoe-test")["executionContextId"]
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True, **where)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def child_frames(self) -> list[dict]:
        """Every frame below the top one (iframes, nested too): dicts with `id` and `url`."""
        out, todo = [], list(self.call("Page.getFrameTree")["frameTree"].get("childFrames", []))
        while todo:
            node = todo.pop(0)
            out.append(node["frame"])
            todo.extend(node.get("childFrames", []))
        return out

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 90.0, what: str = "",
                 frame: str | None = None):
        """Polls `expression` (in `frame`, see evaluate) until it is truthy and returns it; at
        the timeout fails with the page's visible text, which says what was shown instead."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression, frame)
            except RuntimeError:  # navigating: the old document is gone
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                errors = "".join(f"\n  {e[:300]}" for e in self.errors[-5:])
                raise AssertionError(f"{what or expression} did not appear; the page shows:\n"
                                     f"{text[:3000]}\nits last script errors:{errors or ' none'}")
            time.sleep(0.25)

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))


def _devtools(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def headless_page(exe: str, width: int = 1440, height: int = 900, timeout: float = 60.0):
    """Starts `exe` headless with a DevTools port on loopback and yields one Page; stops the
    browser (by its handle) and removes its profile afterwards."""
    port = free_port()
    profile = Path(tempfile.mkdtemp(prefix="hilomoe-chromium-"))
    cmd = [exe, "--headless", "--no-sandbox", "--no-zygote", "--single-process",
           "--in-process-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions",
           "--disable-background-networking", "--hide-scrollbars", "--lang=en-US",
           f"--window-size={width},{height}", f"--remote-debugging-port={port}",
           "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}", "about:blank"]
    log = profile / "chromium.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=_environment(exe), stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ws = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise Unavailable(f"{exe} exited ({proc.returncode}): "
                                  f"{log.read_text(errors='replace')[-300:].strip()}")
            try:
                pages = [t for t in _devtools(port, "/json/list") if t["type"] == "page"]
                if pages:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{exe} did not open its DevTools port in {timeout:.0f}s")
            time.sleep(0.2)
        ws = _WebSocket(pages[0]["webSocketDebuggerUrl"], timeout=timeout)
        page = Page(ws)
        page.call("Runtime.enable")
        # a C/POSIX locale on the machine reaches JavaScript as "en-US@posix", which
        # Date.toLocaleString rejects (MLflow's pages then fail to render)
        page.call("Emulation.setLocaleOverride", locale="en-US")
        page.call("Emulation.setTimezoneOverride", timezoneId="UTC")
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        yield page
    finally:
        if ws is not None:
            ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    exe = chromium()
    print(exe)
    with headless_page(exe) as page:
        page.goto("data:text/html,<h1>hello</h1>")
        print(page.wait_for("document.querySelector('h1')?.textContent"))
