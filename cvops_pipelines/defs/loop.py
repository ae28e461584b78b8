"""One loop's Dagster names: its asset-key prefix, its partitions, its jobs' selections.

Stage modules declare their assets and jobs once, at module level, for the default loop
(unprefixed keys, exactly as before). `loop_asset` and `loop_job` also remember how they were
declared, so `build_defs` (definitions.py) can declare the same thing again for a named loop:
every asset key, input, check and selection under the loop's prefix, its own drop and
feedback partitions. Sensors and schedules are the same objects in every loop; what differs
(partitions, op names) they ask of the `loop` resource.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckSpec,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    ConfigurableResource,
    DynamicPartitionsDefinition,
    asset,
    define_asset_job,
)
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)


class Loop(ConfigurableResource):
    """The loop a code location runs ("" = the default loop, with unprefixed keys)."""

    name: str = ""

    @property
    def prefix(self) -> list[str]:
        return [self.name] if self.name else []

    def key(self, name: str) -> AssetKey:
        return AssetKey([*self.prefix, name])

    def asset_keys(self, *names: str) -> list[AssetKey]:
        # not `keys`: a resource with a keys() method is taken for a mapping, and its config lost
        return [self.key(n) for n in names]

    def op(self, name: str) -> str:
        """The op that materializes an asset: what run config's `ops` is keyed by."""
        return "__".join(self.key(name).path)

    def partitions(self, kind: str) -> DynamicPartitionsDefinition:
        """`drops` or `feedback_batches`: the loop's own set, so one loop's drop named
        `initial` is never taken for another's."""
        return DynamicPartitionsDefinition(name=f"{self.name}_{kind}" if self.name else kind)

    @property
    def drops(self) -> DynamicPartitionsDefinition:
        return self.partitions("drops")

    @property
    def feedback_batches(self) -> DynamicPartitionsDefinition:
        return self.partitions("feedback_batches")

    @property
    def tags(self) -> dict[str, str]:
        return {"cvops/loop": self.name} if self.name else {}


DEFAULT = Loop()


@dataclass(frozen=True)
class PerLoop:
    """A declaration argument that depends on the loop (a partitions definition, a selection)."""

    resolve: Callable[[Loop], Any]


DROPS = PerLoop(lambda loop: loop.drops)
FEEDBACK_BATCHES = PerLoop(lambda loop: loop.feedback_batches)


def _checks(specs, loop: Loop) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(
            s.name,
            asset=loop.key(s.asset_key.path[-1]),
            description=s.description,
            blocking=s.blocking,
            metadata=s.metadata,
        )
        for s in specs
    ]


def _declare_asset(loop: Loop, fn: Callable, kwargs: dict) -> AssetsDefinition:
    args = {k: v.resolve(loop) if isinstance(v, PerLoop) else v for k, v in kwargs.items()}
    if "check_specs" in args:
        args["check_specs"] = _checks(args["check_specs"], loop)
    probe = asset(fn)  # the inputs Dagster reads off the signature, before any prefix
    ins = {name: AssetIn(key=loop.key(name)) for name in probe.keys_by_input_name}
    return asset(key_prefix=loop.prefix or None, ins=ins, **args)(fn)


@dataclass(frozen=True)
class _AssetDeclaration:
    fn: Callable
    kwargs: dict


@dataclass(frozen=True)
class _JobDeclaration:
    name: str
    assets: tuple[str, ...]
    groups: tuple[str, ...]
    kwargs: dict


_DECLARED: dict[int, _AssetDeclaration | _JobDeclaration] = {}


def loop_asset(**kwargs) -> Callable[[Callable], AssetsDefinition]:
    """`@asset` for the default loop that any loop can declare again (`for_loop`). A value
    wrapped in `PerLoop` is resolved per loop; check specs follow the asset's key."""

    def decorate(fn: Callable) -> AssetsDefinition:
        declared = _declare_asset(DEFAULT, fn, kwargs)
        _DECLARED[id(declared)] = _AssetDeclaration(fn, kwargs)
        return declared

    return decorate


def _declare_job(loop: Loop, declaration: _JobDeclaration) -> UnresolvedAssetJobDefinition:
    assets = AssetSelection.assets(*loop.asset_keys(*declaration.assets))
    selection = assets | AssetSelection.groups(*declaration.groups)
    kwargs = dict(declaration.kwargs)
    if loop.tags:
        kwargs["tags"] = {**kwargs.get("tags", {}), **loop.tags}
    return define_asset_job(declaration.name, selection=selection, **kwargs)


def loop_job(
    name: str, *, assets: tuple[str, ...] = (), groups: tuple[str, ...] = (), **kwargs
) -> UnresolvedAssetJobDefinition:
    """`define_asset_job` over assets named without their loop's prefix (or whole groups)."""
    declaration = _JobDeclaration(name, tuple(assets), tuple(groups), kwargs)
    declared = _declare_job(DEFAULT, declaration)
    _DECLARED[id(declared)] = declaration
    return declared


def declared(obj: object) -> bool:
    return id(obj) in _DECLARED


def for_loop(obj, loop: Loop):
    """The same asset or job declared for `loop` (the object itself for the default loop)."""
    if not loop.name:
        return obj
    declaration = _DECLARED[id(obj)]
    if isinstance(declaration, _AssetDeclaration):
        return _declare_asset(loop, declaration.fn, declaration.kwargs)
    return _declare_job(loop, declaration)
