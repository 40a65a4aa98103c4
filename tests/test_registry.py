"""The plugin system: bundled components, lookups, temporary plugins, failures and real entry points."""
from __future__ import annotations

import importlib
import sys
import textwrap
import types

import pytest
from torch import nn

from musco_core import hookimpl
from musco_core.components import Decomposer, LayerAdapter, RankSelector, Scheduler
from musco_core.errors import DuplicateComponentError, MuscoError, PluginError, UnknownComponentError
from musco_core.plugins import (BUNDLED_PLUGINS, DISABLE_ENV, ENTRY_POINT_GROUP, MuscoPluginManager,
                                PluginFailure, PluginSource, make_plugin_manager)
from musco_core.registry import Registry, default_registry, forget_shared_registries

BUNDLED = {
    "decompositions": ["cp3", "cp4", "svd", "tucker2", "whitened_svd"],
    "rank_selectors": ["budget", "manual", "param_reduction", "vbmf"],
    "adapters": ["conv", "hf_conv1d", "linear"],
    "schedulers": ["musco"],
}
BASES = {"decompositions": Decomposer, "rank_selectors": RankSelector, "adapters": LayerAdapter,
         "schedulers": Scheduler}


@pytest.fixture(autouse=True)
def _no_disabled_plugins(monkeypatch):
    """Tests must not depend on the caller's $MUSCO_DISABLE_PLUGINS."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)


def make_plugin(module_name: str = "temp_musco_plugin", **hooks) -> types.ModuleType:
    """A module-like plugin whose attributes are the given hook functions, each marked with ``@hookimpl``."""
    plugin = types.ModuleType(module_name)
    for hook_name, function in hooks.items():
        setattr(plugin, hook_name, hookimpl(function))
    return plugin


def registry_with(*plugins: tuple[str, object], strict: bool = False) -> Registry:
    manager = make_plugin_manager(entry_points=False, strict=strict, plugins=list(plugins))
    return Registry.from_plugin_manager(manager, strict=strict)


class FakeDecomposer(Decomposer):
    name = "fake"


class FakeSvd(Decomposer):
    name = "svd"


class NotAComponent:
    name = "not_a_component"


# --------------------------------------------------------------------------------------------------------------
# 1. bundled components


@pytest.mark.parametrize("role", sorted(BUNDLED))
def test_bundled_components_are_registered(registry, role):
    entries = getattr(registry, role).entries
    for name in BUNDLED[role]:
        assert name in entries, f"bundled {role} {name!r} missing; have {sorted(entries)}"
        provided = entries[name]
        assert provided.name == name
        assert provided.component.name == name
        assert issubclass(provided.component, BASES[role])
        assert provided.source.distribution == "musco-core"
        assert provided.source.name in BUNDLED_PLUGINS


def test_bundled_names_and_sources(registry):
    assert registry.decompositions.names() == ["cp3", "cp4", "svd", "tucker2", "whitened_svd"]
    assert registry.decompositions.entries["svd"].source.name == "musco_plugins.svd"
    assert registry.decompositions.entries["tucker2"].source.name == "musco_plugins.tucker2"
    assert registry.decompositions.entries["cp3"].source.name == "musco_plugins.cp"
    assert registry.schedulers.entries["musco"].source.name == "musco_plugins.schedulers"
    assert registry.adapters.entries["conv"].source.name == "musco_plugins.adapters"
    assert registry.rank_selectors.entries["vbmf"].source.name == "musco_plugins.rank_selectors"
    assert not registry.manager.failures


def test_get_returns_fresh_instances(registry):
    first, second = registry.decompositions.get("svd"), registry.decompositions.get("svd")
    assert isinstance(first, registry.decompositions.entries["svd"].component)
    assert first is not second
    assert isinstance(registry.schedulers.get("musco"), Scheduler)
    assert isinstance(registry.rank_selectors.get("vbmf"), RankSelector)


def test_provided_lists_every_component_role_by_role(registry):
    provided = registry.provided()
    assert [(p.role, p.name) for p in provided] == (
        [("decomposition", n) for n in BUNDLED["decompositions"]]
        + [("rank selector", n) for n in BUNDLED["rank_selectors"]]
        + [("layer adapter", n) for n in BUNDLED["adapters"]]
        + [("scheduler", n) for n in BUNDLED["schedulers"]])


# --------------------------------------------------------------------------------------------------------------
# 2. adapter lookup by MRO


class MyConv2d(nn.Conv2d):
    pass


class MyDeeperConv2d(MyConv2d):
    pass


class MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize(("module", "expected"), [
    (nn.Conv2d(3, 4, 3), "conv"),
    (nn.Conv1d(3, 4, 3), "conv"),
    (nn.Conv3d(3, 4, 3), "conv"),
    (MyConv2d(3, 4, 3), "conv"),
    (MyDeeperConv2d(3, 4, 1), "conv"),
    (nn.Linear(3, 4), "linear"),
    (MyLinear(3, 4), "linear"),
    (nn.BatchNorm2d(4), None),
    (nn.ReLU(), None),
    (nn.Sequential(nn.Linear(3, 4)), None),
])
def test_adapter_for_walks_the_mro(registry, module, expected):
    adapter = registry.adapter_for(module)
    if expected is None:
        assert adapter is None
    else:
        assert isinstance(adapter, LayerAdapter)
        assert adapter.name == expected
        assert adapter is not registry.adapter_for(module)  # a fresh instance each time


def test_plugin_adapter_for_a_subclass_takes_precedence_over_the_base_adapter():
    class MyConvAdapter(LayerAdapter):
        name = "my_conv"
        module_types = (MyConv2d,)

    reg = registry_with(("my_adapters", make_plugin(musco_register_layer_adapters=lambda: [MyConvAdapter])))
    assert reg.adapter_for(MyConv2d(3, 4, 3)).name == "my_conv"
    assert reg.adapter_for(MyDeeperConv2d(3, 4, 3)).name == "my_conv"
    assert reg.adapter_for(nn.Conv2d(3, 4, 3)).name == "conv"
    assert reg.adapters.entries["my_conv"].source.name == "my_adapters"


# --------------------------------------------------------------------------------------------------------------
# 3. a temporary plugin


def test_temporary_module_plugin_adds_a_decomposition():
    plugin = make_plugin(musco_register_decompositions=lambda: [FakeDecomposer])
    manager = make_plugin_manager(entry_points=False, plugins=[("extra", plugin)])
    reg = Registry.from_plugin_manager(manager)

    assert manager.sources["extra"].name == "extra"
    assert manager.sources["extra"].distribution == "<registered in code>"
    assert "fake" in reg.decompositions.names()
    provided = reg.decompositions.entries["fake"]
    assert provided.component is FakeDecomposer
    assert provided.source.name == "extra"
    assert isinstance(reg.decompositions.get("fake"), FakeDecomposer)
    # the bundled ones are still there
    assert {"svd", "tucker2", "cp3", "cp4"} <= set(reg.decompositions.names())
    assert not manager.failures


def test_temporary_object_plugin_with_several_hooks():
    class FakeSelector(RankSelector):
        name = "fake_selector"

    class FakeScheduler(Scheduler):
        name = "fake_scheduler"

    class Plugin:
        @hookimpl
        def musco_register_rank_selectors(self):
            return [FakeSelector]

        @hookimpl
        def musco_register_schedulers(self):
            return (FakeScheduler,)  # any iterable is accepted

    reg = registry_with(("object_plugin", Plugin()))
    assert reg.rank_selectors.entries["fake_selector"].source.name == "object_plugin"
    assert reg.schedulers.entries["fake_scheduler"].source.name == "object_plugin"
    assert reg.schedulers.names() == ["fake_scheduler", "musco"]


def test_hook_returning_none_contributes_nothing():
    reg = registry_with(("empty", make_plugin(musco_register_decompositions=lambda: None)))
    assert reg.decompositions.names() == ["cp3", "cp4", "svd", "tucker2", "whitened_svd"]
    assert not reg.manager.failures


def test_same_name_in_different_roles_is_allowed():
    class SvdScheduler(Scheduler):
        name = "svd"

    reg = registry_with(("sched", make_plugin(musco_register_schedulers=lambda: [SvdScheduler])))
    assert reg.schedulers.entries["svd"].component is SvdScheduler
    assert reg.decompositions.entries["svd"].source.name == "musco_plugins.svd"


# --------------------------------------------------------------------------------------------------------------
# 4. duplicate names


@pytest.mark.parametrize("strict", [False, True])
def test_duplicate_name_names_both_plugins(strict):
    plugin = make_plugin(musco_register_decompositions=lambda: [FakeSvd])
    with pytest.raises(DuplicateComponentError) as info:
        registry_with(("my_svd_plugin", plugin), strict=strict)
    message = str(info.value)
    assert "'svd'" in message
    assert "musco_plugins.svd" in message
    assert "musco-core" in message
    assert "my_svd_plugin" in message
    assert "<registered in code>" in message
    assert isinstance(info.value, PluginError)


def test_duplicate_between_two_extra_plugins():
    first = make_plugin(musco_register_decompositions=lambda: [FakeDecomposer])
    second = make_plugin(musco_register_decompositions=lambda: [FakeDecomposer])
    with pytest.raises(DuplicateComponentError, match=r"'fake'.*'first_plugin'.*'second_plugin'"):
        registry_with(("first_plugin", first), ("second_plugin", second))


def test_duplicate_avoided_when_the_bundled_plugin_is_disabled():
    plugin = make_plugin(musco_register_decompositions=lambda: [FakeSvd])
    manager = make_plugin_manager(entry_points=False, disabled=["musco_plugins.svd"],
                                  plugins=[("my_svd_plugin", plugin)])
    reg = Registry.from_plugin_manager(manager)
    assert "musco_plugins.svd" not in manager.sources
    assert reg.decompositions.entries["svd"].component is FakeSvd
    assert reg.decompositions.entries["svd"].source.name == "my_svd_plugin"


def test_bundled_plugin_disabled_through_the_environment(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, " musco_plugins.cp , musco_plugins.schedulers,")
    reg = Registry.from_plugin_manager(make_plugin_manager(entry_points=False))
    assert reg.decompositions.names() == ["svd", "tucker2", "whitened_svd"]
    assert reg.schedulers.names() == []
    assert "musco_plugins.cp" not in reg.manager.sources


# --------------------------------------------------------------------------------------------------------------
# 5. unknown names


def test_unknown_decomposition_lists_the_known_names(registry):
    with pytest.raises(UnknownComponentError) as info:
        registry.decompositions.get("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert "decomposition" in message
    for name in ("svd", "tucker2", "cp3", "cp4"):
        assert name in message
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, MuscoError)


@pytest.mark.parametrize(("role", "known"), [("rank_selectors", "vbmf"), ("adapters", "conv"),
                                             ("schedulers", "musco")])
def test_unknown_name_in_other_roles(registry, role, known):
    with pytest.raises(UnknownComponentError, match=known):
        getattr(registry, role).get("nope")


def test_unknown_name_in_an_empty_role():
    reg = Registry.from_plugin_manager(make_plugin_manager(entry_points=False,
                                                           disabled=["musco_plugins.schedulers"]))
    with pytest.raises(UnknownComponentError, match="known: none"):
        reg.schedulers.get("musco")


# --------------------------------------------------------------------------------------------------------------
# 6. a hook implementation that raises


def _raising_hook():
    raise RuntimeError("boom from the hook")


def test_raising_hook_is_skipped_when_not_strict():
    class AlsoProvided(Scheduler):
        name = "also_provided"

    plugin = make_plugin(musco_register_decompositions=_raising_hook,
                         musco_register_schedulers=lambda: [AlsoProvided])
    good = make_plugin(musco_register_decompositions=lambda: [FakeDecomposer])
    manager = make_plugin_manager(entry_points=False, plugins=[("raiser", plugin), ("good", good)])
    reg = Registry.from_plugin_manager(manager)

    assert len(manager.failures) == 1
    failure = manager.failures[0]
    assert isinstance(failure, PluginFailure)
    assert failure.name == "raiser"
    assert failure.distribution == "<registered in code>"
    assert "RuntimeError" in failure.error and "boom from the hook" in failure.error
    # the failing plugin contributes nothing at all, even from its hooks that worked
    assert "also_provided" not in reg.schedulers.names()
    assert all(p.source.name != "raiser" for p in reg.provided())
    # the other plugins still work
    assert reg.decompositions.entries["fake"].source.name == "good"
    assert reg.decompositions.names() == ["cp3", "cp4", "fake", "svd", "tucker2", "whitened_svd"]
    assert reg.schedulers.names() == ["musco"]
    assert reg.adapter_for(nn.Conv2d(3, 4, 3)).name == "conv"


def test_raising_hook_is_reported_once_per_plugin():
    plugin = make_plugin(musco_register_decompositions=_raising_hook, musco_register_schedulers=_raising_hook)
    reg = registry_with(("raiser", plugin))
    assert [f.name for f in reg.manager.failures] == ["raiser"]


def test_raising_hook_raises_when_strict():
    plugin = make_plugin(musco_register_decompositions=_raising_hook)
    manager = make_plugin_manager(entry_points=False, strict=True, plugins=[("raiser", plugin)])
    with pytest.raises(PluginError, match=r"'raiser'.*boom from the hook") as info:
        Registry.from_plugin_manager(manager, strict=True)
    assert isinstance(info.value.__cause__, RuntimeError)


# --------------------------------------------------------------------------------------------------------------
# 7. a hook that returns something that is not a component class


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("returned", [42, NotAComponent, FakeDecomposer(), "svd", RankSelector],
                         ids=["int", "plain-class", "instance", "string", "wrong-base"])
def test_hook_returning_a_non_component_is_a_plugin_error(returned, strict):
    plugin = make_plugin(musco_register_decompositions=lambda: [returned])
    if strict:
        with pytest.raises(PluginError) as info:
            registry_with(("bad_return", plugin), strict=strict)
        message = str(info.value)
    else:  # a broken plugin is reported and skipped; the bundled components still load
        reg = registry_with(("bad_return", plugin), strict=strict)
        assert [f.name for f in reg.manager.failures] == ["bad_return"]
        assert reg.decompositions.names() == ["cp3", "cp4", "svd", "tucker2", "whitened_svd"]
        message = reg.manager.failures[0].error
    assert "'bad_return'" in message
    assert "musco_register_decompositions" in message
    assert "Decomposer" in message


def test_hook_returning_a_bare_int_is_reported():
    plugin = make_plugin(musco_register_decompositions=lambda: 42)
    with pytest.raises(PluginError, match="'bare_int'"):
        registry_with(("bare_int", plugin), strict=True)
    reg = registry_with(("bare_int", plugin))
    assert [f.name for f in reg.manager.failures] == ["bare_int"]
    assert reg.decompositions.names() == ["cp3", "cp4", "svd", "tucker2", "whitened_svd"]


def test_component_without_a_name_is_a_plugin_error():
    class Nameless(Decomposer):
        pass

    plugin = make_plugin(musco_register_decompositions=lambda: [Nameless])
    with pytest.raises(PluginError, match=r"'nameless_plugin'.*Nameless.*name"):
        registry_with(("nameless_plugin", plugin), strict=True)
    failures = registry_with(("nameless_plugin", plugin)).manager.failures
    assert len(failures) == 1 and "must declare a string `name`" in failures[0].error


# --------------------------------------------------------------------------------------------------------------
# 8. a hookimpl with a wrong signature


def _wrong_signature(unexpected_arg):
    return [FakeDecomposer]


def test_wrong_signature_is_reported_and_skipped_when_not_strict():
    plugin = make_plugin(musco_register_decompositions=_wrong_signature)
    manager = make_plugin_manager(entry_points=False, plugins=[("bad_sig", plugin)])
    assert "bad_sig" not in manager.sources
    assert manager.get_plugin("bad_sig") is None
    assert len(manager.failures) == 1
    failure = manager.failures[0]
    assert failure.name == "bad_sig"
    assert failure.distribution == "<registered in code>"
    assert "PluginValidationError" in failure.error
    assert "unexpected_arg" in failure.error
    reg = Registry.from_plugin_manager(manager)
    assert "fake" not in reg.decompositions.names()
    assert reg.decompositions.names() == ["cp3", "cp4", "svd", "tucker2", "whitened_svd"]


def test_wrong_signature_in_one_hook_drops_the_whole_plugin():
    class Plugin:
        @hookimpl
        def musco_register_decompositions(self):
            return [FakeDecomposer]

        @hookimpl
        def musco_register_schedulers(self, unexpected_arg):
            return []

    manager = make_plugin_manager(entry_points=False, plugins=[("half_bad", Plugin())])
    assert [f.name for f in manager.failures] == ["half_bad"]
    assert all(impl.plugin_name != "half_bad"
               for impl in manager.hook.musco_register_decompositions.get_hookimpls())
    reg = Registry.from_plugin_manager(manager)  # must not trip over a half-registered plugin
    assert "fake" not in reg.decompositions.names()


def test_wrong_signature_raises_when_strict():
    plugin = make_plugin(musco_register_decompositions=_wrong_signature)
    with pytest.raises(PluginError, match=r"(?s)'bad_sig'.*unexpected_arg"):
        make_plugin_manager(entry_points=False, strict=True, plugins=[("bad_sig", plugin)])


def test_plugin_name_clash_is_reported():
    plugin = make_plugin(musco_register_decompositions=lambda: [FakeDecomposer])
    manager = make_plugin_manager(entry_points=False, plugins=[("musco_plugins.svd", plugin)])
    assert [f.name for f in manager.failures] == ["musco_plugins.svd"]
    assert manager.sources["musco_plugins.svd"].distribution == "musco-core"
    reg = Registry.from_plugin_manager(manager)
    assert "fake" not in reg.decompositions.names()
    assert reg.decompositions.entries["svd"].source.distribution == "musco-core"


# --------------------------------------------------------------------------------------------------------------
# 9. real entry points


GOOD_PLUGIN = '''
from musco_core import hookimpl
from musco_core.components import Decomposer


class FakeIdentity(Decomposer):
    name = "fake_identity"

    def layout(self, spec, ranks):
        raise NotImplementedError


@hookimpl
def musco_register_decompositions():
    return [FakeIdentity]
'''

BROKEN_PLUGIN = '''
raise ImportError("broken_musco_plugin needs a missing dependency")
'''

PLUGIN_MODULES = ("good_musco_plugin", "broken_musco_plugin")


def _fake_distribution(root, package: str, dist_name: str, version: str, entry_point: str, source: str) -> None:
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{package}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_point} = {package}\n")


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """Two fake installed distributions exposing ``musco`` entry points: 'good' and 'broken'."""
    _fake_distribution(tmp_path, "good_musco_plugin", "good-musco-plugin", "1.2.3", "good", GOOD_PLUGIN)
    _fake_distribution(tmp_path, "broken_musco_plugin", "broken-musco-plugin", "0.0.1", "broken", BROKEN_PLUGIN)
    for module in PLUGIN_MODULES:
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert {"good", "broken"} <= names, "importlib.metadata does not see the fake distributions"
    forget_shared_registries()  # default_registry() loads the plugins once per process: let it see these
    yield tmp_path
    for module in PLUGIN_MODULES:
        sys.modules.pop(module, None)
    monkeypatch.undo()  # drop tmp_path from sys.path before invalidating the caches
    importlib.invalidate_caches()
    forget_shared_registries()


def test_entry_points_not_strict(installed_plugins):
    manager = make_plugin_manager()
    reg = Registry.from_plugin_manager(manager)

    provided = reg.decompositions.entries["fake_identity"]
    assert provided.source.name == "good"
    assert provided.source.distribution == "good-musco-plugin"
    assert provided.source.version == "1.2.3"
    assert manager.sources["good"] == provided.source
    assert reg.decompositions.get("fake_identity").name == "fake_identity"

    assert "broken" not in manager.sources
    assert len(manager.failures) == 1
    failure = manager.failures[0]
    assert failure.name == "broken"
    assert failure.distribution == "broken-musco-plugin"
    assert "ImportError" in failure.error
    assert "broken_musco_plugin needs a missing dependency" in failure.error

    # the bundled components still work
    assert {"svd", "tucker2", "cp3", "cp4"} <= set(reg.decompositions.names())
    assert reg.decompositions.entries["svd"].source.distribution == "musco-core"
    assert reg.schedulers.names() == ["musco"]
    assert reg.adapter_for(nn.Linear(2, 3)).name == "linear"


def test_default_registry_sees_entry_points(installed_plugins):
    reg = default_registry()
    assert reg.decompositions.entries["fake_identity"].source.distribution == "good-musco-plugin"
    assert [f.name for f in reg.manager.failures] == ["broken"]


def test_entry_points_strict(installed_plugins):
    with pytest.raises(PluginError, match=r"'broken'.*broken-musco-plugin.*missing dependency") as info:
        make_plugin_manager(strict=True)
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(PluginError, match="'broken'"):
        default_registry(strict=True)


def test_entry_point_disabled_through_the_environment(installed_plugins, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "broken")
    manager = make_plugin_manager(strict=True)  # strict: nothing left to fail
    assert manager.failures == []
    assert "broken" not in manager.sources
    assert "broken_musco_plugin" not in sys.modules  # not even imported
    reg = Registry.from_plugin_manager(manager, strict=True)
    assert reg.decompositions.entries["fake_identity"].source.version == "1.2.3"


def test_entry_point_disabled_by_argument(installed_plugins):
    manager = make_plugin_manager(disabled=["good"])
    reg = Registry.from_plugin_manager(manager)
    assert "fake_identity" not in reg.decompositions.names()
    assert "good" not in manager.sources
    assert "good_musco_plugin" not in sys.modules
    assert [f.name for f in manager.failures] == ["broken"]


def test_entry_points_can_be_switched_off(installed_plugins):
    manager = make_plugin_manager(entry_points=False, strict=True)
    reg = Registry.from_plugin_manager(manager, strict=True)
    assert "fake_identity" not in reg.decompositions.names()
    assert manager.failures == []
    assert set(manager.sources) == set(BUNDLED_PLUGINS)


def test_entry_point_duplicating_a_bundled_name(installed_plugins, tmp_path):
    _fake_distribution(tmp_path, "dup_musco_plugin", "dup-musco-plugin", "2.0", "dup", '''
        from musco_core import hookimpl
        from musco_core.components import Decomposer

        class OtherSvd(Decomposer):
            name = "svd"

        @hookimpl
        def musco_register_decompositions():
            return [OtherSvd]
    ''')
    importlib.invalidate_caches()
    try:
        with pytest.raises(DuplicateComponentError, match=r"musco_plugins\.svd.*musco-core.*'dup'.*dup-musco-plugin"):
            Registry.from_plugin_manager(make_plugin_manager(disabled=["broken"]))
    finally:
        sys.modules.pop("dup_musco_plugin", None)


# --------------------------------------------------------------------------------------------------------------
# 10. independent managers


def test_plugin_managers_are_independent():
    first = make_plugin_manager(entry_points=False)
    second = make_plugin_manager(entry_points=False)
    assert isinstance(first, MuscoPluginManager)
    assert first is not second

    plugin = make_plugin(musco_register_decompositions=lambda: [FakeDecomposer])
    first.register(plugin, name="late_extra")
    first.sources["late_extra"] = PluginSource("late_extra", "tests", "0")

    assert "late_extra" not in second.sources
    assert second.get_plugin("late_extra") is None
    assert all(impl.plugin_name != "late_extra"
               for impl in second.hook.musco_register_decompositions.get_hookimpls())
    assert "fake" in Registry.from_plugin_manager(first).decompositions.names()
    assert "fake" not in Registry.from_plugin_manager(second).decompositions.names()


def test_factory_plugins_do_not_leak_between_managers():
    plugin = make_plugin(musco_register_decompositions=_raising_hook)
    with_extra = make_plugin_manager(entry_points=False, plugins=[("raiser", plugin)])
    Registry.from_plugin_manager(with_extra)
    plain = make_plugin_manager(entry_points=False)
    reg = Registry.from_plugin_manager(plain)
    assert "raiser" in with_extra.sources and with_extra.failures
    assert "raiser" not in plain.sources
    assert plain.failures == []
    assert reg.decompositions.names() == ["cp3", "cp4", "svd", "tucker2", "whitened_svd"]


def test_registries_from_the_same_manager_are_independent():
    manager = make_plugin_manager(entry_points=False)
    first, second = Registry.from_plugin_manager(manager), Registry.from_plugin_manager(manager)
    assert first.decompositions is not second.decompositions
    first.decompositions.add(FakeDecomposer, manager.sources["musco_plugins.svd"])
    assert "fake" in first.decompositions.names()
    assert "fake" not in second.decompositions.names()
