"""The registry of model keys: plain keys ("clip") and namespaces ("timm:<architecture>")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from models.capabilities import Capabilities
from models.errors import ModelError
from models.spec import ModelSpec
from models.weights import Weights, parse_weights


@dataclass(frozen=True)
class Request:
    """One load: the key as given, the name after a namespace prefix, the backbone and the weights."""

    key: str
    name: str
    backbone: str | None
    weights: Weights


Builder = Callable[[Request], ModelSpec]
# An entry's facts: one Capabilities; one per backbone (same keys as `backbones`); or, for a namespace,
# a function of the name after the prefix.
Facts = Capabilities | Mapping[str, Capabilities] | Callable[[str], Capabilities] | None


@dataclass(frozen=True)
class Entry:
    """A registry entry; `backbones` maps accepted --backbone values to architectures (first = default).

    `capabilities` declares what the entry loads without building it (see Facts); None for a plug-in
    that declares nothing.
    """

    key: str
    build: Builder
    summary: str
    backbones: dict[str, str] = field(default_factory=dict)
    namespace: bool = False
    capabilities: Facts = field(default=None, compare=False)

    @property
    def label(self) -> str:
        return f"{self.key}:<architecture>" if self.namespace else self.key


_ENTRIES: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add an entry; ModelError if its key is taken (keys are unique across plain keys and namespaces)."""
    if entry.key in _ENTRIES:
        raise ModelError(f"model key '{entry.key}' is already registered; choose another key")
    if ":" in entry.key:
        raise ModelError(f"model key '{entry.key}' may not contain ':' (reserved for namespaces)")
    _check_facts(entry)
    _ENTRIES[entry.key] = entry
    return entry


def _check_facts(entry: Entry) -> None:
    """The declared capabilities have the shape the entry needs; ModelError naming what is wrong."""
    facts = entry.capabilities
    if facts is None or isinstance(facts, Capabilities) and not entry.backbones and not entry.namespace:
        return
    if isinstance(facts, Mapping) and entry.backbones and set(facts) == set(entry.backbones):
        if all(isinstance(f, Capabilities) for f in facts.values()):
            return
    if callable(facts) and entry.namespace:
        return
    expected = ("a function of the architecture name" if entry.namespace else
                f"one Capabilities per backbone ({', '.join(entry.backbones)})" if entry.backbones else
                "one Capabilities")
    raise ModelError(f"model key '{entry.key}': its capabilities must be {expected}")


def unregister(key: str) -> None:
    """Remove an entry (for plug-ins and tests)."""
    _ENTRIES.pop(key, None)


def model_names() -> tuple[str, ...]:
    """Registered plain keys, in registration order."""
    return tuple(k for k, e in _ENTRIES.items() if not e.namespace)


def entries() -> tuple[Entry, ...]:
    """Every entry, plain keys and namespaces, in registration order."""
    return tuple(_ENTRIES.values())


def valid_keys_text() -> str:
    return ", ".join(e.label for e in _ENTRIES.values())


def resolve(key: str) -> tuple[Entry, str]:
    """The entry of `key` and the name after its namespace prefix; ModelError listing valid keys."""
    prefix, sep, name = str(key).partition(":")
    entry = _ENTRIES.get(prefix)
    if entry is not None and entry.namespace == bool(sep) and (name or not sep):
        return entry, name
    raise ModelError(f"unknown model '{key}'; valid models: {valid_keys_text()}")


def resolve_backbone(entry: Entry, key: str, backbone: str | None) -> str | None:
    """The architecture for --backbone; ModelError naming the valid backbones."""
    if not entry.backbones:
        if backbone:
            raise ModelError(
                f"model '{key}' has a fixed architecture; --backbone applies only to models with a "
                f"choice of backbones ({', '.join(e.key for e in _ENTRIES.values() if e.backbones)})"
            )
        return None
    if not backbone:
        return next(iter(entry.backbones))
    canonical = {b.replace("/", "-").lower(): b for b in entry.backbones}
    choice = canonical.get(backbone.replace("/", "-").lower())
    if choice is None:
        raise ModelError(
            f"unknown backbone '{backbone}' for model '{key}'; valid backbones: {', '.join(entry.backbones)}"
        )
    return choice


def capabilities(key: str, backbone: str | None = None) -> Capabilities:
    """What `key` (with `backbone`, else its default one) loads, without building it; ModelError if undeclared."""
    entry, name = resolve(key)
    chosen = resolve_backbone(entry, key, backbone)
    facts = entry.capabilities
    if facts is None:
        raise ModelError(
            f"model '{key}' declares no capabilities; `python -m models show {key}` builds it and prints its facts"
        )
    if entry.namespace:
        return facts(name)
    return facts[chosen] if chosen is not None else facts


def load_model(key: str, backbone: str | None = None, weights: str | None = None) -> ModelSpec:
    """Build the model of `key` with its preprocessing and encoders.

    weights: None = the usual source (hub download, packaged file or built-in tiny weights),
    "random" = the architecture with a fixed-seed random initialisation, or a local file/folder.
    """
    entry, name = resolve(key)
    chosen = resolve_backbone(entry, key, backbone)
    request = Request(key=key, name=name, backbone=chosen, weights=parse_weights(weights, key))
    spec = entry.build(request)
    spec.model.eval()
    return spec
