"""DiT trained by flow matching: the DiT transformer predicting the velocity n - x0 at flow time t (`models/noise/
flow.py`), as SD3 and Flux train, with DiT's class labels and null class.

Everything but the noise process is DiT's (`models/dit.py`): loading, labels, PEFT, ZeRO-3 building. The network
takes x_t and t * 1000 as its timestep; its learned-variance channels, if any, take no part. It expects a DiT trained
by flow matching (or one to train from scratch): a DDPM DiT's weights predict epsilon. Samples come from diffusers'
FlowMatchEulerDiscreteScheduler (or DPM-Solver++ on flow sigmas), shifted as in training.

Export: transformer/ (a `DiTTransformer2DModel`), scheduler/ (a FlowMatchEulerDiscreteScheduler with the training
shift), vae/ if there is one, and noise_process.json (the training distribution of t), which `from_pretrained`
reads back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from models.dit import DiTFamily, record_original_frequencies
from models.noise.flow import NUM_TRAIN_TIMESTEPS, FlowMatchingProcess
from models.samplers import FLOW_SAMPLERS, flow_sampler

NOISE_PROCESS_FILE = "noise_process.json"


class DiTFlowFamily(DiTFamily):
    name = "dit_flow"

    @classmethod
    def from_pretrained(cls, pretrained: str, *, noise: object | None = None, **settings) -> DiTFlowFamily:
        """DiT's `from_pretrained` (same settings); the distribution of t is the `noise:` config's where set, else
        what the folder records (noise_process.json), else SD3's logit-normal (0, 1) without shift."""
        family = super().from_pretrained(pretrained, **settings)
        recorded = _read_json(Path(pretrained) / NOISE_PROCESS_FILE)
        recorded = {key: value for key, value in recorded.items() if key not in ("name", "classes")}
        family.process = FlowMatchingProcess.from_settings(noise, recorded)
        family.scheduler_config = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": family.process.time.shift}
        return family

    def betas(self) -> np.ndarray:
        raise ValueError(
            f"model.family={self.name} trains by flow matching in continuous time and has no DDPM betas: use its "
            "noise_process, or model.family=dit for a discrete DDPM DiT"
        )

    @property
    def noise_process(self) -> FlowMatchingProcess:
        return self.process

    samplers = FLOW_SAMPLERS

    def sampling_scheduler(self, sampler: str = "euler"):
        """Euler over the shifted flow times (what `sample` uses) or DPM-Solver++ on the same flow sigmas."""
        return flow_sampler(self.scheduler_config, sampler)

    def export(self, state_dict: dict[str, torch.Tensor], directory: Path, class_names: list[str] | None = None):
        """transformer/, scheduler/ (FlowMatchEulerDiscreteScheduler), vae/ if any, and noise_process.json
        (`class_names` are written there too): `DiTFlowFamily.from_pretrained(directory)` loads it back."""
        directory = Path(directory)
        self._plain_transformer(state_dict, shared=False).save_pretrained(directory / "transformer")
        FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config).save_pretrained(directory / "scheduler")
        if self.vae is not None:
            vae = self.vae if self.vae.dtype == torch.float32 else copy.deepcopy(self.vae).float()
            vae.save_pretrained(directory / "vae")
        if self.original_timestep_frequencies:
            record_original_frequencies(directory / "transformer")
        record = {"name": self.process.name, **self.process.settings()}
        if class_names:
            record["classes"] = list(class_names)
        (directory / NOISE_PROCESS_FILE).write_text(json.dumps(record, indent=2))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
