"""Plugin discovery: entry points in the group "kvlm", loaded with pluggy, failures captured.

Discovery never raises: a plugin that fails to import, returns a bad spec or reuses a
taken name is reported (distribution, reason) by `broken()` and skipped. Results are
cached per value of the `KVLM_PLUGINS` / `KVLM_DISABLE_PLUGINS` environment variables;
`refresh()` discovers again.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import asdict, dataclass
from importlib import metadata

import pluggy

import kvlm
from kvlm.experts import hookspecs
from kvlm.experts.spec import DatasetSpec, ExpertSpec

ENTRY_POINT_GROUP = "kvlm"
ALLOW_ENV = "KVLM_PLUGINS"
DENY_ENV = "KVLM_DISABLE_PLUGINS"
BUILTIN_DISTRIBUTION = "kvlm"

# First-party expert names -> the distribution to `pip install` when one is missing.
FIRST_PARTY_EXPERTS = {"medical": "kvlm-medical", "legal": "kvlm-legal", "retail": "kvlm-retail"}


def canonical(name: str) -> str:
    """PEP 503 normalisation, used for distribution and expert names alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Provided:
    """A discovered spec with the distribution (pip name) and version that provided it."""

    spec: ExpertSpec | DatasetSpec
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.spec.name


class ExpertInfo(Provided):
    """A discovered `ExpertSpec` with its distribution and version."""


class DatasetInfo(Provided):
    """A discovered `DatasetSpec` with its distribution and version."""


