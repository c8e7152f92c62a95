"""Model families: each is one module behind the `ModelFamily` Protocol (`models/family.py`), registered here by
name with the noise process it trains (`models/noise/`). The trainer, the data jobs and the evaluation look
families up here; adding one is one module and one entry in `FAMILIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyEntry:
    module: str  # imported only when the family is used: diffusers and transformers cost seconds
    attribute: str
    noise_process: str  # a key of models.noise.NOISE_PROCESSES: config checks read it without building anything
    settings: str | None = None  # the section of the model config it reads (model.<settings>), if any

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.attribute)


FAMILIES: dict[str, FamilyEntry] = {
    "dit": FamilyEntry("models.dit", "DiTFamily", "ddpm", "dit"),
    "dit_edm": FamilyEntry("models.dit_edm", "DiTEDMFamily", "edm", "dit"),
    "dit_flow": FamilyEntry("models.dit_flow", "DiTFlowFamily", "flow", "dit"),
    "sd_controlnet": FamilyEntry("models.sd_controlnet", "SDControlNetFamily", "ddpm", "sd_controlnet"),
    "sd3": FamilyEntry("models.sd3", "SD3Family", "flow", "sd3"),
    "flux": FamilyEntry("models.flux", "FluxFamily", "flow", "flux"),
}


def family_entry(name: str) -> FamilyEntry:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_class(name: str) -> type:
    """The class of family `name` (a `models.family.ModelFamily`)."""
    return family_entry(name).load()


def register_family(name: str, module: str, attribute: str, noise_process: str, settings: str | None = None) -> None:
    """Adds a family living outside this package (e.g. a user's module) under `name` (model.family=name); it may
    read an existing section of the model config (`settings`, e.g. "dit")."""
    FAMILIES[name] = FamilyEntry(module, attribute, noise_process, settings)
