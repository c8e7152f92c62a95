"""DiT trained in continuous noise levels: the DiT transformer as EDM's network F, behind EDM's preconditioning.

Everything but the noise process is DiT's (`models/dit.py`): loading, labels and the null class, PEFT, ZeRO-3
building. The process is `models/noise/edm.py` (log-normal training sigma, c_skip / c_out / c_in / c_noise, EDM's
loss weight), and samples come from diffusers' `EDMEulerScheduler`, which applies the same preconditioning. The
network takes c_in x and c_noise = ln(sigma) / 4 as its timestep; DiT's learned-variance channels, if any, are
not used. It expects a DiT trained in sigma (or one to train from scratch): a DDPM DiT's weights speak of t.

Export: transformer/ (a `DiTTransformer2DModel`), scheduler/ (an `EDMEulerScheduler` with the model's
sigma_data), vae/ if there is one, and noise_process.json (the training sigma distribution), which
`from_pretrained` reads back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import EDMEulerScheduler

from models.dit import DiTFamily, record_original_frequencies
from models.noise.edm import EDMProcess
from models.samplers import EDM_SAMPLERS, edm_sampler

NOISE_PROCESS_FILE = "noise_process.json"


class DiTEDMFamily(DiTFamily):
    name = "dit_edm"

    @classmethod
    def from_pretrained(cls, pretrained: str, *, noise: object | None = None, **settings) -> DiTEDMFamily:
        """DiT's `from_pretrained` (same settings); `noise` (the `noise:` config) overrides the training sigma
        distribution and sigma_data that the folder records (noise_process.json, an EDMEulerScheduler config),
        else EDM's own (P_mean -1.2, P_std 1.2, sigma_data 0.5)."""
        family = super().from_pretrained(pretrained, **settings)
        folder = Path(pretrained)
        recorded = _read_json(folder / NOISE_PROCESS_FILE)
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
        if scheduler.get("_class_name") != EDMEulerScheduler.__name__:
            scheduler = {}  # a DDPM folder's schedule says nothing about sigma
        chosen = {}
        for key in ("p_mean", "p_std", "sigma_data"):
            for source in (getattr(noise, key, None), recorded.get(key), scheduler.get(key)):
                if source is not None:
                    chosen[key] = source
                    break
        family.process = EDMProcess(**chosen)
        config = {k: v for k, v in scheduler.items() if not k.startswith("_")}
        family.scheduler_config = dict(EDMEulerScheduler.from_config(config).config)
        family.scheduler_config["sigma_data"] = family.process.sigma_data
        return family

    def betas(self) -> np.ndarray:
        raise ValueError(
            f"model.family={self.name} trains in continuous sigma (EDM) and has no DDPM betas: use its "
            "noise_process, or model.family=dit for a discrete DDPM DiT"
        )

    @property
    def noise_process(self) -> EDMProcess:
        return self.process

    samplers = EDM_SAMPLERS

    def sampling_scheduler(self, sampler: str = "euler"):
        """EDM's Euler sampler (what `sample` uses) or DPM-Solver++ over Karras' sigma schedule, preconditioned as in
        training."""
        return edm_sampler(self.scheduler_config, sampler)

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """transformer/, scheduler/ (EDMEulerScheduler), vae/ if any, and noise_process.json (`class_names` are
        written there too): `DiTEDMFamily.from_pretrained(directory)` loads it back."""
        directory = Path(directory)
        self._plain_transformer(state_dict, shared=False).save_pretrained(directory / "transformer")
        self.sampling_scheduler().save_pretrained(directory / "scheduler")
        if self.vae is not None:
            vae = self.vae if self.vae.dtype == torch.float32 else copy.deepcopy(self.vae).float()
            vae.save_pretrained(directory / "vae")
        if self.original_timestep_frequencies:
            record_original_frequencies(directory / "transformer")
        process = self.noise_process
        record = {"name": process.name, "p_mean": process.p_mean, "p_std": process.p_std}
        record["sigma_data"] = process.sigma_data
        if class_names:
            record["classes"] = list(class_names)
        (directory / NOISE_PROCESS_FILE).write_text(json.dumps(record, indent=2))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
