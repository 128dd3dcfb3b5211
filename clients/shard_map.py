"""Replica groups as one searcher, found through the searchers' own shard map (no hard-coded pod list).

Searchers that share a PostgreSQL store run in replica groups; each category is placed on one group, and
every searcher answers GetShardMap: the groups, the target each advertises (a headless Service per group
in Kubernetes), and the placements. This client reads the map from a seed target, keeps one round-robin
channel per group (a call that meets a dead replica is retried on another one within its deadline), plans
each search with the searcher's routing rule over the mapped categories, asks each group for its part in
parallel and merges. A group whose every replica stays unreachable is left out and named in
missing_shards, unless the client is strict. Writes go to the group serving the item's category (so that
group serves them at once), and to any other group when it is down: the store is shared.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import grpc
import numpy as np

from lookalike.client.connection import (ChannelSettings, DeadlineExceededError, LookalikeError, UnavailableError,
                                         call_with_retries, channel_settings, deadline_after, seconds_left,
                                         time_left)
from lookalike.client.searcher_client import CatalogueItem, FilterInput, SearcherClient, tightest
from lookalike.client.sharded import UNREACHABLE, BatchAnswer, gather, search_owners, search_owners_batch
from lookalike.routing import Routing, RoutingDefaults, RoutingPlan, part_of, plan
from lookalike.v1 import common_pb2, searcher_pb2

log = logging.getLogger(__name__)

# Pauses before each try of a search when a category moved or split since the map was read (see
# _until_settled): about 2.5 s in all, past a group's heartbeat (follow_interval, 1 s by default).
MOVED_RETRY_PAUSES = (0.0, 0.1, 0.3, 0.6, 1.5)

Response = TypeVar("Response")


class ShardMapClient:
    """SearcherClient's API over the replica groups a shard map describes. Use as a context manager."""

    def __init__(self, seed: str | ChannelSettings, *, threshold: float | None = None,
                 max_shards: int | None = None, strict: bool = False, refresh_seconds: float = 10.0) -> None:
        """`seed` reaches any searcher (one group's target, or a Service over all of them). `strict`
        makes a search fail when a group is unreachable instead of answering without its shards.
        `threshold` and `max_shards` override, for probability routings that leave them unset, the defaults
        the searchers report in the map (their --routing-* settings or their routing model's)."""
        self.settings = channel_settings(seed)
        self.seed = SearcherClient(self.settings)
        self.threshold, self.max_shards, self.strict = threshold, max_shards, strict
        self.refresh_seconds = refresh_seconds
        # The groups of the last map read: one that left it has no live replica.
        self.groups: dict[str, SearcherClient] = {}
        # Every group client made, by group and target: a group back in the map takes its channel again, and
        # one that left it is not closed under a call another thread may still be making through it (the call
        # would fail as cancelled, not as unreachable); close() closes them all.
        self._clients: dict[tuple[str, str], SearcherClient] = {}
        # category -> the group serving each of its parts (one for a whole category), as the map says.
        self.placements: dict[str, list[str]] = {}
        self._map: searcher_pb2.GetShardMapResponse | None = None
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="groups")

    # -- the map -----------------------------------------------------------------------------------

    def shard_map(self, refresh: bool = False, timeout: float | None = None) -> searcher_pb2.GetShardMapResponse:
        """The map (cached for refresh_seconds). When no searcher answers (within `timeout`, all of them),
        the last map is kept; so it is while another thread reads it for longer than half of `timeout` (the
        other half left for the operation the map is read for)."""
        deadline = deadline_after(timeout)
        left = seconds_left(deadline)
        wait = -1.0 if left is None else left / 2 if self._map is not None else left
        if not self._lock.acquire(timeout=wait):
            if self._map is not None:
                return self._map
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "the operation's timeout passed while "
                                        "another thread read the shard map", "Searcher.GetShardMap")
        try:
            return self._read_map(refresh, deadline)
        finally:
            self._lock.release()

    def _read_map(self, refresh: bool, deadline: float | None) -> searcher_pb2.GetShardMapResponse:
        """shard_map() under its lock."""
        if self._map is not None and not refresh and time.monotonic() - self._fetched_at < self.refresh_seconds:
            return self._map
        error: Exception | None = None
        candidates = [self.seed, *self.groups.values()]
        for position, client in enumerate(candidates):
            try:
                left = time_left(deadline, "Searcher.GetShardMap")
                # Each searcher gets its share of what is left: one that hangs leaves time for the others.
                share = left / (len(candidates) - position) if left is not None else None
                response = call_with_retries(client.stub.GetShardMap, searcher_pb2.GetShardMapRequest(),
                                             client.settings, share, "Searcher.GetShardMap")
                break
            except UNREACHABLE as failure:
                error = error or failure  # the first searcher's error says most
        else:
            if self._map is None:
                raise error  # type: ignore[misc]
            log.warning("no searcher answered GetShardMap (%s); keeping the map from %.0fs ago", error,
                        time.monotonic() - self._fetched_at)
            return self._map
        groups: dict[str, SearcherClient] = {}
        for group in response.groups:
            target = group.target or self.settings.target
            key = (group.name, target)
            if key not in self._clients:
                self._clients[key] = SearcherClient(dataclasses.replace(self.settings, target=target))
            groups[group.name] = self._clients[key]
        for name in sorted(set(self.groups) - set(groups)):
            log.warning("replica group %r left the shard map (no live replica); its categories are missing "
                        "until it is back", name)
        self.groups = groups
        placements: dict[str, list[str]] = {}
        for placement in sorted(response.placements, key=lambda p: (p.category, p.part)):
            if not placement.building:  # a split still being built is served by the old layout
                placements.setdefault(placement.category, []).append(placement.group)
        self.placements = placements
        self._map, self._fetched_at = response, time.monotonic()
        return response

    def categories(self) -> set[str]:
        self.shard_map()
        return set(self.placements)

    def _group(self, category: str, item_id: str) -> SearcherClient:
        """The group serving the part of `category` that `item_id` falls in (the seed for a new category)."""
        parts = self.placements.get(category)
        return self.groups.get(parts[part_of(item_id, len(parts))], self.seed) if parts else self.seed

    def _with_fallback(self, first: SearcherClient, call: Callable[[SearcherClient], Response]) -> Response:
        """`call` on `first`, then on the other groups while they are unreachable (the store is shared)."""
        candidates = [first] + [c for c in [self.seed, *self.groups.values()] if c is not first]
        for client in candidates:
            try:
                return call(client)
            except UnavailableError as error:
                log.warning("searcher group at %s unavailable (%s); trying another", client.settings.target, error)
                last = error
        raise last

    # -- writes ------------------------------------------------------------------------------------

    def upsert(self, items: Sequence[CatalogueItem], timeout: float | None = None,
               replace_products: Sequence[str] = ()) -> searcher_pb2.UpsertResponse:
        """Each item through the group that serves its category (a new category: any group). Replacing
        products goes through one group, in one write with the items (the store is shared), so it needs the
        items in one request: a request whose items fall in several groups goes wholly through the first.
        `timeout` bounds all of it."""
        deadline = deadline_after(timeout)
        self.shard_map(timeout=time_left(deadline, "Searcher.GetShardMap"))
        positions: dict[int, list[int]] = defaultdict(list)
        owners: dict[int, SearcherClient] = {}
        for position, item in enumerate(items):
            owner = self._group(item.category, item.id)
            if replace_products and owners:
                owner = next(iter(owners.values()))
            owners[id(owner)] = owner
            positions[id(owner)].append(position)
        futures = {key: self._pool.submit(self._with_fallback, owners[key], lambda c, members=members: c.upsert(
            [items[i] for i in members], time_left(deadline, "Searcher.Upsert"), replace_products))
            for key, members in positions.items()}
        statuses: list[common_pb2.ItemStatus] = [common_pb2.ItemStatus()] * len(items)
        sequence = 0
        for key, future in futures.items():
            response = future.result()
            sequence = max(sequence, response.sequence)
            for position, status in zip(positions[key], response.statuses):
                statuses[position] = status
        # New categories were just placed: read where, if time is left (the items are stored either way).
        if any(item.category not in self.placements for item in items) and seconds_left(deadline) != 0.0:
            self.shard_map(refresh=True, timeout=time_left(deadline, "Searcher.GetShardMap"))
        return searcher_pb2.UpsertResponse(statuses=statuses, sequence=sequence)

    def delete(self, ids: Sequence[str] = (), timeout: float | None = None,
               products: Sequence[str] = ()) -> searcher_pb2.DeleteResponse:
        """Through any group: the store knows each id's category, and every group follows it."""
        deadline = deadline_after(timeout)
        return self._with_fallback(self.seed, lambda client: client.delete(ids, time_left(deadline, "Searcher.Delete"),
                                                                           products))

    # -- reads -------------------------------------------------------------------------------------

    def _plan(self, routing: searcher_pb2.Routing | None) -> tuple[RoutingPlan, dict[str, list[str]]]:
        reported = self._map.routing_defaults if self._map is not None else searcher_pb2.RoutingSettings()
        defaults = RoutingDefaults.from_message(reported)
        routed = plan(Routing.from_message(routing), self.placements, *defaults.overridden(self.threshold,
                                                                                           self.max_shards))
        owned: dict[str, list[str]] = defaultdict(list)
        for category in routed.categories:
            for group in dict.fromkeys(self.placements[category]):  # each group searches its parts
                owned[group].append(category)
        return routed, owned

    def _moved(self, routed: RoutingPlan, response: searcher_pb2.SearchResponse) -> set[str]:
        """Planned categories some part of which no group answered for, though none was unreachable: a
        group no longer serves a part the map placed on it (it moved, or its category was split)."""
        answered = {(p.category, p.part) for p in response.probes
                    if max(p.parts, 1) == len(self.placements.get(p.category, ()))}
        return {c for c in routed.categories if c not in response.missing_shards
                and any((c, part) not in answered for part in range(len(self.placements[c])))}

    def _placed_group(self, name: str, method: str = "Searcher.Search") -> SearcherClient:
        """The client of a group the map places categories on; a group the map lists no live replica for
        (all down since the map was read, or never up) is unreachable like a group that does not answer."""
        if name not in self.groups:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "no live replica in the shard map", method)
        return self.groups[name]

    def _describe(self, name: str) -> str:
        """A group as its errors name it (see sharded.gather): which of several failed."""
        client = self.groups.get(name)
        return f"replica group {name!r}" + (f" at {client.settings.target}" if client else "")

    def search(self, vector: np.ndarray, model_id: str, k: int = 10, routing: searcher_pb2.Routing | None = None,
               ef: int = 0, timeout: float | None = None, filter: FilterInput = None,
               distinct_products: bool = False) -> searcher_pb2.SearchResponse:
        deadline = deadline_after(timeout)

        def ask() -> tuple[list[RoutingPlan], list[BatchAnswer]]:
            routed, owned = self._plan(routing)
            time_left(deadline, "Searcher.Search")  # raised here, not as every group's failure
            return [routed], [search_owners(routed, owned, lambda group, part: self._placed_group(group).search(
                vector, model_id, k, part.to_message(), ef, time_left(deadline, "Searcher.Search"), filter,
                distinct_products), k, self._pool, self.strict, distinct_products, self._describe)]

        answer = self._until_settled(ask, deadline)[0]
        if isinstance(answer, LookalikeError):
            raise answer
        return answer

    def search_batch(self, requests: Sequence[searcher_pb2.SearchRequest],
                     timeout: float | None = None) -> list[BatchAnswer]:
        """Many searches, one SearchBatch per group that any of them probes."""
        deadline = deadline_after(timeout)

        def ask() -> tuple[list[RoutingPlan], list[BatchAnswer]]:
            planned = [self._plan(request.routing if request.HasField("routing") else None) for request in requests]
            routes = [routed for routed, _ in planned]
            time_left(deadline, "Searcher.SearchBatch")  # raised here, not as every group's failure
            return routes, search_owners_batch(
                requests, routes, [owned for _, owned in planned],
                lambda group, parts: self._placed_group(group).search_batch(
                    parts, time_left(deadline, "Searcher.SearchBatch")), self._pool, self.strict, self._describe)

        return self._until_settled(ask, deadline)

    def _until_settled(self, ask: Callable[[], tuple[list[RoutingPlan], list[BatchAnswer]]],
                       deadline: float | None) -> list[BatchAnswer]:
        """ask()'s answers under the current map; asked again, the map re-read after a pause, while a planned
        category lacks an answer for some part with no unreachable group to explain it: a group no longer
        serves what the map places on it (the category moved or split), or does not serve it yet (groups
        take up a new layout at their next heartbeat). Still lacking after the last try, the category is named
        in missing_shards, or the query fails when the client is strict: never a silently partial answer.
        Tries stop early when another (its pause, and as long as the last took) would not end before the
        search's `deadline`: the last answers stand."""
        moved: list[set[str]] = []
        tries, took = 0, 0.0
        for attempt, pause in enumerate(MOVED_RETRY_PAUSES):
            left = seconds_left(deadline)
            if attempt and left is not None and left <= pause + took:
                break
            time.sleep(pause)
            started = time.monotonic()
            try:
                self.shard_map(refresh=attempt > 0, timeout=time_left(deadline, "Searcher.GetShardMap"))
                tried = ask()
            except DeadlineExceededError:
                if not attempt:
                    raise
                break
            routes, answers = tried
            tries, took = tries + 1, time.monotonic() - started
            moved = [set() if isinstance(answer, LookalikeError) else self._moved(routed, answer)
                     for routed, answer in zip(routes, answers)]
            if not any(moved):
                return answers
            log.info("categories %s moved or split since the map was read; reading it again",
                     sorted(set().union(*moved)))
        for position, (routed, categories) in enumerate(zip(routes, moved)):
            if not categories:
                continue
            unsettled = [c for c in routed.categories if c in categories]
            if self.strict:
                answers[position] = UnavailableError(grpc.StatusCode.UNAVAILABLE, (
                    f"no group answered for every part of {unsettled} after {tries} tries: "
                    "they are moving or being split"), "Searcher.Search")
            else:
                answers[position].missing_shards.extend(unsettled)
        return answers

    def limits(self, timeout: float | None = None) -> searcher_pb2.RequestLimits:
        """The lowest of each reachable group's request limits (and the seed's): a write or batch split for them
        fits every group."""
        deadline = deadline_after(timeout)
        seed = self.seed.limits(time_left(deadline, "Searcher.GetStats"))  # read once, then kept
        self.shard_map(timeout=time_left(deadline, "Searcher.GetShardMap"))
        calls = {name: (lambda client=client: client.limits(time_left(deadline, "Searcher.GetStats")))
                 for name, client in self.groups.items()}
        answers, _ = gather(calls, self._pool, self._describe)
        return tightest([seed, *answers.values()])

    def stats(self, timeout: float | None = None) -> searcher_pb2.GetStatsResponse:
        """Every group's shards that the map places on it, summed; sequence is the lowest any group applied.
        A group that is unreachable, or has no live replica, is left out with its shards (and logged), as a
        search leaves it out, unless the client is strict; when no group answers, the error is raised."""
        deadline = deadline_after(timeout)
        self.shard_map(timeout=time_left(deadline, "Searcher.GetShardMap"))
        names = sorted(set(self.groups) | {group for parts in self.placements.values() for group in parts})

        def ask(name: str) -> searcher_pb2.GetStatsResponse:
            return self._placed_group(name, "Searcher.GetStats").stats(time_left(deadline, "Searcher.GetStats"))

        responses, unreachable = gather({name: (lambda name=name: ask(name)) for name in names}, self._pool,
                                        self._describe)
        if unreachable and (self.strict or not responses):
            raise next(iter(unreachable.values()))
        for error in unreachable.values():
            log.warning("%s; its shards are left out of the stats", error)
        merged = searcher_pb2.GetStatsResponse()
        for name, response in responses.items():
            merged.shards.extend(s for s in response.shards
                                 if max(s.parts, 1) == len(self.placements.get(s.category, ()))
                                 and self.placements[s.category][s.part] == name)
        merged.shards.sort(key=lambda s: (s.category, s.part))
        merged.items = sum(s.items for s in merged.shards)
        merged.sequence = min(r.sequence for r in responses.values())
        merged.store_sequence = max(r.store_sequence for r in responses.values())
        merged.lag_seconds = max(r.lag_seconds for r in responses.values())
        return merged

    def move(self, category: str, group: str, timeout: float | None = None) -> searcher_pb2.MoveCategoryResponse:
        """Starts moving a category to another group (see the MoveCategory RPC)."""
        return call_with_retries(self.seed.stub.MoveCategory, searcher_pb2.MoveCategoryRequest(
            category=category, group=group), self.settings, timeout, "Searcher.MoveCategory")

    def close(self) -> None:
        for client in [self.seed, *self._clients.values()]:
            client.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> "ShardMapClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