@dataclass(frozen=True)
class PluginReport:
    """Why (part of) a plugin was skipped."""

    distribution: str
    version: str
    entry_point: str
    reason: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} ({self.entry_point}): {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Registry:
    """The result of one discovery run."""

    experts: dict[str, ExpertInfo]
    datasets: dict[str, DatasetInfo]
    broken: tuple[PluginReport, ...]
    disabled: dict[str, ExpertInfo]  # installed experts filtered out by the environment variables
    packages: dict[str, str]  # top-level package of each loaded plugin module -> distribution
    plugin_manager: pluggy.PluginManager


@dataclass(frozen=True)
class _Source:
    distribution: str
    version: str
    entry_point: str  # "name = module[:attr]"

    @property
    def package(self) -> str:
        """The top-level package of the entry point's module."""
        return self.entry_point.split("=", 1)[-1].strip().split(":")[0].split(".")[0]

    def report(self, reason: str) -> PluginReport:
        return PluginReport(self.distribution, self.version, self.entry_point, reason)


@dataclass(frozen=True)
class Filters:
    """The allow / deny lists of `KVLM_PLUGINS` / `KVLM_DISABLE_PLUGINS`."""

    allow: frozenset[str] | None
    deny: frozenset[str]

    @classmethod
    def from_env(cls) -> Filters:
        def names(var: str) -> frozenset[str]:
            return frozenset(canonical(n.strip()) for n in os.environ.get(var, "").split(",") if n.strip())

        return cls(allow=names(ALLOW_ENV) or None, deny=names(DENY_ENV))

    def denies_distribution(self, distribution: str) -> bool:
        return canonical(distribution) in self.deny

    def keeps(self, name: str, distribution: str, enabled: bool = False) -> bool:
        """`enabled`: the item is kept by the allow list regardless (built-ins, siblings)."""
        keys = {canonical(name), canonical(distribution)}
        if keys & self.deny:
            return False
        return enabled or self.allow is None or bool(keys & self.allow)


class _BuiltinPlugin:
    """kvlm's own experts, registered through the same hooks as any plugin."""

    @kvlm.hookimpl
    def kvlm_register_experts(self) -> list[ExpertSpec]:
        return [
            ExpertSpec(
                name="ffn",
                domain="general",
                build="kvlm.experts.builtin:FFNExpert",
                version=kvlm.__version__,
                description="Generic feed-forward expert: Dense(hidden_dim, gelu) -> Dense(d_model).",
            )
        ]


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "<unknown distribution>", "?"
    return dist.metadata["Name"] or dist.name, dist.version


def _entry_points() -> list[tuple[metadata.EntryPoint, _Source]]:
    """Entry points of the group, first-party distributions first, then by name."""
    first_party = {canonical(d) for d in FIRST_PARTY_EXPERTS.values()}
    found = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        distribution, version = _distribution_of(entry_point)
        source = _Source(distribution, version, f"{entry_point.name} = {entry_point.value}")
        found.append((entry_point, source))

    def order(item):
        distribution = canonical(item[1].distribution)
        return distribution not in first_party, distribution, item[0].name

    return sorted(found, key=order)


def _new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(_BuiltinPlugin(), name=BUILTIN_DISTRIBUTION)
    return manager


def _load_entry_points(manager: pluggy.PluginManager, filters: Filters):
    """Imports and registers every allowed plugin; returns `(sources by plugin name, reports)`."""
    sources: dict[str, _Source] = {}
    reports: list[PluginReport] = []
    for entry_point, source in _entry_points():
        if filters.denies_distribution(source.distribution):
            continue
        try:
            plugin = entry_point.load()
        except (Exception, SystemExit) as error:
            reports.append(source.report(f"import failed: {describe(error)}"))
            continue
        if manager.is_registered(plugin):
            continue
        name = f"{source.distribution}:{entry_point.name}"
        try:
            manager.register(plugin, name=name)
        except Exception as error:
            reports.append(source.report(f"invalid hooks: {describe(error)}"))
            continue
        callers = manager.get_hookcallers(plugin) or []
        unknown = sorted(c.name for c in callers if not c.has_spec())
        if unknown:
            reports.append(source.report(f"unknown hooks ignored: {', '.join(unknown)}"))
        if not any(c.has_spec() for c in callers):
            manager.unregister(plugin)
            reports.append(
                source.report(
                    "no hooks found: mark kvlm_register_experts / kvlm_register_datasets with @kvlm.hookimpl"
                )
            )
            continue
        sources[name] = source
    return sources, reports


def get_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A new pluggy manager with kvlm's hookspecs, its built-in plugin and, optionally, every
    allowed entry-point plugin registered (failures are skipped; see `broken()`)."""
    manager = _new_plugin_manager()
    if load_entry_points:
        _load_entry_points(manager, Filters.from_env())
    return manager


def _call_hook(manager: pluggy.PluginManager, hook_name: str, plugin_name: str) -> list:
    """Calls one hook of one plugin only, so one failing plugin cannot hide the others."""
    plugin = manager.get_plugin(plugin_name)
    others = [p for _, p in manager.list_name_plugin() if p is not plugin]
    return manager.subset_hook_caller(hook_name, remove_plugins=others)()


def _collect(manager, sources, hook_name: str, spec_type: type, reports: list) -> list:
    items = []
    for plugin_name, source in sources.items():
        try:
            results = _call_hook(manager, hook_name, plugin_name)
        except (Exception, SystemExit) as error:
            reports.append(source.report(f"{hook_name}() raised {describe(error)}"))
            continue
        for result in results:
            if not isinstance(result, (list, tuple)):
                reports.append(
                    source.report(
                        f"{hook_name}() must return a list of kvlm.{spec_type.__name__}. "
                        f"Received: {type(result).__name__} {result!r:.80}"
                    )
                )
                continue
            for item in result:
                if isinstance(item, spec_type):
                    items.append((item, source))
                else:
                    reports.append(
                        source.report(
                            f"{hook_name}() returned an item that is not a kvlm.{spec_type.__name__}. "
                            f"Received: {type(item).__name__} {item!r:.80}"
                        )
                    )
    return items


def _select(items, kind: str, keeps, info_type, reports: list):
    """Keeps the allowed items; on a name clash the earlier (first-party first) provider wins."""
    selected, disabled = {}, {}
    for spec, source in items:
        info = info_type(spec, source.distribution, source.version)
        if not keeps(spec, source):
            disabled.setdefault(spec.name, info)
            continue
        owner = selected.get(spec.name)
        if owner is not None:
            reports.append(
                source.report(
                    f"{kind} name {spec.name!r} is already provided by {owner.distribution} {owner.version}; skipped"
                )
            )
            continue
        selected[spec.name] = info
    return selected, disabled


def discover() -> Registry:
    """Runs discovery now (uncached) with the current environment variables."""
    filters = Filters.from_env()
    manager = _new_plugin_manager()
    builtin = _Source(BUILTIN_DISTRIBUTION, kvlm.__version__, "built-in")
    loaded, reports = _load_entry_points(manager, filters)
    sources = {BUILTIN_DISTRIBUTION: builtin, **loaded}

    expert_items = _collect(manager, sources, "kvlm_register_experts", ExpertSpec, reports)
    experts, disabled = _select(
        expert_items,
        "expert",
        lambda spec, src: filters.keeps(spec.name, src.distribution, enabled=src is builtin),
        ExpertInfo,
        reports,
    )
    enabled = {canonical(info.distribution) for info in experts.values()}
    dataset_items = _collect(manager, sources, "kvlm_register_datasets", DatasetSpec, reports)
    datasets, _ = _select(
        dataset_items,
        "dataset",
        lambda spec, src: filters.keeps(spec.name, src.distribution, enabled=canonical(src.distribution) in enabled),
        DatasetInfo,
        reports,
    )
    packages = {BUILTIN_DISTRIBUTION: BUILTIN_DISTRIBUTION}
    for source in loaded.values():
        packages.setdefault(source.package, source.distribution)
    return Registry(experts, datasets, tuple(reports), disabled, packages, manager)


_lock = threading.Lock()
_cache: dict[tuple[str, str], Registry] = {}


def registry() -> Registry:
    """The cached discovery result for the current `KVLM_PLUGINS` / `KVLM_DISABLE_PLUGINS`."""
    key = (os.environ.get(ALLOW_ENV, ""), os.environ.get(DENY_ENV, ""))
    with _lock:
        if key not in _cache:
            _cache[key] = discover()
        return _cache[key]


def refresh() -> Registry:
    """Forgets cached discovery results and discovers again."""
    with _lock:
        _cache.clear()
    return registry()


def available() -> dict[str, ExpertInfo]:
    """The discovered experts by name."""
    return dict(registry().experts)


def datasets() -> dict[str, DatasetInfo]:
    """The discovered datasets by name."""
    return dict(registry().datasets)


def broken() -> list[PluginReport]:
    """Reports of plugins (or parts of plugins) that were skipped, with the reason."""
    return list(registry().broken)


def distribution_for(name: str) -> str | None:
    """The distribution providing expert `name`: installed, else first-party, else None."""
    reg = registry()
    info = reg.experts.get(name) or reg.disabled.get(name)
    return info.distribution if info else FIRST_PARTY_EXPERTS.get(name)
