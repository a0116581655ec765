#!/usr/bin/env python
"""Precompute the frozen features of a training set once: VAE posteriors and T5 embeddings.

    python tools/cache_features.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json \\
        --image_dir images/ --feature_cache cache/
    python train.py -c configs/train/pixart-sigma-512-MS.yaml --json_path labels.json --image_dir images/ \\
        --feature_cache cache/

Training from the cache loads neither T5 nor the VAE (the maintainers' own advice for slow
finetuning). Entries are one .npz per image and bucket size; existing entries are kept,
so an interrupted run resumes where it stopped. It reads the same config as train.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402


def main(argv=None) -> int:
    import train  # the same flags and config file as training
    from pixart.data.cache import CacheEntry, cache_path, write_cache_entry
    from pixart.data.dataset import CAPTION_FIELDS, DatasetError, TrainDataset
    from pixart.training.features import NULL_CAPTION_FILE, FeatureEncoder
    from pixart.utils.config import fail, parse_with_config, str2bool
    from pixart.utils.errors import ModelLoadError

    parser = train.build_parser()
    parser.description = __doc__
    parser.add_argument("--cache_fp16", type=str2bool, default=False,
                        help="store T5 embeddings in float16 (half the disk; a rounding of the features)")
    args = parse_with_config(parser, argv)
    if not args.feature_cache:
        fail("--feature_cache FOLDER is required: where to write the features")
    train.setup_mindspore(argparse.Namespace(device=args.device))
    try:
        config = train.model_config(args)
        encoder = FeatureEncoder.from_folders(args.vae_root, args.tokenizer_root, args.text_encoder_root,
                                              config.model_max_length)
        dataset = TrainDataset(args.json_path, args.image_dir, args.image_size, multi_scale=args.multi_scale,
                               divisor=encoder.vae.config.downsample_factor * config.patch_size,
                               verify_images=True)
    except (ModelLoadError, DatasetError) as e:
        fail(str(e))
    os.makedirs(args.feature_cache, exist_ok=True)
    np.savez(os.path.join(args.feature_cache, NULL_CAPTION_FILE), emb=encoder.null_caption(),
             scaling_factor=encoder.vae.scaling_factor, shift_factor=encoder.vae.shift_factor)
    written = skipped = 0
    for index, record in enumerate(tqdm(dataset.records, desc="caching features")):
        path = cache_path(args.feature_cache, record.path, record.size)
        if os.path.isfile(path):
            skipped += 1
            continue
        image = dataset.load_image(index)[None]
        mean, std = encoder.encode_images(image)
        captions = {}
        for field in CAPTION_FIELDS:
            if record.captions.get(field):
                emb, mask = encoder.encode_captions([record.captions[field]])
                captions[field] = (emb[0].astype(np.float16 if args.cache_fp16 else np.float32), mask[0])
        write_cache_entry(path, CacheEntry(mean[0], std[0], captions))
        written += 1
    print(f"feature cache {args.feature_cache}: {written} entries written, {skipped} already there, "
          f"{len(dataset.records)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
