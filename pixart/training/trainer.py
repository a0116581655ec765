"""The training loop behind train.py: data, features, compiled steps, checkpoints, logs.

Randomness. Every random draw of micro-batch k (timesteps, diffusion noise, the VAE
posterior sample, caption dropout) comes from ``default_rng([seed, k])`` drawn for the whole
global batch, of which each rank takes its slice. A run is therefore the same whatever the
number of ranks, and resuming needs only the step count.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Iterator, Tuple

import numpy as np
from tqdm.auto import tqdm

from pixart.utils.config import fail

logger = logging.getLogger("pixart.train")


class Trainer:
    def __init__(self, args, config, rank: int = 0, world: int = 1):
        import mindspore as ms

        from pixart.data.dataset import DatasetError, TrainDataset
        from pixart.data.sampler import BucketBatchSampler
        from pixart.models.pixart import build_model
        from pixart.training.checkpoints import load_checkpoint, resolve_resume
        from pixart.training.features import NULL_CAPTION_FILE, FeatureEncoder
        from pixart.training.optim import auto_scale_lr
        from pixart.training.train_step import TrainStep
        from pixart.utils.errors import ModelLoadError

        self.args, self.config, self.rank, self.world = args, config, rank, world
        self.is_main = rank == 0
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
        device = ms.get_context("device_target")
        if device == "CPU" and args.dtype != "fp32":
            fail(f"--dtype {args.dtype} is not supported on CPU; use fp32")
        dtype = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.dtype]

        resume_dir = resolve_resume(args.resume, args.output_path) if args.resume else None
        try:
            self.encoder = None
            if not args.feature_cache or args.validation_every:
                self.encoder = FeatureEncoder.from_folders(args.vae_root, args.tokenizer_root, args.text_encoder_root,
                                                           config.model_max_length)
            if args.feature_cache:
                info = np.load(os.path.join(args.feature_cache, NULL_CAPTION_FILE))
                self.null_caption, self.scaling_factor = info["emb"], float(info["scaling_factor"])
                self.shift_factor = float(info["shift_factor"])
            else:
                self.null_caption = self.encoder.null_caption() if args.replace_null_caption else None
                self.scaling_factor, self.shift_factor = self.encoder.vae.scaling_factor, self.encoder.vae.shift_factor
            vae_factor = self.encoder.vae.config.downsample_factor if self.encoder else 8
            self.dataset = TrainDataset(args.json_path, args.image_dir, args.image_size, multi_scale=args.multi_scale,
                                        real_prompt_ratio=args.real_prompt_ratio, seed=args.seed,
                                        divisor=vae_factor * config.patch_size, cache_dir=args.feature_cache)
            self.sampler = BucketBatchSampler(self.dataset.bucket_keys, args.batch_size, world, rank, args.seed)
        except (ModelLoadError, DatasetError, ValueError) as e:
            fail(str(e))
        if self.is_main:
            logger.info("%s", self.dataset.summary)

        self.model = build_model(config, dtype=dtype)
        if args.recompute:
            self.model.enable_recompute()
        self.global_batch = args.batch_size * world
        self.lr = auto_scale_lr(args.lr, self.global_batch * args.grad_accumulation,
                                None if args.auto_lr == "none" else args.auto_lr)
        self.step = TrainStep(self.model, args, world)
        self.start_step = 0
        if resume_dir:
            ckpt = load_checkpoint(resume_dir)
            self._load_weights(ckpt["weights"])
            self.step.load_state(ckpt["optimizer"], ckpt["ema"], ckpt["state"])
            self.start_step = int(ckpt["state"]["step"])
            if self.is_main:
                logger.info("resumed from %s at step %d", resume_dir, self.start_step)
        else:
            if args.checkpoint:
                from pixart.models.pixart_checkpoint import read_source
                sd, _ = read_source(args.checkpoint)
                sd.pop("pos_embed", None)
                self._load_weights(sd)
            if self.null_caption is not None and args.replace_null_caption:
                self.model.y_embedder.y_embedding.set_data(ms.Tensor(self.null_caption.astype(np.float32)))
            self.step.reset_ema()
        micro_per_epoch = len(self.sampler)
        self.total_steps = args.max_steps or args.epochs * micro_per_epoch // args.grad_accumulation
        if self.total_steps < 1:
            fail(f"nothing to train: {micro_per_epoch} micro-batches per epoch with grad_accumulation "
                 f"{args.grad_accumulation} gives no optimizer step")

    def _load_weights(self, sd):
        import mindspore as ms
        from pixart.models.pixart_checkpoint import check_state_dict

        check_state_dict(sd, self.config, "initial weights")
        params = dict(self.model.parameters_and_names())
        for name, value in sd.items():
            params[name].set_data(ms.Tensor(np.asarray(value, np.float32)))

    # ------------------------------------------------------------------ data
    def micro_batches(self, start: int) -> Iterator[Tuple[int, dict]]:
        """(global micro-batch index, this rank's batch) from micro-batch ``start`` on, across epochs."""
        from pixart.data.dataset import iterate_batches

        index = start
        epoch, pos = self.sampler.position(start)
        while True:
            for batch in iterate_batches(self.dataset, self.sampler, epoch, pos, self.args.num_workers):
                yield index, batch
                index += 1
            epoch, pos = epoch + 1, 0

    def features(self, index: int, batch: dict):
        """Model inputs of micro-batch ``index``: x0 (scaled latents), caption embeddings and mask,
        timesteps, noise, caption-drop flags, resolution and aspect ratio (this rank's slice)."""
        b = self.args.batch_size
        rows = slice(self.rank * b, (self.rank + 1) * b)
        if self.args.feature_cache:
            mean, std = batch["latent_mean"], batch["latent_std"]
            emb, mask = batch["caption_emb"], batch["caption_mask"]
        else:
            mean, std = self.encoder.encode_images(batch["image"])
            emb, mask = self.encoder.encode_captions(batch["caption"])
        g = self.global_batch
        shape = (g,) + mean.shape[1:]
        rng = np.random.default_rng([self.args.seed, index])
        t = rng.integers(0, 1000, size=g)[rows].astype(np.int32)
        noise = rng.standard_normal(shape, dtype=np.float32)[rows]
        posterior_noise = rng.standard_normal(shape, dtype=np.float32)[rows]
        drop = (rng.random(g) < self.args.class_dropout_prob)[rows]
        x0 = ((mean + std * posterior_noise - self.shift_factor) * self.scaling_factor).astype(np.float32)
        return dict(x0=x0, y=emb.astype(np.float32), mask=mask.astype(np.int32), t=t, noise=noise, drop=drop,
                    resolution=batch["img_hw"].astype(np.float32),
                    aspect_ratio=np.asarray(batch["aspect_ratio"], np.float32).reshape(-1, 1))

    def lr_at(self, step: int) -> float:
        from pixart.training.optim import constant_with_warmup
        return constant_with_warmup(step, self.lr, self.args.warmup_steps)

    # ------------------------------------------------------------------ loop
    def fit(self):
        from pixart.training.checkpoints import save_checkpoint
        from pixart.training.logger import MetricsLogger

        args = self.args
        metrics_log = MetricsLogger(args.output_path, self.start_step if args.resume else None,
                                    args.tensorboard) if self.is_main else None
        accumulation = args.grad_accumulation
        batches = self.micro_batches(self.start_step * accumulation)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", disable=not (self.is_main
                                                                                              and args.progress))
        window = {"loss": [], "mse": [], "vb": [], "grad_norm": []}
        window_start, window_images = time.perf_counter(), 0
        step = self.start_step
        if self.is_main:
            logger.info("training %d steps: global batch %d (%d x %d ranks x %d accumulation), lr %.3g, %s",
                        self.total_steps, self.global_batch * accumulation, args.batch_size, self.world,
                        accumulation, self.lr, args.optimizer)
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
            if step % args.log_every == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                row = {key: float(np.mean(v)) for key, v in window.items()}
                row.update(lr=lr, loss_scale=out["loss_scale"], images_per_s=window_images / elapsed,
                           epoch=self.sampler.position(step * accumulation)[0])
                if self.is_main:
                    metrics_log.log(step, row)
                window = {key: [] for key in window}
                window_start, window_images = time.perf_counter(), 0
            if self.is_main and (step % args.ckpt_every == 0 or step == self.total_steps):
                folder = save_checkpoint(args.output_path, step, self.config, self.weights(), self.step.ema_weights(),
                                         self.step.optimizer_state(),
                                         {"seed": args.seed, "loss_scale": out["loss_scale"], "world": self.world,
                                          "global_batch": self.global_batch * accumulation, "lr": lr},
                                         keep_last=args.keep_last)
                tqdm.write(f"saved {folder}")
            if args.validation_every and step % args.validation_every == 0 and self.is_main:
                self.validate(step)
        bar.close()
        if metrics_log:
            metrics_log.close()
        digest = float(sum(np.abs(v).sum() for v in self.weights().values()))
        logger.info("finished at step %d; weights checksum %.10e", step, digest)

    def weights(self):
        return {name: p.asnumpy() for name, p in self.model.parameters_and_names()}

    # ------------------------------------------------------------------ validation
    def validate(self, step: int):
        """Sample the validation prompts at the most common training bucket sizes (current weights)."""
        from pixart.pipelines.text_to_image import PixArtPipeline, TextEmbeddings
        from pixart.utils.images import save_png, slug

        args = self.args
        if not args.validation_prompts or self.encoder is None:
            return
        self.model.set_train(False)
        if not hasattr(self, "_validation"):
            emb, mask = self.encoder.encode_captions(list(args.validation_prompts) + [""])
            counts = {}
            for r in self.dataset.records:
                counts[r.size] = counts.get(r.size, 0) + 1
            sizes = sorted(counts, key=counts.get, reverse=True)[:2]
            self._validation = (TextEmbeddings(emb[:-1], mask[:-1]), TextEmbeddings(emb[-1:], mask[-1:]), sizes,
                                PixArtPipeline(self.model, self.encoder.vae, mode=args.mode))
        text, null, sizes, pipeline = self._validation
        folder = os.path.join(args.output_path, "validation", f"step-{step:08d}")
        n = len(text)
        for height, width in sizes:
            result = pipeline(text, null.take([0] * n), height, width, steps=args.validation_steps,
                              seeds=list(range(n)), use_resolution_binning=False, progress=False)
            for prompt, image in zip(args.validation_prompts, result.images):
                save_png(image, folder, f"{height}x{width}-{slug(prompt)}", {"prompt": prompt, "step": step})
        self.model.set_train(True)
