"""The plugin system: bundled components, lookups, temporary plugins, failures and real entry points."""
from __future__ import annotations

import importlib
import re
import sys
import textwrap
import types

import attrs
import numpy as np
import pytest
from torch import nn

from musco_core import Compressor, hookimpl
from musco_core.components import Decomposer, LayerAdapter, NoParams, RankSelector, Scheduler
from musco_core.errors import (ConfigError, DuplicateComponentError, MuscoError, PluginError,
                               UnknownComponentError)
from musco_core.plugins import (BUNDLED_PLUGINS, DISABLE_ENV, ENTRY_POINT_GROUP, MuscoPluginManager,
                                PluginFailure, PluginSource, make_plugin_manager)
from musco_core.registry import Registry, default_registry, forget_shared_registries
from musco_plugins.adapters import ConvAdapter
from musco_plugins.schedulers import MuscoScheduler
from musco_plugins.svd import SVD

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


class FakeDecomposer(SVD):
    name = "fake"


class FakeSvd(SVD):
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
    class MyConvAdapter(ConvAdapter):
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

        def select(self, decomposer, source, stage, params):
            return decomposer.max_ranks(source)

    class FakeScheduler(MuscoScheduler):
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
    class SvdScheduler(MuscoScheduler):
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
    class AlsoProvided(MuscoScheduler):
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
from musco_plugins.svd import SVD


class FakeIdentity(SVD):
    name = "fake_identity"


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
        from musco_plugins.svd import SVD

        class OtherSvd(SVD):
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
    first.add(first.decompositions, FakeDecomposer, manager.sources["musco_plugins.svd"])
    assert "fake" in first.decompositions.names()
    assert "fake" not in second.decompositions.names()


# --------------------------------------------------------------------------------------------------------------
# 11. component contracts, checked at registration


@attrs.frozen
class ForceParams:
    force: bool = False
    curr_compr_iter: int = 0


class ForceSelector(RankSelector):
    name = "forcing"
    Params = ForceParams

    def select(self, decomposer, source, stage, params):
        return decomposer.max_ranks(source)


class AutoSvd(SVD):
    name = "auto"


class NoMaxRanks(SVD):
    name = "no_max_ranks"
    max_ranks = Decomposer.max_ranks


class NoDecompose(SVD):
    name = "no_decompose"
    decompose = Decomposer.decompose


class NoSelect(RankSelector):
    name = "no_select"


class NoAllocate(RankSelector):
    name = "no_allocate"
    scope = "model"


class MisScoped(ForceSelector):
    name = "mis_scoped"
    scope = "Model"


class NoPlan(Scheduler):
    name = "no_plan"


class NoBuild(ConvAdapter):
    name = "no_build"
    module_types = (MyConv2d,)
    build = LayerAdapter.build


@pytest.mark.parametrize(("hook", "component", "expected"), [
    ("musco_register_decompositions", AutoSvd, "decomposition AutoSvd ('auto') is named 'auto'"),
    ("musco_register_rank_selectors", ForceSelector,
     "rank selector ForceSelector ('forcing') has Params fields ['curr_compr_iter', 'force']: these keys of a layer's "
     "schedule are the core's"),
    ("musco_register_decompositions", NoMaxRanks,
     "decomposition NoMaxRanks ('no_max_ranks') does not implement max_ranks (required of a Decomposer)"),
    ("musco_register_decompositions", NoDecompose, "NoDecompose ('no_decompose') does not implement decompose"),
    ("musco_register_rank_selectors", NoSelect, "NoSelect ('no_select') does not implement select (required of a "
                                                "layer-scope RankSelector)"),
    ("musco_register_rank_selectors", NoAllocate, "NoAllocate ('no_allocate') does not implement allocate"),
    ("musco_register_rank_selectors", MisScoped, "MisScoped ('mis_scoped') has scope 'Model'; expected 'layer' or "
                                                 "'model'"),
    ("musco_register_schedulers", NoPlan, "scheduler NoPlan ('no_plan') does not implement plan (required of a "
                                          "Scheduler)"),
    ("musco_register_layer_adapters", NoBuild, "layer adapter NoBuild ('no_build') does not implement build"),
])
def test_a_component_breaking_its_contract_is_a_failure_of_its_plugin(hook, component, expected):
    """A name the schedule reserves, or a required method left to the base's NotImplementedError, would fail (or
    silently mean something else) only when a schedule uses the component: its plugin is refused at loading."""
    reg = registry_with(("contract_plugin", make_plugin(**{hook: lambda: [component]})))
    assert [failure.name for failure in reg.manager.failures] == ["contract_plugin"]
    assert expected in reg.manager.failures[0].error
    assert component.name not in {provided.name for provided in reg.provided()}
    assert reg.decompositions.names() == BUNDLED["decompositions"]
    with pytest.raises(PluginError, match=r"'contract_plugin'.*" + re.escape(expected)):
        registry_with(("contract_plugin", make_plugin(**{hook: lambda: [component]})), strict=True)


