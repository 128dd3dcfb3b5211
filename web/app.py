"""The web demo's page: search the catalogue by photo through the client library, like any other client."""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import streamlit as st
from PIL import Image, ImageDraw, ImageOps

from lookalike.client.connection import (ChannelSettings, DeadlineExceededError, LookalikeError, UnavailableError,
                                         deadline_after, library_error, time_left)
from lookalike.client.facade import Lookalike, SearchResult, routing_request, search_result, searcher_target
from lookalike.pixels import to_rgb, upright
from lookalike.routing import RoutingDefaults
from lookalike.v1 import embedder_pb2, searcher_pb2

# What the page calls each routing mode -> the facade's name for it.
ROUTING_MODES = {"global": "all", "top-1 shard": "top1", "adaptive": "adaptive"}
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp"]
THUMBNAIL, SMALL_THUMBNAIL, COLUMNS, COMPARED_HITS = 160, 72, 5, 5
TOP_CATEGORIES_SHOWN = 10
FACE_BOX_COLOUR = (0, 200, 0)
# A page waits on a person: a service that is down should say so within a second or two, not after
# the library's default eight retries; a query (its embedding and its searches) gets CALL_TIMEOUT in all.
CALL_TIMEOUT, CALL_RETRIES = 15.0, 2

Answer = TypeVar("Answer")

# Pixels decoded for a thumbnail, counted after a JPEG's reduced-scale draft, as the embedder counts them:
# Pillow's own check counts a JPEG's full size, so a 192-megapixel camera JPEG the embedder took (it decodes
# at an eighth) had no preview.
MAX_DECODED_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class AppSettings:
    """Where the services are, and the photos offered as sample queries."""

    embedder: str
    searcher: str
    samples: tuple[Path, ...] = ()
    # The folders catalogue photos may be shown from (resolved): an item's attributes["path"] names a file on
    # this machine, and anyone who may write items could otherwise have the page show any image file here.
    image_roots: tuple[Path, ...] = ()


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> AppSettings:
    """`streamlit run app.py -- --embedder A --searcher B --sample PHOTO ...`, or LOOKALIKE_EMBEDDER,
    LOOKALIKE_SEARCHER and LOOKALIKE_SAMPLES (paths joined by os.pathsep) in the environment."""
    # parse_known_args and no abbreviations: under a test runner argv holds the runner's own options.
    parser = argparse.ArgumentParser(prog="lookalike-web", add_help=False, allow_abbrev=False)
    parser.add_argument("--embedder", default=environ.get("LOOKALIKE_EMBEDDER", "localhost:50051"))
    parser.add_argument("--searcher", default=environ.get("LOOKALIKE_SEARCHER", "localhost:50052"))
    parser.add_argument("--sample", action="append", type=Path)
    parser.add_argument("--images-root", action="append", type=Path)
    args, _ = parser.parse_known_args(list(argv))
    samples = args.sample or [Path(p) for p in environ.get("LOOKALIKE_SAMPLES", "").split(os.pathsep) if p]
    roots = args.images_root or [Path(p) for p in environ.get("LOOKALIKE_IMAGES_ROOTS", "").split(os.pathsep) if p]
    return AppSettings(args.embedder, args.searcher, tuple(samples), tuple(root.resolve() for root in roots))


def _settings(target: str) -> ChannelSettings:
    return ChannelSettings(target, timeout=CALL_TIMEOUT, retries=CALL_RETRIES)


@st.cache_resource(show_spinner=False)
def connect(embedder: str, searcher: str) -> Lookalike:
    """One facade per pair of addresses, shared by every browser session (gRPC channels are thread-safe).

    `searcher` is one target (host:port, ipv4:a,b or dns:///name) or comma-separated pod addresses
    (sharded by category), as the CLI takes it.
    """
    target = searcher_target(searcher)
    if isinstance(target, str):
        return Lookalike(_settings(embedder), _settings(target))
    return Lookalike(_settings(embedder), [_settings(pod) for pod in target])


def remembered(slot: str, key: tuple, compute: Callable[[], Answer]) -> Answer:
    """compute()'s answer for `key`, kept in this browser session's `slot` until the key changes: Streamlit
    reruns the whole page on every widget change, and one that only changes what is shown (the routing
    radio) must not embed and search the photo again."""
    kept = st.session_state.get(slot)
    if kept is not None and kept[0] == key:
        return kept[1]
    answer = compute()
    st.session_state[slot] = (key, answer)
    return answer


