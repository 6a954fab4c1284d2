"""PolicyStore: lookups, and hot reload through the real polling task on real files."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from guard.policy.model import Policy
from guard.policy.store import PolicyStore, UnknownPolicy

RELOAD_DEADLINE = 2.0  # seconds an edit may take to be served


async def eventually(condition: Callable[[], bool], timeout: float = RELOAD_DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def version_of(store: PolicyStore, name: str) -> str | None:
    return next((p.version for p in store.list() if p.policy.name == name), None)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    (tmp_path / "default.yaml").write_text("name: default\n")
    (tmp_path / "alpha.yaml").write_text("name: alpha\nsampling: {max_tokens: 3}\n")
    return tmp_path


@pytest.fixture
def events() -> list[tuple[str, str]]:
    return []


@pytest.fixture
async def store(directory: Path, events: list[tuple[str, str]]) -> AsyncIterator[PolicyStore]:
    store = PolicyStore(directory, poll_interval=0.05)
    store.on_reload(lambda result, file: events.append((result, Path(file).name)))
    store.reload_now()
    assert sorted(events) == [("ok", "alpha.yaml"), ("ok", "default.yaml")]
    events.clear()  # each test asserts only the reloads it causes
    await store.start()
    yield store
    await store.stop()


def test_get_lookups() -> None:
    store = PolicyStore.from_policies([Policy(name="default"), Policy(name="strict")])
    assert store.get("").policy.name == "default"
    assert store.get("strict").policy.name == "strict"
    with pytest.raises(UnknownPolicy) as raised:
        store.get("nope")
    assert str(raised.value) == "unknown policy 'nope' (known: default, strict)"
    assert isinstance(raised.value, KeyError)
    assert [loaded.policy.name for loaded in store.list()] == ["default", "strict"]


def test_another_default_policy() -> None:
    store = PolicyStore.from_policies([Policy(name="strict")], default_policy="strict")
    assert store.get("").policy.name == "strict"


def test_first_load_serves_good_files_and_records_broken_ones(directory: Path) -> None:
    (directory / "broken.yaml").write_text("name: broken\nstepz: []\n")
    store, events = PolicyStore(directory), []
    store.on_reload(lambda result, file: events.append((result, Path(file).name)))
    store.reload_now()
    assert events == [("ok", "alpha.yaml"), ("error", "broken.yaml"), ("ok", "default.yaml")]
    assert [loaded.policy.name for loaded in store.list()] == ["alpha", "default"]
    assert list(store.last_errors) == [str(directory / "broken.yaml")]
    assert "unknown key 'stepz'" in str(store.last_errors[str(directory / "broken.yaml")])
    with pytest.raises(UnknownPolicy):
        store.get("broken")


def test_a_missing_directory_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PolicyStore(tmp_path / "absent").reload_now()


def test_an_untouched_directory_is_not_a_new_generation(directory: Path) -> None:
    store = PolicyStore(directory)
    store.reload_now()
    generation = store.generation
    (directory / "alpha.yaml").touch()  # new mtime, same bytes
    store.reload_now()
    assert store.generation == generation


async def test_an_edit_is_served_within_the_deadline(store: PolicyStore, directory: Path, events, caplog) -> None:
    caplog.set_level(logging.INFO, logger="guard.policy.store")
    before, generation = store.get("alpha"), store.generation
    (directory / "alpha.yaml").write_text("name: alpha\nsampling: {max_tokens: 5}\n")

    await eventually(lambda: store.get("alpha").version != before.version)

    assert store.get("alpha").policy.sampling.max_tokens == 5
    assert store.generation > generation
    assert events == [("ok", "alpha.yaml")]
    assert f"version {store.get('alpha').version}" in caplog.text


async def test_an_added_file_appears_and_a_deleted_one_disappears(store: PolicyStore, directory: Path, events) -> None:
    (directory / "beta.yml").write_text("name: beta\n")
    await eventually(lambda: version_of(store, "beta") is not None)

    (directory / "alpha.yaml").unlink()
    await eventually(lambda: version_of(store, "alpha") is None)

    with pytest.raises(UnknownPolicy):
        store.get("alpha")
    assert events == [("ok", "beta.yml"), ("removed", "alpha.yaml")]


async def test_a_broken_edit_keeps_the_last_good_version_until_fixed(
    store: PolicyStore, directory: Path, events, caplog
) -> None:
    path = directory / "alpha.yaml"
    good = store.get("alpha").version

    path.write_text("name: alpha\nsampling: {max_tokens: 5}\nstepz: []\n")
    await eventually(lambda: str(path) in store.last_errors)

    assert store.get("alpha").version == good  # still serving
    assert f"{path}:3: stepz: unknown key 'stepz'" in str(store.last_errors[str(path)])
    assert "stepz" in caplog.text and f"version {good} keeps serving" in caplog.text

    path.write_text("name: alpha\nsampling: {max_tokens: 5}\n")
    await eventually(lambda: store.get("alpha").version != good)

    assert store.last_errors == {}
    assert events == [("error", "alpha.yaml"), ("ok", "alpha.yaml")]


async def test_reverting_a_broken_edit_to_the_served_content_recovers(store: PolicyStore, directory: Path, events) -> None:
    path = directory / "alpha.yaml"
    good_text, good = path.read_text(), store.get("alpha").version
    path.write_text("name: alpha\nsampling: {max_tokens: -1}\n")
    await eventually(lambda: str(path) in store.last_errors)

    path.write_text(good_text)
    await eventually(lambda: str(path) not in store.last_errors)

    assert store.get("alpha").version == good
    assert events == [("error", "alpha.yaml"), ("ok", "alpha.yaml")]


async def test_a_file_broken_from_the_start_appears_once_fixed(store: PolicyStore, directory: Path, events) -> None:
    path = directory / "gamma.yaml"
    path.write_text("name: gamma\nsteps: [{type: nope}]\n")
    await eventually(lambda: str(path) in store.last_errors)
    assert version_of(store, "gamma") is None

    path.write_text("name: gamma\n")
    await eventually(lambda: version_of(store, "gamma") is not None)
    assert events == [("error", "gamma.yaml"), ("ok", "gamma.yaml")]


async def test_a_duplicate_name_waits_for_the_original_to_go(store: PolicyStore, directory: Path, events) -> None:
    (directory / "alpha.yml").write_text("name: alpha\ndescription: the other one\n")
    await eventually(lambda: str(directory / "alpha.yml") in store.last_errors)
    assert store.get("alpha").source == str(directory / "alpha.yaml")

    (directory / "alpha.yaml").unlink()
    await eventually(lambda: store.get("alpha").source.endswith("alpha.yml") if version_of(store, "alpha") else False)

    assert store.last_errors == {}
    assert events == [("error", "alpha.yml"), ("removed", "alpha.yaml"), ("ok", "alpha.yml")]


async def test_a_failing_observer_does_not_stop_reloads(store: PolicyStore, directory: Path) -> None:
    def broken(result: str, file: str) -> None:
        raise RuntimeError("observer bug")

    store.on_reload(broken)
    (directory / "beta.yaml").write_text("name: beta\n")
    await eventually(lambda: version_of(store, "beta") is not None)
    (directory / "beta.yaml").write_text("name: beta\ndescription: again\n")
    await eventually(lambda: store.get("beta").policy.description == "again")


async def test_stop_ends_polling(store: PolicyStore, directory: Path) -> None:
    await store.stop()
    generation = store.generation
    (directory / "beta.yaml").write_text("name: beta\n")
    await asyncio.sleep(store.poll_interval * 4)  # several polls' worth: nothing may happen
    assert store.generation == generation and version_of(store, "beta") is None
