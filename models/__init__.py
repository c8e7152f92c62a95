"""Model families. Each is one module behind the same small interface (see `models/dit.py`):
`from_pretrained`, `denoiser`, `sample_shape`, `null_condition`, `betas`, `condition_fields`, `condition`,
`predict`, `tunable_parameters`, `place_frozen`, `denoiser_from_state_dict`, `sample`, `preview`,
`export`. The trainer looks families up here.
"""

from __future__ import annotations


def family_class(name: str) -> type:
    if name == "dit":
        from models.dit import DiTFamily

        return DiTFamily
    if name == "sd_controlnet":
        from models.sd_controlnet import SDControlNetFamily

        return SDControlNetFamily
    raise ValueError(f"unknown model family {name!r}; known: dit, sd_controlnet")
