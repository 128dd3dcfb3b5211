"""`lookalike web`: starts the web demo's page (Streamlit), and the demo's services first when none are given."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from lookalike.client.facade import searcher_target
from lookalike.tools.processes import ServiceStartError, free_port, refuse_taken_port, stop_process

SAMPLE_QUERIES = 8


def app_path() -> Path:
    """Where lookalike/web/app.py is (in the checkout or the installed package), without importing it:
    importing it would import streamlit, which only the page's own process needs."""
    spec = importlib.util.find_spec("lookalike.web.app")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("lookalike.web.app is not installed: pip install 'lookalike[web]'")
    return Path(spec.origin)


def streamlit_command(embedder: str, searcher: str, samples: Sequence[Path], port: int,
                      address: str = "127.0.0.1", image_roots: Sequence[Path] = ()) -> list[str]:
    """`python -m streamlit run app.py ... -- --embedder A --searcher B --sample PHOTO ... --images-root DIR ...`."""
    app_args = ["--embedder", embedder, "--searcher", searcher]
    for sample in samples:
        app_args += ["--sample", str(Path(sample).resolve())]
    for root in image_roots:
        app_args += ["--images-root", str(Path(root).resolve())]
    # Headless (no browser opened), no usage statistics sent anywhere, no file watcher (nothing here
    # edits the app while it runs, and watching costs CPU), the viewer's toolbar (no "Deploy"), and an
    # unexpected exception shown to the visitor as a generic message only: its type, message and
    # traceback go to the page's console output, not the browser.
    return [sys.executable, "-m", "streamlit", "run", str(app_path()), "--server.headless", "true",
            "--server.port", str(port), "--server.address", address, "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer", "--client.showErrorDetails", "none",
            "--", *app_args]


def page_url(address: str, port: int) -> str:
    host = "localhost" if address in ("127.0.0.1", "localhost", "0.0.0.0", "::") else address
    return f"http://{host}:{port}"


def _healthy(url: str) -> bool:
    # No proxy: the page is on this machine, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running_web_app(embedder: str, searcher: str, samples: Sequence[Path] = (), port: int = 0,
                    address: str = "127.0.0.1", startup_timeout: float = 90.0,
                    echo: bool = False, image_roots: Sequence[Path] = ()) -> Iterator[tuple[subprocess.Popen, str]]:
    """Runs the page in a child process until the block ends; yields (process, URL) once it answers.

    Its output is kept for the error raised when it fails to start, and echoed when `echo` is set.
    """
    if port:
        refuse_taken_port(address, port)
    port = port or free_port()
    url = page_url(address, port)
    process = subprocess.Popen(streamlit_command(embedder, searcher, samples, port, address, image_roots),
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output: list[str] = []

    def relay() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    threading.Thread(target=relay, daemon=True).start()
    try:
        deadline = time.monotonic() + startup_timeout
        while process.poll() is not None or not _healthy(url):  # healthy, and ours
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServiceStartError(f"the web app did not start at {url}:\n{''.join(output[-30:])}")
            time.sleep(0.25)
        yield process, url
    finally:
        stop_process(process, 15)


def run_web(workdir: Path, embedder: str | None = None, searcher: str | None = None, samples: Path | None = None,
            port: int = 8501, address: str = "127.0.0.1", catalog_size: int = 10_000,
            image_roots: Sequence[Path] = ()) -> int:
    """Serves the page until interrupted. Without addresses, first builds (or reuses) the demo's model and
    index exactly as `lookalike demo` does and starts both services on them."""
    from lookalike.quality.labelled_images import read_labelled_images
    from lookalike.tools.demo import demo_services, prepare_demo, stratified

    if (embedder is None) != (searcher is None):
        raise ValueError("give both --embedder and --searcher, or neither to start the demo's services")
    if embedder is not None and searcher is not None:
        # Refused here, not on every visit to the page.
        if not embedder.strip():
            raise ValueError("--embedder is empty, expected host:port or a gRPC target")
        searcher_target(searcher)
    if port:  # before the demo's model is built and its services started
        refuse_taken_port(address, port)
    for root in image_roots:
        if not Path(root).is_dir():
            raise ValueError(f"--images-root {root} is not a folder")
    with ExitStack() as stack:
        sample_photos: list[Path] = []
        if samples is not None:
            sample_photos = [image.path for image in stratified(read_labelled_images(samples), SAMPLE_QUERIES, seed=2)]
        if embedder is None or searcher is None:
            # An absolute workdir, so the image paths indexing records resolve from the page's process too.
            setup = prepare_demo(workdir.resolve(), catalog_size=catalog_size)
            embedder, searcher, _ = stack.enter_context(demo_services(setup))
            # The demo's catalogue photos: the page shows thumbnails from their folder.
            image_roots = [*image_roots, setup.catalog if setup.catalog.is_dir() else setup.catalog.parent]
            if samples is None:
                sample_photos = [image.path for image in stratified(setup.queries, SAMPLE_QUERIES, seed=2)]
        sample_photos.sort()
        process, url = stack.enter_context(running_web_app(embedder, searcher, sample_photos, port, address,
                                                           echo=True, image_roots=image_roots))
        print(f"\nLookalike web demo: {url}  (embedder {embedder}, searcher {searcher}; Ctrl-C stops it)", flush=True)
        try:
            return process.wait()
        except KeyboardInterrupt:  # Ctrl-C, or a SIGTERM (lookalike.tools.cli raises it for both): stopped as asked
            return 0
