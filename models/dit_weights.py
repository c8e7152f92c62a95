"""Pre-trained DiT weights read one tensor at a time: from a diffusers folder (safetensors, `safe_open`) or an
original `.pt` (memory-mapped), with the label table mapped onto the target classes on the way.

A rank that fills a ZeRO-3 partitioned model from this stream holds one pre-trained tensor at a time, never the
whole model (DESIGN.md invariant 7).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from models.dit_convert import infer_original_dit_config, load_original_state_dict, original_key_plan, read_planned

EMBEDDER = "norm1.emb."  # diffusers' per-block copy of DiT's one timestep/label embedder
LABEL_TABLE = "class_embedder.embedding_table.weight"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass
class WeightSource:
    """The model config and a reader of each tensor by its diffusers name."""

    config: dict
    names: list[str]
    read: Callable[[str], torch.Tensor]
    original: bool  # an original facebookresearch/DiT `.pt`
    files: ExitStack = field(default_factory=ExitStack)

    def close(self) -> None:
        self.files.close()


def open_weights(path: Path, num_attention_heads: int, model_class: type = DiTTransformer2DModel) -> WeightSource:
    """The weights of `path`: an original DiT `.pt` file, or a diffusers folder of `model_class` (DiT's transformer,
    or another family's, e.g. SD3's)."""
    if path.is_file():
        state = load_original_state_dict(path, mmap=True)
        config = infer_original_dit_config(state, num_attention_heads, source=str(path))
        plan = original_key_plan(state, source=str(path))
        return WeightSource(config, list(plan), lambda name: read_planned(state, plan[name]), original=True)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: is model.pretrained a diffusers DiT folder?")
    config = dict(model_class.load_config(path))
    files = ExitStack()
    readers: dict[str, Callable[[str], torch.Tensor]] = {}
    if (path / SHARD_INDEX).is_file():
        shard_files = sorted(set(json.loads((path / SHARD_INDEX).read_text())["weight_map"].values()))
    else:
        shard_files = [name for name in WEIGHT_FILES if (path / name).is_file()][:1]
    if not shard_files:
        raise FileNotFoundError(
            f"{path} has no {' or '.join(WEIGHT_FILES)}: is model.pretrained a diffusers {model_class.__name__} folder?"
        )
    for name in shard_files:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            handle = files.enter_context(safe_open(str(path / name), framework="pt", device="cpu"))
            readers.update({key: handle.get_tensor for key in handle.keys()})
        else:  # an old .bin folder: memory-mapped, read tensor by tensor all the same
            state = torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
            readers.update({key: state.__getitem__ for key in state})
    return WeightSource(config, list(readers), lambda name: readers[name](name), original=False, files=files)


def relabelled(source: WeightSource, num_classes: int, class_init: str, seed: int) -> WeightSource:
    """The label table mapped onto `num_classes` target classes on the stream; the pre-trained null row stays
    the null row (Diff-Tuning's retention trains the unconditional branch through it). `class_init`: reuse rows
    0..K-1, fresh random rows, or grow: keep every pre-trained row and append fresh ones (continual stages)."""
    old = source.config["num_embeds_ada_norm"]
    if num_classes == 0 or (num_classes == old and class_init in ("reuse", "grow")):
        return source
    if class_init == "grow" and num_classes < old:
        raise ValueError(
            f"model.class_init=grow keeps every one of the {old} classes of model.pretrained and adds rows, but "
            f"model.num_classes={num_classes} is smaller: set model.num_classes >= {old}"
        )
    if class_init == "reuse" and num_classes > old:
        raise ValueError(
            f"model.num_classes={num_classes} is larger than the pre-trained label space ({old} classes), so "
            f"its rows cannot be reused: set model.num_classes <= {old} or model.class_init=fresh"
        )
    width = source.config["num_attention_heads"] * source.config["attention_head_dim"]
    # Drawn once: every block's copy of the table (diffusers keeps one per block) gets the same fresh rows.
    fresh = torch.randn((num_classes, width), generator=torch.Generator().manual_seed(seed)) * 0.02

    def read(name: str) -> torch.Tensor:
        tensor = source.read(name)
        if not name.endswith(LABEL_TABLE):
            return tensor
        if class_init == "grow":  # a later stage's new classes: the earlier rows keep their ids
            rows = torch.cat([tensor[:old], fresh[old:].to(tensor.dtype)])
        else:
            rows = tensor[:num_classes] if class_init == "reuse" else fresh.to(tensor.dtype)
        return torch.cat([rows, tensor[old : old + 1]])

    config = {**source.config, "num_embeds_ada_norm": num_classes}
    return WeightSource(config, source.names, read, source.original, source.files)


def embedder_copies_equal(source: WeightSource) -> bool:
    """True when every block's copy of the timestep/label embedder equals block 0's, as in weights converted
    from DiT (which has one embedder): then they can train as one."""
    first = [name for name in source.names if name.startswith(f"transformer_blocks.0.{EMBEDDER}")]
    for block in range(1, source.config["num_layers"]):
        for name in first:
            copy = name.replace("transformer_blocks.0.", f"transformer_blocks.{block}.", 1)
            if copy not in source.names or not torch.equal(source.read(copy), source.read(name)):
                return False
    return True


def stream_into(
    model: torch.nn.Module, source: WeightSource, load_parameter: Callable[[torch.nn.Parameter, torch.Tensor], None]
) -> None:
    """Fills every parameter and persistent buffer of `model` from `source`, one tensor at a time.

    A parameter shared by several modules is loaded once, from its first name (block 0 for a shared embedder);
    `load_parameter` writes one tensor into one parameter (the trainer gathers a ZeRO-3 partition around it).
    """
    parameters = dict(model.named_parameters())  # shared parameters appear once
    expected = set(model.state_dict())  # every name, shared ones under each module that holds them
    available = set(source.names)
    missing, unexpected = sorted(set(parameters) - available), sorted(available - expected)
    if missing or unexpected:
        raise ValueError(
            f"the pre-trained weights do not fit {type(model).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}): is model.pretrained a folder of this family?"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            load_parameter(parameter, source.read(name))
        for name, buffer in model.named_buffers():
            if name in expected and name in available:  # persistent buffers only; DiT's pos_embed is recomputed
                buffer.copy_(source.read(name))


def copy_into_parameter(parameter: torch.nn.Parameter, tensor: torch.Tensor) -> None:
    """The plain load of one tensor (no partitioning)."""
    if parameter.shape != tensor.shape:
        raise ValueError(f"a pre-trained tensor of shape {tuple(tensor.shape)} does not fit {tuple(parameter.shape)}")
    parameter.data.copy_(tensor)