def search_modes(lookalike: Lookalike, image: bytes, model_id: str, k: int, modes: Sequence[str], threshold: float,
                 max_shards: int, prior_weight: float, timeout: float = CALL_TIMEOUT) -> dict[str, SearchResult]:
    """Embeds the photo once and searches it under each routing mode (keys of ROUTING_MODES), so the
    modes are compared on the same embedding, all within `timeout` (each call had all of it: a slow searcher
    kept the page waiting three times as long). Raises the library's error, carrying the server's message,
    when the embedder refuses the photo or a call fails."""
    deadline = deadline_after(timeout)
    started = time.perf_counter()
    embedded = lookalike.embedder.embed([image], ids=["query"], timeout=time_left(deadline, "Embedder.Embed"))[0]
    if not embedded.ok:
        raise library_error(embedded.error_code, embedded.error, "Embedder.Embed")
    embed_seconds = time.perf_counter() - started
    results: dict[str, SearchResult] = {}
    for mode in modes:
        routing = routing_request(ROUTING_MODES[mode], embedded, threshold, max_shards, prior_weight)
        searching = time.perf_counter()
        response = lookalike.searcher.search(embedded.vector, model_id, k, routing,
                                             timeout=time_left(deadline, "Searcher.Search"))
        results[mode] = search_result(embedded, response, embed_seconds, time.perf_counter() - searching)
    return results


def describe_error(error: LookalikeError, settings: AppSettings) -> str:
    """What a person should read for a failed call: which service, where, and the server's own words."""
    embedder = error.method.startswith("Embedder")
    service, address = ("embedder", settings.embedder) if embedder else ("searcher", settings.searcher)
    if isinstance(error, UnavailableError):
        return (f"The {service} at {plain(address)} cannot be reached ({plain(error.details)}). Start it or check "
                f"the address; the page tries again on your next action.")
    if isinstance(error, DeadlineExceededError):
        return f"The {service} at {plain(address)} did not answer in time ({plain(error.details)})."
    if error.method == "Embedder.Embed":
        return f"The embedder refused this photo ({error.code.name}): {plain(error.details)}"
    return f"The {service} at {plain(address)} answered {error.code.name}: {plain(error.details)}"


def model_facts(info: embedder_pb2.GetModelInfoResponse) -> dict[str, str]:
    """The served model as the embedder's GetModelInfo describes it."""
    manifest = info.manifest
    return {
        "model id": info.model_id,
        "backbone": manifest.backbone or "(not recorded)",
        "input size": f"{manifest.input.width}×{manifest.input.height} {manifest.input.layout} {manifest.input.dtype}",
        "embedding": f"{info.dimension}-d, {manifest.metric or 'cosine'}, {manifest.precision or 'fp32'}",
        "providers": ", ".join(info.providers),
        "labels": f"{len(info.labels)}: " + ", ".join(info.labels),
    }


def shard_sizes(stats: searcher_pb2.GetStatsResponse) -> dict[str, int]:
    """Live items per category (the parts of a split category added up), by category name."""
    sizes: dict[str, int] = {}
    for shard in stats.shards:
        sizes[shard.category] = sizes.get(shard.category, 0) + int(shard.items)
    return dict(sorted(sizes.items()))


def _thumbnail_of(image: Image.Image, size: int) -> bytes:
    # JPEG decodes at a reduced scale when the thumbnail is much smaller than the photo.
    image.draft("RGB", (size, size))
    if image.width * image.height > MAX_DECODED_PIXELS:
        raise ValueError(f"{image.width}x{image.height} pixels to decode, more than {MAX_DECODED_PIXELS}")
    image = to_rgb(upright(image))  # as the embedder took it
    # Tiny images (Fashion-MNIST's 28x28) stay crisp enlarged pixel by pixel; photos are resampled smoothly.
    method = Image.Resampling.NEAREST if max(image.size) * 3 <= size else Image.Resampling.BICUBIC
    buffer = io.BytesIO()
    ImageOps.pad(image, (size, size), method=method, color="white").save(buffer, "PNG")
    return buffer.getvalue()


@st.cache_data(show_spinner=False, max_entries=4000)
def file_thumbnail(path: str, modified_ns: int, size: int) -> bytes:
    """A square PNG thumbnail of an image file; the modification time in the key refreshes a changed file."""
    with Image.open(path) as image:
        return _thumbnail_of(image, size)


