"""The one seam through which a package built on DiffusionDet joins ``build_config``.

An extension package (DiffusionInst today) calls :func:`register_config_extension` when its
config module is imported, and a caller names it: ``build_config(..., extensions=("diffusioninst",))``.
``build_config`` imports a named package it has not seen yet, so a tool never imports an
extension's code itself and the core never names an extension. For each config, in order (the
core ``diffusiondet`` first, then the named extensions):

1. ``add_config(cfg)`` adds the extension's keys (after the core's, so it may read or change them);
2. the YAML file and the command-line overrides are merged;
3. ``validate(cfg)`` raises ``ValueError`` for values that would only fail later;
4. the ``registers`` modules are imported: importing them fills detectron2's registries
   (meta-architectures, backbones) and dataset catalog with what configs name;
5. ``prepare(cfg)`` runs last, for work that needs the validated config (DiffusionDet registers
   its ``DATASETS.CUSTOM`` json files here and sets ``NUM_CLASSES`` from them).

``registers`` and a ``prepare`` given as ``"module:function"`` are plain strings, imported at
step 4/5 only: registering an extension costs no heavy import, and importing a config module
never imports the model. Only the standard library is imported here, so any layer may use it.
See docs/extensions.md.
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

__all__ = [
    "ConfigExtension",
    "config_extension",
    "register_config_extension",
    "resolve_config_extensions",
    "unregister_config_extension",
]

ConfigFn = Callable[[object], None]

_REGISTRY: Dict[str, "ConfigExtension"] = {}


@dataclass(frozen=True)
class ConfigExtension:
    """What one package contributes to a config; see the module docstring for when each runs.

    Attributes:
        name: the importable package that registers it (``build_config`` imports it by this name).
        add_config: ``add_config(cfg)`` adds keys; None adds none.
        validate: ``validate(cfg)`` raises ``ValueError`` listing every bad value; None checks nothing.
        registers: modules whose import registers the meta-architectures, backbones and datasets
            the extension provides.
        prepare: ``prepare(cfg)``, or ``"module:function"`` naming it; runs after ``registers``.
    """

    name: str
    add_config: Optional[ConfigFn] = None
    validate: Optional[ConfigFn] = None
    registers: Tuple[str, ...] = ()
    prepare: Union[None, str, ConfigFn] = None

    def load_registrations(self, cfg) -> None:
        """Import ``registers`` and run ``prepare`` (steps 4 and 5)."""
        for module in self.registers:
            importlib.import_module(module)
        prepare = _load_function(self.prepare) if isinstance(self.prepare, str) else self.prepare
        if prepare is not None:
            prepare(cfg)


def _load_function(reference: str) -> ConfigFn:
    module, sep, attribute = reference.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"prepare must be a callable or 'module:function', got {reference!r}")
    return getattr(importlib.import_module(module), attribute)


def register_config_extension(
    name: str,
    add_config: Optional[ConfigFn] = None,
    validate: Optional[ConfigFn] = None,
    registers: Iterable[str] = (),
    prepare: Union[None, str, ConfigFn] = None,
) -> ConfigExtension:
    """Make ``name`` available to ``build_config(extensions=(name, ...))``; returns the entry.

    Registering a name again replaces the entry: a re-imported (reloaded) module must not leave
    the functions of its previous copy behind.
    """
    if isinstance(registers, str):
        # A bare string would otherwise be read as one module per character.
        raise TypeError(f"registers must be a sequence of module names, got the string {registers!r}")
    extension = ConfigExtension(name, add_config, validate, tuple(registers), prepare)
    _REGISTRY[name] = extension
    return extension


def unregister_config_extension(name: str) -> Optional[ConfigExtension]:
    """Remove ``name`` (tests that register a toy extension clean up with it)."""
    return _REGISTRY.pop(name, None)


def config_extension(name: str) -> ConfigExtension:
    """The extension registered as ``name``, importing the package ``name`` first if needed."""
    if name not in _REGISTRY:
        importlib.import_module(name)
    if name not in _REGISTRY:
        raise LookupError(
            f"importing {name!r} registered no config extension: its package (or a module its"
            f" __init__ imports) must call register_config_extension({name!r}, ...)"
        )
    return _REGISTRY[name]


def resolve_config_extensions(
    extensions: Iterable[Union[str, ConfigExtension]],
) -> List[ConfigExtension]:
    """Names or ``ConfigExtension`` objects -> objects, in order, each name once.

    A name given twice (e.g. by a wrapper that adds its own package to the caller's list) would
    add its keys twice and run its checks twice; the first occurrence wins.
    """
    if isinstance(extensions, (str, ConfigExtension)):
        extensions = (extensions,)
    resolved, seen = [], set()
    for item in extensions:
        extension = item if isinstance(item, ConfigExtension) else config_extension(item)
        if extension.name not in seen:
            seen.add(extension.name)
            resolved.append(extension)
    return resolved
