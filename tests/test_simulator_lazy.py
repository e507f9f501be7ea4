"""The simulator's lazy dataset: deterministic, every ID resolves and no other, every field
shape, changes, media, and a real server over HTTP; plus the bounded request log."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from recarchive.cli.app import app
from recarchive.simulator.dataset import STATUSES, ZERO_DATE, Dataset, parse_iso
from recarchive.simulator.lazy import IdSequence, LazyDataset
from recarchive.simulator.server import SimulatorConfig, SimulatorServer
from tests.fixtures.simulator import SimulatorFactory
from tests.test_simulator import SEED_FIELDS

Payload = dict[str, Any]


def lazy(recordings: int = 400, seed: int = 1, **options: Any) -> LazyDataset:
    return LazyDataset(recordings, seed, workspace_id="ws", **options)


def current(dataset: LazyDataset, rid: str) -> Payload:
    payload = dataset.payload(rid)
    assert payload is not None, rid
    return payload


def payloads(dataset: LazyDataset) -> list[Payload]:
    found = [dataset.payload(rid) for rid in dataset.ids]
    assert all(p is not None for p in found)
    return [p for p in found if p is not None]


def fingerprint(dataset: LazyDataset, count: int) -> str:
    """A digest of the first ``count`` IDs, payloads and media of ``dataset``."""
    digest = hashlib.sha256()
    for rid in dataset.ids[:count]:
        digest.update(json.dumps([rid, dataset.payload(rid)]).encode())
        digest.update(dataset.media(rid).sha256().encode())
    return digest.hexdigest()


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_dataset_other_seed_other_ids() -> None:
    first, again, other = lazy(200, 42), lazy(200, 42), lazy(200, 43)
    assert list(first.ids) == list(again.ids) and len(set(first.ids)) == 200
    assert payloads(first) == payloads(again)
    assert fingerprint(first, 20) == fingerprint(again, 20)
    assert not set(first.ids) & set(other.ids)
    # An index's ID depends on the seed and the index only: a bigger dataset extends a smaller.
    assert list(lazy(300, 42).ids[:200]) == list(first.ids)


def test_another_process_draws_the_same_dataset() -> None:
    # str hash() is salted per process: a seed built on it would differ here.
    code = (
        "from tests.test_simulator_lazy import fingerprint, lazy; "
        "print(fingerprint(lazy(60, 7), 60))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": salt, "PATH": ""},
        ).stdout.strip()
        for salt in ("1", "2")
    }
    assert runs == {fingerprint(lazy(60, 7), 60)}


# --- IDs ---------------------------------------------------------------------------------------


def test_every_id_is_a_v4_uuid_and_resolves_to_its_payload() -> None:
    dataset = lazy(500, 3)
    for position, rid in enumerate(dataset.ids):
        assert str(uuid.UUID(rid)) == rid and uuid.UUID(rid).version == 4
        payload = dataset.payload(rid)
        assert payload is not None and payload["id"] == rid
        assert rid in dataset.ids and dataset.ids.index(rid) == position


def _upper_bits_changed(rid: str) -> str:
    # The first hex digit: neither the version nibble nor the variant bits nor the low 32.
    return ("0" if rid[0] != "0" else "1") + rid[1:]


@pytest.mark.parametrize(
    "made_up",
    [
        lambda d: str(uuid.uuid4()),
        lambda d: _upper_bits_changed(d.ids[5]),
        lambda d: d.ids[5].upper(),
        lambda d: lazy(1000, 3).ids[900],  # the same seed's ID of an index beyond the dataset
        lambda d: lazy(400, 4).ids[5],  # another seed's ID of an index within it
        lambda d: d.ids[5][:-1],
        lambda d: "x" * 36,
    ],
    ids=[
        "random-v4",
        "wrong-upper-bits",
        "upper-case",
        "index-beyond",
        "other-seed",
        "short",
        "junk",
    ],
)
def test_a_made_up_id_does_not_exist(made_up: Callable[[LazyDataset], str]) -> None:
    dataset = lazy(400, 3)
    rid = made_up(dataset)
    assert dataset.payload(rid) is None
    assert not dataset.has_media(rid) and not dataset.delete_media(rid)
    assert rid not in dataset.all_ids and rid not in dataset.ids
    with pytest.raises(KeyError):
        dataset.media(rid)
    with pytest.raises(KeyError):
        dataset.set_status(rid, "available")


@pytest.mark.parametrize(
    ("recordings", "fraction"),
    [(60, 0.0), (300, 0.25), (20, 1.0)],
    ids=["none-missing", "a-quarter-missing", "all-missing"],
)
def test_missing_ids_are_seeded_and_the_three_sequences_agree(
    recordings: int, fraction: float
) -> None:
    dataset = lazy(recordings, 5, missing_fraction=fraction)
    again = lazy(recordings, 5, missing_fraction=fraction)
    assert (list(dataset.ids), list(dataset.missing_ids)) == (
        list(again.ids),
        list(again.missing_ids),
    )
    every = list(dataset.all_ids)
    missing = set(dataset.missing_ids)
    assert len(set(every)) == recordings
    # Index order: ids and missing_ids are all_ids split in two, the order kept.
    assert list(dataset.ids) == [rid for rid in every if rid not in missing]
    assert list(dataset.missing_ids) == [rid for rid in every if rid in missing]
    assert every == list(lazy(recordings, 5).all_ids)  # the same IDs, some of them missing
    for position, rid in enumerate(dataset.missing_ids):
        assert dataset.payload(rid) is None and dataset.missing_ids.index(rid) == position
        assert rid in dataset.all_ids and rid not in dataset.ids
    for position, rid in enumerate(dataset.ids):
        assert dataset.ids.index(rid) == position
    if fraction == 0.0:
        assert not missing
    elif fraction == 1.0:
        assert len(dataset.ids) == 0 and len(missing) == recordings
    else:
        assert 0.15 < len(missing) / recordings < 0.35


def test_id_sequences_behave_like_lists() -> None:
    dataset = lazy(30, 9)
    ids, as_list = dataset.ids, list(dataset.ids)
    assert isinstance(ids, IdSequence) and len(ids) == 30
    assert ids[-1] == as_list[-1] and ids[3:9:2] == as_list[3:9:2] and ids[:] == as_list
    assert ids == as_list and as_list == ids and ids != as_list[:-1] and ids != "x"
    assert ids.count(as_list[4]) == 1 and ids.count("nope") == 0
    with pytest.raises(IndexError):
        ids[30]
    with pytest.raises(ValueError, match="not in the sequence"):
        ids.index(as_list[4], 5)


def test_a_million_recordings_hold_no_per_recording_state() -> None:
    tracemalloc.start()
    try:
        dataset = lazy(1_000_000, 21)
        size, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size < 100_000, f"{size} bytes for the dataset: something per recording?"
    containers = [v for v in vars(dataset).values() if isinstance(v, dict | set | list)]
    assert containers and all(len(c) == 0 for c in containers)
    assert len(dataset.ids) == len(dataset.all_ids) == 1_000_000 and len(dataset.missing_ids) == 0
    last = dataset.ids[999_999]
    assert dataset.payload(last) is not None and dataset.ids.index(last) == 999_999


# --- payloads and media ------------------------------------------------------------------------

SHAPES: dict[str, Callable[[Payload], bool]] = {
    "zero-endedAt": lambda p: p.get("endedAt") == ZERO_DATE,
    "field-absent": lambda p: "channelId" not in p,
    "field-null": lambda p: "channelId" in p and p["channelId"] is None,
    "conference": lambda p: p["source"] == "conference" and bool(p["conferenceId"]),
    "anonymous-number": lambda p: bool(
        ((p.get("originator") or {}).get("number") or {}).get("anonymous")
    ),
    "no-receiver": lambda p: p.get("receiver") is None,
    "no-contact": lambda p: p.get("originator") is not None and "contact" not in p["originator"],
    "extra-fields": lambda p: "sentiment" in p and "tags" in p,
    "transcription": lambda p: p["transcription"] is True,
    "unseen-status": lambda p: p["status"] == "transcribing",
}


def _has_status(status: str) -> Callable[[Payload], bool]:
    return lambda p: p["status"] == status


SHAPES.update({f"status-{status}": _has_status(status) for status in STATUSES})


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_every_field_shape_of_the_eager_dataset_occurs(shape: str) -> None:
    seen = payloads(lazy(400, 1, available_fraction=0.6))
    assert any(SHAPES[shape](p) for p in seen)
    # ... and the eager dataset has it too: the shapes are the same ones.
    eager = Dataset(400, 1, workspace_id="ws", available_fraction=0.6)
    assert any(SHAPES[shape](p) for p in map(eager.payload, eager.ids) if p is not None)


def test_payloads_have_the_seed_fields_and_spread_over_months() -> None:
    seen = payloads(lazy(400, 2))
    assert all(set(p) <= SEED_FIELDS | {"sentiment", "tags"} for p in seen)
    assert any(set(p) == SEED_FIELDS for p in seen)
    assert len({p["createdAt"][:7] for p in seen}) >= 5
    assert not any(p["transcription"] for p in payloads(lazy(100, 2, transcriptions=False)))


def test_media_is_deterministic_and_within_the_size_range() -> None:
    first, again = (lazy(40, 8, media_size_range=(5_000, 9_000)) for _ in range(2))
    sizes = [first.media(rid).size for rid in first.ids]
    assert all(5_000 <= size <= 9_000 for size in sizes) and len(set(sizes)) > 10
    for rid in first.ids[:5]:
        data = first.media_bytes(rid)
        assert len(data) == first.media(rid).size and data == again.media_bytes(rid)
    assert first.media_bytes(first.ids[0]) != first.media_bytes(first.ids[1])


# --- changes and whole-dataset views -----------------------------------------------------------


def _minute_later(before: Payload, after: Payload) -> bool:
    return parse_iso(after["updatedAt"]) - parse_iso(before["updatedAt"]) == timedelta(minutes=1)


def test_changes_work_through_overrides() -> None:
    dataset = lazy(60, 4, available_fraction=0.5)
    waiting = [rid for rid in dataset.ids if current(dataset, rid)["status"] != "available"]
    rid, other = waiting[0], waiting[1]
    before = current(dataset, rid)
    assert not dataset.has_media(rid)
    dataset.set_status(rid, "available")
    after = current(dataset, rid)
    assert after["status"] == "available" and _minute_later(before, after)
    assert dataset.has_media(rid) and rid in dataset.available_ids()
    dataset.touch(rid, duration=7, tags=["x"])
    touched = current(dataset, rid)
    assert (touched["duration"], touched["tags"]) == (7, ["x"]) and _minute_later(after, touched)
    touched["duration"] = 99  # a copy: the dataset's own payload stays as it was
    assert current(dataset, rid)["duration"] == 7
    dataset.set_media_size(rid, 12_345)
    assert len(dataset.media_bytes(rid)) == 12_345
    assert dataset.delete_media(rid) and dataset.is_deleted(rid) and not dataset.has_media(rid)
    assert not dataset.is_deleted(other)
    untouched = current(dataset, other)
    made = dataset.make_all_available()
    assert made == len(waiting) - 1  # rid was available already
    available = current(dataset, other)
    assert available["status"] == "available" and _minute_later(untouched, available)
    assert dataset.make_all_available() == 0
    assert set(dataset.available_ids()) == set(dataset.ids)
    assert lazy(60, 4, available_fraction=0.5).payload(other) == untouched  # no shared state


def test_held_back_recordings_say_completed_a_minute_later() -> None:
    plain = lazy(80, 6)
    held = lazy(80, 6, held_back=lambda rid: rid[0] in "01234567")
    changed = 0
    for rid in plain.ids:
        was, now = current(plain, rid), current(held, rid)
        if was["status"] == "available" and rid[0] in "01234567":
            assert now["status"] == "completed" and _minute_later(was, now)
            assert not held.has_media(rid)
            changed += 1
        else:
            assert now == was
    assert changed > 10 and held.make_all_available() >= changed


def test_whole_dataset_views_agree_with_the_payloads() -> None:
    dataset = lazy(300, 11, missing_fraction=0.1)
    dataset.touch(dataset.ids[0], createdAt="2025-01-01T00:00:00.000Z")
    seen = payloads(dataset)
    assert dataset.available_ids() == [p["id"] for p in seen if p["status"] == "available"]
    since, until = parse_iso("2025-04-01T00:00:00Z"), parse_iso("2025-06-01T00:00:00Z")
    expected = [p["id"] for p in seen if since <= parse_iso(p["createdAt"]) < until]
    assert dataset.ids_created_between(since, until) == expected and expected
    listed = list(dataset.listing())
    assert listed == sorted(seen, key=lambda p: (p["createdAt"], p["id"]))
    assert listed[0]["id"] == dataset.ids[0]  # the touched createdAt is the earliest


# --- the server --------------------------------------------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    # One client: httpx.get() would build a client (and its SSL context) per request.
    with httpx.Client() as client:
        yield client


def _get(http: httpx.Client, sim: SimulatorServer, path: str, **kwargs: Any) -> httpx.Response:
    url = f"{sim.api_url}/workspaces/{sim.config.workspace_id}/recordings{path}"
    headers = {"Authorization": f"AccessKey {sim.config.access_key}"}
    return http.get(url, headers=headers, **kwargs)


@pytest.mark.parametrize("is_lazy", [False, True], ids=["eager", "lazy"])
def test_a_lazy_server_answers_like_the_eager_one(
    http: httpx.Client, simulator_factory: SimulatorFactory, is_lazy: bool
) -> None:
    sim = simulator_factory(recordings=30, seed=5, missing_fraction=0.2, lazy=is_lazy)
    dataset = sim.dataset
    assert isinstance(dataset, LazyDataset) == is_lazy and dataset.missing_ids
    for rid in dataset.ids:
        answer = _get(http, sim, f"/{rid}")
        assert answer.status_code == 200 and answer.json() == dataset.payload(rid)
    for rid in (*dataset.missing_ids, str(uuid.uuid4()), _upper_bits_changed(dataset.ids[0])):
        assert _get(http, sim, f"/{rid}").status_code == 404
    rid = dataset.available_ids()[0]
    redirect = _get(http, sim, f"/{rid}.mp3")
    assert redirect.status_code == 307
    media = http.get(redirect.headers["Location"])
    assert media.status_code == 200 and media.content == dataset.media_bytes(rid)
    listed = _get(http, sim, "", params={"limit": 99}).json()["results"]
    assert [r["id"] for r in listed] == [p["id"] for p in dataset.listing()]
    assert {r["id"] for r in listed} == set(dataset.ids)
    assert http.get(f"{sim.api_url}/_sim/ids").text.splitlines() == list(dataset.all_ids)
    assert len(sim.api_requests()) == 30 + 2 + 1 + 1  # /_sim/ids is not logged


def test_notready_fault_holds_back_lazy_recordings(
    http: httpx.Client, simulator_factory: SimulatorFactory
) -> None:
    sim = simulator_factory(recordings=200, seed=3, lazy=True, faults="notready")
    plain = lazy(200, 3)
    held = [rid for rid in plain.available_ids() if sim.faults.hits_recording("notready", rid)]
    assert held and not set(held) & set(sim.dataset.available_ids())
    assert _get(http, sim, f"/{held[0]}.mp3").status_code == 404
    assert _get(http, sim, f"/{held[0]}").json()["status"] == "completed"


def test_without_a_request_log_the_counts_still_count(
    http: httpx.Client, simulator_factory: SimulatorFactory
) -> None:
    sim = simulator_factory(recordings=20, seed=2, lazy=True, keep_requests=False)
    for rid in sim.dataset.ids:
        assert _get(http, sim, f"/{rid}").status_code == 200
    stats = http.get(f"{sim.api_url}/_sim/stats").json()
    assert stats["api"]["requests"] == 20 and stats["api"]["by_status"] == {"200": 20}
    assert sim.requests == []
    with pytest.raises(RuntimeError, match="keeps no request log"):
        sim.leaks  # noqa: B018 (the property is what is tested)
    with pytest.raises(RuntimeError):
        sim.api_requests()
    assert sim._attempts == {}  # no fault: no attempt worth counting


def test_attempts_are_counted_only_for_keys_a_fault_may_hit(
    http: httpx.Client,
    simulator_factory: SimulatorFactory,
) -> None:
    sim = simulator_factory(recordings=100, seed=2, lazy=True, faults="500")
    for rid in sim.dataset.ids:
        assert _get(http, sim, f"/{rid}").status_code in (200, 500, 502, 503)
    counted = set(sim._attempts)
    may_hit = {f"meta:{rid}" for rid in sim.dataset.ids if sim.faults.may_hit(f"meta:{rid}")}
    assert counted == may_hit and 0 < len(counted) < 30
    # A key no fault may hit is never hit, whatever its attempt: it needs no count.
    others = [f"meta:{rid}" for rid in sim.dataset.ids if f"meta:{rid}" not in may_hit]
    assert not any(sim.faults.hits("500", key, attempt) for key in others for attempt in range(3))


def test_config_refuses_a_lazy_dataset_beyond_32_bits() -> None:
    with pytest.raises(ValueError, match="fewer than 2\\*\\*32 recordings"):
        SimulatorConfig(recordings=2**32, lazy=True)
    assert SimulatorConfig(recordings=2**32).recordings == 2**32  # eager: no such limit


@pytest.mark.parametrize(
    "args",
    [["--recordings", "37", "--seed", "9"], ["--recordings", "50", "--missing-fraction", "0.2"]],
    ids=["seeded", "with-missing"],
)
def test_simulate_list_ids_lazy_prints_the_lazy_ids(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["simulate", "--list-ids", "--lazy", *args])
    assert result.exit_code == 0, result.output
    options = dict(zip(args[::2], args[1::2], strict=True))
    expected = lazy(
        int(options["--recordings"]),
        int(options.get("--seed", "1")),
        missing_fraction=float(options.get("--missing-fraction", "0")),
    )
    assert result.stdout.splitlines() == list(expected.all_ids)
    eager = CliRunner().invoke(app, ["simulate", "--list-ids", *args]).stdout.splitlines()
    assert not set(eager) & set(expected.all_ids)  # opt-in: the default IDs are the eager ones
