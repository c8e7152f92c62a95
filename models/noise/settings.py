"""Which `noise:` config keys each noise process reads, so that a family refuses the keys of another process by
name instead of ignoring them."""

from __future__ import annotations

PROCESS_SETTINGS = {
    "edm": ("p_mean", "p_std", "sigma_data"),
    "flow": ("t_distribution", "logit_mean", "logit_std", "shift"),
}
_WHAT = {
    "edm": ("sets the continuous sigma distribution of an EDM process", "model.family=dit_edm"),
    "flow": ("sets the flow-matching time distribution of a rectified-flow process", "model.family=dit_flow"),
}


def refuse_timestep_options(method: object) -> None:
    """`method.bank_max_t` is a DDPM timestep: a continuous process refuses it by name."""
    if getattr(method, "bank_max_t", None) is not None:
        raise ValueError(
            f"method.bank_max_t={method.bank_max_t} truncates the bank at an integer DDPM timestep, and this family's "
            "levels are continuous: remove it"
        )


def refuse_other_settings(noise: object, process: str, trains: str) -> None:
    """Raises ValueError for the first `noise.*` key that is set and belongs to a process other than `process`
    (`trains`: what the family trains, in words)."""
    for owner, keys in PROCESS_SETTINGS.items():
        if owner == process:
            continue
        for key in keys:
            value = getattr(noise, key, None)
            if value is not None:
                what, family = _WHAT[owner]
                raise ValueError(
                    f"noise.{key}={value} {what}, but this family trains {trains}: remove noise.{key} or pick a "
                    f"family that trains it ({family})"
                )
