"""The schema of the run configuration: one dataclass per section, with each setting's default and meaning.

The checks across settings and the loading of presets and overrides are in trainer/config/__init__.py."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DiTModelConfig:
    """model.dit: what the DiT families (dit, dit_edm, dit_flow) read."""

    vae: str | None = None  # local AutoencoderKL folder (for a `.pt` DiT, or to override the folder's own)
    num_attention_heads: int = 16  # only read for an original `.pt` DiT, whose heads the weights don't record
    clip_sample: bool | None = None  # DDIM clamps x0 to [-1, 1]; None: not for latent DiTs, the folder's for pixel ones
    original_timestep_frequencies: bool = False  # DiT's 10000^(-i/128) timestep features (weights from DiT's .pt)


@dataclass
class SDControlNetModelConfig:
    """model.sd_controlnet: what the Stable Diffusion 1.5 + ControlNet family reads (model.pretrained: an SD folder)."""

    controlnet: str | None = None  # local ControlNetModel folder; None starts one with ControlNetModel.from_unet
    control: str = "canny"  # canny | sketch | depth | normal | seg
    default_prompt: str = "a high-quality, detailed, and professional image"  # the null condition (bank, dropout)
    annotator: str | None = None  # path/to/module.py[:function] making control maps from images (non-canny)
    canny_thresholds: tuple[int, int] = (100, 200)  # Canny's low and high thresholds (ControlNet's defaults)


@dataclass
class SD3ModelConfig:
    """model.sd3: what the Stable Diffusion 3 family reads (model.pretrained: a StableDiffusion3Pipeline folder)."""

    null_prompt: str = ""  # the null condition (bank slots, dropout) and the unconditional branch of guidance
    max_sequence_length: int = 256  # T5 tokens per prompt (SD3's pipeline default; 77 CLIP tokens come first)
    t5: bool = True  # false: no T5 encoder (zeros in its place, as SD3's pipeline runs without text_encoder_3)


@dataclass
class FluxModelConfig:
    """model.flux: what the Flux family reads (model.pretrained: a FluxPipeline folder)."""

    null_prompt: str = ""  # the null condition (bank slots, dropout)
    max_sequence_length: int = 512  # T5 tokens per prompt (FLUX.1-dev's pipeline default)
    guidance: float = 3.5  # the guidance input a guidance-distilled transformer (FLUX.1-dev) trains with
    resolution: int | None = None  # training image side in pixels (sets the latents and the shift); None: the VAE's


@dataclass
class ModelConfig:
    family: str = "dit"  # a key of models.FAMILIES; it reads its own section below (models.FAMILIES[...].settings)
    pretrained: str = ""  # local diffusers folder, or an original DiT `.pt` state dict
    num_classes: int = 0  # K target classes of a class-conditional family; 0 keeps the pre-trained label space
    class_init: str = "reuse"  # reuse: rows 0..K-1 of the pre-trained table; fresh: new random rows;
    # grow: every pre-trained row kept, fresh rows appended (a continual stage adding classes)
    ema_from: str | None = None  # a model folder whose weights start the EMA (continual stages carry it on)
    dit: DiTModelConfig = field(default_factory=DiTModelConfig)
    sd_controlnet: SDControlNetModelConfig = field(default_factory=SDControlNetModelConfig)
    sd3: SD3ModelConfig = field(default_factory=SD3ModelConfig)
    flux: FluxModelConfig = field(default_factory=FluxModelConfig)


# Keys that moved into a family's own section: an old config naming them gets the new name in its error.
MOVED_MODEL_KEYS = {
    **{f"model.{k}": f"model.dit.{k}" for k in DiTModelConfig.__dataclass_fields__},
    **{f"model.{k}": f"model.sd_controlnet.{k}" for k in SDControlNetModelConfig.__dataclass_fields__},
}


@dataclass
class NoiseConfig:
    """Settings of a continuous noise process (models/noise/): None: the model folder's, else the process's own.
    A family refuses the settings of a process it does not train."""

    # EDM (model.family=dit_edm, models/noise/edm.py)
    p_mean: float | None = None  # mean of ln(sigma) of the training sigma (EDM: -1.2)
    p_std: float | None = None  # its standard deviation (EDM: 1.2)
    sigma_data: float | None = None  # standard deviation of the data, in the preconditioning (EDM: 0.5)
    # Flow matching (model.family=dit_flow, models/noise/flow.py): the training distribution of t
    t_distribution: str | None = None  # logit_normal (SD3, the default) | uniform
    logit_mean: float | None = None  # logit t ~ N(logit_mean, logit_std^2) (SD3: 0, 1)
    logit_std: float | None = None
    shift: float | None = None  # t' = shift t / (1 + (shift - 1) t), toward noise (SD3: 3; none: 1)


@dataclass
class DataConfig:
    target: str = ""  # shard directory of the target data
    bank: str | None = None  # shard directory of the memory bank; not needed when method.bank_ratio == 0 or under KD
    verify: str = "sha256"  # sha256 | size | none: how shards are checked against the manifest at start-up
    format: str = "wds"  # wds (webdataset tars) | mds (mosaicml-streaming) for the shards the jobs write;
    # readers take the format from the manifest
    num_workers: int = 2  # processes decoding the next steps while one trains; 0: one background thread
    prefetch: int = 2  # steps each worker (or the thread) reads ahead: DataLoader's prefetch_factor


@dataclass
class MethodConfig:
    """Diff-Tuning's split of timesteps between the target data and the retention (METHOD.md)."""

    retention: str = "bank"  # what keeps pre-trained knowledge: bank (replay data.bank) | kd (distil the frozen model)
    bank_ratio: float = 0.5  # r: share of each global batch given to retention (bank samples, or KD slots under kd)
    bank_count: str = "round"  # round: round(B*r) (paper) | floor: int(B*r) (released code)
    bank_loss_weight: float = 1.0  # lambda of bank replay
    kd_weight: float = 0.05  # lambda of method.retention=kd (rebuttal: 0.05)
    tau: float = 1.0  # psi(t) = (t/T)^tau (continuous: CDF(sigma)^tau); tau = 0 with bank_ratio = 0: fine-tuning
    timestep_weights: str = "complement"  # complement: xi = 1 - psi (paper) | mirrored: (t+1)^tau, (T-t)^tau' | logsnr
    bank_tau: float = 1.0  # tau' of the mirrored bank distribution
    # Ours, not the paper's (README): timestep_weights=logsnr puts psi = sigmoid((center - logSNR(t)) / width) on the
    # schedule's log-SNR (DiT's linear schedule: logSNR -2.5 at t ~ 500); bank_max_t: no bank draws above that t.
    logsnr_center: float = -2.5
    logsnr_width: float = 1.0
    bank_max_t: int | None = None
    label_dropout: float = 0.1  # condition dropout on target slots, for classifier-free guidance
    # DreamBooth's prior preservation, a baseline to compare with (README): bank slots keep the condition their sample
    # was generated for (own; Diff-Tuning: null) and draw their levels as target slots do (target; Diff-Tuning: xi)
    bank_condition: str = "null"  # null | own
    bank_levels: str = "xi"  # xi | target
    peft: str = "full"  # which parameters train: full | bitfit | difffit | lora (settings in the peft: section)
    # Timestep re-weighting of the epsilon-MSE on top of the split, for both sources (trainer/loss.py)
    # none | min_snr: min(SNR, gamma) / SNR (Min-SNR's epsilon form) | min_snr_released: min(gamma, SNR) (the
    # released code's) | p2: 1 / (k + SNR)^gamma
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0  # rebuttal: 1 and 5
    p2_k: float = 1.0  # P2's paper and the released code: k = 1
    p2_gamma: float = 0.5  # the released code's (P2's paper: 0.5 or 1)


