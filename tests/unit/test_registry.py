"""cispo.core.registry.Registry does what its docstring says, and every registry in the project is one."""

from __future__ import annotations

import json
import os
import sys
import types
from importlib.metadata import EntryPoint

import pytest

import cispo.core.registry as registry_module
from cispo.core.registry import Registry, callable_from

GROUP = "cispo.test_widgets"  # an entry-point group nothing installs
HOLDER: dict[str, Registry] = {}  # lets a module written by a test register into the test's registry


def first(x: int) -> int:
    return x


def second(x: int) -> int:
    return -x


def fresh(**lazy: str) -> Registry:
    return Registry("widget", GROUP, lazy=lazy)


# --- duplicates ---------------------------------------------------------------------------------------


def test_registering_the_same_object_twice_is_harmless():
    reg = fresh()
    assert reg.register("a", first) is first
    assert reg.register("a")(first) is first  # the decorator form, again
    assert reg.get("a") is first and reg.names() == ["a"]


def test_a_reloaded_definition_counts_as_the_same_object():
    # What importlib.reload (or a module run as __main__ and imported) produces: a new function object
    # with the same module and qualified name.
    reloaded = types.FunctionType(first.__code__, first.__globals__, first.__name__)
    reloaded.__qualname__ = first.__qualname__
    assert reloaded is not first
    reg = fresh()
    reg.register("a", first)
    reg.register("a", reloaded)
    assert reg.get("a") in (first, reloaded)


def test_a_different_object_under_a_taken_name_is_an_error_naming_both():
    reg = fresh()
    reg.register("a", first)
    with pytest.raises(ValueError) as err:
        reg.register("a", second)
    message = str(err.value)
    assert "widget 'a'" in message
    assert f"{__name__}.first" in message and f"{__name__}.second" in message
    with pytest.raises(ValueError, match=f"{__name__}.second"):
        reg.register("a")(second)
    assert reg.get("a") is first  # the first registration stands


# --- dotted paths -------------------------------------------------------------------------------------


def test_dotted_paths_resolve_modules_and_dotted_attributes():
    reg = fresh()
    assert reg.get("json:dumps") is json.dumps
    assert reg.get("os.path:join") is os.path.join
    assert reg.get("json:JSONDecoder.decode") is json.JSONDecoder.decode
    assert reg.get(f"{__name__}:first") is first


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_mod_x:fn", "widget 'no_such_mod_x:fn': cannot import module 'no_such_mod_x'"),
        ("json:nope", "widget 'json:nope': module 'json' has no attribute 'nope'"),
        ("json:JSONDecoder.nope", "module 'json' has no attribute 'JSONDecoder.nope'"),
        ("json:", "widget path 'json:' must look like 'package.module:attr'"),
        (":dumps", "widget path ':dumps' must look like"),
    ],
)
def test_dotted_path_errors_name_the_missing_module_or_attribute(path, message):
    with pytest.raises(ValueError) as err:
        fresh().get(path)
    assert message in str(err.value)


def test_file_paths_load_the_file_once(tmp_path):
    plugin = tmp_path / "my_widgets.py"
    plugin.write_text("def widget():\n    return 'from file'\n")
    reg = fresh()
    fn = reg.get(f"{plugin}:widget")
    assert fn() == "from file"
    assert reg.get(f"{plugin}:widget") is fn  # the file is one module, not re-executed per lookup
    with pytest.raises(ValueError, match="no file"):
        reg.get(f"{tmp_path / 'absent.py'}:widget")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"importing .*broken\.py.* failed .*boom"):
        reg.get(f"{tmp_path / 'broken.py'}:widget")


# --- entry points -------------------------------------------------------------------------------------


def test_installed_entry_points_of_the_group_resolve():
    # pyproject.toml: [project.entry-points."cispo.rewards"] math = "rewards.math:score", code = ...
    import rewards.code
    import rewards.math

    reg = Registry("reward", "cispo.rewards")
    assert "math" not in reg
    assert reg.get("math") is rewards.math.score
    assert reg.get("code") is rewards.code.score
    assert "math" in reg  # loaded once, then registered under its name


