"""The exported folder loads with diffusers and generates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from tests.conftest import assert_ok, read_metrics, run_entry
from tests.tiny import make_shards, make_tiny_dit

pytestmark = pytest.mark.slow


def test_latent_run_exports_a_dit_pipeline(tmp_path):
    pretrained = make_tiny_dit(tmp_path / "pretrained", latent=True)
    target = make_shards(tmp_path / "target", 16, shape=(4, 4, 4), num_classes=3)
    bank = make_shards(tmp_path / "bank", 8, shape=(4, 4, 4), num_classes=10, seed=2)
    run = tmp_path / "run"
    args = ["--config", "tiny_cpu", f"model.pretrained={pretrained}", "model.num_classes=3", f"data.target={target}",
            f"data.bank={bank}", f"run.dir={run}", "train.steps=2", "run.sample_every=2"]  # fmt: skip
    assert_ok(run_entry("train.py", args))
    assert len(read_metrics(run)) == 2
    assert (run / "samples" / "samples_00000002.png").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for which in ("ema", "raw"):
        pipe = DiTPipeline.from_pretrained(run / "export" / which)
        # DiTPipeline's null class is id 1000: the 3 tuned rows, then null copies, then the null row
        table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
        assert pipe.transformer.config.num_embeds_ada_norm == 1000 and table.shape[0] == 1001
        assert torch.equal(table[3], table[1000]) and not torch.equal(table[2], table[1000])
        assert pipe.get_label_ids(["class_0", "class_2"]) == [0, 2]
        image = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np")
        images = image.images
        assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
