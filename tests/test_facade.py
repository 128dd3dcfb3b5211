"""The Lookalike facade, its asyncio twin, catalogue indexing and the CLI against real servers on port 0."""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lookalike.client.aio import AsyncLookalike
from lookalike.quality.labelled_images import LabelledImage
from lookalike.client.connection import ChannelSettings
from lookalike.client.indexing import index_catalogue
from lookalike.client.facade import IndexResult, Lookalike
from lookalike.client.searcher_client import SearcherClient
from tests.conftest import SlowNetwork, run_cli, start_searcher
from lookalike.tools.processes import free_port


@pytest.fixture()
def services(embedder, tmp_path: Path) -> Iterator[tuple[str, str]]:
    started_embedder, _ = embedder
    searcher, channel = start_searcher(tmp_path / "searcher", snapshot_interval=0)
    yield f"127.0.0.1:{started_embedder.port}", f"127.0.0.1:{searcher.port}"
    channel.close()
    searcher.stop(None)


def test_index_search_delete_search(services: tuple[str, str], grocery_val: list) -> None:
    photos = grocery_val[:24]
    with Lookalike(*services) as lookalike:
        result = lookalike.index([p.path for p in photos], [p.item_id for p in photos], [p.category for p in photos],
                                 [{"label": p.label} for p in photos])
        assert sorted(result.indexed) == sorted(p.item_id for p in photos) and not result.failed
        query = photos[5]
        found = lookalike.search(query.path, k=5)
        assert found.matches[0].id == query.item_id and found.matches[0].similarity > 0.9999
        assert found.matches[0].attributes == {"label": query.label}
        assert found.probes and found.categories[0][1] >= found.categories[1][1]
        assert {m.category for m in found.matches} <= {p.category for p in found.probes}
        everywhere = lookalike.search(query.path, k=5, routing="all")
        assert len(everywhere.probes) == len({p.category for p in photos})
        assert lookalike.delete([query.item_id]).deleted == 1
        after = lookalike.search(query.path, k=24, routing="all")
        assert query.item_id not in {m.id for m in after.matches} and len(after.matches) == 23


