#!/usr/bin/env python
"""Precompute the frozen features of a training set once: VAE posteriors and T5 embeddings.

    python tools/cache_features.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json \\
        --image_dir images/ --feature_cache cache/
    python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json --image_dir images/ \\
        --feature_cache cache/

    msrun --worker_num=8 --local_worker_num=8 --log_dir=log tools/cache_features.py \\
        -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json --image_dir images/ --feature_cache cache/

Training from the cache loads neither T5 nor the VAE (the maintainers' own advice for slow
finetuning). Entries are one .npz per image and bucket size; existing entries are kept,
so an interrupted run resumes where it stopped. It reads the same config as train.py; for a
class-conditional DiT (``--model DiT-...``) it caches the VAE posteriors alone. The encoders
run in the config's --dtype on Ascend and GPU, fp32 on CPU.

Launched by msrun, each worker encodes every world-th image (``records[rank::world]``) and writes
its own entries: the cache is the set of files, so the workers share nothing but the folder,
and rank 0 reports what all of them wrote.
"""
import os
import sys

import numpy as np
from tqdm import tqdm

from pixart.cli import entry_point, fail, parse_with_config, str2bool
from pixart.cli.training import build_parser
from pixart.errors import DatasetError
from pixart.training.config import TrainConfig, model_config
from pixart.utils.hf_cache import apply_pretrained


def entry_complete(path: str, needs_control: bool, needs_captions: bool) -> bool:
    """Whether the cache entry at ``path`` exists and holds what the model needs: control latents
    for a ControlNet, caption embeddings for a text-conditioned model (a DiT's cache has none)."""
    if not os.path.isfile(path):
        return False
    if not (needs_control or needs_captions):
        return True
    try:
        with np.load(path) as data:
            names = data.files
    except (OSError, ValueError):
        return False
    return (not needs_control or "control_mean" in names) and \
        (not needs_captions or any(name.startswith("emb/") for name in names))


def batches_of_one_size(records, indices, batch_size: int):
    """``indices`` grouped by training size (a VAE batch needs one size), in chunks of ``batch_size``."""
    by_size = {}
    for i in indices:
        by_size.setdefault(records[i].size, []).append(i)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def launched_by_msrun() -> bool:
    """Whether msrun started this process: as a worker (MS_WORKER), or as its scheduler (MS_SCHED),
    which runs the same script and must join the group too (its ``init`` serves the workers', then
    ends the process)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


@entry_point
def main(argv=None) -> int:
    from pixart.data.cache import CacheEntry, cache_path, write_cache_entry
    from pixart.data.dataset import CAPTION_FIELDS, TrainDataset
    from pixart.models.family import is_class_conditional
    from pixart.runtime import init_data_parallel, setup_device
    from pixart.training.features import NULL_CAPTION_FILE, FeatureEncoder

    parser = build_parser(__doc__)  # the same flags and config file as train.py
    parser.add_argument("--cache_fp16", type=str2bool, default=False,
                        help="store T5 embeddings in float16 (half the disk; a rounding of the features)")
    parser.add_argument("--cache_batch_size", type=int, default=16,
                        help="images of one size encoded together (memory grows with it)")
    args = parse_with_config(parser, argv)
    apply_pretrained(args, argv)
    if not args.feature_cache:
        fail("--feature_cache FOLDER is required: where to write the features")
    setup_device(args.device, args.jit_level, args.max_device_memory)
    rank, world = init_data_parallel() if launched_by_msrun() else (0, 1)
    cfg = TrainConfig.from_namespace(args)
    config = model_config(cfg)
    classes = (cfg.class_field, config.num_classes) if is_class_conditional(config) else None
    encoder = FeatureEncoder.from_folders(args.vae_root, dtype=cfg.dtype) if classes else \
        FeatureEncoder.from_folders(args.vae_root, args.tokenizer_root, args.text_encoder_root, config.model_max_length,
                                    dtype=cfg.dtype)
    dataset = TrainDataset(args.json_path, args.image_dir, args.image_size, multi_scale=args.multi_scale,
                           divisor=encoder.vae.config.downsample_factor * config.patch_size,
                           verify_images=cfg.verify_images,  # the sizes, so the buckets, train.py will look up
                           control=cfg.control_source, classes=classes)
    os.makedirs(args.feature_cache, exist_ok=True)
    if rank == 0:  # one writer: the workers would race on the same file
        null_caption = np.zeros((0,), np.float32) if classes else encoder.null_caption()
        np.savez(os.path.join(args.feature_cache, NULL_CAPTION_FILE), emb=null_caption,
                 scaling_factor=encoder.vae.scaling_factor, shift_factor=encoder.vae.shift_factor)
    mine = range(rank, len(dataset.records), world)
    todo = [i for i in mine if not entry_complete(cache_path(args.feature_cache, dataset.records[i].path,
                                                             dataset.records[i].size),
                                                  bool(cfg.control_source), needs_captions=classes is None)]
    desc = "caching features" + (f" (rank {rank} of {world})" if world > 1 else "")
    unreadable = []
    with tqdm(total=len(todo), desc=desc, unit="image") as progress:
        for batch in batches_of_one_size(dataset.records, todo, max(1, args.cache_batch_size)):
            images = {}
            for i in batch:
                try:
                    images[i] = dataset.load_image(i)
                except DatasetError as e:  # no entry: train.py then skips the record as a missing cache entry
                    unreadable.append(i)
                    tqdm.write(f"skipping: {e}")
            progress.update(len(batch) - len(images))
            batch = list(images)
            if not batch:
                continue
            mean, std = encoder.encode_images(np.stack([images[i] for i in batch]))
            control = [None] * len(batch)
            if cfg.control_source:  # the control image's latents (posterior mean), as the pipeline encodes it
                control = encoder.encode_images(np.stack([dataset.load_control(i) for i in batch]))[0]
            captions = {}
            for field in () if classes else CAPTION_FIELDS:
                texts = [dataset.records[i].captions.get(field) or "" for i in batch]
                emb, mask = encoder.encode_captions(texts)
                captions[field] = (emb.astype(np.float16 if args.cache_fp16 else np.float32), mask)
            for k, i in enumerate(batch):
                record = dataset.records[i]
                entry_captions = {field: (emb[k], mask[k]) for field, (emb, mask) in captions.items()
                                  if record.captions.get(field)}
                write_cache_entry(cache_path(args.feature_cache, record.path, record.size),
                                  CacheEntry(mean[k], std[k], entry_captions, control[k]))
            progress.update(len(batch))
    written, skipped, bad = len(todo) - len(unreadable), len(mine) - len(todo), len(unreadable)
    if world > 1:  # also the barrier: rank 0 reports once every worker has written its entries
        from pixart.training.trainer import all_reduce_sum

        written, skipped, bad = (int(n) for n in all_reduce_sum(np.array([written, skipped, bad])))
    if rank == 0:
        print(f"feature cache {args.feature_cache}: {written} entries written, {skipped} already there, "
              + (f"{bad} unreadable images skipped, " if bad else "")
              + f"{len(dataset.records)} images" + (f", {world} workers" if world > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
