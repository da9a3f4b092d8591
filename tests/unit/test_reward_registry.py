"""Rewards by name: built-ins, installed plugins (entry points), `module:function` settings;
declared versions; misconfiguration stops start-up; unknown names are poison with the list."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import RewardEndpoint, Settings
from schemas.errors import PoisonEventError
from schemas.events import InteractionLogged
from tests.support.plugins import install_plugin, uninstall
from workers.rewards.registry import RewardConfigError, Rewards, declare

IT = InteractionLogged(policy_id="p", prompt="q?", task="length")


@pytest.fixture(scope="module")
def installed_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_plugin(tmp_path_factory.mktemp("plugin") / "site")  # pip, once per module


@pytest.fixture
def plugin_site(installed_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = installed_site
    monkeypatch.syspath_prepend(str(site))
    yield site
    uninstall()


def test_builtins_register_like_plugins() -> None:
    rewards = Rewards.load(Settings(), installed=[])
    assert rewards.names() == ["feedback", "length", "reference"]
    assert {n: rewards.get(n).version for n in rewards.names()} == {
        "feedback": 2, "length": 1, "reference": 1}
    assert rewards.get("length").source == "workers.rewards.functions:length_reward"


def test_an_installed_plugin_is_found_by_name_with_its_version(plugin_site: Path) -> None:
    rewards = Rewards.load(Settings())
    assert {"monotone", "judge-like"} <= set(rewards.names())
    assert (rewards.get("monotone").version, rewards.get("judge-like").version) == (3, 1)
    got = rewards.score_many_sync([("monotone", IT, ["aaa", "ab", ""]),
                                   ("judge-like", IT, ["x", "xy"]),
                                   ("length", IT, [""])])
    assert got == [[1.0, 0.5, 1.0], [1.0, 0.0], [1.0]]


def test_module_function_from_settings(plugin_site: Path) -> None:
    settings = Settings(reward_plugins={"mono2": "lorastream_test_plugin:monotone"})
    rewards = Rewards.load(settings, installed=[])
    assert rewards.get("mono2").version == 3


@pytest.mark.parametrize(("plugins", "match"), [
    ({"x": "lorastream_test_plugin:unversioned"}, "must declare an integer `version`"),
    ({"x": "lorastream_test_plugin:nope"}, "cannot load reward"),
    ({"x": "no_such_module_anywhere:f"}, "cannot load reward"),
    ({"x": "not-a-target"}, "is not 'module:function'"),
    ({"length": "lorastream_test_plugin:monotone"}, "defined twice"),
])
def test_misconfiguration_stops_start_up(plugin_site: Path, plugins: dict[str, str],
                                         match: str) -> None:
    with pytest.raises(RewardConfigError, match=match):
        Rewards.load(Settings(reward_plugins=plugins), installed=[])


def test_an_endpoint_may_not_shadow_a_function() -> None:
    settings = Settings(reward_endpoints={"length": RewardEndpoint(url="http://127.0.0.1:1")})
    with pytest.raises(RewardConfigError, match="both"):
        Rewards.load(settings, installed=[])


def test_unknown_names_and_bad_results_are_poison() -> None:
    @declare(version=1)
    def nan(interaction: InteractionLogged, completion: str) -> float:
        return float("nan")

    rewards = Rewards.load(Settings(), installed=[])
    with pytest.raises(PoisonEventError,
                       match="unknown reward function 'nope'; known: feedback, length, reference"):
        rewards.get("nope")
    (unknown,) = rewards.score_many_sync([("nope", IT, ["a"])])
    assert isinstance(unknown, PoisonEventError) and "known: feedback" in str(unknown)
    from workers.rewards.registry import function_reward

    bad = Rewards({"nan": function_reward("nan", "tests:nan", nan)})
    (result,) = bad.score_many_sync([("nan", IT, ["a"])])
    assert isinstance(result, PoisonEventError) and "non-finite" in str(result)


def test_a_synchronous_plugin_runs_off_the_event_loop() -> None:
    loop_thread: list[int] = []

    @declare(version=1)
    def slow(interaction: InteractionLogged, completion: str) -> float:
        loop_thread.append(threading.get_ident())
        return 1.0

    from workers.rewards.registry import function_reward

    rewards = Rewards({"slow": function_reward("slow", "tests:slow", slow)})

    async def main() -> list[list[float] | Exception]:
        return await rewards.score_many([("slow", IT, ["a", "b"])])

    assert asyncio.run(main()) == [[1.0, 1.0]]
    assert loop_thread and all(t != threading.get_ident() for t in loop_thread)