def test_predicted_categories_and_bad_images(services: tuple[str, str], grocery_val: list, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with Lookalike(*services) as lookalike:
        result = lookalike.index([grocery_val[0].path, bad], ["good", "bad"])
        assert result.indexed == ["good"]
        assert result.failed[0][0] == "bad" and "INVALID_ARGUMENT" in result.failed[0][1]
        predicted = lookalike.embedder.embed([grocery_val[0].path], top_categories=1)[0].top_category
        assert lookalike.search(grocery_val[0].path, k=1, routing="top1").matches[0].category == predicted
        # Per-image lists of another length would drop images silently when zipped: refused, nothing sent.
        items = lookalike.searcher.stats().items
        for call, expected in [(lambda: lookalike.index([grocery_val[1].path, grocery_val[2].path], ["one"]),
                                "ids has 1 entries, expected one per image (2)"),
                               (lambda: lookalike.index([grocery_val[1].path], ["one"], categories=[]),
                                "categories has 0 entries, expected one per image (1)"),
                               (lambda: lookalike.embedder.embed([grocery_val[1].path], ids=["a", "b"]),
                                "ids has 2 entries, expected one per image (1)")]:
            with pytest.raises(ValueError, match=re.escape(expected)):
                call()
        assert lookalike.searcher.stats().items == items


def test_an_unreadable_photo_file_fails_alone(services: tuple[str, str], grocery_val: list, tmp_path: Path) -> None:
    """A missing file or a folder given as a photo raised OSError out of embed: search broke its promise of
    InvalidArgumentError, and one such path in search_batch or index lost every other photo. It is now that
    photo's INVALID_ARGUMENT, naming the path, through the sync and the asyncio facade."""
    from lookalike.client.connection import InvalidArgumentError

    missing, folder = tmp_path / "absent.jpg", tmp_path
    good = grocery_val[0]
    with Lookalike(*services) as lookalike:
        embedded = lookalike.embedder.embed([good.path, missing, folder], ids=["good", "missing", "folder"])
        assert [(e.id, e.ok) for e in embedded] == [("good", True), ("missing", False), ("folder", False)]
        assert all(e.error_code.name == "INVALID_ARGUMENT" for e in embedded[1:])
        assert str(missing) in embedded[1].error and str(folder) in embedded[2].error
        with pytest.raises(InvalidArgumentError, match="absent.jpg"):
            lookalike.search(missing)
        answers = lookalike.search_batch([good.path, missing], k=1)
        assert not isinstance(answers[0], Exception) and isinstance(answers[1], InvalidArgumentError)
        indexed = lookalike.index([good.path, missing], ["good", "missing"])
        assert indexed.indexed == ["good"] and [item_id for item_id, _ in indexed.failed] == ["missing"]

    async def search_async() -> list:
        async with AsyncLookalike(*services) as lookalike:
            with pytest.raises(InvalidArgumentError, match="absent.jpg"):
                await lookalike.search(missing)
            return await lookalike.search_batch([missing, good.path], k=1)

    answers = asyncio.run(search_async())
    assert isinstance(answers[0], InvalidArgumentError) and not isinstance(answers[1], Exception)


def test_a_filter_that_does_not_parse_is_invalid_argument_before_any_call(grocery_val: list) -> None:
    """Filter text that does not parse raised a plain ValueError, and from the facade only once the photo had
    been embedded. It is now InvalidArgumentError, raised before anything is sent: with no service listening,
    nothing else could be raised before the UnavailableError of the first call."""
    from lookalike.client.connection import InvalidArgumentError

    down = ChannelSettings(f"127.0.0.1:{free_port()}", retries=0, timeout=5)
    bad = 'brand IN ("a"'
    photo = grocery_val[0].path
    with Lookalike(down, down) as lookalike:
        for call in (lambda: lookalike.search(photo, filter=bad), lambda: lookalike.search_batch([photo], filter=bad),
                     lambda: lookalike.searcher.search(np.ones(8, np.float32), "m", filter=bad)):
            with pytest.raises(InvalidArgumentError, match="filter: expected ',' or '\\)' in the IN list"):
                call()

    async def search_async() -> None:
        async with AsyncLookalike(down, down) as lookalike:
            for call in (lookalike.search(photo, filter=bad), lookalike.search_batch([photo], filter=bad)):
                with pytest.raises(InvalidArgumentError, match="filter: expected"):
                    await call

    asyncio.run(search_async())


def test_index_refuses_entries_it_cannot_send_before_any_call(grocery_val: list) -> None:
    """A non-str attribute value raised TypeError while a later upsert batch was built, after earlier batches
    were stored; a string given for a list was iterated per character. Each is now a TypeError naming the
    entry, raised before anything is sent: with no service listening, nothing else could come before the
    UnavailableError of the first call."""
    down = ChannelSettings(f"127.0.0.1:{free_port()}", retries=0, timeout=5)
    photo = grocery_val[0].path
    refused = [
        (([photo], ["a"], None, [{"size": 42}]), r"attributes\[0\] has 'size': 42, expected str keys and values"),
        (([photo], ["a"], None, ["red"]), r"attributes\[0\] is a str, expected a mapping of str to str"),
        (([photo], ["a"], [7]), r"categories\[0\] is a int, expected a category name or None"),
        (([photo], [7]), r"ids\[0\] is a int, expected a str"),
        (([photo], "a"), r"ids is a str, expected a list with one entry per image"),
        ((str(photo), ["a"]), r"images is a str, expected a list with one entry per image"),
        (([3], ["a"]), r"images\[0\] is a int, expected bytes or a file path"),
    ]
    with Lookalike(down, down) as lookalike:
        for arguments, message in refused:
            with pytest.raises(TypeError, match=message):
                lookalike.index(*arguments)  # type: ignore[arg-type]

    async def index_async() -> None:
        async with AsyncLookalike(down, down) as lookalike:
            for arguments, message in refused:
                with pytest.raises(TypeError, match=message):
                    await lookalike.index(*arguments)  # type: ignore[arg-type]

    asyncio.run(index_async())


def test_replacing_a_product_with_a_refused_photo_removes_nothing_of_it(services: tuple[str, str],
                                                                         grocery_val: list) -> None:
    """A product whose new photos include one the embedder refuses is not replaced: its good photos are stored,
    and none of its stored photos is removed (the refused photo's stored version above all), through the
    sync and the asyncio facade; a product whose photos all embed is replaced as asked."""
    photos = [image.path.read_bytes() for image in grocery_val[:6]]
    ids, products = ["tote-front", "tote-back", "tote-side", "cap-1", "cap-2"], ["tote"] * 3 + ["cap"] * 2

    def stored() -> set[str]:
        with Lookalike(*services) as lookalike:
            return {m.id for m in lookalike.search(photos[0], k=50, routing="all").matches}

    with Lookalike(*services) as lookalike:
        assert not lookalike.index(photos[:5], ids, products=products).failed
    assert stored() == set(ids)
    with Lookalike(*services) as lookalike:
        result = lookalike.index([photos[5], b"not a photo", photos[3]], ["tote-front", "tote-back", "cap-1"],
                                 products=["tote", "tote", "cap"], replace_products=True)
    assert result.indexed == ["tote-front", "cap-1"] and result.failed[0][0] == "tote-back"
    assert stored() == {"tote-front", "tote-back", "tote-side", "cap-1"}  # cap-2 left out of cap's photos

    async def replace_async() -> IndexResult:
        async with AsyncLookalike(*services) as lookalike:
            return await lookalike.index([b"not a photo", photos[1]], ["tote-front", "tote-back"],
                                         products=["tote", "tote"], replace_products=True)

    assert asyncio.run(replace_async()).indexed == ["tote-back"]
    assert stored() == {"tote-front", "tote-back", "tote-side", "cap-1"}


def test_a_replaced_products_photos_travel_in_one_upsert(services: tuple[str, str], grocery_val: list,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches were cut every UPSERT_BATCH items: a product straddling two was replaced by the first batch,
    which removed its photos in the second, so one of those the searcher then refused (here for an empty
    attribute name) lost its stored version. A replaced product's photos now travel together: in a batch of
    their own when they are more than a batch; other items are still cut at the batch size."""
    from lookalike.client import facade
    from lookalike.client.searcher_client import CatalogueItem

    monkeypatch.setattr(facade, "UPSERT_BATCH", 2)
    photos = [image.path.read_bytes() for image in grocery_val[:4]]
    ids = ["tote-front", "tote-back", "tote-side", "cap"]
    with Lookalike(*services) as lookalike:
        assert not lookalike.index(photos, ids, products=["tote"] * 3 + ["cap"]).failed
        result = lookalike.index(photos[:3], ["cap", "tote-front", "tote-back"], products=["cap", "tote", "tote"],
                                 attributes=[{}, {}, {"": "refused"}], replace_products=True)
        assert result.indexed == ["cap", "tote-front"] and [item_id for item_id, _ in result.failed] == ["tote-back"]
        stored = {m.id for m in lookalike.search(photos[0], k=10, routing="all").matches}
    assert stored == {"cap", "tote-front", "tote-back"}  # tote-side left out of the tote's photos

    def item(item_id: str, product: str) -> CatalogueItem:
        return CatalogueItem(item_id, "c", np.ones(4, np.float32), "m", product=product)

    items = [item("a", "P"), item("b", "Q"), item("c", "P"), item("d", ""), item("e", "P"), item("f", "R")]
    assert [([i.id for i in batch], replaced) for batch, replaced in facade.upsert_batches(items, True, size=2)] == [
        (["a", "c", "e"], ["P"]), (["b", "d"], ["Q"]), (["f"], ["R"])]
    assert [([i.id for i in batch], replaced) for batch, replaced in facade.upsert_batches(items, True, {"P"}, 2)] == [
        (["a", "b"], ["Q"]), (["c", "d"], []), (["e", "f"], ["R"])]
    assert [[i.id for i in batch] for batch, _ in facade.upsert_batches(items, False, size=2)] == [
        ["a", "b"], ["c", "d"], ["e", "f"]]


def test_a_searcher_client_that_cannot_be_built_leaves_no_embedder_channel_open(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookalike(embedder, []) raised for the empty pod list after opening the embedder's channel, which stayed
    open with no object left to close it."""
    from lookalike.client import facade
    from lookalike.client.embedder_client import EmbedderClient
    from lookalike.v1 import embedder_pb2

    opened: list[EmbedderClient] = []

    class Recorded(EmbedderClient):
        def __init__(self, target: str | ChannelSettings) -> None:
            super().__init__(target)
            opened.append(self)

    monkeypatch.setattr(facade, "EmbedderClient", Recorded)
    with pytest.raises(ValueError):  # no searcher pod given
        Lookalike(f"127.0.0.1:{free_port()}", [])
    assert len(opened) == 1
    with pytest.raises(ValueError, match="closed channel"):  # an open channel would try, and fail UNAVAILABLE
        opened[0].stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=2)


def test_a_search_s_timeout_covers_the_embedder_and_the_searcher(services: tuple[str, str],
                                                                   grocery_val: list) -> None:
    """Lookalike.search gave the embedder and the searcher the whole timeout each (and read the model with no
    timeout): two calls of a slow network, each in time, ran past it. Now the searcher gets what the embedder
    left, and nothing left fails the search."""
    import grpc
    from lookalike.client.connection import DeadlineExceededError
    from lookalike.v1 import embedder_pb2_grpc, searcher_pb2_grpc

    embedder, searcher = services
    with Lookalike(embedder, searcher) as client:
        client.index([grocery_val[0].path], ["first"], categories=["a"])  # the model and the limits are read
        slow = SlowNetwork(0.6)
        client.embedder.stub = embedder_pb2_grpc.EmbedderStub(grpc.intercept_channel(client.embedder.channel, slow))
        client.searcher.stub = searcher_pb2_grpc.SearcherStub(grpc.intercept_channel(client.searcher.channel, slow))
        with pytest.raises(DeadlineExceededError, match="Searcher.Search failed with DEADLINE_EXCEEDED: the operation's "
                                                        "timeout passed before this call"):
            client.search(grocery_val[0].path, routing="all", timeout=0.5)
        assert slow.calls == 1, "the photo's Embed, then no time was left for the search"
        assert client.search(grocery_val[0].path, routing="all", timeout=30).matches[0].id == "first"


def test_a_pod_list_with_a_bad_address_opens_no_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """ShardedSearcherClient opened a channel per pod in turn: an address ChannelSettings refused left the
    earlier pods' channels open, with no client to close them."""
    from lookalike.client import sharded

    opened: list[object] = []
    monkeypatch.setattr(sharded, "SearcherClient", lambda target: opened.append(target))
    with pytest.raises(ValueError, match="port 70000 is out of range"):
        sharded.ShardedSearcherClient(["127.0.0.1:50052", "127.0.0.1:70000"])
    assert opened == []


def test_async_lookalike_refuses_a_pod_list_before_opening_a_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """AsyncLookalike(embedder, [pods]) failed opening the searcher's channel after opening the embedder's, which
    stayed open (closing an asyncio channel needs an await no caller could give it)."""
    from lookalike.client import aio

    opened: list[object] = []
    monkeypatch.setattr(aio, "AsyncEmbedderClient", lambda target: opened.append(target))
    with pytest.raises(TypeError, match="searcher is a list, expected an address or ChannelSettings"):
        AsyncLookalike(f"127.0.0.1:{free_port()}", ["127.0.0.1:1", "127.0.0.1:2"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target"):  # nor an address ChannelSettings refuses
        AsyncLookalike(f"127.0.0.1:{free_port()}", "")
    assert opened == []


def test_async_facade_matches_sync(services: tuple[str, str], grocery_val: list) -> None:
    photos = grocery_val[30:46]
    with Lookalike(*services) as lookalike:
        lookalike.index([p.path for p in photos], [p.item_id for p in photos], [p.category for p in photos])
        expected = [[(m.id, round(m.score, 5)) for m in lookalike.search(p.path, k=6).matches] for p in photos[:4]]

    async def run() -> tuple[list, list]:
        async with AsyncLookalike(*services) as lookalike:
            results = await asyncio.gather(*(lookalike.search(p.path, k=6) for p in photos[:4]))
            batch = await lookalike.search_batch([p.path for p in photos[:4]], k=6)
            return ([[(m.id, round(m.score, 5)) for m in r.matches] for r in results],
                    [[(m.id, round(m.score, 5)) for m in r.matches] for r in batch])

    one_by_one, batched = asyncio.run(run())
    assert one_by_one == expected and batched == expected


def test_client_started_before_its_server_succeeds_once_it_is_up(tmp_path: Path) -> None:
    port = free_port()
    settings = ChannelSettings(f"127.0.0.1:{port}", retries=60, backoff_initial=0.1, backoff_max=0.5, timeout=30)
    outcome: dict = {}

    def call() -> None:
        try:
            with SearcherClient(settings) as client:
                outcome["items"] = client.stats().items
        except Exception as error:  # noqa: BLE001 - asserted below
            outcome["error"] = error

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)
    assert caller.is_alive(), "the call should still be retrying while no server listens"
    started, channel = start_searcher(tmp_path, snapshot_interval=0, address_override=f"127.0.0.1:{port}")
    caller.join(20)
    channel.close()
    started.stop(None)
    assert outcome == {"items": 0}


def test_catalogue_indexing_resumes_and_reports_failures(services: tuple[str, str], grocery_val: list,
                                                         tmp_path: Path) -> None:
    bad = tmp_path / "Milk" / "corrupt.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    images = list(grocery_val[:40]) + [LabelledImage("Milk/corrupt", bad, "Milk", "Milk")]
    journal = tmp_path / "journal.txt"
    with Lookalike(*services) as lookalike:
        first = index_catalogue(lookalike, images[:25], journal=journal, batch_size=8, progress=None)
        assert (first.indexed, first.skipped, first.failed) == (25, 0, [])
        second = index_catalogue(lookalike, images, journal=journal, batch_size=8, progress=None)
        assert (second.indexed, second.skipped) == (15, 25)
        assert [item_id for item_id, _ in second.failed] == ["Milk/corrupt"]
        assert "not a readable image" in second.failed[0][1]
        assert lookalike.searcher.stats().items == 40


def test_catalogue_indexing_redoes_what_changed_and_lists_missing_files(services: tuple[str, str], grocery_val: list,
                                                                         tmp_path: Path) -> None:
    """The journal keyed each image by id, size and mtime only: moved to another category or given another
    label in the list, the image was skipped and stayed where it was. And a file missing from the list
    stopped the whole run before anything was indexed; it is now one failed item."""
    from dataclasses import replace

    images = list(grocery_val[:12])
    journal = tmp_path / "journal.txt"
    with Lookalike(*services) as lookalike:
        assert index_catalogue(lookalike, images, journal=journal, batch_size=4, progress=None).indexed == 12
        moved = [replace(image, category="Moved") if n < 3 else image for n, image in enumerate(images)]
        relabelled = [replace(image, label="relabelled") if n == 5 else image for n, image in enumerate(moved)]
        missing = LabelledImage("Milk/gone", tmp_path / "gone.jpg", "Milk", "Milk")
        again = index_catalogue(lookalike, [*relabelled, missing], journal=journal, batch_size=4, progress=None)
        assert (again.indexed, again.skipped) == (4, 8)
        assert [item_id for item_id, _ in again.failed] == ["Milk/gone"] and "No such file" in again.failed[0][1]
        shards = {s.category: s.items for s in lookalike.searcher.stats().shards if s.items}
        assert shards.get("Moved") == 3 and sum(shards.values()) == 12
        found = lookalike.search(images[5].path, k=1, routing="all").matches[0]
        assert found.id == images[5].item_id and found.attributes["label"] == "relabelled"
        assert index_catalogue(lookalike, relabelled, journal=journal, batch_size=4, progress=None).skipped == 12


def test_the_journal_knows_the_model_each_image_was_stored_with(embedder, model_dir: Path, grocery_val: list,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal keyed images without the model: rerun against an embedder serving another model, every
    image was "already indexed (skipped)" and the run succeeded, with nothing stored under the new model.
    It held paths as given, so a run from another folder (`make demo`, then `make web`) redid everything;
    it was opened only after the first batch was stored (a bad --journal failed with items stored and none
    recorded); and an id listed twice was counted twice (skipped -1). Items recorded their path as given, so
    the page, run from another folder, found no photo for them."""
    import shutil
    from dataclasses import replace

    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    other_model = tmp_path / "other-model"
    shutil.copytree(model_dir, other_model)
    manifest = json.loads((other_model / "manifest.json").read_text())
    manifest["model_id"] += "-retrained"
    (other_model / "manifest.json").write_text(json.dumps(manifest))
    other, other_port = create_server(EmbedderConfig(model_dir=other_model, address="127.0.0.1:0"))
    searcher, channel = start_searcher(tmp_path / "searcher", snapshot_interval=0)
    monkeypatch.chdir(grocery_val[0].path.parent.parent)
    relative = [replace(image, path=Path(os.path.relpath(image.path))) for image in grocery_val[:6]]
    journal = tmp_path / "journal.txt"
    try:
        with Lookalike(f"127.0.0.1:{embedder[0].port}", f"127.0.0.1:{searcher.port}") as lookalike:
            first = index_catalogue(lookalike, [*relative, relative[0]], journal=journal, progress=None)
            assert (first.indexed, first.skipped, first.failed) == (6, 0, [])
            again = index_catalogue(lookalike, grocery_val[:6], journal=journal, progress=None)  # absolute paths
            assert (again.indexed, again.skipped) == (0, 6)
            # The page finds an item's photo by the path stored with it, from wherever it runs.
            found = lookalike.search(grocery_val[0].path, k=1, routing="all").matches[0]
            assert found.attributes["path"] == str(grocery_val[0].path.resolve())
        with Lookalike(f"127.0.0.1:{other_port}", f"127.0.0.1:{searcher.port}") as lookalike:
            retrained = index_catalogue(lookalike, grocery_val[:6], journal=journal, progress=None)
            assert (retrained.indexed, retrained.skipped, len(retrained.failed)) == (0, 0, 6)
            assert "re-embed it with" in retrained.failed[0][1]
            with pytest.raises(OSError, match=f"the journal {tmp_path}/absent/journal.txt cannot be written"):
                index_catalogue(lookalike, grocery_val[6:8], journal=tmp_path / "absent" / "journal.txt",
                                progress=None)
            assert lookalike.searcher.stats().items == 6, "nothing stored before the journal was refused"
    finally:
        other.stop(None)
        channel.close()
        searcher.stop(None)


def test_catalogue_indexing_stops_when_the_embedder_is_down(services: tuple[str, str], grocery_val: list,
                                                              tmp_path: Path) -> None:
    """Every batch would meet the same UNAVAILABLE: the run raises it instead of listing the whole catalogue
    as failed batch by batch; nothing is recorded as stored."""
    from lookalike.client.connection import ChannelSettings, UnavailableError

    down = ChannelSettings(f"127.0.0.1:{free_port()}", retries=1, backoff_initial=0.05, timeout=5)
    journal = tmp_path / "journal.txt"
    with Lookalike(down, services[1]) as lookalike:
        with pytest.raises(UnavailableError):
            index_catalogue(lookalike, grocery_val[:40], journal=journal, batch_size=8, progress=None)
        with pytest.raises(ValueError, match="batch_size is 0, expected 1 or more"):
            index_catalogue(lookalike, grocery_val[:8], batch_size=0, progress=None)
    assert not journal.exists() or journal.read_text().strip() == ""


def test_cli_index_and_search(services: tuple[str, str], tmp_path: Path) -> None:
    from tests.conftest import CLOTHING

    if not CLOTHING.is_dir():
        pytest.skip("clothing-small not found (../shared/datasets is absent)")
    embedder_address, searcher_address = services
    catalogue = tmp_path / "catalogue"
    for category in ("hat", "shoes"):
        (catalogue / category).mkdir(parents=True)
        for photo in sorted((CLOTHING / "validation" / category).glob("*.jpg"))[:6]:
            (catalogue / category / photo.name).write_bytes(photo.read_bytes())
    indexed = run_cli("index", str(catalogue), "--embedder", embedder_address, "--searcher", searcher_address,
                      "--journal", str(tmp_path / "journal"), "--json")
    assert indexed.returncode == 0, indexed.stderr
    assert json.loads(indexed.stdout)["indexed"] == 12
    query = next((catalogue / "shoes").glob("*.jpg"))
    found = run_cli("search", str(query), "--embedder", embedder_address, "--searcher", searcher_address, "-k", "3",
                    "--routing", "all", "--json")
    assert found.returncode == 0, found.stderr
    matches = json.loads(found.stdout)["matches"]
    assert matches[0]["id"] == f"shoes/{query.stem}" and len(matches) == 3
    text = run_cli("search", str(query), "--embedder", embedder_address, "--searcher", searcher_address)
    assert text.returncode == 0 and "probed:" in text.stdout and f"shoes/{query.stem}" in text.stdout
    # Categories without a shard are named; when none of those asked for has one, nothing was searched: exit 1.
    typo = run_cli("search", str(query), "--embedder", embedder_address, "--searcher", searcher_address,
                   "--routing", "adaptiv", "--json")
    assert typo.returncode == 1 and "no shard for: adaptiv" in typo.stderr
    assert json.loads(typo.stdout)["unknown_categories"] == ["adaptiv"] and json.loads(typo.stdout)["matches"] == []
    partly = run_cli("search", str(query), "--embedder", embedder_address, "--searcher", searcher_address,
                     "--routing", "shoes, shoez")
    assert partly.returncode == 0 and "no shard for: shoez" in partly.stderr and f"shoes/{query.stem}" in partly.stdout
    unreachable = run_cli("search", str(query), "--embedder", f"127.0.0.1:{free_port()}", "--searcher",
                          searcher_address, timeout=120)
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr
    bad_filter = run_cli("search", str(query), "--embedder", embedder_address, "--searcher", searcher_address,
                         "--filter", "brand ==")
    assert bad_filter.returncode == 1 and "INVALID_ARGUMENT: filter" in bad_filter.stderr, bad_filter.stderr
    assert "Traceback" not in bad_filter.stderr


def test_the_demo_reuses_only_a_model_built_with_held_out_photos(model_dir: Path, tmp_path: Path) -> None:
    """`make bench` before `make demo` built the demo's model on a folder of 200 photos a class, all of them
    training it: no calibration, no fitted routing, and the demo reused it for good. A model folder without
    fitted routing is now built again, and a catalogue leaving no photo to hold out is refused."""
    import shutil

    from PIL import Image

    from lookalike.codec import read_manifest, write_manifest
    from lookalike.tools.demo import _slug, ensure_model

    catalog = tmp_path / "catalog"
    for category in ("bag", "shoe"):
        (catalog / category).mkdir(parents=True)
        for n in range(4):
            Image.new("RGB", (8, 8), (n * 40, 0, 0)).save(catalog / category / f"{n}.png")
    folder = tmp_path / "work" / "models" / f"{_slug(catalog)}-4"
    shutil.copytree(model_dir, folder)
    assert ensure_model(tmp_path / "work", catalog, 4) == folder  # fitted routing: reused as it is
    manifest = read_manifest(folder)
    manifest.ClearField("routing")
    write_manifest(folder, manifest)
    with pytest.raises(ValueError, match="has no images beyond the 4 a category the model trains on"):
        ensure_model(tmp_path / "work", catalog, 4)


@pytest.mark.slow
def test_demo_on_a_reduced_catalogue(tmp_path: Path) -> None:
    """What `make demo` runs, on 300 Fashion-MNIST images, twice (the second run reuses model and index)."""
    from lookalike.quality.fashion_mnist import DEBIAN_DIR

    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed (make setup installs it)")
    args = ["demo", "--workdir", str(tmp_path), "--catalog-size", "300", "--query-count", "20",
            "--head-per-category", "20"]
    first = run_cli(*args, "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(first.stdout)  # stdout is the report alone; progress goes to stderr
    assert report["catalogue_items"] == 300 and report["indexed_now"] == 300 and report["queries"] == 20
    # Measured: mAP@10 0.90, routing recall 1.0 at 2.25 shards (chance mAP@10 with 10 even categories: about 0.1).
    assert report["mAP@10"] >= 0.7 and report["routing_recall"] >= 0.9 and report["failed"] == 0
    assert Path(report["contact_sheet"]).is_file()
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "already_indexed: 300" in second.stdout and "query " in second.stdout and "mAP@10:" in second.stdout
    # A SIGTERM stops the services the demo started (they were left running, holding the searcher's data
    # folder: the next run failed "another searcher is using the data folder").
    import signal
    import subprocess
    import sys

    demo = subprocess.Popen([sys.executable, "-m", "lookalike.tools.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert demo.stderr is not None
    for line in demo.stderr:
        if line.startswith("indexing "):  # both services are up
            break
    demo.send_signal(signal.SIGTERM)
    _, rest = demo.communicate(timeout=60)
    assert demo.returncode == 130 and "lookalike demo: interrupted" in rest, rest
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "searcher")]).returncode == 1, "a service was left running"
    # A catalogue image that cannot be stored fails the run (exit 1), as `lookalike index` does.
    sorted((tmp_path / "fashion-mnist" / "train").rglob("*.png"))[0].write_bytes(b"not a png")
    third = run_cli(*args)
    assert third.returncode == 1 and "failed: 1" in third.stdout, third.stdout + third.stderr


def test_cli_export_builds_a_verified_model(tmp_path: Path) -> None:
    from lookalike.codec import read_manifest
    from tests.conftest import CLOTHING

    if not CLOTHING.is_dir():
        pytest.skip("clothing-small not found (../shared/datasets is absent)")
    result = run_cli("export", "--catalog", str(CLOTHING / "train"), "--max-per-category", "3", "--out",
                     str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "10 categories" in result.stdout
    manifest = read_manifest(tmp_path / "model")
    assert manifest.parity.passed and len(manifest.labels) == 10


def test_cli_bench_searcher_prints_ratios() -> None:
    result = run_cli("bench", "searcher", "--items", "3000", "--dimension", "32", "--seconds", "0.3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["items"] == 3000 and report["restart_from_snapshots_seconds"] > 0
    routings = {row["routing"] for row in report["rows"]}
    assert {"one shard (top-1 category)", "adaptive (threshold 0.9, at most 4 shards)", "all shards"} < routings
    assert any("mixed per request" in r for r in routings) and any("(SearchBatch)" in r for r in routings)
    assert all(row["ratio"] > 0 for row in report["rows"])
    # Every answer lies in the probed shards, so it cannot hold more of the global top 10 than of theirs.
    assert all(row["recall_probed"] >= 0.9 and 0 < row["recall_global"] <= row["recall_probed"]
               for row in report["rows"])
    # One shard searched one query per call or 32 per call: the same index and ef, the same answers.
    recalls = {row["routing"]: (row["recall_probed"], row["recall_global"]) for row in report["rows"]
               if row["path"] == "gRPC searcher"}
    assert recalls["one shard, 32 queries per call (SearchBatch)"] == recalls["one shard (top-1 category)"]


def test_cli_bench_servers_compares_the_thread_pool_and_asyncio_servers() -> None:
    result = run_cli("bench", "servers", "--items", "3000", "--dimension", "32", "--seconds", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [(row["path"].split(",")[0], row["clients"]) for row in rows] == [
        ("servicer in process (decode", 1), ("servicer in process (decode", 8)] + [
        (server, clients) for server in ("grpc.server", "grpc.aio server", "grpc.aio server") for clients in (1, 8)]
    assert all(row["queries_per_second"] > 0 and row["client_cpu_ms"] > 0 for row in rows)
    assert rows[0]["server_cpu_ms"] is None and all(row["server_cpu_ms"] > 0 for row in rows[2:])


@pytest.mark.slow
def test_cli_bench_peers_runs_every_system_on_the_same_vectors() -> None:
    """Chroma (its server) and Milvus Lite, installed on first use into var/peers-venv (kept for later runs),
    against the searcher on a small catalogue: every system and mode at recall@10 >= 0.95."""
    result = run_cli("bench", "peers", "--items", "3000", "--dimension", "32", "--seconds", "0.2", "--json",
                     timeout=1200)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [system["system"] for system in report["systems"]] == ["lookalike", "chroma", "milvus-lite"]
    for system in report["systems"]:
        assert system["ingest_items_per_second"] > 0 and system["server_memory_bytes_per_item"] > 0
        # (At 3,000 items the growth over the second half is within the allocator's noise: present, not sized.)
        assert math.isfinite(system["server_memory_bytes_per_further_item"])
        assert [(row["mode"], row["clients"]) for row in system["rows"]] == [
            ("category-scoped", 1), ("category-scoped", 8), ("global", 1), ("global", 8)]
        assert all(row["recall_at_10"] >= 0.95 and row["queries_per_second"] > 0 for row in system["rows"])
    assert all(row["lookalike_over_this"] == 1.0 for row in report["systems"][0]["rows"])


def test_cli_bench_embedder_measures_the_given_models(model_dir: Path) -> None:
    """--model, repeated: every scenario for each model, named by its id, ratios against its own in-process loop."""
    from lookalike.codec import read_manifest

    result = run_cli("bench", "embedder", "--model", str(model_dir), "--model", str(model_dir), "--seconds", "0.3",
                     "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert {row["model"] for row in rows} == {read_manifest(model_dir).model_id} and len(rows) == 14
    assert rows[0]["ratio_to_in_process"] == 1.0 and all(row["images_per_second"] > 0 for row in rows)
    # Each gRPC row also against the in-process decode + run loop with as many images per call.
    assert [row["ratio_to_same_work_in_process"] for row in rows[1:3]] == [1.0, 1.0]
    assert all(row["ratio_to_same_work_in_process"] > 0 for row in rows[1:7])


def test_cli_bench_gpu_runs_every_step_on_the_cpu_and_refuses_a_missing_gpu(model_dir: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """The GPU run prepared for a GPU machine, here with --providers cpu (CI has no GPU): parity of fp32 and the
    fp16 twin it writes beside the model, in-process rows with and without IOBinding, host decode and gRPC rows.
    Asked for CUDA where onnxruntime has none, it stops with the provider named instead of measuring the CPU."""
    import shutil

    from tests.conftest import GROCERY

    if not GROCERY.is_dir():
        pytest.skip(f"real photos not found at {GROCERY}")
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    result = run_cli("bench", "gpu", "--model", str(model), "--images", str(GROCERY / "val.txt"), "--providers", "cpu",
                     "--batch-sizes", "1,4", "--seconds", "0.2", "--gpu-clients", "2", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(p["precision"], p["providers"]) for p in report["parity"]] == [
        ("fp32", ["CPUExecutionProvider"]), ("fp16", ["CPUExecutionProvider"])]
    assert all(p["min_cosine"] >= 0.999 and p["category_agreement"] >= 0.9 for p in report["parity"])
    assert (tmp_path / "model-fp16" / "manifest.json").is_file()
    steps = [(r["step"].split(",")[0], r["precision"], r["images_per_call"], r["clients"]) for r in report["rows"]]
    in_process = [("in-process", precision, size, 1) for precision in ("fp32", "fp16") for size in (1, 4) for _ in (0, 1)]
    grpc_rows = [("gRPC embedder from JPEG bytes", precision, per_call, clients) for precision in ("fp32", "fp16")
                 for per_call, clients in ((1, 1), (8, 2), (32, 2))]
    assert steps == in_process + [("JPEG decode on the host", "-", 1, os.cpu_count())] + grpc_rows
    assert all(r["images_per_second"] > 0 and r["gpu_utilisation_percent"] is None for r in report["rows"])
    # The saved report reads back as the table scripts/gpu_bench.sh prints: a line per parity and per row.
    from lookalike.tools.bench_gpu import print_report

    print_report(report)
    table = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("parity ") for line in table) == 2
    assert [line.split("  ")[0] for line in table[-len(report["rows"]):]] == [r["step"] for r in report["rows"]]

    missing = run_cli("bench", "gpu", "--model", str(model), "--images", str(GROCERY / "val.txt"), "--providers",
                      "cuda,cpu", "--batch-sizes", "1", "--seconds", "0.2")
    assert missing.returncode != 0 and "CUDAExecutionProvider requested but not active" in missing.stderr


def test_cli_bench_photo_times_each_call_alone_and_both_in_turn(model_dir: Path, grocery_val: list,
                                                                tmp_path: Path) -> None:
    """Embed alone, Search alone, then photo to results, each with every process's CPU per call; the query
    photos from --images."""
    for image in grocery_val[:3]:
        (tmp_path / "queries" / image.category).mkdir(parents=True, exist_ok=True)
        (tmp_path / "queries" / image.category / image.path.name).write_bytes(image.read_bytes())
    result = run_cli("bench", "photo", "--model", str(model_dir), "--items", "120", "--seconds", "0.3", "--json",
                     "--images", str(tmp_path / "queries"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["catalogue"] == 120 and report["queries"] == 3
    embed, search, photo = report["rows"]
    assert [embed["path"], search["path"]] == ["Embed alone", "Search alone"] and photo["path"].startswith("photo")
    assert all(row["calls"] > 0 and row["p50_ms"] > 0 and row["client_cpu_ms"] > 0 for row in report["rows"])
    assert embed["embedder_cpu_ms"] > 0 and search["searcher_cpu_ms"] > 0
    assert photo["embed_p50_ms"] < photo["p50_ms"] and photo["search_p50_ms"] < photo["p50_ms"]
    assert photo["ratio"] == round(photo["p50_ms"] / (embed["p50_ms"] + search["p50_ms"]), 3)


def test_cli_bench_filters_prints_every_method() -> None:
    result = run_cli("bench", "filters", "--items", "3000", "--dimension", "32", "--seconds", "0.2", "--ef", "64",
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    methods = {row["method"] for row in report["rows"]}
    assert len(methods) == 4 and {row["selectivity"] for row in report["rows"]} == {0.5, 0.1, 0.01, 0.001}
    assert all(row["recall_at_10"] == 1.0 for row in report["rows"] if row["method"].startswith("exact"))
    assert len(report["batch"]) == 4 and all(row["queries_per_second"] > 0 for row in report["batch"])


@pytest.fixture()
def fitted_routing_model(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The test model with routing values set in its manifest (as if fitted at export: prior weight 0.5,
    threshold 1, at most 3 shards), served by its own embedder; yields the folder and the embedder's address."""
    import shutil

    from lookalike.codec import read_manifest, write_manifest
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    manifest = read_manifest(folder)
    manifest.routing.threshold, manifest.routing.max_shards, manifest.routing.prior_weight = 1.0, 3, 0.5
    write_manifest(folder, manifest)
    started, port = create_server(EmbedderConfig(model_dir=folder, address="127.0.0.1:0"))
    yield folder, f"127.0.0.1:{port}"
    started.stop(None)


def test_facades_route_with_the_models_fitted_values_unless_given_others(fitted_routing_model: tuple[Path, str],
                                                                         tmp_path: Path, grocery_val: list) -> None:
    """Adaptive searches send the manifest's threshold, shard cap and prior weight: 3 shards probed and every
    score = cosine + 0.5 ln p(category); values given to the facade win (prior weight 0: plain cosine)."""
    import math

    _, embedder_address = fitted_routing_model
    searcher, channel = start_searcher(tmp_path / "searcher", snapshot_interval=0)
    services = (embedder_address, f"127.0.0.1:{searcher.port}")
    photos = grocery_val[:40]
    try:
        with Lookalike(*services) as lookalike:
            assert lookalike.routing == (1.0, 3, 0.5)
            lookalike.index([p.path for p in photos], [p.item_id for p in photos], [p.category for p in photos])
            result = lookalike.search(photos[0].path, k=10)
            probability = dict(result.categories)
            assert len(result.probes) == 3
            for match in result.matches:
                assert match.score == pytest.approx(match.similarity + 0.5 * math.log(probability[match.category]),
                                                    abs=1e-5)
        with Lookalike(*services, prior_weight=0.0, max_shards=2) as plain:
            assert plain.routing == (1.0, 2, 0.0)
            result = plain.search(photos[0].path, k=10)
            assert len(result.probes) == 2 and all(m.score == m.similarity for m in result.matches)

        async def routed() -> tuple[tuple[float, int, float | None], int]:
            async with AsyncLookalike(*services) as lookalike:
                return await lookalike.routing(), len((await lookalike.search(photos[0].path)).probes)

        assert asyncio.run(routed()) == ((1.0, 3, 0.5), 3)
    finally:
        channel.close()
        searcher.stop(None)


def test_searcher_started_with_a_models_routing_applies_it_where_requests_leave_it_unset(
        fitted_routing_model: tuple[Path, str], tmp_path: Path, grocery_val: list) -> None:
    """--routing-model: requests that leave threshold, shard cap or prior weight unset get the manifest's; a
    request that sets the prior weight to 0 gets plain cosine. A manifest without fitted routing is refused."""
    import math

    from lookalike.client.embedder_client import EmbedderClient
    from lookalike.client.searcher_client import CatalogueItem, routing_for
    from lookalike.codec import read_manifest, write_manifest
    from lookalike.searcher.config import SearcherConfig

    folder, embedder_address = fitted_routing_model
    searcher, channel = start_searcher(tmp_path / "searcher", snapshot_interval=0, routing_model=folder)
    photos = grocery_val[:40]
    try:
        with EmbedderClient(embedder_address) as embedder, SearcherClient(f"127.0.0.1:{searcher.port}") as client:
            model_id = embedder.model_info().model_id
            embedded = embedder.embed([p.path for p in photos])
            client.upsert([CatalogueItem(p.item_id, p.category, e.vector, model_id) for p, e in zip(photos, embedded)])
            query = embedded[0]
            probability = dict(query.categories)
            unset = client.search(query.vector, model_id, 10, routing_for(probabilities=query.categories))
            assert len(unset.probes) == 3
            for hit in unset.hits:
                assert hit.score == pytest.approx(hit.similarity + 0.5 * math.log(probability[hit.category]), abs=1e-5)
            plain = client.search(query.vector, model_id, 10, routing_for(probabilities=query.categories,
                                                                           prior_weight=0.0))
            assert all(hit.score == hit.similarity for hit in plain.hits)
    finally:
        channel.close()
        searcher.stop(None)
    manifest = read_manifest(folder)
    manifest.ClearField("routing")
    write_manifest(folder, manifest)
    with pytest.raises(ValueError, match="no fitted routing defaults"):
        SearcherConfig(data_dir=tmp_path / "other", routing_model=folder).routing_defaults()


def test_writes_and_batches_are_split_to_the_searchers_reported_limits(embedder, grocery_val: list,
                                                                      tmp_path: Path) -> None:
    """A searcher started with --max-batch 3 and --max-batch-queries 2 refuses larger requests; the clients read
    its limits from GetStats and split to fit (sync, asyncio, and a pod list taking the lowest of its pods')."""
    started_embedder, _ = embedder
    searcher, channel = start_searcher(tmp_path / "small", snapshot_interval=0, max_batch=3, max_batch_queries=2)
    roomy, roomy_channel = start_searcher(tmp_path / "roomy", snapshot_interval=0)
    embedder_address, small = f"127.0.0.1:{started_embedder.port}", f"127.0.0.1:{searcher.port}"
    photos = grocery_val[60:67]
    try:
        with Lookalike(embedder_address, small) as lookalike:
            result = lookalike.index([p.path for p in photos], [p.item_id for p in photos],
                                     [p.category for p in photos])
            assert sorted(result.indexed) == sorted(p.item_id for p in photos) and not result.failed
            found = lookalike.search_batch([p.path for p in photos[:5]], k=1, routing="all")
            assert [r.matches[0].id for r in found] == [p.item_id for p in photos[:5]]

        async def run() -> list[str]:
            async with AsyncLookalike(embedder_address, small) as lookalike:
                await lookalike.index([p.path for p in photos], [p.item_id for p in photos],
                                      [p.category for p in photos])
                return [r.matches[0].id for r in await lookalike.search_batch([p.path for p in photos[:5]], k=1,
                                                                                routing="all")]

        assert asyncio.run(run()) == [p.item_id for p in photos[:5]]
        with Lookalike(embedder_address, [small, f"127.0.0.1:{roomy.port}"]) as pods:
            assert (pods.searcher.limits().max_batch, pods.searcher.limits().max_batch_queries) == (3, 2)
            result = pods.index([p.path for p in photos], [p.item_id for p in photos], [p.category for p in photos])
            assert sorted(result.indexed) == sorted(p.item_id for p in photos) and not result.failed
    finally:
        for started, opened in ((searcher, channel), (roomy, roomy_channel)):
            opened.close()
            started.stop(None)
