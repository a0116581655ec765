"""What a training run is: one dataclass whose fields are train.py's flags (and YAML keys).

``TrainConfig`` is the single definition: ``pixart.cli.training`` builds the command line
from its fields (type, default, help, group), and ``Trainer`` takes it as it is. The
architecture comes from ``--checkpoint`` (or a ``--model`` preset) with ``--model_config``
overrides: :func:`model_config`.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from pixart.errors import ConfigError
from pixart.models.lora_spec import OFFICIAL_TARGETS, LoraSpec
from pixart.models.attention import ATTENTION_KERNELS
from pixart.runtime import DTYPE_NAMES, JIT_LEVELS


def option(default, help: str, group: str, **argparse_kwargs):
    """A TrainConfig field: its default, its ``-h`` text, its help group, and argparse extras
    (``choices``, ``nargs``, ``type``)."""
    extras = dict(help=help, group=group, **argparse_kwargs)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=extras)
    return dataclasses.field(default=default, metadata=extras)


@dataclasses.dataclass
class TrainConfig:
    # data
    json_path: Optional[str] = option(None, "label file: a list of {path, prompt, sharegpt4v, height, width, ratio}",
                                      "data")
    image_dir: Optional[str] = option(None, "folder the label paths are relative to", "data")
    feature_cache: Optional[str] = option(None, "train from precomputed VAE/T5 features (tools/cache_features.py); "
                                                "T5 and the VAE are then not loaded", "data")
    image_size: int = option(512, "base resolution in pixels (bucket table)", "data")
    multi_scale: bool = option(True, "aspect-ratio buckets; False trains everything at image_size x image_size",
                               "data")
    real_prompt_ratio: float = option(0.5, "probability of the original `prompt` over the `sharegpt4v` caption",
                                      "data")
    num_workers: int = option(2, "image loading threads", "data")
    verify_images: bool = option(False, "decode every image at start, on every rank, and take each image's size from "
                                        "its file: bad images are then skipped before training, at the cost of one "
                                        "decode per image. Default: a label's height/width is trusted (the header "
                                        "is read when it has none), and an image found unreadable when first "
                                        "loaded is skipped then, another image of its bucket taking its place",
                                 "data")
    class_field: str = option("class_id", "label field holding each image's integer class id, read when training a "
                                          "class-conditional DiT (--model DiT-...)", "data")
    # model
    checkpoint: Optional[str] = option(None, "initial weights (.ckpt from tools/convert.py or a training "
                                             "checkpoint); the architecture comes from it", "model")
    model: str = option("PixArt-Sigma-XL-2-512-MS", "architecture preset when training from scratch "
                                                    "(no --checkpoint): a PixArt one, or DiT-XL-2-256x256 / "
                                                    "DiT-XL-2-512x512 for a class-conditional DiT", "model")
    model_config: Optional[dict] = option(None, 'architecture overrides as JSON, e.g. \'{"depth": 4, '
                                                '"hidden_size": 192}\'', "model", type="json")
    init_from: Optional[str] = option(None, "start the --model / --model_config architecture from another "
                                            "checkpoint's tensors whose name and shape match (e.g. stage 2 of "
                                            "PixArt-α's recipe from a class-conditional stage-1 DiT); the rest keeps "
                                            "its initialisation, and the run lists what was loaded, new, dropped",
                                      "model")
    vae_root: Optional[str] = option(None, "diffusers AutoencoderKL folder", "model")
    text_encoder_root: Optional[str] = option(None, "T5 encoder folder", "model")
    tokenizer_root: Optional[str] = option(None, "T5 tokenizer folder", "model")
    replace_null_caption: bool = option(False, "set y_embedding (the dropped-caption embedding) to T5(\"\"), as the "
                                               "official finetuning", "model")
    recompute: bool = option(False, "activation checkpointing per block (for accelerators: on CPU it saves no "
                                    "memory and costs time)", "model")
    dtype: str = option("fp32", "compute dtype; weights and optimizer stay fp32 (CPU: fp32 only; auto: fp16 on "
                                "Ascend and GPU, fp32 on CPU; fp16 trains with dynamic loss scaling)", "model",
                        choices=DTYPE_NAMES)
    attention: str = option("auto", "attention kernel: auto (flash_attention_score on Atlas A2/A3 in fp16/bf16, "
                                    "else math), math (matmuls in query chunks, any device) or flash", "model",
                            choices=ATTENTION_KERNELS)
    # LoRA
    lora_rank: int = option(0, "train a LoRA adapter of this rank on the frozen --checkpoint (0: train every "
                               "weight)", "lora")
    lora_alpha: Optional[float] = option(None, "LoRA alpha: the adapter is scaled by alpha / rank (default: the "
                                               "rank, scale 1)", "lora")
    lora_targets: List[str] = option(list(OFFICIAL_TARGETS), "diffusers module names (or name endings) to adapt; "
                                                             "default: the official PixArt LoRA list", "lora")
    use_rslora: bool = option(False, "rank-stabilised LoRA: scale alpha / sqrt(rank)", "lora")
    lora_dropout: float = option(0.0, "dropout on the adapters' input while training", "lora")
    # ControlNet
    controlnet_blocks: int = option(0, "train a PixArt-δ ControlNet branch copying this many base blocks (13 of "
                                       "XL/2's 28) on the frozen --checkpoint; 0: off", "controlnet")
    control_field: str = option("control", "label field holding each record's control image path (relative to "
                                           "--image_dir)", "controlnet")
    control_preprocess: str = option("none", "canny: the control image is the Canny edge map of the training image "
                                             "itself (no control field needed)", "controlnet",
                                     choices=("none", "canny"))
    controlnet: Optional[str] = option(None, "initial ControlNet branch weights (a control .ckpt, the official .pth); "
                                             "default: copies of the base blocks, zero projections", "controlnet")
    # objective
    objective: str = option("diffusion", "diffusion: the IDDPM loss PixArt is trained with; lcm: latent consistency "
                                         "distillation of --checkpoint (PixArt-δ) into a few-step model (the EMA, "
                                         "--ema_decay 0.95, is the target network; with --lora_rank an LCM-LoRA)",
                            "objective", choices=("diffusion", "lcm"))
    lcm_guidance: float = option(4.5, "LCM: the teacher's fixed classifier-free guidance w", "objective")
    lcm_loss: str = option("huber", "LCM: pseudo-Huber or squared distance between student and target", "objective",
                           choices=("huber", "l2"))
    lcm_huber_c: float = option(1e-3, "LCM: the pseudo-Huber constant c", "objective")
    # optimization
    optimizer: str = option("came", "optimizer", "optimization", choices=("came", "adamw"))
    lr: float = option(2e-5, "learning rate after warm-up", "optimization")
    weight_decay: float = option(0.0, "decoupled weight decay", "optimization")
    betas: Optional[List[float]] = option(None, "CAME: 3 values (0.9 0.999 0.9999); AdamW: 2 (0.9 0.999)",
                                          "optimization")
    eps: Optional[List[float]] = option(None, "CAME: 2 values (1e-30 1e-16); AdamW: 1", "optimization")
    warmup_steps: int = option(1000, "linear warm-up, then constant", "optimization")
    auto_lr: str = option("none", "scale lr by the global batch: sqrt(batch/256) or batch/256", "optimization",
                          choices=("none", "sqrt", "linear"))
    grad_clip: float = option(0.01, "max global gradient norm (0 = off)", "optimization")
    grad_accumulation: int = option(1, "micro-batches per optimizer step", "optimization")
    ema_decay: float = option(0.9999, "EMA of the weights (0 = off)", "optimization")
    class_dropout_prob: float = option(0.1, "caption dropout for classifier-free guidance", "optimization")
    loss_scale: float = option(65536.0, "initial dynamic loss scale (fp16 only)", "optimization")
    # schedule
    batch_size: int = option(4, "images per device per micro-batch", "schedule")
    epochs: int = option(10, "passes over the data (unless --max_steps)", "schedule")
    max_steps: int = option(0, "stop after this many optimizer steps (0: epochs)", "schedule")
    seed: int = option(0, "seed of every random draw of the run", "schedule")
    # output
    output_path: str = option("output/train", "checkpoints, logs and validation samples", "output")
    ckpt_every: int = option(1000, "checkpoint every N optimizer steps (and at the end)", "output")
    keep_last: int = option(3, "checkpoints to keep (0 = all)", "output")
    resume: Optional[str] = option(None, "'latest' or a checkpoint folder: continue exactly where it stopped",
                                   "output")
    overwrite: bool = option(False, "start over in an output folder that holds another run (its checkpoints and "
                                    "logs are deleted); without it such a folder is refused", "output")
    log_every: int = option(10, "log metrics every N steps", "output")
    tensorboard: bool = option(True, "also write TensorBoard event files", "output")
    validation_every: int = option(0, "sample validation images every N steps (0 = off)", "output")
    validation_prompts: List[str] = option([], "prompts for validation images", "output", nargs="*")
    validation_steps: int = option(20, "DPM-Solver steps for validation images", "output")
    # runtime
    mode: str = option("graph", "graph: one compiled train step; streamed: the step block by block with the memory "
                                "of one block (each block's forward recomputed in the backward; the full finetune of "
                                "a PixArt model by one process, e.g. XL/2 in 24 GB on CPU); pynative: eager "
                                "(debugging)", "runtime", choices=("graph", "streamed", "pynative"))
    progress: bool = option(True, "progress bar", "runtime")
    dynamic_shapes: bool = option(False, "compile the train step once for every bucket shape (symbolic latent "
                                         "height and width) instead of once per shape; multi-scale PixArt only",
                                  "runtime")
    jit_level: str = option("O0", "MindSpore compiler level: O0 kernel by kernel, O1 with operator fusion, O2 "
                                  "whole-graph sinking (GE backend, Ascend only)", "runtime", choices=JIT_LEVELS)
    max_device_memory: Optional[str] = option(None, "the most device memory MindSpore may take, e.g. 58GB "
                                                    "(default: MindSpore's, the whole device)", "runtime")

    @classmethod
    def from_namespace(cls, namespace) -> "TrainConfig":
        """The fields of an argparse namespace (other attributes, e.g. --device, are ignored)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})

    def check(self) -> None:
        """ConfigError for settings that cannot start a run."""
        if not self.json_path or not self.image_dir:
            raise ConfigError("--json_path and --image_dir are required (a label file and the image folder)")
        if not self.feature_cache:
            needed = ("vae_root",) if self.class_conditional else ("vae_root", "text_encoder_root", "tokenizer_root")
            missing = [k for k in needed if not getattr(self, k)]
            if missing:
                raise ConfigError(f"training from images needs {', '.join('--' + k for k in missing)} "
                                  f"(or --feature_cache from tools/cache_features.py)")
        for key in ("batch_size", "grad_accumulation", "epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} must be at least 1")
        if self.init_from and self.checkpoint:
            raise ConfigError("--init_from starts a new --model architecture from another checkpoint's matching "
                              "tensors, --checkpoint continues a whole model: give one of them")
        if self.class_conditional and (self.lora_rank or self.controlnet_blocks or self.objective != "diffusion"
                                       or self.validation_every):
            raise ConfigError("a class-conditional DiT trains with the diffusion objective, every weight, without "
                              "prompts: not with --lora_rank, --controlnet_blocks, --objective lcm or "
                              "--validation_every")
        if self.lora_rank < 0:
            raise ConfigError(f"--lora_rank must be 0 (off) or positive, got {self.lora_rank}")
        if self.lora_rank and not self.checkpoint:
            raise ConfigError("a LoRA adapts given weights: --checkpoint (the base model) is required with --lora_rank")
        if self.controlnet_blocks:
            if self.controlnet_blocks < 0 or not self.checkpoint:
                raise ConfigError("a ControlNet steers given weights: --checkpoint (the base) is required with a "
                                  "positive --controlnet_blocks")
            if self.lora_rank or self.objective != "diffusion":
                raise ConfigError("--controlnet_blocks trains the control branch alone: not with --lora_rank or "
                                  "--objective lcm")
        if self.objective == "lcm":
            if not self.checkpoint:
                raise ConfigError("LCM distillation needs the model to distill: --checkpoint (the teacher)")
            if not self.lora_rank and self.ema_decay <= 0:
                raise ConfigError("LCM distillation keeps its target network as the EMA of the student: set "
                                  "--ema_decay (0.95 in PixArt-δ)")
        self.lora_spec()

    @property
    def class_conditional(self) -> bool:
        """Whether the model is a DiT (from --checkpoint or the --model preset)."""
        from pixart.models.dit import DIT_PRESETS
        from pixart.models.family import holds_dit

        return holds_dit(self.checkpoint) if self.checkpoint else self.model in DIT_PRESETS

    @property
    def control_source(self) -> Optional[Tuple[Optional[str], str]]:
        """(label field or None, preprocessing) of the control images, or None without a ControlNet."""
        if not self.controlnet_blocks:
            return None
        return (None if self.control_preprocess == "canny" else self.control_field), self.control_preprocess

    def lora_spec(self) -> Optional[LoraSpec]:
        """The adapter to train, or None for a full finetune."""
        if not self.lora_rank:
            return None
        try:
            return LoraSpec(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=self.lora_targets,
                            use_rslora=self.use_rslora, lora_dropout=self.lora_dropout)
        except ValueError as e:
            raise ConfigError(f"LoRA: {e}") from None

    @property
    def optimizer_kwargs(self) -> dict:
        """Keyword arguments of ``make_optimizer`` beyond the name and the parameters."""
        kwargs = dict(lr=self.lr, weight_decay=self.weight_decay)
        if self.betas:
            kwargs["betas"] = tuple(self.betas)
        if self.eps:
            kwargs["eps"] = tuple(self.eps) if len(self.eps) > 1 else self.eps[0]
        return kwargs


def model_config(cfg: TrainConfig):
    """The architecture: from --checkpoint if given, else the --model preset, with --model_config on top."""
    from pixart.models.dit import DIT_PRESETS
    from pixart.models.family import read_model_config
    from pixart.models.pixart import PRESETS

    presets = {**PRESETS, **DIT_PRESETS}
    if cfg.checkpoint:
        config = read_model_config(cfg.checkpoint)
    elif cfg.model in presets:
        config = presets[cfg.model]
    else:
        raise ConfigError(f"--model {cfg.model!r} is not a preset ({', '.join(presets)}); give --checkpoint instead")
    overrides = dict(cfg.model_config or {})
    overrides["class_dropout_prob"] = cfg.class_dropout_prob
    try:
        return type(config).from_dict({**config.to_dict(), **overrides})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model_config: {e}") from None