@pytest.mark.parametrize("module_types", [
    nn.Bilinear, "torch.nn.modules.linear.Bilinear", ("Bilinear",), (), (int,), (nn.Bilinear, 3), [nn.Bilinear]])
def test_adapter_module_types_must_be_a_tuple_of_module_classes_or_dotted_names(module_types):
    """A bare class once broke every registry with a raw TypeError; a bare string would be read letter by letter."""
    adapter = type("BilinearAdapter", (ConvAdapter,), {"name": "bilinear", "module_types": module_types})
    reg = registry_with(("bad_types", make_plugin(musco_register_layer_adapters=lambda: [adapter])))
    assert [failure.name for failure in reg.manager.failures] == ["bad_types"]
    assert "expected a non-empty tuple of nn.Module classes or dotted class names" in reg.manager.failures[0].error
    assert reg.adapters.names() == BUNDLED["adapters"]
    assert reg.adapter_for(nn.Linear(2, 3)).name == "linear"


def test_adapter_module_types_may_name_classes():
    adapter = type("DottedAdapter", (ConvAdapter,), {"name": "dotted", "module_types": (
        f"{MyConv2d.__module__}.{MyConv2d.__qualname__}",)})
    reg = registry_with(("dotted_types", make_plugin(musco_register_layer_adapters=lambda: [adapter])))
    assert not reg.manager.failures
    assert reg.adapter_for(MyConv2d(3, 4, 3)).name == "dotted"


class MyConv1dAdapter(ConvAdapter):
    name = "my_conv1d"
    module_types = (nn.Conv1d,)


class MyConvAdapterA(ConvAdapter):
    name = "my_conv_a"
    module_types = (MyConv2d,)


class MyConvAdapterB(ConvAdapter):
    name = "my_conv_b"
    module_types = (f"{MyConv2d.__module__}.{MyConv2d.__qualname__}",)


class MyConv3dAdapter(ConvAdapter):
    name = "my_conv3d"
    module_types = ("torch.nn.modules.conv.Conv3d",)


@pytest.mark.parametrize(("plugins", "expected"), [
    ([("conv1d_plugin", [MyConv1dAdapter])],
     "layer adapter 'my_conv1d' of plugin 'conv1d_plugin' (<registered in code>) lists torch.nn.modules.conv.Conv1d, "
     "which layer adapter 'conv' of plugin 'musco_plugins.adapters' (musco-core) lists already"),
    ([("conv3d_plugin", [MyConv3dAdapter])],  # a class and its dotted name are one type
     "layer adapter 'my_conv3d' of plugin 'conv3d_plugin' (<registered in code>) lists torch.nn.modules.conv.Conv3d, "
     "which layer adapter 'conv' of plugin 'musco_plugins.adapters' (musco-core) lists already"),
    ([("plugin_a", [MyConvAdapterA]), ("plugin_b", [MyConvAdapterB])],
     f"layer adapter 'my_conv_b' of plugin 'plugin_b' (<registered in code>) lists {MyConvAdapterB.module_types[0]}, "
     f"which layer adapter 'my_conv_a' of plugin 'plugin_a' (<registered in code>) lists already"),
])
def test_a_module_type_listed_by_two_adapters_is_a_clash(plugins, expected):
    """Which adapter handles a type two list would depend on loading order, silently: a clash, like a duplicate
    name; listings keep the first registered adapter and record the other."""
    plugin_objects = [(name, make_plugin(musco_register_layer_adapters=lambda classes=classes: classes))
                      for name, classes in plugins]
    with pytest.raises(DuplicateComponentError) as info:
        registry_with(*plugin_objects)
    assert str(info.value).startswith(expected)
    kept = Registry.from_plugin_manager(make_plugin_manager(entry_points=False, plugins=plugin_objects),
                                        keep_clashes=True)
    assert [clash.message for clash in kept.clashes] == [str(info.value)]
    rejected = kept.clashes[0].rejected.name
    assert rejected not in kept.adapters.names()
    assert kept.adapter_for(nn.Conv1d(2, 2, 1)).name == "conv"
    assert kept.adapter_for(nn.Conv3d(2, 2, 1)).name == "conv"
    assert kept.adapter_for(MyConv2d(2, 2, 1)).name == ("my_conv_a" if rejected == "my_conv_b" else "conv")


def test_a_decomposition_named_as_a_whole_model_selector_is_a_clash():
    """settings.algo_kwargs.<name> sets a decomposition's or a whole-model selector's Params: the decomposition
    'budget' was handed the budget selector's."""
    budget_svd = type("BudgetSvd", (SVD,), {"name": "budget"})
    plugin = make_plugin(musco_register_decompositions=lambda: [budget_svd])
    with pytest.raises(DuplicateComponentError, match=re.escape(
            "decomposition 'budget' of plugin 'budget_svd' (<registered in code>) has the name of whole-model rank "
            "selector 'budget' of plugin 'musco_plugins.budget' (musco-core): settings.algo_kwargs.budget would set "
            "both")):
        registry_with(("budget_svd", plugin))
    layer_selector = type("Svd", (ForceSelector,), {"name": "svd", "Params": NoParams})  # no settings: no clash
    reg = registry_with(("svd_selector", make_plugin(musco_register_rank_selectors=lambda: [layer_selector])))
    assert reg.rank_selectors.entries["svd"].component is layer_selector


