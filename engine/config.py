"""The run's configuration: one typed model for CLI flags, TOML keys, defaults and help.

Every field is a kohya ``train_network.py`` flag spelled exactly as kohya spells it
(plus a few of our own, marked in their help). The CLI parser, the TOML loader and
the cockpit's form are all generated from :data:`FIELDS`, so a flag cannot exist in
one place and not the others. This module is light: it imports no torch.

Its length is its one job: a declaration per flag (~150 kohya flags: type, default, group, help
line); the rules between them live in ``engine.config_checks``, reading and writing TOML and flag
values in ``engine.config_io``; the flag table, ``--config_file`` and kohya commands live in
``engine.kohya_flags``, ``engine.kohya_config`` and ``engine.kohya_command``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from engine.sample.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES
from engine.resize import FLAG_CHOICES as RESIZE_INTERPOLATIONS
from engine.schedules import SCHEDULERS

# Groups, in the order the cockpit's form shows them.
GROUPS: dict[str, str] = {
    "model": "Model",
    "dataset": "Dataset",
    "network": "Network",
    "optimizer": "Optimizer & schedule",
    "saving": "Saving",
    "precision": "Precision & memory",
    "logging": "Logging",
    "samples": "Sample images",
}

PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
DEVICES = ("auto", "mps", "cuda", "cpu")
NAN_POLICIES = ("stop", "skip", "rollback")
LOG_WITH = ("tensorboard", "wandb", "all")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
FP32_MAX = 3.4028234663852886e38
# Fields whose engine part exists (engine/models.py: load_external_vae, full_precision_dtype) but which the
# training setup does not call yet: refused rather than silently ignored. Remove a name once the setup applies it.
AWAITING_TRAINING_SETUP: tuple[str, ...] = ()


def _f(default: Any, group: str, help: str, *, choices: Iterable[str] | None = None,
       kind: str | None = None, ours: bool = False, minimum: float | None = None) -> Any:
    meta = {"group": group, "help": help, "choices": tuple(choices) if choices else None,
            "kind": kind, "ours": ours, "minimum": minimum}
    if isinstance(default, list):  # kohya's nargs="*" flags
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model
    pretrained_model_name_or_path: str = _f(
        "", "model", "Base SD1.x model: a diffusers folder or a single-file .safetensors (LDM layout).", kind="path")
    sd_config_dir: str = _f(
        "", "model", "Local SD1.5 config folder for single-file models (default: the one shipped with spyke-cockpit).",
        kind="path", ours=True)
    allow_pickle: bool = _f(False, "model", "Allow loading pickle .ckpt/.pt base models (runs code from the file).",
                            ours=True)
    vae: str = _f("", "model", "An external VAE instead of the base model's: a diffusers folder or a single "
                  ".safetensors file.", kind="path")
    clip_skip: int | None = _f(None, "model", "Use the output of the n-th last text-encoder layer (2 = skip the last).",
                               minimum=1)
    # --- dataset
    dataset_config: str = _f("", "dataset", "kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]]).",
                             kind="path")
    train_data_dir: str = _f("", "dataset", "Image folder with kohya 'N_name' subfolders (N = repeats).", kind="path")
    reg_data_dir: str = _f("", "dataset", "Regularisation image folder ('N_name' subfolders).", kind="path")
    in_json: str = _f("", "dataset", "kohya's fine-tuning metadata JSON/JSONL: captions/tags of the images in "
                      "--train_data_dir (a metadata_file subset).", kind="path")
    dataset_repeats: int = _f(1, "dataset", "Repeats of a subset that sets no num_repeats (the --in_json dataset, "
                              "dataset-TOML subsets).", minimum=1)
    max_token_length: int | None = _f(None, "dataset", "Caption tokens: 75, 150 or 225 (longer captions are "
                                      "encoded in 75-token chunks).", minimum=1)
    weighted_captions: bool = _f(False, "dataset", "Read (word:1.3), (word) and [word] in captions as attention "
                                 "weights on those tokens (keep commas out of the brackets when shuffling).")
    resolution: str = _f("512", "dataset", "Training resolution: 'N' or 'W,H'.")
    train_batch_size: int = _f(1, "dataset", "Images per step.", minimum=1)
    caption_extension: str = _f(".caption", "dataset", "Caption file extension.")
    enable_bucket: bool = _f(False, "dataset", "Aspect-ratio buckets.")
    min_bucket_reso: int = _f(256, "dataset", "Smallest bucket side.", minimum=64)
    max_bucket_reso: int = _f(1024, "dataset", "Largest bucket side.", minimum=64)
    bucket_reso_steps: int = _f(64, "dataset", "Bucket side step (64 recommended).", minimum=1)
    bucket_no_upscale: bool = _f(False, "dataset", "Never upscale an image to fit a bucket.")
    shuffle_caption: bool = _f(False, "dataset", "Shuffle comma-separated caption tags.")
    keep_tokens: int = _f(0, "dataset", "Leading caption tags kept in place when shuffling.", minimum=0)
    flip_aug: bool = _f(False, "dataset", "Random horizontal flips.")
    cache_latents: bool = _f(False, "dataset", "Encode every image with the VAE once, before training.")
    alpha_mask: bool = _f(False, "dataset", "Each image's transparency is its loss mask (dataset-TOML subsets: "
                          "alpha_mask).")
    # --- dataset: captions and augmentation (kohya flags; dataset-TOML keys of the same names override them)
    caption_prefix: str = _f("", "dataset", "Text put before every caption (joined with a space).")
    caption_suffix: str = _f("", "dataset", "Text put after every caption (joined with a space).")
    caption_dropout_rate: float = _f(0.0, "dataset", "Probability of training a sample on an empty caption.",
                                     minimum=0)
    caption_dropout_every_n_epochs: int = _f(0, "dataset", "Train on empty captions every N-th epoch (0 = never).",
                                             minimum=0)
    caption_tag_dropout_rate: float = _f(0.0, "dataset", "Probability of dropping each shuffleable caption tag.",
                                         minimum=0)
    caption_separator: str = _f(",", "dataset", "Separator between caption tags.")
    keep_tokens_separator: str = _f("", "dataset", "Caption marker: tags before it (and after a second one) stay fixed.")
    secondary_separator: str = _f("", "dataset", "Separator kept together when shuffling, turned into the tag separator.")
    enable_wildcard: bool = _f(False, "dataset", "Expand {a|b|c} and pick one line of multi-line captions at random.")
    token_warmup_min: int = _f(1, "dataset", "Caption tags used at step 0 of the token warm-up.", minimum=0)
    token_warmup_step: float = _f(0, "dataset", "Steps (or ratio of total steps below 1) to reach all tags; 0 = off.",
                                  minimum=0)
    color_aug: bool = _f(False, "dataset", "Random weak hue/gamma augmentation (not with --cache_latents).")
    random_crop: bool = _f(False, "dataset", "Random instead of centre crop (not with --cache_latents).")
    face_crop_aug_range: str = _f("", "dataset", "Face crop scale range 'lo,hi' (face from names name_cx_cy_w_h).")
    resize_interpolation: str | None = _f(
        None, "dataset", "How images are resized to their bucket (default: area when shrinking, lanczos when "
        "enlarging; dataset TOMLs also take box).", choices=RESIZE_INTERPOLATIONS)
    cache_latents_to_disk: bool = _f(False, "dataset", "Cache latents on disk, reused by later runs (implies "
                                     "--cache_latents; see the README for the folder).")
    max_data_loader_n_workers: int = _f(
        8, "dataset", "Accepted for kohya compatibility; images load in-process and are kept decoded in memory.",
        minimum=0)
    persistent_data_loader_workers: bool = _f(False, "dataset", "Accepted for kohya compatibility (no effect).")
    # --- dataset: validation loss (kohya v0.10 flags; dataset-TOML validation_split/validation_seed override them)
    validation_split: float = _f(0.0, "dataset", "Fraction of each subset's images held out for the validation loss "
                                 "(0 = none); they are not trained on.", minimum=0)
    validation_seed: int | None = _f(None, "dataset", "Seed that picks the held-out images and the validation noise "
                                     "(default: --seed).", minimum=0)
    validate_every_n_steps: int | None = _f(None, "dataset", "Also compute the validation loss every N steps.",
                                            minimum=1)
    validate_every_n_epochs: int | None = _f(None, "dataset", "Compute the validation loss every N epochs "
                                             "(default: every epoch).", minimum=1)
    max_validation_steps: int | None = _f(None, "dataset", "Use at most N validation batches per pass.", minimum=1)
    # --- network
    network_module: str = _f("networks.lora", "network", "Network module: kohya's networks.lora, networks.dylora "
                             "(DyLoRA: each module trains a random block of unit ranks per step, so the file's "
                             "first ranks work alone; --network_args unit=N) or lycoris.kohya "
                             "(LyCORIS: algo=locon/loha/lokr/ia3/... in network_args).",
                             choices=("networks.lora", "networks.dylora", "lycoris.kohya"))
    network_dim: int = _f(4, "network", "LoRA rank.", minimum=1)
    network_alpha: float = _f(1.0, "network", "LoRA alpha; the update is scaled by alpha/dim.", minimum=0)
    network_train_unet_only: bool = _f(False, "network", "Put LoRA only into the UNet.")
    network_train_text_encoder_only: bool = _f(False, "network", "Train only the text encoder's LoRA.")
    # --- network: kohya's networks.lora options (engine.network_args)
    network_args: list[str] = _f(
        [], "network", "Network options: key=value ... (networks.lora: conv_dim=8 conv_alpha=4 block_dims=… "
        "down_lr_weight=… rank_dropout=0.1 module_dropout=0.1 loraplus_lr_ratio=16; networks.dylora: unit=N "
        "conv_dim=<network_dim> loraplus_lr_ratio=…; lycoris.kohya: algo=lokr preset=full factor=8 dora_wd=True …).")
    # --- network: kohya's --base_weights (engine.base_weights): LoRA files merged into the base before training
    base_weights: list[str] = _f(
        [], "network", "LoRA/LyCORIS files merged into the base model before training (kohya's layout); the "
        "trained file holds only the new network.", kind="paths")
    base_weights_multiplier: list[float] = _f(
        [], "network", "Merge strength of each --base_weights file, in order (1.0 for a file without one).")
    network_dropout: float | None = _f(None, "network", "Dropout on each LoRA's down output while training "
                                       "(kohya's neuron dropout, e.g. 0.1).", minimum=0)
    scale_weight_norms: float | None = _f(None, "network", "After each step, scale down every LoRA module whose "
                                          "update norm (up·down·alpha/dim) exceeds this (kohya's max-norm "
                                          "regularisation; 1 is a good start).", minimum=0)
    # --- optimizer & schedule
    learning_rate: float = _f(2e-6, "optimizer", "Learning rate for groups without their own.", minimum=0)
    unet_lr: float | None = _f(None, "optimizer", "UNet LoRA learning rate (overrides learning_rate; 0 freezes).",
                               minimum=0)
    text_encoder_lr: float | None = _f(None, "optimizer",
                                       "Text-encoder LoRA learning rate (overrides learning_rate; 0 freezes). kohya "
                                       "takes one per text encoder; SD1.x has one.", minimum=0, kind="one_float")
    optimizer_type: str = _f(
        "AdamW", "optimizer", "Optimizer, kohya's names: AdamW, AdamW8bit, PagedAdamW8bit, Lion, Prodigy, Adafactor, "
        "DAdaptAdam, AdamWScheduleFree, SGDNesterov, ... or a dotted path module.Class to a torch optimizer.")
    optimizer_args: list[str] = _f(
        [], "optimizer", "Optimizer keyword arguments: key=value ... (e.g. weight_decay=0.01 betas=0.9,0.99).")
    use_8bit_adam: bool = _f(False, "optimizer", "Same as --optimizer_type=AdamW8bit (kohya's older switch).")
    use_lion_optimizer: bool = _f(False, "optimizer", "Same as --optimizer_type=Lion (kohya's older switch).")
    lr_scheduler: str = _f("constant", "optimizer", "Learning-rate schedule.", choices=SCHEDULERS)
    lr_scheduler_type: str = _f(
        "", "optimizer", "A torch.optim.lr_scheduler class (e.g. CosineAnnealingLR) or dotted module.Class, used "
        "instead of --lr_scheduler.")
    lr_scheduler_args: list[str] = _f([], "optimizer", "Scheduler keyword arguments: key=value ... (e.g. T_max=100).")
    lr_warmup_steps: float = _f(0, "optimizer", "Warm-up steps, or a ratio of the total steps when below 1.",
                                kind="steps_or_ratio", minimum=0)
    lr_decay_steps: float = _f(0, "optimizer", "Decay steps for warmup_stable_decay, or a ratio when below 1.",
                               kind="steps_or_ratio", minimum=0)
    lr_scheduler_min_lr_ratio: float | None = _f(
        None, "optimizer", "Minimum LR as a ratio of the initial LR (cosine_with_min_lr, warmup_stable_decay).",
        minimum=0)
    lr_scheduler_timescale: int | None = _f(None, "optimizer", "Timescale of inverse_sqrt (default: warm-up steps).",
                                            minimum=1)
    lr_scheduler_num_cycles: int = _f(1, "optimizer", "Restarts for cosine_with_restarts.", minimum=1)
    lr_scheduler_power: float = _f(1.0, "optimizer", "Power for polynomial.", minimum=0)
    max_grad_norm: float = _f(1.0, "optimizer", "Clip gradient norm (0 = no clipping).", minimum=0)
    max_train_steps: int = _f(1600, "optimizer", "Total steps (ignored when max_train_epochs is set).", minimum=1)
    max_train_epochs: int | None = _f(None, "optimizer", "Total epochs (overrides max_train_steps).", minimum=1)
    gradient_accumulation_steps: int = _f(1, "optimizer", "Batches per optimizer step.", minimum=1)
    seed: int | None = _f(None, "optimizer", "Random seed (same seed, same run). Empty = a random one, recorded.",
                          minimum=0)
    noise_offset: float | None = _f(None, "optimizer", "Noise offset (e.g. 0.05).", minimum=0)
    min_snr_gamma: float | None = _f(None, "optimizer", "Min-SNR loss weighting gamma (e.g. 5).", minimum=0)
    prior_loss_weight: float = _f(1.0, "optimizer", "Loss weight of regularisation images.", minimum=0)
    masked_loss: bool = _f(False, "optimizer", "Weight the loss by each image's mask (alpha_mask, or a dataset-TOML "
                           "subset's conditioning_data_dir image).")
    # --- optimizer & schedule: kohya's loss and noise options (engine/train/losses.py; checks in engine/loss_config.py)
    loss_type: str = _f("l2", "optimizer", "Loss: l2, l1, huber or smooth_l1.", choices=LOSS_TYPES)
    huber_schedule: str = _f("snr", "optimizer", "Huber c over the timesteps (huber/smooth_l1): constant, "
                             "exponential or snr.", choices=HUBER_SCHEDULES)
    huber_c: float = _f(0.1, "optimizer", "Huber c (huber/smooth_l1).", minimum=0)
    huber_scale: float = _f(1.0, "optimizer", "Huber c scale (constant and exponential schedules).", minimum=0)
    min_timestep: int | None = _f(None, "optimizer", "Lowest training timestep (default 0).", minimum=0)
    max_timestep: int | None = _f(None, "optimizer", "Training timesteps stay below this one (default 1000).",
                                  minimum=0)
    noise_offset_random_strength: bool = _f(False, "optimizer", "Noise offset strength uniform in 0..noise_offset.")
    adaptive_noise_scale: float | None = _f(None, "optimizer", "Add this times |latent mean| to the noise offset "
                                            "(needs --noise_offset).")
    multires_noise_iterations: int | None = _f(None, "optimizer", "Multi-resolution (pyramid) noise levels "
                                               "(e.g. 6-10).", minimum=1)
    multires_noise_discount: float = _f(0.3, "optimizer", "Weight falloff of each multires noise level.", minimum=0)
    ip_noise_gamma: float | None = _f(None, "optimizer", "Input perturbation noise (e.g. 0.1).", minimum=0)
    ip_noise_gamma_random_strength: bool = _f(False, "optimizer", "Perturbation strength uniform in "
                                              "0..ip_noise_gamma.")
    debiased_estimation_loss: bool = _f(False, "optimizer", "Debiased estimation loss weighting.")
    zero_terminal_snr: bool = _f(False, "optimizer", "Rescale the noise schedule to zero terminal SNR "
                                 "(for v-prediction).")
    v_parameterization: bool = _f(False, "optimizer", "Train v-prediction (for a v-prediction base model).")
    scale_v_pred_loss_like_noise_pred: bool = _f(False, "optimizer", "Scale the v-prediction loss like a noise "
                                                 "prediction loss (needs --v_parameterization).")
    v_pred_like_loss: float | None = _f(None, "optimizer", "Add a v-prediction-like loss times this "
                                        "(not with --v_parameterization).", minimum=0)
    # --- saving
    output_dir: str = _f("output", "saving", "Folder for checkpoints (and the run folder .spyke/).", kind="path")
    output_name: str = _f("last", "saving", "Checkpoint base name.")
    save_model_as: str = _f("safetensors", "saving", "File format: safetensors, or ckpt/pt (torch.save, no "
                            "metadata, as kohya).", choices=("safetensors", "ckpt", "pt"))
    save_every_n_steps: int | None = _f(None, "saving", "Save a checkpoint every N steps.", minimum=1)
    save_every_n_epochs: int | None = _f(None, "saving", "Save a checkpoint every N epochs.", minimum=1)
    save_precision: str | None = _f(None, "saving", "Weights dtype in files (default: float).",
                                    choices=SAVE_PRECISIONS)
    save_state: bool = _f(False, "saving", "Save the training state beside each checkpoint (for --resume).")
    save_state_on_train_end: bool = _f(False, "saving", "Save the training state at the end of training "
                                       "(<output_name>-state), even without --save_state.")
    # kohya's pruning, metadata and start-from-weights flags (engine/train/pruning.py, engine/train/setup.py)
    save_last_n_steps: int | None = _f(None, "saving", "Keep only the step files of the last N steps (removes "
                                       "older ones this run wrote).", minimum=1)
    save_last_n_epochs: int | None = _f(None, "saving", "Keep only the last N epoch files.", minimum=1)
    save_last_n_steps_state: int | None = _f(None, "saving", "Keep only the states of the last N steps (default: "
                                             "save_last_n_steps).", minimum=1)
    save_last_n_epochs_state: int | None = _f(None, "saving", "Keep only the last N epoch states (default: "
                                              "save_last_n_epochs).", minimum=1)
    save_n_epoch_ratio: int | None = _f(None, "saving", "Save about N epoch files over the run (sets "
                                        "save_every_n_epochs = epochs // N, at least 1).", minimum=1)
    training_comment: str = _f("", "saving", "A comment stored in each file's metadata (ss_training_comment).")
    no_metadata: bool = _f(False, "saving", "Write only kohya's minimal metadata (network and base model "
                           "version; no dataset or training facts).")
    # kohya's --metadata_* (library/sai_model_spec.py): the modelspec.* keys of each saved file
    metadata_title: str | None = _f(None, "saving", "modelspec.title of the saved files (default: output_name).")
    metadata_author: str | None = _f(None, "saving", "modelspec.author of the saved files.")
    metadata_description: str | None = _f(None, "saving", "modelspec.description of the saved files.")
    metadata_license: str | None = _f(None, "saving", "modelspec.license of the saved files.")
    metadata_tags: str | None = _f(None, "saving", "modelspec.tags of the saved files (comma-separated).")
    metadata_usage_hint: str | None = _f(None, "saving", "modelspec.usage_hint of the saved files.")
    metadata_thumbnail: str | None = _f(None, "saving", "modelspec.thumbnail: an image file (stored as a data: "
                                        "URL) or a data: URL.", kind="path")
    metadata_merged_from: str | None = _f(None, "saving", "modelspec.merged_from of the saved files.")
    metadata_trigger_phrase: str | None = _f(None, "saving", "modelspec.trigger_phrase of the saved files.")
    metadata_preprocessor: str | None = _f(None, "saving", "modelspec.preprocessor of the saved files.")
    metadata_is_negative_embedding: str | None = _f(None, "saving", "modelspec.is_negative_embedding of the "
                                                    "saved files.")
    network_weights: str = _f("", "saving", "Start from an existing LoRA file (kohya's or ours).", kind="path")
    dim_from_weights: bool = _f(False, "saving", "Take network_dim and network_alpha from --network_weights.")
    resume: str = _f("", "saving", "Resume from a saved state folder, or 'latest'.", kind="path")
    initial_epoch: int | None = _f(None, "saving", "Start counting at this epoch (1 = the first; 0 changes nothing, as "
                                   "in kohya); the LR schedule is not moved, as in kohya.", minimum=0)
    initial_step: int | None = _f(None, "saving", "Start counting at this step (overrides initial_epoch); without "
                                  "skip_until_initial_step only the epoch number moves, as in kohya.", minimum=0)
    skip_until_initial_step: bool = _f(False, "saving", "Skip the steps before initial_step/initial_epoch without "
                                       "training, then count on from there.")
    resume_force: bool = _f(False, "saving", "Resume even if run-defining settings differ from the saved state.",
                            ours=True)
    overwrite: bool = _f(False, "saving", "Allow replacing existing checkpoint files of the same name.", ours=True)
    nan_policy: str = _f("stop", "saving", "On a non-finite loss: stop, skip the step, or rollback to the last state.",
                         choices=NAN_POLICIES, ours=True)
    no_notify: bool = _f(False, "saving", "No bell or desktop notification when a run ends unwatched.", ours=True)
    # --- precision & memory
    mixed_precision: str = _f("no", "precision", "Mixed precision.", choices=PRECISIONS)
    no_half_vae: bool = _f(False, "precision", "Keep the VAE in fp32 under mixed precision.")
    gradient_checkpointing: bool = _f(False, "precision", "Recompute activations to save memory.")
    full_fp16: bool = _f(False, "precision", "Train the LoRA weights in fp16 too (needs mixed_precision fp16).")
    full_bf16: bool = _f(False, "precision", "Train the LoRA weights in bf16 too (needs mixed_precision bf16).")
    fp8_base: bool = _f(False, "precision", "Store the base U-Net and text encoder weights in float8 (e4m3), "
                        "computed under mixed precision; CUDA or CPU, needs mixed_precision fp16/bf16.")
    fp8_base_unet: bool = _f(False, "precision", "Store only the base U-Net in float8; the text encoder stays in "
                             "mixed_precision.")
    device: str = _f("auto", "precision", "Device: auto picks MPS, then CUDA, then CPU.", choices=DEVICES, ours=True)
    # --- logging (kohya's trackers: TensorBoard event files, wandb)
    logging_dir: str = _f("", "logging", "Write TensorBoard logs under this folder (<dir>/<prefix><time>/<tracker>).",
                          kind="path")
    log_with: str | None = _f(None, "logging", "Trackers: tensorboard, wandb or all (default: tensorboard when "
                              "--logging_dir is given).", choices=LOG_WITH)
    log_prefix: str = _f("", "logging", "Prefix of each run's log folder name (before the timestamp).")
    log_tracker_name: str = _f("", "logging", "Tracker run name: the TensorBoard subfolder, the wandb project "
                               "(default: network_train).")
    log_tracker_config: str = _f("", "logging", "TOML of tracker init options: [tensorboard] and [wandb] tables.",
                                 kind="path")
    wandb_run_name: str = _f("", "logging", "The wandb run's name.")
    wandb_api_key: str = _f("", "logging", "wandb API key to log in with (kept out of the run folder).")
    log_config: bool = _f(False, "logging", "Store the run's settings in the trackers (TensorBoard hparams, wandb "
                          "config); the API key and folder paths are left out, as in kohya.")
    # --- sample images (kohya's sample_* flags)
    sample_prompts: str = _f("", "samples", "Prompts file (.txt, .toml or .json, kohya's forms); re-read at each "
                             "sampling. Also samples at every checkpoint.", kind="path")
    sample_every_n_steps: int | None = _f(None, "samples", "Sample images every N steps.", minimum=1)
    sample_every_n_epochs: int | None = _f(None, "samples", "Sample images every N epochs (overrides "
                                           "sample_every_n_steps).", minimum=1)
    sample_at_first: bool = _f(False, "samples", "Sample images before training starts.")
    sample_sampler: str = _f(DEFAULT_SAMPLER, "samples", "Sampler for the sample images.", choices=SAMPLER_NAMES)

    # --- will it fit (memory pre-flight, keeping the Mac awake)
    ignore_memory_check: bool = _f(False, "precision", "Start even when the memory estimate exceeds the device's memory.",
                                   ours=True)
    no_prevent_sleep: bool = _f(False, "precision", "Let macOS sleep during the run (no caffeinate).", ours=True)

    # ---------------------------------------------------------------- derived
    def resolution_wh(self) -> tuple[int, int]:
        from engine.config_io import parse_resolution  # engine.config_io imports this module

        return parse_resolution(self.resolution, "resolution")

    def effective_unet_lr(self) -> float:
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    def effective_text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    def problems(self) -> dict[str, str]:
        """Every invalid field with a one-line reason (empty when the config is valid)."""
        from engine.config_checks import config_problems  # engine.config_checks imports this module

        return config_problems(self)

    def validate(self) -> "TrainConfig":
        """Raise a one-line ConfigError for the first problem; return self when valid."""
        from engine.config_checks import validate_config

        return validate_config(self)

    def to_dict(self, *, skip_defaults: bool = False) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if skip_defaults and value == field_default(f.name):
                continue
            out[f.name] = list(value) if isinstance(value, list) else value
        return out

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(TrainConfig)}


def field_type(name: str) -> type:
    """The type of a field: bool, int, float, str (Optional unwrapped) or list (kohya's nargs="*": of str, or of
    float for :func:`field_item_type` float)."""
    annotation = str(FIELDS[name].type)
    for kind in ("bool", "int", "float", "str", "list"):
        if annotation.startswith(kind):
            return {"bool": bool, "int": int, "float": float, "str": str, "list": list}[kind]
    raise AssertionError(f"unsupported field type {annotation} for {name}")


def field_item_type(name: str) -> type:
    """The type of a list field's items: str, or float (``list[float]``)."""
    return float if str(FIELDS[name].type).replace(" ", "") == "list[float]" else str


def field_default(name: str) -> Any:
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_is_optional(name: str) -> bool:
    return "None" in str(FIELDS[name].type)


def fields_in_group(group: str) -> list[dataclasses.Field]:
    return [f for f in fields(TrainConfig) if f.metadata["group"] == group]