@dataclass
class PeftConfig:
    """Parameter-efficient tuning (method.peft): DiffFit, BitFit, LoRA (models/tuning/)."""

    lr_scale: float = 10.0  # DiffFit: its tunable set trains at optim.lr x lr_scale (paper: x10)
    difffit_blocks: int = 14  # DiffFit: scale factors in the first N transformer blocks (paper: 14 of DiT-XL/2's 28)
    lora_rank: int = 8
    lora_alpha: float = 8.0  # LoRA's update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # linear layers


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 disables clipping
    ema_decay: float = 0.9999


@dataclass
class TrainConfig:
    global_batch_size: int = 32
    # Samples per rank per forward, or "auto": the largest that divides the rank's share of the global batch
    # and is at most max_micro_batch_size, so that a preset starts on any number of GPUs that divides it.
    micro_batch_size: int | str = 32
    max_micro_batch_size: int = 32  # cap of micro_batch_size=auto: what fits one GPU (launch/benchmark.py --plan)
    steps: int = 24000
    seed: int = 0
    zero_stage: int = 0  # 0-3; bf16 needs >= 1 (the presets use 2)
    precision: str = "fp32"  # fp32 | bf16
    max_consecutive_skips: int = 10  # stop after this many steps in a row with a non-finite loss or gradient
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    compile: bool = False  # torch.compile each transformer block / ControlNet down block
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions on CUDA (as DiT's train.py)
    overlap_comm: bool = True  # ZeRO-2/3: reduce and gather in buckets while the backward still computes
    # A rank waiting longer than this in a collective fails rather than hanging: it must cover the longest wait
    # (rank 0 converting a checkpoint to the universal format on an elastic resume, an export).
    collective_timeout_minutes: float = 30.0


@dataclass
class BankConfig:
    """The memory bank, sampled once by the pre-trained model into data.bank (launch/generate_bank.py)."""

    num_samples: int = 5000  # the paper finds 5K generated samples already enough (Fig. 6d)
    samples_per_shard: int = 1000
    batch_size: int = 32
    num_steps: int = 250  # DDIM steps (paper: DDIM-250)
    guidance_scale: float = 1.5  # classifier-free guidance (paper: 1.5)
    seed: int = 0
    # drawn per sample (sd_controlnet; sd3: class prompts); empty: the family's null prompt
    prompts: list[str] = field(default_factory=list)
    preview: int = 16  # decoded samples in a preview grid for a human; 0 for none


@dataclass
class PrepareConfig:
    """Target images (one subfolder per class) into data.target shards (launch/prepare_data.py)."""

    images: str = ""
    resolution: int = 256  # centre-crop and resize, as DiT does
    samples_per_shard: int = 1000
    batch_size: int = 32
    hflip: bool = True  # also store each image's flipped version, for flip augmentation (not for prompted families)
    seed: int = 0
    background: str = "white"  # transparent pixels are composited onto it: a colour name, "#RRGGBB" or "R,G,B"


# The paper's sudden-convergence thresholds (Table 4), by control: SSIM after blur for edges and sketches (higher is
# better), MSE for depth and normals (lower is better), pixel accuracy for segmentation (COCO 0.5; ADE20k 0.4).
CONVERGENCE_THRESHOLDS = {"canny": 0.55, "sketch": 0.75, "depth": 0.04, "normal": 0.06, "seg": 0.5}


@dataclass
class EvalConfig:
    """Sudden-convergence tracking of a ControlNet (trainer/convergence.py): generate for fixed validation controls
    with fixed seeds, re-annotate the outputs, compare them with the controls."""

    every: int = 0  # steps between evaluations (paper: 100); 0: off
    data: str | None = None  # shard directory of validation samples, prepared like data.target; None: data.target
    num_controls: int = 8  # the first N samples of eval.data
    num_steps: int = 50  # DDIM steps (paper: 50)
    guidance_scale: float = 9.0  # against the empty prompt, control kept (ControlNet's validation setting)
    batch_size: int = 8
    seed: int = 0
    threshold: float | None = None  # None: the paper's threshold for model.sd_controlnet.control
    blur_sigma: float = 2.0  # Gaussian blur (pixels) of edges and sketches before SSIM
    # launch/evaluate.py (trainer/evaluation/evaluate.py) also reads eval.batch_size (sampling and feature batches),
    # eval.seed (sample i's class and noise come from (eval.seed, i)) and, for sd_controlnet, eval.data (required
    # there: the prepared shards whose prompt and control sample i takes, entry i mod N).
    mode: str = "metrics"  # metrics | replacement | denoising | drift
    model: str = ""  # a diffusers folder, or a run directory (its export/ema is evaluated)
    reference: str = ""  # shard directory or ImageFolder of real images (denoising: held-out target shards)
    out: str = ""  # results, sample shards and plots; a rerun with the same settings redoes only what is missing
    num_samples: int = 10000  # FID-10K (paper)
    num_classes: int = 0  # classes sampled in turn; 0: the reference's classes, else the model's label space
    sampler: str = ""  # "": the family's own (DDIM; dit_edm, dit_flow: euler) | ddim | dpm++ (DPM-Solver++) | euler
    sample_steps: int = 50  # paper: DDIM-50
    cfg_scale: float = 1.5  # classifier-free guidance of the samples (paper: 1.5)
    samples_per_shard: int = 1000
    inception: str | None = None  # local pt_inception-2015-12-05-6726825d.pth: Inception-v3 features
    feature_net: str | None = None  # or a models/feature_net.py net (.pt): small images, tests, the demo
    cache: str = "runs/eval_cache"  # reference features, by the reference's and the extractor's fingerprints
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_neighbours: int = 3  # k of the k-NN precision/recall (Kynkaanniemi et al., 2019)
    grid_images: int = 64  # samples in grid.png (0: none)
    pretrained: str | None = None  # replacement and drift: the pre-trained model folder
    handover: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # replacement: share p
    handover_labels: str = "null"  # null: the pre-trained model denoises unconditionally | same: with the labels
    models: list[str] = field(default_factory=list)  # denoising: model folders or runs, as name=path or path
    bands: list[int] = field(default_factory=lambda: [0, 100, 300, 600, 1000])  # denoising: timestep band edges


@dataclass
class RunConfig:
    dir: str = "runs/dit"
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 0  # 0: no sample grids during training
    sample_steps: int = 50  # DDIM steps of the sample grid
    num_sample_images: int = 16
    keep_last: int = 3  # checkpoints kept (0: all); older ones go only after a newer one is complete
    allow_plan_change: bool = False  # let --resume continue with other global-batch settings
    export: bool = True
    progress: bool = True


@dataclass
class DebugConfig:
    """Fault injection and tracing, for the robustness tests and for debugging a run."""

    sample_ledger: bool = False  # every rank logs each consumed (step, slot, source, index) to ledger/
    count_host_reads: bool = False  # every rank counts its device reads per step into host_reads/ (slows steps)
    nan_at_step: int = -1  # make this step's loss NaN on rank `nan_rank` (and the next `nan_steps` - 1)
    nan_steps: int = 1
    nan_rank: int = 0
    crash_in_save_step: int = -1  # rank `crash_rank` dies after writing its part of this step's checkpoint
    crash_after_shards: int = -1  # shard jobs (prepare, bank): rank `crash_rank` exits (17) after this many shards
    crash_rank: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