def _exits_with_usage():
    raise SystemExit(2)  # argparse reading the host's sys.argv


def test_a_hook_raising_system_exit_is_a_failure_of_its_plugin():
    reg = registry_with(("exiting", make_plugin(musco_register_decompositions=_exits_with_usage)),
                        ("good", make_plugin(musco_register_decompositions=lambda: [FakeDecomposer])))
    assert reg.manager.failures == [PluginFailure("exiting", "<registered in code>", "SystemExit: 2")]
    assert "fake" in reg.decompositions.names()


def test_a_schedule_naming_an_unknown_component_names_the_plugins_that_failed_to_load():
    """With its plugin skipped (an import error), a schedule naming its components said only 'expected one of cp3,
    ..., got 'block_svd'', as if the name were misspelt; the failure was in a log line the library user may not see.
    Now the error names the plugins that failed to load, and why."""
    def broken():
        raise ImportError("No module named 'my_kernels'")

    reg = registry_with(("block_plugin", make_plugin(musco_register_decompositions=broken)))
    with pytest.raises(ConfigError) as info:
        Compressor(nn.Sequential(nn.Linear(8, 8)), registry=reg,
                   model_compr_kwargs={"0": {"decomposition": "block_svd", "rank_selection": "blocky"}})
    for key in ("decomposition", "rank_selection"):
        assert re.search(rf'\$\.layers\["0"\]\.{key}: expected one of .*; plugins that failed to load: '
                         rf"'block_plugin' \(<registered in code>\): ImportError: No module named 'my_kernels'",
                         str(info.value))
    assert "failed to load" not in str(pytest.raises(ConfigError, Compressor, nn.Sequential(nn.Linear(8, 8)),
                                                     model_compr_kwargs={"0": {"decomposition": "svd2"}}).value)


def test_an_entry_point_raising_system_exit_at_import_is_skipped(installed_plugins, tmp_path):
    _fake_distribution(tmp_path, "exiting_musco_plugin", "exiting-musco-plugin", "0.1", "exiting", '''
        import argparse
        argparse.ArgumentParser().parse_args(["--unknown"])
    ''')
    importlib.invalidate_caches()
    try:
        manager = make_plugin_manager()
        assert ("exiting", "exiting-musco-plugin", "SystemExit: 2") in {
            (failure.name, failure.distribution, failure.error) for failure in manager.failures}
        assert "fake_identity" in Registry.from_plugin_manager(manager).decompositions.names()
        with pytest.raises(PluginError, match="'exiting' from exiting-musco-plugin failed: SystemExit: 2"):
            make_plugin_manager(strict=True, disabled=["broken"])
    finally:
        sys.modules.pop("exiting_musco_plugin", None)


def test_a_misspelt_hook_is_a_failure_of_its_plugin():
    """pluggy keeps an implementation of an unknown hook and never calls it: the plugin loaded with nothing."""
    plugin = make_plugin(musco_register_decomposition=lambda: [FakeDecomposer])
    reg = registry_with(("typo", plugin))
    expected = ("PluginError: unknown hook 'musco_register_decomposition' "
                "(did you mean 'musco_register_decompositions'?)")
    assert reg.manager.failures == [PluginFailure("typo", "<registered in code>", expected)]
    assert "typo" not in reg.manager.sources
    with pytest.raises(PluginError, match=re.escape(f"plugin 'typo' from <registered in code> failed: {expected}")):
        registry_with(("typo", plugin), strict=True)


def test_an_optional_hook_of_another_version_is_allowed():
    plugin = types.ModuleType("optional")
    plugin.musco_register_quantizers = hookimpl(optionalhook=True)(lambda: [])
    plugin.musco_register_decompositions = hookimpl(lambda: [FakeDecomposer])
    reg = registry_with(("optional", plugin))
    assert not reg.manager.failures
    assert "fake" in reg.decompositions.names()


class NumpyNames(MuscoScheduler):
    name = "numpy_names"

    def plan(self, layer_names, settings, params):
        return [[np.str_(name) for name in step] for step in super().plan(layer_names, settings, params)]


def test_a_plan_of_numpy_strings_is_saved_as_plain_names(tmp_path):
    """numpy's str_ passed the plan's checks, then broke save_state with a raw yaml RepresenterError."""
    reg = registry_with(("numpy_names", make_plugin(musco_register_schedulers=lambda: [NumpyNames])))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    compressor = Compressor(model, model_compr_kwargs={
        "version": 1, "settings": {"scheduler": "numpy_names"},
        "layers": {"0": {"decomposition": "svd", "rank_selection": "manual", "manual_rank": [4]}}}, registry=reg)
    assert all(type(layer) is str for step in compressor.state.steps for layer in step)
    compressor.save_state(tmp_path)
    assert (tmp_path / "LATEST").exists()
