"""Several searcher pods as one searcher: categories are assigned to pods by rendezvous hashing.

When one pod cannot hold the catalogue, the searcher runs as a StatefulSet of n pods and category c
lives on pod argmax_i sha256(c, i) (highest-random-weight hashing over the ordinals 0..n-1): every client
computes the same owner with no coordination, and growing from n to n+1 pods moves only the ~1/(n+1)
of categories the new pod wins. This client routes writes to owners and fans searches out, planning
and merging with the searcher's own rule (lookalike.routing), so the answers equal those of one
searcher holding everything.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Hashable, Mapping, Sequence, TypeVar, Union

import numpy as np

from lookalike.client.connection import (ChannelSettings, DeadlineExceededError, LookalikeError, Response,
                                         UnavailableError, channel_settings, deadline_after, library_error,
                                         seconds_left, time_left)
from lookalike.client.searcher_client import CatalogueItem, FilterInput, SearcherClient, tightest
from lookalike.routing import (Routing, RoutingDefaults, RoutingPlan, merge_hits, merge_products, plan,
                               rendezvous_owner)
from lookalike.v1 import common_pb2, searcher_pb2

log = logging.getLogger(__name__)

# A server that could not answer in time (down, restarting, too slow), as against one refusing the request.
UNREACHABLE = (UnavailableError, DeadlineExceededError)

Owner = TypeVar("Owner", bound=Hashable)
# One query's answer in a batch, or why it failed.
BatchAnswer = Union[searcher_pb2.SearchResponse, LookalikeError]


def gather(calls: Mapping[Owner, Callable[[], Response]], pool: Executor,
           describe: Callable[[Owner], str] = str) -> tuple[dict[Owner, Response], dict[Owner, LookalikeError]]:
    """The calls in parallel: each owner's answer, and the error of each owner that was unreachable (any
    other error is raised). Each error names its owner (`describe`): which of several servers failed."""
    futures = {owner: pool.submit(call) for owner, call in calls.items()}
    answers: dict[Owner, Response] = {}
    unreachable: dict[Owner, LookalikeError] = {}
    for owner, future in futures.items():
        try:
            answers[owner] = future.result()
        except LookalikeError as error:
            named = library_error(error.code, f"{describe(owner)}: {error.details}", error.method)
            if not isinstance(named, UNREACHABLE):
                raise named from error
            unreachable[owner] = named
    return answers, unreachable


def search_owners(routed: RoutingPlan, owned: Mapping[Owner, list[str]],
                  search: Callable[[Owner, Routing], searcher_pb2.SearchResponse], k: int, pool: Executor,
                  strict: bool = True, distinct_products: bool = False,
                  describe: Callable[[Owner], str] = str) -> searcher_pb2.SearchResponse:
    """Asks each owner (a pod, a replica group) for its planned shards in parallel and merges the answers.

    An owner that stays unreachable within the deadline makes the search fail when `strict`; otherwise
    the answer is what the others found, and its shards are named in missing_shards.
    """
    responses, unreachable = gather({owner: (lambda owner=owner, categories=categories: search(
        owner, routed.routing_for(categories))) for owner, categories in owned.items()}, pool, describe)
    if unreachable and strict:
        raise next(iter(unreachable.values()))
    return merge_answers(routed, list(responses.values()), [c for owner in unreachable for c in owned[owner]], k,
                         distinct_products)


def search_owners_batch(requests: Sequence[searcher_pb2.SearchRequest], plans: Sequence[RoutingPlan],
                        owned: Sequence[Mapping[Owner, list[str]]],
                        search_batch: Callable[[Owner, list[searcher_pb2.SearchRequest]], list[BatchAnswer]],
                        pool: Executor, strict: bool = True,
                        describe: Callable[[Owner], str] = str) -> list[BatchAnswer]:
    """search_owners for many queries: one SearchBatch per owner, carrying each query's part for it, in
    parallel; then each query's answers merged. A query refused by an owner fails with that error."""
    per_owner: dict[Owner, list[tuple[int, searcher_pb2.SearchRequest]]] = defaultdict(list)
    for position, (request, routed, owners) in enumerate(zip(requests, plans, owned)):
        for owner, categories in owners.items():
            part = searcher_pb2.SearchRequest()
            part.CopyFrom(request)
            part.routing.CopyFrom(routed.routing_for(categories).to_message())
            per_owner[owner].append((position, part))
    results, unreachable = gather({owner: (lambda owner=owner, entries=entries: search_batch(
        owner, [part for _, part in entries])) for owner, entries in per_owner.items()}, pool, describe)
    if unreachable and strict:
        raise next(iter(unreachable.values()))
    answers: list[list[searcher_pb2.SearchResponse]] = [[] for _ in requests]
    missing: list[list[str]] = [[] for _ in requests]
    failed: dict[int, LookalikeError] = {}
    for owner in unreachable:
        for position, _ in per_owner[owner]:
            missing[position].extend(owned[position][owner])
    for owner, owner_results in results.items():
        for (position, _), result in zip(per_owner[owner], owner_results):
            if isinstance(result, LookalikeError):
                failed.setdefault(position, result)
            else:
                answers[position].append(result)
    return [failed[n] if n in failed else
            merge_answers(plans[n], answers[n], missing[n], requests[n].k, requests[n].distinct_products)
            for n in range(len(requests))]


