"""The parts of external servers alone: URL and name checks, the model asked of a server, the store."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from mvllmd.errors import InvalidRequest
from mvllmd.external.check import served_model
from mvllmd.external.spec import ExternalSpec, default_name, parse_url
from mvllmd.external.store import ExternalStore

Serve = Callable[[list[str]], Awaitable[str]]


@pytest.fixture
async def models_server() -> AsyncIterator[Serve]:
    """`await models_server(["a", "b"])` -> the base URL of a server whose /v1/models lists them."""
    runners: list[web.AppRunner] = []

    async def _serve(models: list[str]) -> str:
        async def listing(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

        app = web.Application()
        app.router.add_get("/v1/models", listing)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield _serve
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("text", "url", "name"),
    [
        ("http://10.0.0.5:8000/v1/", "http://10.0.0.5:8000", "10-0-0-5-8000"),
        ("https://vllm.Team-B.svc", "https://vllm.Team-B.svc", "vllm-team-b-svc-443"),
        ("http://[::1]:8001", "http://[::1]:8001", "1-8001"),
    ],
)
def test_urls_and_the_names_derived_from_them(text: str, url: str, name: str) -> None:
    assert parse_url(text) == url
    assert default_name(url) == name


@pytest.mark.parametrize("text", ["10.0.0.5:8000", "http://h:0", "http://h:x", "http://u:p@h:1", "http://h:1/?a=b"])
def test_bad_urls(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_url(text)


async def test_the_model_is_the_one_listed_or_the_one_named(models_server: Serve) -> None:
    one, two = await models_server(["m"]), await models_server(["a", "b"])
    assert await served_model(one, "", "") == "m"
    assert await served_model(two, "b", "") == "b"
    with pytest.raises(InvalidRequest, match=r"serves a, b; pass --model"):
        await served_model(two, "", "")
    with pytest.raises(InvalidRequest, match=r"does not serve model 'c'; it serves: a, b"):
        await served_model(two, "c", "")


def test_the_store_keeps_the_key_apart_and_private(tmp_path: Path) -> None:
    store = ExternalStore(tmp_path)
    store.save(ExternalSpec("a", "http://h:1", "m", 8), "key-a")
    store.save(ExternalSpec("b", "http://h:2", "m", 8), "")
    assert [(s.name, key) for s, key in store.load()] == [("a", "key-a"), ("b", "")]
    assert sorted(p.name for p in store.folder.iterdir()) == ["a.json", "a.key", "b.json"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in store.folder.iterdir())
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    (store.folder / "broken.json").write_text("{")
    store.remove("a")
    assert [s.name for s, _ in store.load()] == ["b"]