def catalogue_thumbnail(attributes: Mapping[str, str], roots: Sequence[Path], size: int = THUMBNAIL) -> bytes | None:
    """The thumbnail of a catalogue item from its own file (indexing records it as attributes["path"]);
    None when the item has no path, the file is not in one of `roots` (resolved), or not on this machine or
    not readable."""
    path = attributes.get("path")
    if not path:
        return None
    try:
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            return None
        return file_thumbnail(str(resolved), os.stat(resolved).st_mtime_ns, size)
    except (OSError, ValueError):
        return None


def query_preview(data: bytes, size: int = 224, face: tuple[int, int, int, int] | None = None) -> bytes | None:
    """The query photo, shown only after the embedder accepted it (so its own size limits were applied first);
    with the face box a face model embedded drawn on it (the box is in the upright photo's pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if face is None:
                return _thumbnail_of(image, size)
            turned = to_rgb(upright(image))
            ImageDraw.Draw(turned).rectangle((face[0], face[1], face[2] - 1, face[3] - 1), outline=FACE_BOX_COLOUR,
                                             width=max(2, max(turned.size) // 100))
            return _thumbnail_of(turned, size)
    except (OSError, ValueError):
        return None


def one_line(text: str) -> str:
    """Markdown reads the lines of a block before anything inside them: a line break in the text would end the
    escaping or the code span around it (a next line starting with # is a heading, a blank line ends the
    paragraph), so every run of them is one space."""
    return re.sub(r"[\r\n]+", " ", text)


def plain(text: str) -> str:
    """Text from the catalogue or a file name, shown as itself in markdown: Streamlit would otherwise read
    `*`, `_`, `[` or `$` in an id or an attribute as emphasis, links or LaTeX."""
    return re.sub(r"([\\`*_{}\[\]<>|~$#])", r"\\\1", one_line(text))


def literal(text: str) -> str:
    """Text any catalogue writer chose (ids, categories, attributes) as inline code: shown as itself, never as a
    link. Streamlit's markdown links bare URLs, www. names and e-mail addresses even when escaped, so
    plain() would let a writer put links on the page."""
    text = one_line(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # CommonMark strips one space each side
    return f"{fence}{pad}{text}{pad}{fence}"


def sample_name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _call(what: str, settings: AppSettings, call: Callable[[], Answer]) -> Answer | None:
    """call() or, when it fails, None after showing what went wrong."""
    try:
        return call()
    except LookalikeError as error:
        st.error(f"{what}: {describe_error(error, settings)}")
        return None


def _on_upload() -> None:
    # The query is whatever was touched last: a new upload, or (once the upload is removed) the sample.
    st.session_state["source"] = "upload" if st.session_state.get("upload") is not None else "sample"


def _on_sample() -> None:
    st.session_state["source"] = "sample"


def choose_query(settings: AppSettings) -> tuple[str, bytes] | None:
    """The query's name and bytes: an uploaded photo or a sample, whichever was chosen last."""
    st.session_state.setdefault("source", "sample")
    upload_column, sample_column = st.columns([3, 2])
    uploaded = upload_column.file_uploader("Upload a photo (JPEG, PNG or WebP)", type=UPLOAD_TYPES, key="upload",
                                           on_change=_on_upload)
    names = {sample_name(path): path for path in settings.samples}
    chosen = sample_column.selectbox("… or pick a sample query (held-out photos)", list(names), key="sample",
                                     index=0 if names else None, on_change=_on_sample,
                                     placeholder="no sample photos were given", disabled=not names)
    if uploaded is not None and (st.session_state["source"] == "upload" or not chosen):
        return f"uploaded {uploaded.name}", uploaded.getvalue()
    if chosen:
        try:
            return f"sample {chosen}", names[chosen].read_bytes()
        except OSError as error:
            st.error(f"The sample photo {plain(str(names[chosen]))} cannot be read: {plain(str(error))}")
    return None


def routing_start(info: embedder_pb2.GetModelInfoResponse | None,
                  stats: searcher_pb2.GetStatsResponse | None) -> tuple[RoutingDefaults, bool]:
    """Where the routing controls start, and whether that is the model's: its values fitted on validation photos
    at export, else the searcher's defaults (what a search that leaves them unset gets: the page started from
    the built-in ones, probing other shards than the library's search of the same photo)."""
    fitted = RoutingDefaults.of_model(info.manifest) if info is not None else None
    if fitted is not None:
        return fitted, True
    return (RoutingDefaults.from_message(stats.routing_defaults) if stats is not None else RoutingDefaults()), False


