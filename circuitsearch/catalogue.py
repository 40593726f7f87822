"""The named models: one registry (name -> loader, what it is, what it needs) and load_model(name).

models.py and toys.py each provide their entries (models.MODELS, toys.MODELS); this module sits
above both, so models.py never imports the toys. `circuitsearch models` lists MODELS in order.
"""
from __future__ import annotations

from . import models, toys
from .models import DEFAULT_MODEL, Model, ModelError, NamedModel

# LOCAL before HUB (a path has a '/' in it too); HUB last: it answers any name with a '/' in it.
MODELS: list[NamedModel] = [*models.MODELS, *toys.MODELS, models.LOCAL, models.HUB]


def find_model(name: str) -> NamedModel:
    """The registry entry that loads `name` (nothing is loaded); ModelError naming the choices."""
    for entry in MODELS:
        if entry.matches(name):
            return entry
    raise ModelError(f"unknown model {name!r}; known: {', '.join(e.name for e in MODELS)} "
                     "(test:NAME:SEED picks a seed). `circuitsearch models` lists them")


def load_model(name: str = DEFAULT_MODEL) -> Model:
    """Load a model by name: smollm2-135m, induction-2l, test:NAME[:SEED], a local HF directory or .gguf
    file, hub:NAME or a hub name."""
    return find_model(name).load(name)
