"""The route cache never changes a decision: for random configs, requests and routers, every answer of a cached
``Routing`` equals what its router decides without the cache.

Routers: the default router, the README's router and ``examples/custom_router.py``, both loaded as real plugins
(the README's code is written to a file first, as a user would copy it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc_router import x
from ipc_router.filterapi import Config, config_from_dict
from ipc_router.plugins import ROUTERS_GROUP, load_plugin
from ipc_router.router import Decision, Routing, UnknownRuleError
from tests.test_readme import _examples

MODEL = "x-ai-eg-model"
# A few header names, so that random rules and random requests meet; x-tenant is what both example routers read.
HEADERS = (MODEL, "x-tenant", "x-user-tier", "x-region")
VALUES = ("gpt-4o", "llama3.3", "premium", "free", "eu", "")
PATTERNS = ("gpt-.*", "llama.*", "pre.*", ".*", "eu|us", "f?ree", "x+")

header_match = st.one_of(
    st.builds(lambda n, v: {"name": n, "value": v}, st.sampled_from(HEADERS), st.sampled_from(VALUES)),
    st.builds(
        lambda n, v: {"type": "RegularExpression", "name": n, "value": v},
        st.sampled_from(HEADERS),
        st.sampled_from(PATTERNS),
    ),
)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    n = draw(st.integers(0, 6))
    names = draw(st.permutations(["premium", "a", "b", "c", "d", "e"]))[:n]
    rules = [
        {
            "name": name,
            "headers": draw(st.lists(header_match, min_size=0, max_size=3)),
            "backends": [{"name": f"{name}-backend"}],
        }
        for name in names
    ]
    return config_from_dict({"rules": rules})


requests = st.dictionaries(st.sampled_from(HEADERS), st.sampled_from(VALUES), max_size=len(HEADERS))


@pytest.fixture(scope="module")
def readme_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[x.NewCustomRouterFn]:
    code = _examples()["my_router"]
    app_dir = tmp_path_factory.mktemp("readme")
    (app_dir / "my_router.py").write_text(code)
    factory: x.NewCustomRouterFn = load_plugin("my_router:new_custom_router", ROUTERS_GROUP, app_dir=str(app_dir))
    yield factory
    sys.modules.pop("my_router", None)
    sys.path.remove(str(app_dir))


EXAMPLE_ROUTER: x.NewCustomRouterFn = load_plugin("examples.custom_router:new_custom_router", ROUTERS_GROUP)


UNKNOWN = "<not a rule of the config>"  # the README's router names "premium" whether the config has it or not


def _uncached(routing: Routing, headers: dict[str, str]) -> str | None:
    try:
        result = routing.router.calculate(headers)
    except x.NoMatchingRuleError:
        return None
    assert isinstance(result, str)
    return result if routing.config.rule(result) is not None else UNKNOWN


def _cached(routing: Routing, headers: dict[str, str]) -> tuple[str | None, bool]:
    try:
        d = routing.route(headers)
    except x.NoMatchingRuleError:
        return None, False
    except UnknownRuleError:
        return UNKNOWN, False
    assert isinstance(d, Decision)
    return d.rule.name, d.cached


def check(config: Config, factory: x.NewCustomRouterFn | None, reqs: list[dict[str, str]]) -> None:
    routing = Routing(config, factory, cache_size=8)  # small: eviction happens too
    assert routing.cache is not None
    for headers in reqs + reqs:  # the second pass is served from the cache where the key allows
        want = _uncached(routing, dict(headers))
        got, cached = _cached(routing, dict(headers))
        assert got == want, f"{'cached' if cached else 'routed'} {got!r} != {want!r} for {headers}"


ROUTERS: dict[str, Callable[[Any], x.NewCustomRouterFn | None]] = {
    "default": lambda _: None,
    "readme": lambda readme: readme,
    "examples.custom_router": lambda _: EXAMPLE_ROUTER,
}


@pytest.mark.parametrize("router", ROUTERS)
@settings(max_examples=300, deadline=None)
@given(config=configs(), reqs=st.lists(requests, min_size=1, max_size=12))
def test_cached_answers_equal_uncached_answers(
    router: str, readme_router: x.NewCustomRouterFn, config: Config, reqs: list[dict[str, str]]
) -> None:
    check(config, ROUTERS[router](readme_router), reqs)


def test_the_property_catches_a_too_small_key(readme_router: x.NewCustomRouterFn) -> None:
    """The check above can fail: with the key cut down to the declared headers, the issue's case misroutes."""
    config = config_from_dict(
        {
            "rules": [
                {"name": "free", "headers": [{"name": "x-user-tier", "value": "free"}]},
                {"name": "gpt", "headers": [{"name": MODEL, "value": "gpt-4o"}]},
            ]
        }
    )
    routing = Routing(config, readme_router)
    assert routing.cache is not None
    declared = routing.router.cache_key_headers  # type: ignore[attr-defined]
    routing.cache.key_headers = tuple(declared)  # what the key was before the fix
    assert _cached(routing, {MODEL: "gpt-4o", "x-user-tier": "free"})[0] == "free"
    assert _cached(routing, {MODEL: "gpt-4o"}) == ("free", True)  # wrong: served from the cache
    assert _uncached(routing, {MODEL: "gpt-4o"}) == "gpt"
