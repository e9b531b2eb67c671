"""Plugin discovery: entry points in the group "kvlm", loaded with pluggy, failures captured.

Discovery never raises: a plugin that fails to import, returns a bad spec or reuses a
taken name is reported (distribution, reason) by `broken()` and skipped. Results are
cached per value of the `KVLM_PLUGINS` / `KVLM_DISABLE_PLUGINS` environment variables;
`refresh()` discovers again.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import threading
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

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


def _canonical(name: str) -> str:
    """PEP 503 normalisation, used for distribution and expert names alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _first_party_packages() -> dict[str, str]:
    return {dist.replace("-", "_"): dist for dist in FIRST_PARTY_EXPERTS.values()}


@dataclass(frozen=True)
class ExpertInfo:
    """A discovered expert with the distribution (pip name) and version that provided it."""

    spec: ExpertSpec
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class DatasetInfo:
    """A discovered dataset with the distribution and version that provided it."""

    spec: DatasetSpec
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.spec.name


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


class ExpertNotFoundError(ValueError, LookupError):
    """No discovered expert has the requested name; the message says what to install."""

    def __init__(self, name: str, message: str, distribution: str | None = None):
        super().__init__(message)
        self.name = name
        self.distribution = distribution


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
class _Filters:
    allow: frozenset[str] | None
    deny: frozenset[str]

    @classmethod
    def from_env(cls) -> _Filters:
        def names(var: str) -> frozenset[str]:
            return frozenset(_canonical(n.strip()) for n in os.environ.get(var, "").split(",") if n.strip())

        return cls(allow=names(ALLOW_ENV) or None, deny=names(DENY_ENV))

    def denies_distribution(self, distribution: str) -> bool:
        return _canonical(distribution) in self.deny

    def keeps(self, name: str, distribution: str, enabled: bool = False) -> bool:
        """`enabled`: the item is kept by the allow list regardless (built-ins, siblings)."""
        keys = {_canonical(name), _canonical(distribution)}
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
                build=_build_ffn,
                version=kvlm.__version__,
                description="Generic feed-forward expert: Dense(hidden_dim, gelu) -> Dense(d_model).",
            )
        ]


def _build_ffn(d_model: int, **options):
    from kvlm.experts import builtin  # Imports keras only when an expert is built.

    return builtin.build(d_model=d_model, **options)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "<unknown distribution>", "?"
    return dist.metadata["Name"] or dist.name, dist.version


def _entry_points() -> list[tuple[metadata.EntryPoint, _Source]]:
    """Entry points of the group, first-party distributions first, then by name."""
    first_party = {_canonical(d) for d in FIRST_PARTY_EXPERTS.values()}
    found = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        distribution, version = _distribution_of(entry_point)
        source = _Source(distribution, version, f"{entry_point.name} = {entry_point.value}")
        found.append((entry_point, source))

    def order(item):
        distribution = _canonical(item[1].distribution)
        return distribution not in first_party, distribution, item[0].name

    return sorted(found, key=order)


def _new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(_BuiltinPlugin(), name=BUILTIN_DISTRIBUTION)
    return manager


