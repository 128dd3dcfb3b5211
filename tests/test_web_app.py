"""The web demo's page (web/app.py) driven headless by Streamlit's AppTest against real servers on port 0."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from lookalike.client.embedder_client import EmbedderClient
from lookalike.client.facade import Lookalike
from lookalike.client.indexing import index_catalogue
from tests.conftest import GROCERY, ROOT, start_searcher
from lookalike.tools.processes import free_port
from tests.test_packaging import lint_with, wheel  # noqa: F401 - wheel is a fixture

pytest.importorskip("streamlit", reason="the web extra is not installed (pip install 'lookalike[web]')")
from streamlit.testing.v1 import AppTest  # noqa: E402 - only once streamlit is known to be there

from lookalike.tools.web import app_path  # noqa: E402
from lookalike.web.app import ROUTING_MODES, literal, plain  # noqa: E402

# A small catalogue: every probed shard holds at least 12 items, so any routing fills a top 10.
CATEGORIES = ("Apple", "Juice", "Milk", "Yoghurt", "Melon", "Tomato")
PER_CATEGORY = 12
RUN_TIMEOUT = 60.0


def catalogue_photos(grocery_train: Sequence) -> list:
    """The first PER_CATEGORY grocery training photos of each of CATEGORIES."""
    return [photo for category in CATEGORIES
            for photo in [p for p in grocery_train if p.category == category][:PER_CATEGORY]]


@contextmanager
def indexed_searcher(embedder_address: str, data_dir: Path, photos: Sequence) -> Iterator[str]:
    """A real searcher on port 0 holding `photos`, indexed through the client library as `lookalike index`
    does (so each item records its file as attributes["path"]); yields its address."""
    searcher, channel = start_searcher(data_dir, snapshot_interval=0)
    address = f"127.0.0.1:{searcher.port}"
    try:
        with Lookalike(embedder_address, address) as lookalike:
            summary = index_catalogue(lookalike, photos, progress=None)
        assert summary.indexed == len(photos) and not summary.failed, summary.describe()
        yield address
    finally:
        channel.close()
        searcher.stop(None)


def query_photo(embedder_address: str, grocery_val: Sequence) -> tuple[object, str]:
    """A held-out photo of one of CATEGORIES whose most probable category is also one of them (so the
    top shard exists and a low threshold probes exactly one), with that category; a correctly
    classified one when there is one (the test model's head saw only 5 photos per category)."""
    candidates = [p for p in grocery_val if p.category in CATEGORIES][::3]
    with EmbedderClient(embedder_address) as client:
        embedded = client.embed([p.path for p in candidates], top_categories=1)
    ranked = sorted(((result.top_category != photo.category, -result.categories[0][1], photo.item_id), photo,
                     result.top_category) for photo, result in zip(candidates, embedded)
                    if result.ok and result.top_category in CATEGORIES)
    assert ranked, "no held-out photo is predicted as one of the catalogue's categories"
    return ranked[0][1], ranked[0][2]


@pytest.fixture(scope="module")
def services(embedder, grocery_train: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    started_embedder, _ = embedder
    embedder_address = f"127.0.0.1:{started_embedder.port}"
    with indexed_searcher(embedder_address, tmp_path_factory.mktemp("web-searcher"),
                          catalogue_photos(grocery_train)) as searcher_address:
        yield embedder_address, searcher_address


@pytest.fixture(scope="module")
def query(services: tuple[str, str], grocery_val: list) -> tuple[object, str]:
    return query_photo(services[0], grocery_val)


@pytest.fixture()
def page(services: tuple[str, str], query: tuple[object, str],
         monkeypatch: pytest.MonkeyPatch) -> tuple[AppTest, object, str]:
    """The app pointed at the real servers (through the environment), the sample query offered first."""
    embedder_address, searcher_address = services
    photo, predicted = query
    monkeypatch.setenv("LOOKALIKE_EMBEDDER", embedder_address)
    monkeypatch.setenv("LOOKALIKE_SEARCHER", searcher_address)
    monkeypatch.setenv("LOOKALIKE_SAMPLES", str(photo.path))
    monkeypatch.setenv("LOOKALIKE_IMAGES_ROOTS", str(GROCERY))  # where the catalogue's photos are
    # Under pytest sys.argv holds pytest's arguments; the app must ignore them and read the environment.
    monkeypatch.setattr("sys.argv", ["app.py"])
    return AppTest.from_file(str(app_path()), default_timeout=RUN_TIMEOUT), photo, predicted


def _texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def _probed(at: AppTest, mode: str = "adaptive") -> list[str]:
    """The shards the page says the search probed, for the results' routing mode."""
    line = next(m.value for m in at.markdown if m.value.startswith(f"**Probed shards ({mode},"))
    return [part.split(" (")[0].strip("`") for part in line.split(":** ", 1)[1].split(", ")]


def test_a_sample_query_gives_results(page: tuple[AppTest, object, str]) -> None:
    at, photo, predicted = page
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    texts = _texts(at)
    assert f"**Query:** sample {plain(photo.path.parent.name + '/' + photo.path.stem)}" in texts
    assert f"**Predicted category:** {predicted} (" in texts
    assert "Top 10 results" in [header.value for header in at.subheader]
    results = at.container(key="results")
    # Every hit shows its catalogue photo, served from the file indexing recorded.
    assert len(results.image) == 10
    hits = [m.value for m in results.markdown if m.value.startswith("**")]
    assert len(hits) == 10 and all("similarity" in hit for hit in hits)
    assert any(f"· `{predicted}`" in hit for hit in hits)
    assert all(re.search(r"`label`: `\S", c.value) for c in results.caption)
    # The model and the catalogue, as GetModelInfo and GetStats tell them.
    sidebar = "\n".join(m.value for m in at.sidebar.markdown)
    assert "**model id:** effnet-lite0@" in sidebar and "**input size:** 224×224" in sidebar
    assert f"**{len(CATEGORIES) * PER_CATEGORY:,} items in {len(CATEGORIES)} shards**" in sidebar
    # Time in each service for this query.
    metrics = {metric.label: metric.value for metric in at.metric}
    assert metrics["Embedder"].endswith(" ms") and float(metrics["Embedder"].split()[0]) > 0
    assert metrics["Searcher"].endswith(" ms") and float(metrics["Searcher"].split()[0]) > 0
    # The three routing modes side by side for the same photo.
    compared = [m.value for m in at.container(key="compare").markdown]
    assert [line.split("**")[1] for line in compared] == ["global", "top-1 shard", "adaptive"]
    assert compared[0].startswith(f"**global**: {len(CATEGORIES)} shards")
    assert compared[1].startswith("**top-1 shard**: 1 shard,") and compared[1].endswith(f"probed: `{predicted}`")


def test_routing_controls_change_the_probed_shards(page: tuple[AppTest, object, str]) -> None:
    at, _, predicted = page
    at.run()
    at.slider(key="threshold").set_value(0.05).run()
    assert _probed(at) == [predicted]
    at.slider(key="threshold").set_value(1.0)
    at.number_input(key="max_shards").set_value(len(CATEGORIES)).run()
    probed = _probed(at)
    assert len(probed) == len(CATEGORIES) and probed[0] == predicted and set(probed) == set(CATEGORIES)
    at.number_input(key="max_shards").set_value(2).run()
    assert len(_probed(at)) == 2
    at.radio(key="routing").set_value("top-1 shard").run()
    assert _probed(at, "top-1 shard") == [predicted]
    at.radio(key="routing").set_value("global").run()
    assert sorted(_probed(at, "global")) == sorted(CATEGORIES)
    # A prior weight ranks by score = cosine + weight * ln p, shown beside the similarity.
    at.slider(key="prior_weight").set_value(0.2).run()
    assert all("score" in m.value for m in at.container(key="results").markdown if m.value.startswith("**"))
    assert not at.exception and not at.error


def _big_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_uploads_show_the_servers_message_and_the_page_keeps_working(page: tuple[AppTest, object, str]) -> None:
    at, photo, _ = page
    at.run()
    uploads = [
        (("notes.jpg", b"these are not pixels", "image/jpeg"), "is not a readable image"),
        (("empty.png", b"", "image/png"), "is empty (0 bytes)"),
        # The test embedder allows 12 megapixels per image (conftest): 4000x3500 is refused, in its words.
        (("huge.png", _big_png(4000, 3500), "image/png"), "4000x3500 = 14000000 pixels, limit is 12000000"),
    ]
    for upload, message in uploads:
        at.file_uploader(key="upload").set_value(upload).run()
        assert not at.exception
        errors = [error.value for error in at.error]
        assert len(errors) == 1 and message in errors[0], errors
        assert errors[0].startswith(f"uploaded {upload[0]}: The embedder refused this photo")
        assert not [header for header in at.subheader if header.value.startswith("Top ")]
    # A real photo next: results again.
    at.file_uploader(key="upload").set_value((photo.path.name, photo.path.read_bytes(), "image/jpeg")).run()
    assert not at.error and not at.exception
    assert f"**Query:** uploaded {plain(photo.path.name)}" in _texts(at)
    assert len(at.container(key="results").image) == 10


def _with_broken_exif(photo: Path) -> bytes:
    """The photo as a PNG whose eXIf chunk holds no TIFF header: Pillow's exif_transpose raises SyntaxError
    on it, while the embedder takes the photo as it is (browsers show it too)."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(photo) as image:
        image.convert("RGB").save(buffer, "PNG", exif=b"XX\x00*\x00\x00\x00\x08")
    return buffer.getvalue()


def test_photos_with_a_broken_exif_block_are_shown_as_they_are(services: tuple[str, str], query: tuple[object, str],
                                                               grocery_train: list, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue's thumbnails and the query's preview show such a photo unturned instead of failing."""
    from dataclasses import replace

    from PIL import Image, ImageOps

    from lookalike.web.app import query_preview

    photo, _ = query
    broken = _with_broken_exif(photo.path)
    with Image.open(io.BytesIO(broken)) as image, pytest.raises(SyntaxError):
        ImageOps.exif_transpose(image)
    # A catalogue of one such photo per category.
    catalogue = []
    for item in catalogue_photos(grocery_train)[::PER_CATEGORY]:
        path = tmp_path / f"{item.path.stem}.png"
        path.write_bytes(_with_broken_exif(item.path))
        catalogue.append(replace(item, path=path))
    with indexed_searcher(services[0], tmp_path / "searcher", catalogue) as searcher_address:
        monkeypatch.setattr("sys.argv", ["app.py", "--embedder", services[0], "--searcher", searcher_address,
                                         "--sample", str(photo.path), "--images-root", str(tmp_path)])
        at = AppTest.from_file(str(app_path()), default_timeout=RUN_TIMEOUT).run()
        # A sound query first: every hit's thumbnail is such a photo.
        at.radio(key="routing").set_value("global").run()
        assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
        assert len(at.container(key="results").image) == len(catalogue)
        # Then such a photo as the query: its preview too.
        at.file_uploader(key="upload").set_value(("broken-exif.png", broken, "image/png")).run()
        assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
        assert f"**Query:** uploaded {plain('broken-exif.png')}" in _texts(at)
        assert len(at.image) == 1 + len(catalogue) + len(ROUTING_MODES), "the preview, the grid, the comparison"
        assert len(at.container(key="results").image) == len(catalogue)
    # With the box a face model draws, too: at the photo's own size, the preview differs from the one without a
    # box exactly along a box of the face's size, in the box's colour.
    import numpy as np

    from lookalike.web.app import FACE_BOX_COLOUR

    with Image.open(io.BytesIO(broken)) as image:
        width, height = image.size
    face = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    unboxed, boxed = (np.asarray(Image.open(io.BytesIO(query_preview(broken, max(width, height), box))).convert("RGB"))
                      for box in (None, face))
    changed = np.argwhere((boxed != unboxed).any(axis=2))  # (row, column) pairs
    assert len(changed) and (boxed[tuple(changed.T)] == FACE_BOX_COLOUR).all()
    (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0)
    assert (right - left + 1, bottom - top + 1) == (face[2] - face[0], face[3] - face[1])


def test_a_server_that_is_down_gives_a_clear_message(services: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
                                                     grocery_val: list) -> None:
    embedder_address, searcher_address = services
    nowhere = f"127.0.0.1:{free_port()}"
    monkeypatch.setattr("sys.argv", ["app.py", "--embedder", nowhere, "--searcher", searcher_address,
                                     "--sample", str(grocery_val[0].path)])
    at = AppTest.from_file(str(app_path()), default_timeout=RUN_TIMEOUT).run()
    assert not at.exception
    errors = [error.value for error in at.error]
    assert len(errors) == 1 and errors[0].startswith(f"Model: The embedder at {nowhere} cannot be reached"), errors
    # The searcher is up: its catalogue still shows.
    assert f"**{len(CATEGORIES) * PER_CATEGORY:,} items" in "\n".join(m.value for m in at.sidebar.markdown)
    monkeypatch.setattr("sys.argv", ["app.py", "--embedder", embedder_address, "--searcher", nowhere])
    at = AppTest.from_file(str(app_path()), default_timeout=RUN_TIMEOUT).run()
    errors = [error.value for error in at.error]
    assert not at.exception and len(errors) == 1
    assert errors[0].startswith(f"Catalogue: The searcher at {nowhere} cannot be reached"), errors


def test_settings_come_from_arguments_or_the_environment(tmp_path: Path) -> None:
    from lookalike.web.app import parse_settings

    samples = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    from_args = parse_settings(["--embedder", "e:1", "--searcher", "s:2", "--sample", str(samples[0]),
                                "--sample", str(samples[1]), "--images-root", str(tmp_path / "photos" / "..")], {})
    assert (from_args.embedder, from_args.searcher, from_args.samples) == ("e:1", "s:2", tuple(samples))
    assert from_args.image_roots == (tmp_path.resolve(),)
    environ = {"LOOKALIKE_EMBEDDER": "e:3", "LOOKALIKE_SEARCHER": "s:4",
               "LOOKALIKE_SAMPLES": os.pathsep.join(map(str, samples)), "LOOKALIKE_IMAGES_ROOTS": str(tmp_path)}
    # A test runner's own arguments are ignored.
    from_env = parse_settings(["-q", "tests/test_web_app.py", "--setup-show"], environ)
    assert (from_env.embedder, from_env.searcher, from_env.samples) == ("e:3", "s:4", tuple(samples))
    assert from_env.image_roots == (tmp_path.resolve(),)


def test_catalogue_photos_are_shown_only_from_the_images_roots(tmp_path: Path) -> None:
    """An item's path attribute names a file on the page's machine: anyone who may write items could have the
    page show any image file there. Only files under the configured roots are shown (a path climbing out with
    .. or a link resolves first)."""
    from PIL import Image

    from lookalike.web.app import catalogue_thumbnail

    for folder in ("catalogue", "private"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / folder / "photo.png")
    (tmp_path / "catalogue" / "link.png").symlink_to(tmp_path / "private" / "photo.png")
    roots = [(tmp_path / "catalogue").resolve()]
    assert catalogue_thumbnail({"path": str(tmp_path / "catalogue" / "photo.png")}, roots) is not None
    for outside in (tmp_path / "private" / "photo.png", tmp_path / "catalogue" / ".." / "private" / "photo.png",
                    tmp_path / "catalogue" / "link.png"):
        assert catalogue_thumbnail({"path": str(outside)}, roots) is None, outside
    assert catalogue_thumbnail({"path": str(tmp_path / "catalogue" / "photo.png")}, []) is None


def test_the_page_shows_visitors_no_tracebacks() -> None:
    """An unexpected exception reaches the browser as a generic message; its details only the console."""
    from lookalike.tools.web import streamlit_command

    command = streamlit_command("e:1", "s:2", [], 8501)
    assert command[command.index("--client.showErrorDetails") + 1] == "none"
    assert command.index("--client.showErrorDetails") < command.index("--")


def test_a_web_app_import_of_the_tools_breaks_its_contract(wheel: Path, tmp_path: Path) -> None:
    """The page is a client like any other: reaching into the tools (which start servers) is refused."""
    result = lint_with(wheel, tmp_path, "web/app.py", "from lookalike.tools.web import app_path")
    assert result.returncode != 0
    assert "The web app imports only the client library and the contracts BROKEN" in result.stdout
    assert "lookalike.web.app -> lookalike.tools.web" in result.stdout


def test_lookalike_web_serves_the_page_and_stops_it(services: tuple[str, str]) -> None:
    """`lookalike web --embedder A --searcher B` prints the page's URL, the page answers, and a SIGTERM
    stops the page with it."""
    usage = subprocess.run([sys.executable, "-m", "lookalike.tools.cli", "web", "--embedder", services[0]], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "give both --embedder and --searcher" in usage.stderr
    process = subprocess.Popen([sys.executable, "-m", "lookalike.tools.cli", "web", "--embedder", services[0],
                                "--searcher", services[1], "--port", "0", "--samples", str(GROCERY / "val.txt")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Lookalike web demo: "):
                break
        assert lines and lines[-1].startswith("Lookalike web demo: "), "".join(lines)
        url = lines[-1].split()[3]
        assert re.fullmatch(r"http://localhost:\d+", url), "".join(lines)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{url}/_stcore/health", timeout=10) as health:
            assert health.read() == b"ok"
        page = subprocess.run(["pgrep", "-f", f"streamlit run .* --server.port {url.rsplit(':', 1)[1]} "],
                              capture_output=True, text=True)
        assert page.stdout.strip(), "the page's streamlit process was not found"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        # The page went with it.
        assert subprocess.run(["pgrep", "-f", "--", f"--server.port {url.rsplit(':', 1)[1]} "]).returncode == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_catalogue_text_is_code_so_no_writer_can_put_links_on_the_page() -> None:
    """Streamlit's markdown links a bare URL, www. name or e-mail address even when its punctuation is escaped
    (checked in headless Chromium); inside a code span it is text. Backticks in the text lengthen the fence."""
    assert literal("https://evil.example/login") == "`https://evil.example/login`"
    assert literal("a`b") == "``a`b``"
    assert literal("`x``") == "``` `x`` ```"
    # Line breaks would end the span (a line starting with # is a heading): one space each run of them.
    assert literal("evil\n# heading\r\n\n[link](https://evil.example)") == \
        "`evil # heading [link](https://evil.example)`"
    assert plain("a\n\n# b") == "a \\# b"


def test_routing_starts_at_the_model_s_values_else_the_searcher_s(model_dir: Path) -> None:
    """Without fitted values the controls started at the built-in defaults, not at the searcher's: the page
    probed other shards than `Lookalike.search` did for the same photo."""
    from lookalike.codec import read_manifest
    from lookalike.routing import RoutingDefaults
    from lookalike.v1 import embedder_pb2, searcher_pb2
    from lookalike.web.app import routing_start

    stats = searcher_pb2.GetStatsResponse(
        routing_defaults=searcher_pb2.RoutingSettings(threshold=0.5, max_shards=2, prior_weight=0.25))
    manifest = read_manifest(model_dir)
    fitted = RoutingDefaults.of_model(manifest)
    assert fitted is not None
    assert routing_start(embedder_pb2.GetModelInfoResponse(manifest=manifest), stats) == (fitted, True)
    manifest.ClearField("routing")
    unfitted = embedder_pb2.GetModelInfoResponse(manifest=manifest)
    assert routing_start(unfitted, stats) == (RoutingDefaults(0.5, 2, 0.25), False)
    assert routing_start(unfitted, None) == (RoutingDefaults(), False)


def test_an_empty_service_address_is_refused_before_the_page_starts(tmp_path: Path) -> None:
    """Not on every visit, as a traceback the visitor cannot act on."""
    from lookalike.tools.web import run_web

    with pytest.raises(ValueError, match="--searcher is '', expected host:port"):
        run_web(tmp_path, embedder="127.0.0.1:1", searcher="")
    with pytest.raises(ValueError, match="--embedder is empty"):
        run_web(tmp_path, embedder=" ", searcher="127.0.0.1:1")


def test_a_huge_camera_jpeg_the_embedder_takes_has_a_preview() -> None:
    """Pillow's own bomb check counts a JPEG's full size: a 182-megapixel JPEG, which the embedder takes (it
    decodes at an eighth), had no preview. The page counts the pixels it decodes, as the embedder does."""
    from PIL import Image

    from lookalike.web.app import query_preview

    buffer = io.BytesIO()
    Image.new("L", (14_000, 13_000), 128).save(buffer, "JPEG", quality=50)
    preview = query_preview(buffer.getvalue(), size=64)
    assert preview is not None and Image.open(io.BytesIO(preview)).size == (64, 64)


def test_a_query_s_embedding_and_searches_share_one_timeout(services: tuple[str, str], grocery_val: list) -> None:
    """Each of the page's calls (the embedding, then one search per routing mode) had the whole timeout: with a
    slow searcher a visitor waited three times as long. A slow network holds each answer 1 s here."""
    import grpc
    from lookalike.client.connection import DeadlineExceededError
    from lookalike.client.facade import Lookalike
    from lookalike.v1 import embedder_pb2_grpc, searcher_pb2_grpc
    from lookalike.web.app import search_modes
    from tests.conftest import SlowNetwork

    with Lookalike(*services) as lookalike:
        model_id = lookalike.model_id
        slow = SlowNetwork(1.0)
        lookalike.embedder.stub = embedder_pb2_grpc.EmbedderStub(grpc.intercept_channel(lookalike.embedder.channel,
                                                                                        slow))
        lookalike.searcher.stub = searcher_pb2_grpc.SearcherStub(grpc.intercept_channel(lookalike.searcher.channel,
                                                                                        slow))
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            search_modes(lookalike, grocery_val[0].path.read_bytes(), model_id, 5, list(ROUTING_MODES), 0.9, 4, 0.0,
                         timeout=1.5)
        assert time.monotonic() - started < 2.8 and slow.calls == 2, "the embedding and one search, then none"


def test_a_taken_port_or_a_missing_images_root_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """The page's health check passed for whatever already answered on the port: `lookalike web` announced
    another server's page as its own (after building the demo's model and starting its services), then failed."""
    import socket

    from lookalike.tools.processes import ServiceStartError
    from lookalike.tools.web import run_web

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceStartError, match=f"port {port} on 127.0.0.1 is taken"):
            run_web(tmp_path / "never-built", port=port)
    with pytest.raises(ValueError, match="--images-root .*absent is not a folder"):
        run_web(tmp_path / "never-built", port=0, image_roots=[tmp_path / "absent"])
    assert not (tmp_path / "never-built").exists(), "nothing was prepared"


def test_changing_only_what_is_shown_calls_no_service_again(page: tuple[AppTest, object, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The routing radio picks one of the three answers already searched: Streamlit's rerun must not embed and
    search the photo again. A search control does search again."""
    from lookalike.client.embedder_client import EmbedderClient
    from lookalike.client.searcher_client import SearcherClient

    calls = {"embed": 0, "search": 0}
    for cls, name in ((EmbedderClient, "embed"), (SearcherClient, "search")):
        def counted(self, *args, _original=getattr(cls, name), _name=name, **kwargs):  # noqa: ANN001, ANN202
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, counted)
    at, _, _ = page
    at.run()
    assert calls == {"embed": 1, "search": 3}
    at.radio(key="routing").set_value("global").run()
    assert calls == {"embed": 1, "search": 3} and _probed(at, "global")
    at.slider(key="threshold").set_value(0.05).run()
    assert calls == {"embed": 2, "search": 6}
    assert not at.exception and not at.error


def test_the_query_preview_shows_the_pixels_the_embedder_takes() -> None:
    """Transparency over white and 16-bit grey rescaled, as the embedder decodes them (a plain RGB conversion
    shows a cut-out on black and a 16-bit gradient as solid white)."""
    import numpy as np
    from PIL import Image

    from lookalike.web.app import query_preview

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()

    def shown(data: bytes) -> np.ndarray:
        preview = query_preview(data, size=64)
        assert preview is not None
        return np.asarray(Image.open(io.BytesIO(preview)).convert("L"), dtype=np.float32)

    cut_out = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert shown(png(cut_out)).mean() > 250
    gradient = Image.fromarray(np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16))
    assert gradient.mode.startswith("I;16")
    assert 100 < shown(png(gradient)).mean() < 155