def merge_answers(routed: RoutingPlan, responses: Sequence[searcher_pb2.SearchResponse], missing: Sequence[str],
                  k: int, distinct_products: bool = False) -> searcher_pb2.SearchResponse:
    """One answer from the owners' answers to one query: the best k hits (or products, whose photo counts
    add up over owners), probes in plan order, and the shards no owner could answer for."""
    order = {category: rank for rank, category in enumerate(routed.categories)}
    merged = searcher_pb2.SearchResponse(unknown_categories=routed.unknown_categories,
                                         missing_shards=sorted(missing, key=order.__getitem__))
    hits = [hit for response in responses for hit in response.hits]
    if distinct_products:
        for hit, photos in merge_products(hits, k, photos=lambda hit: hit.product_matches):
            merged.hits.add().CopyFrom(hit)
            merged.hits[-1].product_matches = photos
    else:
        merged.hits.extend(merge_hits(hits, k))
    merged.probes.extend(sorted((p for r in responses for p in r.probes), key=lambda p: order.get(p.category, -1)))
    return merged


def owner_of(category: str, pods: int) -> int:
    """The ordinal of the pod that owns `category` (rendezvous hashing)."""
    return rendezvous_owner(category, range(pods))


def statefulset_targets(name: str, replicas: int, port: int = 50052, namespace: str = "default",
                        service: str | None = None) -> list[str]:
    """Stable per-pod DNS names behind a StatefulSet's headless service: NAME-i.SERVICE.NAMESPACE.svc:PORT."""
    return [f"{name}-{i}.{service or name}.{namespace}.svc:{port}" for i in range(replicas)]