def _load_entry_points(manager: pluggy.PluginManager, filters: _Filters):
    """Imports and registers every allowed plugin; returns `(sources by plugin name, reports)`."""
    sources: dict[str, _Source] = {}
    reports: list[PluginReport] = []
    for entry_point, source in _entry_points():
        if filters.denies_distribution(source.distribution):
            continue
        try:
            plugin = entry_point.load()
        except (Exception, SystemExit) as error:
            reports.append(source.report(f"import failed: {_describe(error)}"))
            continue
        if manager.is_registered(plugin):
            continue
        name = f"{source.distribution}:{entry_point.name}"
        try:
            manager.register(plugin, name=name)
        except Exception as error:
            reports.append(source.report(f"invalid hooks: {_describe(error)}"))
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
        _load_entry_points(manager, _Filters.from_env())
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
            reports.append(source.report(f"{hook_name}() raised {_describe(error)}"))
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
    filters = _Filters.from_env()
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
    enabled = {_canonical(info.distribution) for info in experts.values()}
    dataset_items = _collect(manager, sources, "kvlm_register_datasets", DatasetSpec, reports)
    datasets, _ = _select(
        dataset_items,
        "dataset",
        lambda spec, src: filters.keeps(spec.name, src.distribution, enabled=_canonical(src.distribution) in enabled),
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


def _env_summary() -> str:
    return f"{ALLOW_ENV}={os.environ.get(ALLOW_ENV, '')!r}, {DENY_ENV}={os.environ.get(DENY_ENV, '')!r}"


def _broken_reason(reg: Registry, distribution: str) -> str | None:
    reasons = [r.reason for r in reg.broken if _canonical(r.distribution) == _canonical(distribution)]
    return "; ".join(reasons) or None


def _missing_expert_message(name: str, reg: Registry) -> tuple[str, str | None]:
    names = ", ".join(sorted(reg.experts)) or "none"
    info = reg.disabled.get(name)
    if info is not None:
        return (
            f"Expert {name!r} from {info.distribution} is installed but disabled ({_env_summary()}). "
            f"Available experts: {names}.",
            info.distribution,
        )
    distribution = FIRST_PARTY_EXPERTS.get(name)
    if distribution is None:
        return (
            f"Unknown expert {name!r}. Available experts: {names}. "
            "Install the plugin that provides it and check `kvlm experts list`.",
            None,
        )
    if _Filters.from_env().denies_distribution(distribution):
        return f"Expert {name!r} comes from {distribution}, which is disabled ({_env_summary()}).", distribution
    reason = _broken_reason(reg, distribution)
    if reason:
        return (
            f"Expert {name!r} comes from {distribution}, which is installed but failed to load: {reason}. "
            f"Reinstall it: pip install --force-reinstall {distribution}",
            distribution,
        )
    return (
        f"Expert {name!r} is provided by the plugin {distribution}, which is not installed: "
        f"pip install {distribution}",
        distribution,
    )


def build_expert(name: str, d_model: int, **options):
    """Builds the discovered expert `name` as a Keras layer of width `d_model`.

    Raises:
        ExpertNotFoundError: no discovered expert has that name; the message says which
            distribution to `pip install` when the name belongs to a first-party plugin,
            and lists the available experts otherwise.
    """
    import keras

    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
        raise ValueError(f"`d_model` must be a positive integer. Received: d_model={d_model!r}")
    reg = registry()
    info = reg.experts.get(name)
    if info is None:
        message, distribution = _missing_expert_message(name, reg)
        raise ExpertNotFoundError(name, message, distribution)
    layer = info.spec.build(d_model=d_model, **options)
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(
            f"Expert {name!r} from {info.distribution}: build() must return a keras.layers.Layer. "
            f"Received: {type(layer).__name__}"
        )
    if info.spec.weights:
        _load_shipped_weights(layer, info, d_model)
    return layer


def _load_shipped_weights(layer, info: ExpertInfo, d_model: int) -> None:
    import keras

    path = Path(info.spec.weights)
    if not path.is_absolute():
        module = sys.modules.get(getattr(info.spec.build, "__module__", "") or "")
        base = Path(module.__file__).parent if getattr(module, "__file__", None) else Path.cwd()
        path = base / path
    if not layer.built:
        layer.build((None, d_model))
    try:
        keras.saving.load_weights(layer, str(path))
    except Exception as error:
        raise ValueError(
            f"Could not load the weights shipped with expert {info.name!r} ({info.distribution}) "
            f"from {path}: {error}"
        ) from error


# ---------------------------------------------------------------------------------------
# Loading saved models.


def _registered_objects(path: str) -> set[tuple[str, str]]:
    """`(registered_name, module)` of every custom object in a `.keras` archive's config."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    found: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            registered = node.get("registered_name")
            if isinstance(registered, str) and ">" in registered:
                found.add((registered, str(node.get("module") or "")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def _distribution_for_package(package: str, reg: Registry) -> str | None:
    if package in reg.packages:
        return reg.packages[package]
    installed = metadata.packages_distributions().get(package)
    if installed:
        return installed[0]
    return _first_party_packages().get(package)


def _missing_plugin_message(registered_name: str, reg: Registry) -> str:
    package = registered_name.split(">", 1)[0]
    distribution = _distribution_for_package(package, reg)
    if distribution is None:
        return (
            f"The model needs {registered_name!r}, registered by the Python package {package!r}, which no "
            "installed kvlm plugin provides. Install the plugin that provides it (pip install <distribution>) "
            "and check `kvlm experts list`."
        )
    if _Filters.from_env().denies_distribution(distribution):
        return (
            f"The model needs {registered_name!r} from the plugin {distribution}, which is disabled "
            f"({_env_summary()}). Enable it, or pip install {distribution}."
        )
    reason = _broken_reason(reg, distribution)
    detail = f" (it failed to load: {reason})" if reason else ""
    return (
        f"The model needs {registered_name!r} from the plugin {distribution}, which is not installed{detail}. "
        f"Install it: pip install {distribution}"
    )


def _ensure_registered(objects: set[tuple[str, str]], reg: Registry, custom_objects: dict | None) -> None:
    """Imports the plugin modules defining the archive's custom classes, or raises ImportError."""
    import keras

    for registered_name, module in sorted(objects):
        if custom_objects and registered_name in custom_objects:
            continue
        if keras.saving.get_registered_object(registered_name) is not None:
            continue
        package = registered_name.split(">", 1)[0]
        if module and module.split(".")[0] in reg.packages:
            # Only modules of discovered plugins (or kvlm) are imported, never arbitrary names.
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ImportError(f"{_missing_plugin_message(registered_name, reg)} ({_describe(error)})") from error
            if keras.saving.get_registered_object(registered_name) is not None:
                continue
            if package in reg.packages and package != BUILTIN_DISTRIBUTION:
                distribution = reg.packages[package]
                raise ImportError(
                    f"The model needs {registered_name!r}, but the installed {distribution} does not register it; "
                    f"the model was probably saved with another version: pip install --upgrade {distribution}"
                )
        if package == BUILTIN_DISTRIBUTION:
            continue  # A kvlm class: Keras reports it precisely.
        raise ImportError(_missing_plugin_message(registered_name, reg))


_REGISTERED_NAME = re.compile(r"""['"]registered_name['"]:\s*['"]([^'"]+>[^'"]+)['"]""")


def load_model(path: str | os.PathLike, custom_objects: dict | None = None, compile: bool = True,
               safe_mode: bool = True):
    """`keras.saving.load_model` after registering the classes of every discovered plugin.

    Raises:
        ImportError: the model needs a class from a plugin that is not installed (or is
            disabled); the message names the distribution to `pip install`.
    """
    import keras

    reg = registry()
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        _ensure_registered(_registered_objects(path), reg, custom_objects)
    try:
        return keras.saving.load_model(path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    except (TypeError, ValueError) as error:
        match = _REGISTERED_NAME.search(str(error))
        if match and keras.saving.get_registered_object(match.group(1)) is None:
            raise ImportError(_missing_plugin_message(match.group(1), reg)) from error
        raise
