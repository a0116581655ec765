"""The training loop behind train.py: data, features, compiled steps, checkpoints, logs.

Randomness. Every random draw of sample j (its row in the global batch) of micro-batch k
(timestep, diffusion noise, the VAE posterior sample, caption dropout) comes from its own
stream ``default_rng([seed, k, j])`` (:func:`draw_sample_noise`): a rank draws only its own
rows, at a cost that does not grow with the number of ranks, and a sample gets the same draws
whichever rank trains it. A run is therefore the same whatever the number of ranks, and
resuming needs only the step count.

Ranks. Every rank runs the same steps, so their collectives line up. Validation, which only
rank 0 runs, ends in a barrier of every rank (:meth:`Trainer.validate_and_wait`), and a
resumed run first checks that every rank resumes from the same checkpoint
(:func:`resume_disagreement`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Iterable, Iterator, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from pixart.errors import ConfigError, TrainingError
from pixart.training.checkpoints import prepare_output
from pixart.training.config import TrainConfig

logger = logging.getLogger("pixart.train")

# a rank's resumed step when it resumes nothing / cannot load the checkpoint it resolves
_NO_CHECKPOINT, _UNLOADABLE = -1, -2


def draw_sample_noise(draw_timesteps: Callable[[np.random.Generator, int], np.ndarray], seed: int, index: int,
                      rows: range, shape: Tuple[int, ...], drop_prob: float):
    """The random draws of rows ``rows`` of the global batch of micro-batch ``index``.

    Each row draws from its own stream ``default_rng([seed, index, row])``: its timestep
    (``draw_timesteps(rng, 1)``), diffusion noise, VAE posterior noise and drop flag, in that
    order. So the draws of a row do not depend on which rank draws it nor on the world size,
    and a rank's cost is its own rows' alone.

    Returns:
        (t int32 (n,), noise float32 (n, *shape), posterior_noise float32 (n, *shape),
        drop bool (n,)) for the n rows.
    """
    n = len(rows)
    t, drop = np.empty(n, np.int32), np.empty(n, bool)
    noise, posterior_noise = np.empty((2, n) + tuple(shape), np.float32)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([seed, index, row])
        t[i] = draw_timesteps(rng, 1)[0]
        rng.standard_normal(shape, dtype=np.float32, out=noise[i])
        rng.standard_normal(shape, dtype=np.float32, out=posterior_noise[i])
        drop[i] = rng.random() < drop_prob
    return t, noise, posterior_noise, drop


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """The sum of float32 ``values`` over every rank; a collective, so every rank must call it.
    (Sum is the one reduction MindSpore's CPU all-reduce has, and float32 its one type.)"""
    import mindspore as ms
    from mindspore import ops

    return ops.AllReduce()(ms.Tensor(np.asarray(values, np.float32))).asnumpy()


def resume_disagreement(step: int, rank: int, world: int,
                        all_reduce: Callable[[np.ndarray], np.ndarray]) -> Optional[str]:
    """None when every rank resumes from the same step, else what differs, for a TrainingError.

    ``step``: the step of the checkpoint this rank resolved, -1 when it found none, -2 when it
    could not load one. A collective (every rank must call it): the ranks' steps are gathered as
    ``all_reduce`` (:func:`all_reduce_sum`) of one-hot rows, exact in float32 up to step 2**24.
    """
    row = np.zeros(world, np.float32)
    row[rank] = step
    others = sorted(set(all_reduce(row).astype(np.int64).tolist()) - {step})
    if not others:
        return None

    def sees(s: int) -> str:
        return {_NO_CHECKPOINT: "no checkpoint", _UNLOADABLE: "a checkpoint it cannot load"}.get(
            s, f"checkpoint step {s}")

    return (f"rank {rank} sees {sees(step)} but another rank sees {sees(others[0])}: --resume needs the output "
            f"folder (or the checkpoint) on every node, e.g. on a shared file system or copied to the same path")


class Trainer:
    """A training run of ``cfg`` on a model of architecture ``config``, as rank ``rank`` of ``world``.

    ``trainable``: names of the parameters to train (default: every trainable parameter); the
    rest of the model stays frozen, and only the trained ones have optimizer state and EMA.
    """

    def __init__(self, cfg: TrainConfig, config, rank: int = 0, world: int = 1,
                 trainable: Optional[Iterable[str]] = None):
        self.cfg, self.config, self.rank, self.world = cfg, config, rank, world
        self.is_main = rank == 0
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
        self.dtype, self.kernels = self._precision()
        # before anything is loaded: a folder holding another run is refused (or, asked to, cleared) first
        prepare_output(cfg.output_path, cfg.resume, cfg.overwrite, delete=self.is_main)
        self._setup_features()
        self._setup_data()
        self._build_model(trainable)
        self.start_step = self._restore()
        micro_per_epoch = len(self.batcher)
        self.total_steps = cfg.max_steps or cfg.epochs * micro_per_epoch // cfg.grad_accumulation
        if self.total_steps < 1:
            raise TrainingError(f"nothing to train: {micro_per_epoch} micro-batches per epoch with grad_accumulation "
                                f"{cfg.grad_accumulation} gives no optimizer step")

    # ------------------------------------------------------------------ set-up stages
    def _precision(self):
        """(compute dtype, kernels) of --dtype and --attention on this process's device."""
        import mindspore as ms

        from pixart.models.pixart import Kernels
        from pixart.runtime import compute_dtype

        device = ms.get_context("device_target")
        dtype = compute_dtype(self.cfg.dtype, device)
        return dtype, Kernels.for_device(device, dtype, self.cfg.attention)

    def _setup_features(self):
        """The frozen VAE + T5 (unless every feature comes from the cache; no T5 for a class-
        conditional model), the null caption and the latent scaling."""
        from pixart.models.family import is_class_conditional
        from pixart.training.features import NULL_CAPTION_FILE, FeatureEncoder

        cfg = self.cfg
        self.class_conditional = is_class_conditional(self.config)
        self.encoder = None
        if self.class_conditional and not cfg.feature_cache:
            self.encoder = FeatureEncoder.from_folders(cfg.vae_root, dtype=cfg.dtype)
        elif not cfg.feature_cache or cfg.validation_every:
            self.encoder = FeatureEncoder.from_folders(cfg.vae_root, cfg.tokenizer_root, cfg.text_encoder_root,
                                                       self.config.model_max_length, dtype=cfg.dtype)
        if cfg.feature_cache:
            info = np.load(os.path.join(cfg.feature_cache, NULL_CAPTION_FILE))
            self.null_caption, self.scaling_factor = info["emb"], float(info["scaling_factor"])
            self.shift_factor = float(info["shift_factor"])
        else:
            self.null_caption = self.encoder.null_caption() if cfg.replace_null_caption and \
                not self.class_conditional else None
            self.scaling_factor, self.shift_factor = self.encoder.vae.scaling_factor, self.encoder.vae.shift_factor

    def _setup_data(self):
        from pixart.data.batching import BucketBatcher
        from pixart.data.dataset import TrainDataset

        cfg = self.cfg
        vae_factor = self.encoder.vae.config.downsample_factor if self.encoder else 8
        self.dataset = TrainDataset(cfg.json_path, cfg.image_dir, cfg.image_size, multi_scale=cfg.multi_scale,
                                    real_prompt_ratio=cfg.real_prompt_ratio, seed=cfg.seed,
                                    divisor=vae_factor * self.config.patch_size, cache_dir=cfg.feature_cache,
                                    verify_images=cfg.verify_images, control=cfg.control_source,
                                    classes=(cfg.class_field, self.config.num_classes) if self.class_conditional
                                    else None)
        self.batcher = BucketBatcher(self.dataset.bucket_keys, cfg.batch_size, self.world, self.rank, cfg.seed)
        if self.is_main:
            logger.info("%s", self.dataset.summary)

    def _build_model(self, trainable: Optional[Iterable[str]]):
        """The model (with LoRA adapters on its targeted layers when training a LoRA), the trained
        parameters (the adapters', or all), the optimizer over them and the compiled step."""
        import mindspore as ms

        from pixart.models.controlnet import ControlPixArt
        from pixart.models.family import build_transformer
        from pixart.models.lora import attach_lora, lora_parameters
        from pixart.training.optim import auto_scale_lr, make_optimizer
        from pixart.training.streamed_step import StreamedTrainStep
        from pixart.training.train_step import TrainStep

        cfg = self.cfg
        self.base_model = self.model = build_transformer(self.config, self.dtype, self.kernels)
        if cfg.controlnet_blocks:
            self.model = ControlPixArt(self.base_model, cfg.controlnet_blocks)
            trainable = [p.name for p in self.model.branch_parameters()] if trainable is None else trainable
        self.lora_spec, self.lora_cells = cfg.lora_spec(), None
        if self.lora_spec:
            try:
                self.lora_cells = attach_lora(self.model, self.lora_spec, seed=cfg.seed)
            except ValueError as e:
                raise ConfigError(f"--lora_targets: {e}") from None
            trainable = [p.name for p in lora_parameters(self.lora_cells)] if trainable is None else trainable
        if cfg.recompute:  # after the adapters are attached, so that they are recomputed too
            self.model.enable_recompute()
        params = self.model.trainable_params()  # y_embedding is a frozen buffer, as officially
        if trainable is not None:
            wanted = set(trainable)
            params = [p for p in params if p.name in wanted]
            unknown = wanted - {p.name for p in params}
            if unknown:
                raise ConfigError(f"asked to train parameters the model does not have: {sorted(unknown)[:5]}")
            for p in self.model.trainable_params():
                if p.name not in wanted:
                    p.requires_grad = False
        if self.is_main and self.lora_cells:
            count = sum(int(np.prod(p.shape)) for p in params)
            logger.info("training a LoRA of rank %d on %d layers: %s parameters", self.lora_spec.r,
                        len(self.lora_cells), f"{count:,}")
        self.global_batch = cfg.batch_size * self.world
        self.lr = auto_scale_lr(cfg.lr, self.global_batch * cfg.grad_accumulation,
                                None if cfg.auto_lr == "none" else cfg.auto_lr)
        optimizer = make_optimizer(cfg.optimizer, params, **cfg.optimizer_kwargs)
        objective, ema_into = self._objective(params)
        step_class = StreamedTrainStep if cfg.mode == "streamed" else TrainStep
        self.step = step_class(self.model, optimizer, objective, ema_decay=cfg.ema_decay, ema_into=ema_into,
                               grad_clip=cfg.grad_clip, grad_accumulation=cfg.grad_accumulation,
                               loss_scale=cfg.loss_scale if self.dtype == ms.float16 else None, world=self.world,
                               compiled=cfg.mode != "pynative", dynamic_shapes=cfg.dynamic_shapes)

    def _objective(self, params):
        """(the objective, the Parameters the EMA is kept in or None). LCM distillation adds a
        frozen teacher and, for a full distillation, a target network that is the student's EMA."""
        from pixart.diffusion.objectives import DiffusionObjective, LCMObjective

        cfg = self.cfg
        if cfg.objective == "diffusion":
            return DiffusionObjective(self.model), None
        self.teacher = self._frozen_copy("teacher")
        target, ema_into = self.model, None
        if not self.lora_cells:  # full distillation: the EMA of the student is the target network
            target = self._frozen_copy("target")
            by_name = {p.name[len("target."):]: p for p in target.get_parameters()}
            ema_into = [by_name[p.name] for p in params]
        return LCMObjective(self.model, self.teacher, target, cfg.lcm_guidance, cfg.lcm_loss, cfg.lcm_huber_c), ema_into

    def _frozen_copy(self, role: str):
        """Another model of the same architecture, its parameters frozen and named ``<role>.*``
        (names must be unique in a compiled graph); weights are loaded in ``_restore``."""
        from pixart.models.pixart import build_model

        model = build_model(self.config, dtype=self.dtype, kernels=self.kernels)
        for p in model.get_parameters():
            p.name = f"{role}.{p.name}"
            p.requires_grad = False
        model.set_train(False)
        return model

    def _restore(self) -> int:
        """Load the base weights and a checkpoint to resume from; returns the step to start at."""
        import mindspore as ms

        from pixart.models.family import read_weights
        from pixart.models.lora import load_into, parameter_values
        from pixart.models.pixart_checkpoint import load_weights
        from pixart.training.checkpoints import configuration_changes

        cfg = self.cfg
        ckpt = self._resume_checkpoint() if cfg.resume else None
        adapter_names = [p.name for p in self.step.params] if self.lora_cells else []
        base = read_weights(cfg.checkpoint)[0] if cfg.checkpoint else None
        # LoRA and ControlNet checkpoints hold what they train alone, over the frozen --checkpoint
        if base is not None and (self.lora_cells or cfg.controlnet_blocks or not ckpt):
            load_weights(self.base_model, base, cfg.checkpoint, optional=adapter_names)
        if cfg.objective == "lcm":  # the teacher is always the model being distilled
            load_weights(self.teacher, base, cfg.checkpoint)
        if cfg.controlnet_blocks and not ckpt:
            self._init_control_branch()
        if ckpt:
            if cfg.controlnet_blocks:
                if ckpt["controlnet"] is None:
                    raise TrainingError(f"{ckpt['folder']} holds no ControlNet branch")
                load_weights(self.model.controlnet, self._branch_names(ckpt["controlnet"]), ckpt["folder"])
                ema = ckpt["controlnet_ema"]
            elif self.lora_cells:
                if ckpt["adapter"] is None:
                    raise TrainingError(f"{ckpt['folder']} is a full finetune's checkpoint, not a LoRA's")
                load_into(self.lora_cells, ckpt["adapter"])
                ema = parameter_values(self.lora_cells, ckpt["adapter_ema"]) if ckpt["adapter_ema"] else None
            else:
                if ckpt["weights"] is None:
                    raise TrainingError(f"{ckpt['folder']} is a LoRA's checkpoint; resume it with its --lora_rank")
                load_weights(self.model, ckpt["weights"], ckpt["folder"])
                ema = ckpt["ema"]
            self.step.load_state(ckpt["optimizer"], ema, ckpt["state"])
            step = int(ckpt["state"]["step"])
            if self.is_main:
                logger.info("resumed from %s at step %d", ckpt["folder"], step)
                changes = configuration_changes(ckpt["state"].get("config", {}), self.run_record())
                if changes:
                    logger.warning("the resumed run was started with other settings, now changed: %s",
                                   "; ".join(changes))
            return step
        if cfg.resume and self.is_main:
            logger.info("--resume %s: no checkpoint in %s yet, starting fresh", cfg.resume, cfg.output_path)
        if cfg.init_from:
            from pixart.models.family import read_weights
            from pixart.models.partial_loading import load_matching

            report = load_matching(self.model, read_weights(cfg.init_from)[0], cfg.init_from)
            if self.is_main:
                logger.info("%s", report)
        if self.null_caption is not None and cfg.replace_null_caption:
            self.model.y_embedder.y_embedding.set_data(ms.Tensor(self.null_caption.astype(np.float32)))
        self.step.reset_ema()
        return 0

    def _resume_checkpoint(self) -> Optional[dict]:
        """``load_resumable`` of --resume, once every rank has found it resolves the same step: a
        node that cannot see the checkpoint fails the run instead of training from another state."""
        from pixart.training.checkpoints import load_resumable

        try:
            ckpt = load_resumable(self.cfg.resume, self.cfg.output_path)
        except TrainingError:
            if self.world > 1:  # still take part in the check, or the other ranks would wait for this one
                resume_disagreement(_UNLOADABLE, self.rank, self.world, all_reduce_sum)
            raise
        if self.world > 1:
            problem = resume_disagreement(int(ckpt["state"]["step"]) if ckpt else _NO_CHECKPOINT, self.rank,
                                          self.world, all_reduce_sum)
            if problem:
                raise TrainingError(problem)
        return ckpt

    def _init_control_branch(self):
        """A new ControlNet: copies of the base blocks (or --controlnet's weights), zero projections."""
        from pixart.models.controlnet import read_controlnet
        from pixart.models.pixart_checkpoint import load_weights

        if self.cfg.controlnet:
            load_weights(self.model.controlnet, self._branch_names(read_controlnet(self.cfg.controlnet)),
                         self.cfg.controlnet)
        else:
            self.model.copy_base_blocks()

    @staticmethod
    def _branch_names(control_sd) -> dict:
        """``controlnet.N.*`` weights named as the branch's own cells (``N.*``)."""
        return {k[len("controlnet."):]: v for k, v in control_sd.items()}

    def run_record(self) -> dict:
        """The run's settings and architecture, kept with every checkpoint."""
        return {**dataclasses.asdict(self.cfg), "architecture": self.config.to_dict()}

    # ------------------------------------------------------------------ data
    def micro_batches(self, start: int) -> Iterator[Tuple[int, dict]]:
        """(global micro-batch index, this rank's batch) from micro-batch ``start`` on, across epochs."""
        from pixart.data.dataset import iterate_batches

        index = start
        epoch, pos = self.batcher.position(start)
        while True:
            for batch in iterate_batches(self.dataset, self.batcher, epoch, pos, self.cfg.num_workers):
                yield index, batch
                index += 1
            epoch, pos = epoch + 1, 0

    def features(self, index: int, batch: dict):
        """Model inputs of micro-batch ``index``: x0 (scaled latents), timesteps, noise and the
        conditioning (caption embeddings and mask, micro-conditions, caption-drop flags; or class
        ids and label-drop flags), this rank's slice."""
        b = self.cfg.batch_size
        cached = self.cfg.feature_cache
        mean, std = (batch["latent_mean"], batch["latent_std"]) if cached else self.encoder.encode_images(batch["image"])
        t, noise, posterior_noise, drop = draw_sample_noise(
            self.step.objective.draw_timesteps, self.cfg.seed, index, range(self.rank * b, (self.rank + 1) * b),
            mean.shape[1:], self.cfg.class_dropout_prob)
        x0 = ((mean + std * posterior_noise - self.shift_factor) * self.scaling_factor).astype(np.float32)
        if self.class_conditional:
            return dict(x0=x0, t=t, noise=noise, labels=batch["class_id"].astype(np.int32), drop_label=drop)
        emb, mask = (batch["caption_emb"], batch["caption_mask"]) if cached else \
            self.encoder.encode_captions(batch["caption"])
        control = np.zeros((len(x0), 1, 1, 1), np.float32)
        if self.cfg.control_source:
            control_mean = batch["control_mean"] if self.cfg.feature_cache else \
                self.encoder.encode_images(batch["control"])[0]
            control = ((control_mean - self.shift_factor) * self.scaling_factor).astype(np.float32)
        return dict(x0=x0, t=t, noise=noise, caption=emb.astype(np.float32), caption_mask=mask.astype(np.int32),
                    resolution=batch["img_hw"].astype(np.float32),
                    aspect_ratio=np.asarray(batch["aspect_ratio"], np.float32).reshape(-1, 1), drop_caption=drop,
                    control=control)

    def lr_at(self, step: int) -> float:
        from pixart.training.optim import constant_with_warmup
        return constant_with_warmup(step, self.lr, self.cfg.warmup_steps)

    # ------------------------------------------------------------------ loop
    def fit(self):
        from pixart.training.logger import MetricsLogger

        cfg = self.cfg
        metrics_log = MetricsLogger(cfg.output_path, self.start_step if cfg.resume else None,
                                    cfg.tensorboard) if self.is_main else None
        accumulation = cfg.grad_accumulation
        batches = self.micro_batches(self.start_step * accumulation)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train",
                   disable=not (self.is_main and cfg.progress))
        window = {key: [] for key in self.step.metric_names + ("grad_norm",)}
        window_start, window_images = time.perf_counter(), 0
        step = self.start_step
        if self.is_main:
            logger.info("training %d steps: global batch %d (%d x %d ranks x %d accumulation), lr %.3g, %s",
                        self.total_steps, self.global_batch * accumulation, cfg.batch_size, self.world,
                        accumulation, self.lr, cfg.optimizer)
        while step < self.total_steps:
            lr = self.lr_at(step)
            for k in range(accumulation):
                index, batch = next(batches)
                inputs = self.features(index, batch)
                last = k == accumulation - 1
                out = self.step.update(inputs, lr) if last else self.step.accumulate(inputs)
                window_images += self.global_batch
            step += 1
            for key in window:
                window[key].append(out[key])
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
            if step % cfg.log_every == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                row = {key: float(np.mean(v)) for key, v in window.items()}
                row.update(lr=lr, loss_scale=out["loss_scale"], images_per_s=window_images / elapsed,
                           epoch=self.batcher.position(step * accumulation)[0])
                if self.is_main:
                    metrics_log.log(step, row)
                window = {key: [] for key in window}
                window_start, window_images = time.perf_counter(), 0
            if self.is_main and (step % cfg.ckpt_every == 0 or step == self.total_steps):
                tqdm.write(f"saved {self.save(step, lr, out['loss_scale'])}")
            if cfg.validation_every and step % cfg.validation_every == 0:
                self.validate_and_wait(step)
        bar.close()
        if metrics_log:
            metrics_log.close()
        digest = float(sum(np.abs(v).sum() for v in self.weights().values()))
        logger.info("finished at step %d; weights checksum %.10e", step, digest)

    def save(self, step: int, lr: float, loss_scale: float) -> str:
        from pixart.training.checkpoints import save_checkpoint

        cfg = self.cfg
        state = {"seed": cfg.seed, "loss_scale": loss_scale, "world": self.world,
                 "global_batch": self.global_batch * cfg.grad_accumulation, "lr": lr, "config": self.run_record()}
        return save_checkpoint(cfg.output_path, step, self.weight_writer(), self.step.optimizer_state(), state,
                               keep_last=cfg.keep_last)

    def weight_writer(self):
        """What a checkpoint holds of the weights: the whole model, the LoRA adapter as PEFT folders,
        or the ControlNet branch."""
        from pixart.models.lora import save_peft
        from pixart.training.checkpoints import model_writer

        if self.cfg.controlnet_blocks:
            from pixart.models.controlnet import save_control_checkpoint

            branch = {name: p.asnumpy() for name, p in self.model.parameters_and_names()
                      if name.startswith("controlnet.")}
            branch_ema = self.step.ema_weights(branch)

            def write_branch(folder):
                save_control_checkpoint(branch, os.path.join(folder, "controlnet.ckpt"))
                if branch_ema is not None:
                    save_control_checkpoint(branch_ema, os.path.join(folder, "controlnet_ema.ckpt"))
            return write_branch
        if not self.lora_cells:
            weights = self.weights()
            return model_writer(self.config, weights, self.step.ema_weights(weights))
        kernel = tuple(self.model.x_embedder.proj.weight.shape[1:])
        ema = self.step.ema_weights({p.name: p.asnumpy() for p in self.step.params})

        def write(folder):
            save_peft(self.lora_cells, self.lora_spec, os.path.join(folder, "adapter"), kernel)
            if ema is not None:
                save_peft(self.lora_cells, self.lora_spec, os.path.join(folder, "adapter_ema"), kernel, values=ema)
        return write

    def weights(self):
        return {name: p.asnumpy() for name, p in self.model.parameters_and_names()}

    # ------------------------------------------------------------------ validation
    def validate_and_wait(self, step: int):
        """Rank 0 samples the validation images; then, with more than one rank, every rank meets
        in a barrier. The other ranks wait there, outside the compiled step, rather than in its
        gradient all-reduce; a validation longer than the collective timeout (HCCL_EXEC_TIMEOUT
        on Ascend) still needs that timeout raised."""
        if self.is_main:
            self.validate(step)
        if self.world > 1:
            all_reduce_sum(np.zeros(1, np.float32))

    def validate(self, step: int):
        """Sample the validation prompts at the most common training bucket sizes (current weights)."""
        from pixart.pipelines.text_to_image import PixArtPipeline, TextEmbeddings
        from pixart.utils.images import save_png, slug

        cfg = self.cfg
        if not cfg.validation_prompts or self.encoder is None:
            return
        self.model.set_train(False)
        if not hasattr(self, "_validation"):
            emb, mask = self.encoder.encode_captions(list(cfg.validation_prompts) + [""])
            counts = {}
            for r in self.dataset.records:
                counts[r.size] = counts.get(r.size, 0) + 1
            sizes = sorted(counts, key=counts.get, reverse=True)[:2]
            self._validation = (TextEmbeddings(emb[:-1], mask[:-1]), TextEmbeddings(emb[-1:], mask[-1:]), sizes,
                                PixArtPipeline(self.model, self.encoder.vae, mode=cfg.mode))
        text, null, sizes, pipeline = self._validation
        folder = os.path.join(cfg.output_path, "validation", f"step-{step:08d}")
        n = len(text)
        for height, width in sizes:
            result = pipeline(text, null.take([0] * n), height, width, sampling_steps=cfg.validation_steps,
                              seeds=list(range(n)), use_resolution_binning=False, progress=False)
            for prompt, image in zip(cfg.validation_prompts, result.images):
                save_png(image, folder, f"{height}x{width}-{slug(prompt)}", {"prompt": prompt, "step": step})
        self.model.set_train(True)