class ShardedSearcherClient:
    """SearcherClient's API over several pods (targets in StatefulSet ordinal order)."""

    def __init__(self, targets: Sequence[str | ChannelSettings], threshold: float | None = None,
                 max_shards: int | None = None, refresh_seconds: float = 10.0) -> None:
        """`threshold` and `max_shards` override, for probability routings that leave them unset, the defaults
        the pods report (their --routing-* settings or their routing model's), which plans use otherwise."""
        if not targets:
            raise ValueError("targets is empty, expected one address per searcher pod")
        settings = [channel_settings(target) for target in targets]  # all checked before any channel opens
        self.pods = [SearcherClient(pod) for pod in settings]
        self.threshold, self.max_shards = threshold, max_shards
        self._defaults = RoutingDefaults()
        # Categories other clients create reach this one's searches within this many seconds.
        self.refresh_seconds = refresh_seconds
        self._pool = ThreadPoolExecutor(max_workers=len(self.pods), thread_name_prefix="pods")
        self._categories: set[str] | None = None
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()
        # pod -> ids stored on another pod whose older copy (the id's category moved) may still be on this
        # one, and when it last failed to delete them (see _delete_strays).
        self._strays: dict[int, set[str]] = defaultdict(set)
        self._strays_failed_at: dict[int, float] = {}

    def owner(self, category: str) -> SearcherClient:
        return self.pods[owner_of(category, len(self.pods))]

    def _describe(self, pod: int) -> str:
        return f"searcher pod {pod} at {self.pods[pod].settings.target}"

    def _gather(self, calls: Mapping[int, Callable[[], Response]]) -> tuple[dict[int, Response],
                                                                             dict[int, LookalikeError]]:
        return gather(calls, self._pool, self._describe)

    def _fan_out(self, calls: Mapping[int, Callable[[], Response]]) -> dict[int, Response]:
        answers, unreachable = self._gather(calls)
        for error in unreachable.values():
            raise error
        return answers

    def categories(self, refresh: bool = False, timeout: float | None = None) -> set[str]:
        """Categories that have a shard on some pod (cached for refresh_seconds; writes through this client
        add theirs at once). A pod that does not answer keeps the categories last read from it, so a search
        of them fails as unreachable instead of finding them unknown; before any read, its error is raised."""
        if self._categories is not None and not refresh and time.monotonic() - self._fetched_at < self.refresh_seconds:
            return self._categories
        deadline = deadline_after(timeout)
        answers, unreachable = self._gather({i: (lambda pod=pod: pod.stats(time_left(deadline, "Searcher.GetStats")))
                                             for i, pod in enumerate(self.pods)})
        if unreachable and self._categories is None:
            raise next(iter(unreachable.values()))
        kept = {category for category in self._categories or () if owner_of(category, len(self.pods)) in unreachable}
        self._categories = kept | {shard.category for response in answers.values() for shard in response.shards}
        if answers:  # the pods share their settings
            self._defaults = RoutingDefaults.from_message(next(iter(answers.values())).routing_defaults)
        for error in unreachable.values():
            log.warning("%s; keeping the pod's categories from the last read", error)
        # Stamped even when a pod did not answer: it is asked again after refresh_seconds, not by every search
        # (each would wait out the retries of a pod that is down).
        self._fetched_at = time.monotonic()
        return self._categories

    def upsert(self, items: Sequence[CatalogueItem], timeout: float | None = None,
               replace_products: Sequence[str] = ()) -> searcher_pb2.UpsertResponse:
        """Each item goes to its category's owner; its id is removed from every other pod, so an item whose
        new category lives elsewhere moves instead of being duplicated (from a pod that is down, at a later
        write: see _delete_strays). An id given twice ends as its last copy, as in one searcher. Replaced
        products lose their other photos on the pods that receive items and all their photos on the others
        (pod by pod, not in one write: each pod has its own store). `timeout` bounds all of it."""
        deadline = deadline_after(timeout)
        pods = [owner_of(item.category, len(self.pods)) for item in items]
        last = {item.id: position for position, item in enumerate(items)}
        # One searcher applies a request's items in order. Copies of an id on two pods would each be stored,
        # then each deleted as the other's stray: only the copies on its last copy's pod are sent.
        superseded = {position for position, item in enumerate(items) if pods[position] != pods[last[item.id]]}
        positions: dict[int, list[int]] = defaultdict(list)
        for position, pod in enumerate(pods):
            if position not in superseded:
                positions[pod].append(position)
        responses = self._fan_out({pod: (lambda pod=pod, members=members: self.pods[pod].upsert(
            [items[i] for i in members], time_left(deadline, "Searcher.Upsert"), replace_products))
            for pod, members in positions.items()})
        if replace_products:
            self._fan_out({pod: (lambda pod=pod: self.pods[pod].delete((), time_left(deadline, "Searcher.Delete"),
                                                                       replace_products))
                           for pod in range(len(self.pods)) if pod not in positions})
        statuses: list[common_pb2.ItemStatus] = [common_pb2.ItemStatus()] * len(items)
        for pod, members in positions.items():
            for position, status in zip(members, responses[pod].statuses):
                statuses[position] = status
        for position in superseded:  # a copy not sent reports what became of its id
            statuses[position] = statuses[last[items[position].id]]
        stored = {pod: [items[i].id for i, status in zip(members, responses[pod].statuses) if status.code == 0]
                  for pod, members in positions.items()}
        if items:
            self._delete_strays(stored, len(items), deadline)
        if self._categories is not None:  # not read here: a write waits on no pod it did not write to
            self._categories.update(items[i].category for members in positions.values() for i in members)
        # No items: no pod was written, nothing to acknowledge (sequence 0).
        return searcher_pb2.UpsertResponse(statuses=statuses,
                                           sequence=max((r.sequence for r in responses.values()), default=0))

    def _delete_strays(self, stored: Mapping[int, Sequence[str]], chunk: int, deadline: float | None) -> None:
        """Deletes the ids just stored on each pod from every other pod, so that an id whose category now
        lives on another pod moves there instead of being served twice.

        Best effort: the items are durable on their owners, so a pod that is unreachable does not fail the
        write. Its ids are kept and deleted at a later write once it answers (tried again at most every
        refresh_seconds, so that writes do not each wait out its retries): down, it serves nothing, but it
        would serve the old copies again once it restarts. An id stored on that pod again meanwhile is no
        longer a stray there. What this process still holds when it closes is logged. Deletes go `chunk`
        ids at a time: the size of the request the pods just took; within the write's `deadline`."""
        with self._lock:
            for owner, ids in stored.items():
                self._strays[owner].difference_update(ids)
                for pod in range(len(self.pods)):
                    if pod != owner:
                        self._strays[pod].update(ids)
            now = time.monotonic()
            due = {pod: sorted(ids) for pod, ids in self._strays.items()
                   if ids and now - self._strays_failed_at.get(pod, float("-inf")) >= self.refresh_seconds}

        def delete(pod: int, ids: list[str]) -> None:
            for start in range(0, len(ids), chunk):
                self.pods[pod].delete(ids[start:start + chunk], time_left(deadline, "Searcher.Delete"))
                with self._lock:
                    self._strays[pod].difference_update(ids[start:start + chunk])
            with self._lock:
                self._strays_failed_at.pop(pod, None)

        if seconds_left(deadline) == 0.0:
            return  # the write used its time: they wait for a later one, no pod having failed
        _, unreachable = self._gather({pod: (lambda pod=pod, ids=ids: delete(pod, ids)) for pod, ids in due.items()})
        for pod, error in unreachable.items():
            if isinstance(error, DeadlineExceededError) and seconds_left(deadline) == 0.0:
                continue  # the write's time ran out, not the pod: tried again at the next write
            with self._lock:
                self._strays_failed_at[pod] = time.monotonic()
            log.warning("%s: %d ids stored on other pods may still have an old copy there; deleting them at a "
                        "later write", error, len(self._strays[pod]))

    def delete(self, ids: Sequence[str] = (), timeout: float | None = None,
               products: Sequence[str] = ()) -> searcher_pb2.DeleteResponse:
        """Deletes on every pod (an id's category, and so its pod, is not known here)."""
        deadline = deadline_after(timeout)
        responses = self._fan_out({i: (lambda pod=pod: pod.delete(ids, time_left(deadline, "Searcher.Delete"),
                                                                  products))
                                   for i, pod in enumerate(self.pods)})
        missing_everywhere = set.intersection(*(set(r.missing) for r in responses.values()))
        return searcher_pb2.DeleteResponse(deleted=sum(r.deleted for r in responses.values()),
                                           missing=[i for i in dict.fromkeys([*ids, *products])
                                                    if i in missing_everywhere],
                                           sequence=max(r.sequence for r in responses.values()))

    def _plan(self, routing: searcher_pb2.Routing | None,
              deadline: float | None) -> tuple[RoutingPlan, dict[int, list[str]]]:
        left = time_left(deadline, "Searcher.GetStats")
        # With categories read before, a refresh is worth at most half the time left: a pod that is down
        # would otherwise take all of it in retries, leaving the search none.
        categories = self.categories(timeout=left / 2 if left is not None and self._categories is not None else left)
        routed = plan(Routing.from_message(routing), categories, *self._defaults.overridden(self.threshold,
                                                                                            self.max_shards))
        per_pod: dict[int, list[str]] = defaultdict(list)
        for category in routed.categories:
            per_pod[owner_of(category, len(self.pods))].append(category)
        return routed, per_pod

    def search(self, vector: np.ndarray, model_id: str, k: int = 10, routing: searcher_pb2.Routing | None = None,
               ef: int = 0, timeout: float | None = None, filter: FilterInput = None,
               distinct_products: bool = False) -> searcher_pb2.SearchResponse:
        deadline = deadline_after(timeout)
        routed, per_pod = self._plan(routing, deadline)
        time_left(deadline, "Searcher.Search")  # raised here, not as every pod's failure
        return search_owners(routed, per_pod, lambda pod, part: self.pods[pod].search(
            vector, model_id, k, part.to_message(), ef, time_left(deadline, "Searcher.Search"), filter,
            distinct_products), k, self._pool,
            distinct_products=distinct_products, describe=self._describe)

    def search_batch(self, requests: Sequence[searcher_pb2.SearchRequest],
                     timeout: float | None = None) -> list[BatchAnswer]:
        """Many searches, one SearchBatch per pod that any of them probes."""
        deadline = deadline_after(timeout)
        planned = [self._plan(request.routing if request.HasField("routing") else None, deadline)
                   for request in requests]
        time_left(deadline, "Searcher.SearchBatch")  # raised here, not as every pod's failure
        return search_owners_batch(requests, [routed for routed, _ in planned], [owned for _, owned in planned],
                                   lambda pod, parts: self.pods[pod].search_batch(
                                       parts, time_left(deadline, "Searcher.SearchBatch")), self._pool,
                                   describe=self._describe)

    def limits(self, timeout: float | None = None) -> searcher_pb2.RequestLimits:
        """The lowest of each pod's request limits: a write or batch split for them fits every pod."""
        deadline = deadline_after(timeout)
        return tightest(self._fan_out({i: (lambda pod=pod: pod.limits(time_left(deadline, "Searcher.GetStats")))
                                       for i, pod in enumerate(self.pods)}).values())

    def stats(self, timeout: float | None = None) -> searcher_pb2.GetStatsResponse:
        deadline = deadline_after(timeout)
        responses = self._fan_out({i: (lambda pod=pod: pod.stats(time_left(deadline, "Searcher.GetStats")))
                                   for i, pod in enumerate(self.pods)})
        merged = searcher_pb2.GetStatsResponse(items=sum(r.items for r in responses.values()),
                                               sequence=max(r.sequence for r in responses.values()))
        merged.shards.extend(sorted((s for r in responses.values() for s in r.shards), key=lambda s: s.category))
        return merged

    def close(self) -> None:
        for pod, ids in self._strays.items():
            if ids:
                log.warning("%s may still hold old copies of %d ids stored on other pods, never deleted there "
                            "(it was unreachable): %s", self._describe(pod), len(ids), sorted(ids)[:20])
        for client in self.pods:
            client.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> "ShardedSearcherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