def sidebar(settings: AppSettings, info: embedder_pb2.GetModelInfoResponse | None,
            stats: searcher_pb2.GetStatsResponse | None) -> tuple[str, int, float, int, float]:
    """The controls (routing mode, k, threshold, shard cap, prior weight), the model and the catalogue."""
    bar = st.sidebar
    bar.header("Search")
    mode = bar.radio("Routing for the results", list(ROUTING_MODES), index=2, key="routing",
                     help="global: every shard; top-1 shard: only the most probable category's; adaptive: "
                          "categories by probability until the threshold is covered")
    k = bar.slider("Results (k)", 1, 50, 10, key="k")
    start, fitted = routing_start(info, stats)
    threshold = bar.slider("Routing threshold", 0.05, 1.0, min(max(start.threshold, 0.05), 1.0), 0.01, key="threshold",
                           help="adaptive routing probes the most probable categories until their probabilities "
                                "add up to this")
    # A number, not a slider: a slider's range would have to follow the shard count, which changes.
    max_shards = int(bar.number_input("Most shards probed (adaptive)", min_value=1, max_value=1000,
                                      value=min(max(start.max_shards, 1), 1000), step=1, key="max_shards"))
    prior_weight = bar.slider("Prior weight", 0.0, 2.0, min(start.prior_weight, 2.0), 0.01, key="prior_weight",
                              help="hits from all probed shards merge by cosine + weight × ln p(category)")
    bar.caption("Routing starts at the model's values, fitted on validation photos at export." if fitted else
                "Routing starts at the searcher's defaults (the model has no fitted values).")
    bar.header("Model")
    bar.caption(f"embedder at {settings.embedder}")
    if info is not None:
        bar.markdown("  \n".join(f"**{name}:** {plain(value)}" for name, value in model_facts(info).items()))
    else:
        bar.warning("unavailable")
    bar.header("Catalogue")
    bar.caption(f"searcher at {settings.searcher}")
    if stats is not None:
        sizes = shard_sizes(stats)
        bar.markdown(f"**{sum(sizes.values()):,} items in {shards(len(sizes))}**")
        bar.dataframe({"shard": list(sizes), "items": list(sizes.values())}, hide_index=True)
    else:
        bar.warning("unavailable")
    return mode, k, threshold, max_shards, prior_weight


def shards(count: int) -> str:
    return f"{count} shard" if count == 1 else f"{count} shards"


def by_probability(mode: str, result: SearchResult) -> bool:
    # Only adaptive routing probes by the classifier's probability: explicit routing (top-1) reports 1
    # for its shard, and global (or adaptive's fallback to every shard) 0.
    return ROUTING_MODES[mode] == "adaptive" and any(probe.probability for probe in result.probes)


def probed_line(result: SearchResult, mode: str) -> str:
    if by_probability(mode, result):
        return ", ".join(f"{literal(p.category)} ({p.probability:.2f})" for p in result.probes)
    return ", ".join(literal(p.category) for p in result.probes)