def test_registered_and_lazy_names_come_before_entry_points():
    reg = Registry("reward", "cispo.rewards", lazy={"math": "json:dumps"})
    reg.register("code", first)
    assert reg.get("math") is json.dumps and reg.get("code") is first


def test_only_the_registry_group_is_searched(monkeypatch):
    eps = {
        GROUP: [EntryPoint(name="fancy", value="json:loads", group=GROUP)],
        "cispo.other": [EntryPoint(name="alien", value="json:dumps", group="cispo.other")],
    }
    asked = []

    def fake_entry_points(*, group):
        asked.append(group)
        return eps.get(group, [])

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    reg = fresh()
    assert reg.get("fancy") is json.loads
    with pytest.raises(ValueError, match=f"unknown widget 'alien'.*entry point in group '{GROUP}'"):
        reg.get("alien")
    assert asked == [GROUP, GROUP]


# --- lazy built-ins -----------------------------------------------------------------------------------


def test_lazy_builtins_are_imported_on_first_get_only(monkeypatch, tmp_path):
    module = "cispo_test_lazy_widgets"
    (tmp_path / f"{module}.py").write_text("IMPORTS = 1\ndef widget():\n    return 'lazy'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    reg = fresh(x=f"{module}:widget", y="json:dumps")
    assert "x" in reg and reg.names() == ["x", "y"]
    reg.check("y")
    assert module not in sys.modules  # built, listed, a sibling resolved: still not imported
    widget = reg.get("x")
    assert widget() == "lazy" and sys.modules[module].IMPORTS == 1
    assert reg.get("x") is widget


def test_lazy_import_happens_once(monkeypatch):
    calls = []
    real = registry_module.import_path

    def spy(path, kind="object"):
        calls.append(path)
        return real(path, kind)

    monkeypatch.setattr(registry_module, "import_path", spy)
    reg = fresh(x="json:dumps")
    assert calls == []
    assert reg.get("x") is json.dumps and reg.get("x") is json.dumps
    assert calls == ["json:dumps"]


def test_a_lazy_builtin_with_a_missing_dependency_only_fails_when_asked_for():
    reg = fresh(ok="json:dumps", missing="no_such_optional_dep_cispo:Engine")
    assert reg.names() == ["missing", "ok"] and reg.get("ok") is json.dumps
    with pytest.raises(ValueError, match="cannot import module 'no_such_optional_dep_cispo'"):
        reg.get("missing")


def test_a_lazy_module_that_registers_itself_keeps_its_metadata(monkeypatch, tmp_path):
    module = "cispo_test_self_registering"
    (tmp_path / f"{module}.py").write_text(
        f"from {__name__} import HOLDER\n"
        "def widget():\n    return 1\n"
        "HOLDER['reg'].register('x', widget, low=-1.0, high=0.0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    reg = fresh(x=f"{module}:widget")
    monkeypatch.setitem(HOLDER, "reg", reg)
    assert reg.metadata("x") == {}
    assert reg.get("x")() == 1
    assert reg.metadata("x") == {"low": -1.0, "high": 0.0}


def test_add_lazy():
    reg = fresh()
    reg.add_lazy("later", "json:loads")
    assert "later" in reg and reg.names() == ["later"]
    assert reg.get("later") is json.loads


# --- unknown names, metadata, callables ---------------------------------------------------------------


def test_unknown_names_list_the_registered_ones():
    reg = fresh(b_lazy="json:dumps")
    reg.register("a_entry", first)
    expected = (
        "unknown widget 'zzz'; registered: a_entry, b_lazy; "
        f"or give 'package.module:attr', or an entry point in group '{GROUP}'"
    )
    with pytest.raises(ValueError) as err:
        reg.get("zzz")
    assert str(err.value) == expected
    with pytest.raises(ValueError, match="registered: a_entry, b_lazy"):
        reg.check("zzz")
    with pytest.raises(ValueError, match=r"unknown widget 'zzz'; registered: \(none\)"):
        fresh().get("zzz")


def test_metadata():
    reg = fresh()
    reg.register("ranged", first, low=-1.0, high=2.0)
    reg.register("plain")(second)
    assert reg.metadata("ranged") == {"low": -1.0, "high": 2.0}
    assert reg.metadata("plain") == {} and reg.metadata("unknown") == {}
    reg.metadata("ranged")["low"] = 5.0  # a copy: the registry's own stays as registered
    assert reg.metadata("ranged")["low"] == -1.0


def test_callable_from_rejects_non_callables():
    reg = fresh()
    assert callable_from(reg, "json:dumps") is json.dumps
    with pytest.raises(TypeError, match="widget 'os:sep' resolves to .* which is not callable"):
        callable_from(reg, "os:sep")


# --- the project's registries -------------------------------------------------------------------------


def _project_registries() -> dict[str, Registry]:
    from cispo.algo.advantages import ADVANTAGES
    from cispo.algo.losses import LOSSES
    from cispo.learner import LEARNERS
    from rewards.registry import REWARDS
    from rollout.engine import ENGINES
    from sandboxes import SANDBOXES

    return {
        "cispo.losses": LOSSES,
        "cispo.advantages": ADVANTAGES,
        "cispo.learners": LEARNERS,
        "cispo.engines": ENGINES,
        "cispo.rewards": REWARDS,
        "cispo.sandboxes": SANDBOXES,
    }


@pytest.mark.parametrize("group", list(_project_registries()))
def test_every_project_registry_is_a_registry(group):
    reg = _project_registries()[group]
    assert isinstance(reg, Registry)
    assert reg.group == group
    assert reg.names(), f"{group}: nothing registered or lazy"


def test_the_project_registries_are_the_ones_the_getters_use(monkeypatch):
    """get_policy_loss & co. go through those Registry objects (not a side dict): a name registered on
    the Registry is what each getter returns."""
    from cispo.algo.advantages import get_advantage
    from cispo.algo.losses import get_policy_loss
    from cispo.learner import build_learner
    from rewards.base import RewardInput
    from rewards.registry import get_reward
    from rollout.engine import build_engine
    from sandboxes import get_sandbox

    made = []

    def factory(**kwargs):
        made.append(kwargs)
        return kwargs

    factory.ray_ranks = False  # a learner backend says where it runs (cispo.learner.LearnerBackend)

    def reward(completion: str, reference: str) -> float:
        return 0.5

    for group, reg in _project_registries().items():
        probe = reward if group == "cispo.rewards" else factory
        monkeypatch.setattr(reg, "_entries", {**reg._entries, "test_probe": probe})
    assert get_policy_loss("test_probe") is factory
    assert get_advantage("test_probe") is factory
    assert build_learner("test_probe", a=1) == {"a": 1}
    assert build_engine("test_probe", b=2) == {"b": 2}
    assert get_sandbox("test_probe", c=3) == {"c": 3}
    assert made == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert get_reward("test_probe")(RewardInput("q", "a", reference="a")).score == 0.5


def test_closures_and_lambdas_with_one_name_are_different_objects():
    def make(k: int):
        def scaled(x: float) -> float:
            return k * x

        return scaled

    registry = Registry("thing", "cispo.tests_nothing")
    registry.register("scaled", make(1))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("scaled", make(2))
    registry.register("anon", lambda x: x)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("anon", lambda x: -x)


def test_a_plain_re_registration_keeps_the_metadata():
    registry = Registry("thing", "cispo.tests_nothing")
    registry.register("ranged", json.dumps, low=-1.0, high=0.0)
    registry.register("ranged", json.dumps)
    assert registry.metadata("ranged") == {"low": -1.0, "high": 0.0}