def show_result(name: str, data: bytes, result: SearchResult, mode: str, prior_weight: float,
                roots: Sequence[Path]) -> None:
    """Prediction, probed shards and timings beside the query, then the result grid."""
    query_column, chart_column, probe_column = st.columns([1, 2, 2])
    query_column.markdown(f"**Query:** {plain(name)}")
    preview = query_preview(data, face=result.face)
    if preview is not None:
        query_column.image(preview, caption="the face embedded (green box)" if result.face else None)
    top = result.categories[:TOP_CATEGORIES_SHOWN]
    chart_column.markdown(f"**Predicted category:** {plain(top[0][0])} ({top[0][1]:.2f})" if top
                          else "**No categories**")
    chart_column.bar_chart({"category": [c for c, _ in top], "probability": [p for _, p in top]}, x="category",
                           y="probability", horizontal=True, sort="-probability", height=min(60 + 26 * len(top), 320))
    probe_column.markdown(f"**Probed shards ({mode}, {len(result.probes)}):** {probed_line(result, mode)}")
    table: dict[str, list[object]] = {"shard": [p.category for p in result.probes]}
    if by_probability(mode, result):
        table["probability"] = [round(p.probability, 4) for p in result.probes]
    table.update({"items": [p.items for p in result.probes], "ef": [p.ef for p in result.probes],
                  "ms in shard": [round(p.seconds * 1000, 2) for p in result.probes]})
    probe_column.dataframe(table, hide_index=True)
    embed_metric, search_metric = probe_column.columns(2)
    embed_metric.metric("Embedder", f"{result.embed_seconds * 1000:.1f} ms")
    search_metric.metric("Searcher", f"{result.search_seconds * 1000:.1f} ms")
    if result.missing_shards:
        probe_column.warning("Not searched, their searchers are down: " + ", ".join(map(plain, result.missing_shards)))
    if result.unknown_categories:
        probe_column.warning("No such shards: " + ", ".join(map(plain, result.unknown_categories)))

    st.subheader(f"Top {len(result.matches)} results")
    if not result.matches:
        st.info("The probed shards hold no items.")
    with st.container(key="results"):
        for start in range(0, len(result.matches), COLUMNS):
            for column, (rank, match) in zip(st.columns(COLUMNS), enumerate(result.matches[start:start + COLUMNS],
                                                                            start=start + 1)):
                thumb = catalogue_thumbnail(match.attributes, roots)
                if thumb is not None:
                    column.image(thumb)
                else:
                    column.caption("(the item's image file is not on this machine)")
                score = f" · score {match.score:.3f}" if prior_weight else ""
                column.markdown(f"**{rank}. {literal(match.id)}**  \n"
                                f"similarity {match.similarity:.3f}{score} · {literal(match.category)}")
                extra = {key: value for key, value in match.attributes.items() if key != "path"}
                if extra:
                    column.caption(", ".join(f"{literal(key)}: {literal(value)}" for key, value in extra.items()))


def show_comparison(results: dict[str, SearchResult], roots: Sequence[Path]) -> None:
    """The same photo under each routing mode, side by side: shards probed, time, and agreement with global."""
    st.subheader("Routing modes compared")
    everywhere = {match.id for match in results["global"].matches}
    with st.container(key="compare"):
        for column, (mode, result) in zip(st.columns(len(results)), results.items()):
            same = len(everywhere & {match.id for match in result.matches})
            column.markdown(f"**{mode}**: {shards(len(result.probes))}, {result.search_seconds * 1000:.1f} ms, "
                            f"{same} of {len(result.matches)} hits also in global's top {len(everywhere)}  \n"
                            f"probed: {probed_line(result, mode)}")
            shown = result.matches[:COMPARED_HITS]
            thumbs = [(catalogue_thumbnail(m.attributes, roots, SMALL_THUMBNAIL), f"{m.similarity:.3f}") for m in shown]
            thumbs = [(image, caption) for image, caption in thumbs if image is not None]
            if thumbs:
                column.image([image for image, _ in thumbs], caption=[caption for _, caption in thumbs])
            column.caption("  \n".join(f"{rank}. {literal(m.id)} ({literal(m.category)})"
                                       for rank, m in enumerate(shown, start=1)))


def main() -> None:
    st.set_page_config(page_title="Lookalike", layout="wide")
    settings = parse_settings(sys.argv[1:], os.environ)
    lookalike = connect(settings.embedder, settings.searcher)
    st.title("Lookalike: visual product search")
    info = _call("Model", settings, lookalike.embedder.model_info)
    stats = _call("Catalogue", settings, lookalike.searcher.stats)
    mode, k, threshold, max_shards, prior_weight = sidebar(settings, info, stats)
    query = choose_query(settings)
    if query is None:
        st.info("Upload a photo to find the catalogue items that look most like it.")
        return
    if info is None or stats is None:
        return  # the error above says which service is down
    name, data = query
    try:
        with st.spinner("Searching…"):
            # Searched again when the photo, a search control, the model or the catalogue (a write) changes.
            key = (settings.embedder, settings.searcher, info.model_id, stats.sequence, stats.items,
                   hashlib.sha256(data).hexdigest(), k, threshold, max_shards, prior_weight)
            results = remembered("results", key, lambda: search_modes(
                lookalike, data, info.model_id, k, list(ROUTING_MODES), threshold, max_shards, prior_weight))
    except LookalikeError as error:
        st.error(f"{plain(name)}: {describe_error(error, settings)}")
        return
    show_result(name, data, results[mode], mode, prior_weight, settings.image_roots)
    show_comparison(results, settings.image_roots)


if __name__ == "__main__":
    main()
