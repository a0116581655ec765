"""The finetuning dataset: a label JSON of images and captions, bucketed by aspect ratio.

The label file is a JSON list of records::

    {"path": "cats/001.jpg", "prompt": "a cat", "sharegpt4v": "A long caption ...",
     "height": 768, "width": 512, "ratio": 1.5}

``path`` is relative to the image folder; ``sharegpt4v`` is optional; ``ratio`` is not read.
A record's ``height`` and ``width``, when both are positive numbers, are trusted: they decide
its bucket and micro-conditions without the image file being opened, and are taken as the
image's size as trained, i.e. after EXIF orientation. A record without them has its image's
header read. With ``verify_images`` every image is instead fully decoded at start and its own
size (after EXIF orientation) decides; disagreeing labels are counted. A wrong label size costs
at most a poorer crop, never a failed one: :func:`load_image` resizes the real image to cover
the bucket size and center crops it, whatever size the label claimed.

Without ``verify_images`` a bad image is found when a sample first loads it: it is skipped
then, another image of its bucket taking its place (:meth:`TrainDataset.get`), and counted.
From the feature cache no image is decoded while training, so there is nothing to find.

Records that cannot be trained on are skipped with a warning and counted by reason:

* ``malformed record``: not an object, no string ``path``, or a caption that is not a string;
* ``missing file``: no file at ``image_dir/path``;
* ``unreadable image``: PIL cannot read its header (when the label has no size) or, with
  ``verify_images``, cannot fully decode it (truncated or corrupt data);
* ``ratio out of range``: height/width outside [r_min / 1.125, r_max * 1.125], where
  r_min..r_max is the bucket table's range (0.25..4.0 for every official table, giving
  [0.222, 4.5]; the 4.5 cap is the official loader's). Beyond it the crop to the extreme
  bucket would throw away more than 1/9 of the long side on top of the bucket's own shape;
* ``empty caption``: both ``prompt`` and ``sharegpt4v`` are empty or whitespace (text-conditioned
  training only);
* ``bad class id``: (class-conditioned training only) the class field is not an integer from 0
  to the model's class count - 1;
* ``missing cache entry``: (feature-cache mode only) no cache file for the record.

A summary of the counts is logged at start; if nothing is left a :class:`DatasetError`
says why.
"""
from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .buckets import DEFAULT_DIVISOR, BucketTable, Size, bucket_table, nearest_bucket, ratio_range, \
    resize_and_center_crop
from .cache import cache_path, read_cache_entry
from .batching import BucketBatcher

from pixart.errors import DatasetError

logger = logging.getLogger(__name__)

CAPTION_FIELDS = ("prompt", "sharegpt4v")
# How far past the table's extreme ratios an image may be and still be cropped to them.
RATIO_OVERSHOOT = 1.125
# Per-record warnings shown per skip reason; the rest only count towards the summary.
_WARNINGS_PER_REASON = 10
# EXIF orientations that rotate by 90 degrees and so swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


@dataclasses.dataclass(frozen=True)
class Record:
    """One usable label record.

    Attributes:
        path: image path as written in the label file (also the cache key).
        file: the image's full path.
        captions: caption field -> stripped text ("" when absent).
        height, width: the image's size after EXIF orientation.
        bucket: ratio key of the bucket it trains in.
        size: (height, width) it is resized and cropped to.
        control_file: the full path of its ControlNet control image, when the label file names one.
        class_id: its class, for class-conditioned training.
    """
    path: str
    file: str
    captions: Dict[str, str]
    height: int
    width: int
    bucket: str
    size: Size
    control_file: Optional[str] = None
    class_id: Optional[int] = None


@dataclasses.dataclass
class LoadSummary:
    """What :func:`load_records` kept and skipped, for the start-of-training report."""
    total: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    sizes_from_labels: int = 0
    label_size_mismatch: int = 0
    bucket_counts: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.total - sum(self.skipped.values())

    def __str__(self) -> str:
        lines = [f"{self.kept} of {self.total} records usable"]
        lines += [f"  skipped, {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        if self.sizes_from_labels:
            lines.append(f"  sizes taken from the labels, images not opened (--verify_images checks them): "
                         f"{self.sizes_from_labels}")
        if self.label_size_mismatch:
            lines.append(f"  label height/width disagreeing with the image file (file size used): "
                         f"{self.label_size_mismatch}")
        if self.bucket_counts:
            lines.append("  images per bucket (ratio: count): " +
                         ", ".join(f"{k}: {n}" for k, n in self.bucket_counts.items()))
        return "\n".join(lines)


def load_records(json_path: str, image_dir: str, table: BucketTable, fixed_size: Optional[Size] = None,
                 verify_images: bool = False, cache_dir: Optional[str] = None,
                 control_field: Optional[str] = None, classes: Optional[Tuple[str, int]] = None
                 ) -> Tuple[List[Record], LoadSummary]:
    """Read and validate the label file.

    Args:
        json_path: the label JSON (a list of records).
        image_dir: folder the records' paths are relative to.
        table: bucket table; assigns buckets and bounds the accepted ratios.
        fixed_size: train every image at this (h, w) instead of its bucket's size.
        verify_images: fully decode every image now and take its size from the file (catches
            truncated files; costs one decode per image). False takes a record's size from its
            label when it has one, from the image header otherwise.
        cache_dir: feature-cache folder; records without an entry there are skipped.
        control_field: label field naming each record's control image (ControlNet training);
            records without a readable one are skipped.
        classes: (label field, number of classes) for class-conditioned training: records need
            an integer class id there, and no caption.
    Returns:
        (usable records in label-file order, summary). Raises DatasetError if none is usable.
    """
    entries = _read_label_file(json_path)
    r_min, r_max = ratio_range(table)
    lo, hi = r_min / RATIO_OVERSHOOT, r_max * RATIO_OVERSHOOT
    summary = LoadSummary(total=len(entries))
    records = []

    def skip(reason: str, where: str, why: str) -> None:
        summary.skipped[reason] += 1
        if summary.skipped[reason] <= _WARNINGS_PER_REASON:
            logger.warning("skipping %s: %s%s", where, why,
                           "" if summary.skipped[reason] < _WARNINGS_PER_REASON
                           else f" (further '{reason}' records are only counted)")

    for i, item in enumerate(entries):
        where = f"{json_path} record {i}"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            skip("malformed record", where, "expected an object with a non-empty string 'path'")
            continue
        where += f" ({item['path']})"
        captions = {field: item.get(field) or "" for field in CAPTION_FIELDS}
        if not all(isinstance(text, str) for text in captions.values()):
            skip("malformed record", where, f"captions {list(CAPTION_FIELDS)} must be strings")
            continue
        captions = {field: text.strip() for field, text in captions.items()}
        class_id = None
        if classes:
            class_id = item.get(classes[0])
            if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < classes[1]:
                skip("bad class id", where, f"'{classes[0]}' is {class_id!r}, expected an integer class id from 0 "
                                            f"to {classes[1] - 1}")
                continue
        elif not any(captions.values()):
            skip("empty caption", where, "both 'prompt' and 'sharegpt4v' are empty")
            continue
        file = os.path.join(image_dir, item["path"])
        if not os.path.isfile(file):
            skip("missing file", where, f"no file {file}")
            continue
        label_size = None if verify_images else _label_size(item)
        if label_size:
            height, width = label_size
        else:
            try:
                height, width = image_size(file, decode=verify_images)
            except Exception as e:  # any failure to decode makes the image unusable, whatever PIL raises
                skip("unreadable image", where, f"{type(e).__name__}: {e}")
                continue
        if not lo <= height / width <= hi:
            skip("ratio out of range", where,
                 f"height/width {height}/{width} = {height / width:.3f} is outside [{lo:.3f}, {hi:.3f}]")
            continue
        bucket, size = _fixed_bucket(fixed_size) if fixed_size else nearest_bucket(height, width, table)
        entry = None if cache_dir is None else cache_path(cache_dir, item["path"], size)
        if entry is not None and not os.path.isfile(entry):
            skip("missing cache entry", where, f"no {entry}")
            continue
        control_file = None
        if control_field:
            control = item.get(control_field)
            control_file = os.path.join(image_dir, control) if isinstance(control, str) and control else None
            if control_file is None or not os.path.isfile(control_file):
                skip("missing control image", where, f"no file in its '{control_field}' field ({control!r})")
                continue
        if not label_size and _label_disagrees(item, height, width):
            summary.label_size_mismatch += 1
        summary.sizes_from_labels += label_size is not None
        records.append(Record(item["path"], file, captions, height, width, bucket, size, control_file, class_id))

    counts = collections.Counter(r.bucket for r in records)
    summary.bucket_counts = {k: counts[k] for k in sorted(counts, key=float)}
    if not records:
        raise DatasetError(f"no usable record in {json_path} (images under {image_dir}):\n{summary}")
    logger.log(logging.WARNING if summary.skipped else logging.INFO, "dataset %s:\n%s", json_path, summary)
    return records, summary


def _read_label_file(json_path: str) -> list:
    if not os.path.isfile(json_path):
        raise DatasetError(f"label file {json_path} does not exist")
    try:
        with open(json_path, encoding="utf-8") as f:
            entries = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"label file {json_path} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise DatasetError(f"label file {json_path} must hold a JSON list of records, "
                           f"got {type(entries).__name__}")
    if not entries:
        raise DatasetError(f"label file {json_path} holds no records")
    return entries


def _fixed_bucket(size: Size) -> Tuple[str, Size]:
    return str(round(size[0] / size[1], 2)), size


def _label_size(item: dict) -> Optional[Size]:
    """The record's (height, width) label rounded to pixels, or None unless both are finite and
    round to at least one pixel."""
    h, w = item.get("height"), item.get("width")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and round(v) >= 1
               for v in (h, w)):
        return None
    return round(h), round(w)


def _label_disagrees(item: dict, height: int, width: int) -> bool:
    label = _label_size(item)
    return label is not None and abs(label[0] / label[1] - height / width) > 0.01 * (height / width)


def image_size(file: str, decode: bool = True) -> Size:
    """(height, width) of an image file as it will be trained, i.e. after EXIF orientation.

    With ``decode`` the whole image is decoded, so truncated or corrupt data raises here
    rather than in the middle of training.
    """
    with Image.open(file) as im:
        width, height = im.size
        if decode:
            im.load()
        if im.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS:
            height, width = width, height
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image ({width}x{height})")
    return height, width


def load_image(file: str, size: Size, resample: int = Image.BICUBIC) -> np.ndarray:
    """An image file as a float32 (3, height, width) array in [-1, 1], covering ``size``.

    EXIF orientation is applied; transparent pixels are composited onto white (plain RGB
    conversion would expose whatever colour hides under alpha 0). Then the image is
    resized to cover ``size`` and center cropped.
    """
    with Image.open(file) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        im = resize_and_center_crop(im.convert("RGB"), size[0], size[1], resample)
        pixels = np.asarray(im, dtype=np.float32)
    return (pixels / 127.5 - 1.0).transpose(2, 0, 1)


class TrainDataset:
    """Validated records with per-sample loading and caption choice.

    Args:
        json_path, image_dir: the label file and the folder its paths are relative to.
        image_size: base resolution in pixels (512 for the 512-MS model).
        multi_scale: train each image at its aspect-ratio bucket's size; False trains all
            at image_size x image_size.
        real_prompt_ratio: probability of training a sample on ``prompt`` rather than
            ``sharegpt4v`` (when the chosen one is empty, the other is used).
        seed: seeds the caption choice, which depends only on (seed, epoch, index).
        divisor: VAE factor x patch size, for bucket tables of non-official base sizes.
        cache_dir: if set, samples are read from the feature cache instead of images.
        verify_images: fully decode every image at start and take sizes from the files (see
            :func:`load_records`); otherwise bad images are skipped when first loaded (:meth:`get`).
        control: for ControlNet training, (label field of the control image or None, "none" or
            "canny"): samples then carry a control image (or its cached latents).
        classes: for class-conditioned training, (label field of the class id, number of
            classes): samples then carry ``class_id`` and no caption features.
    """

    def __init__(self, json_path: str, image_dir: str, image_size: int, *, multi_scale: bool = True,
                 real_prompt_ratio: float = 0.5, seed: int = 0, divisor: int = DEFAULT_DIVISOR,
                 cache_dir: Optional[str] = None, verify_images: bool = False,
                 control: Optional[Tuple[Optional[str], str]] = None, classes: Optional[Tuple[str, int]] = None):
        if not 0.0 <= real_prompt_ratio <= 1.0:
            raise ValueError(f"real_prompt_ratio must be in [0, 1], got {real_prompt_ratio}")
        if not os.path.isdir(image_dir):
            raise DatasetError(f"image folder {image_dir} does not exist")
        if cache_dir is not None and not os.path.isdir(cache_dir):
            raise DatasetError(f"feature cache folder {cache_dir} does not exist")
        self.table = bucket_table(image_size, divisor=divisor)
        self.real_prompt_ratio = real_prompt_ratio
        self.seed = seed
        self.cache_dir = cache_dir
        # The official loader switches to Lanczos for its 2K and larger tables.
        self.resample = Image.LANCZOS if image_size >= 2048 else Image.BICUBIC
        fixed = None if multi_scale else (image_size, image_size)
        self.control = control
        self.class_conditioned = classes is not None
        self.records, self.summary = load_records(json_path, image_dir, self.table, fixed,
                                                  verify_images=verify_images, cache_dir=cache_dir,
                                                  control_field=control[0] if control else None, classes=classes)
        self._bucket_members: Dict[str, List[int]] = collections.defaultdict(list)
        for i, record in enumerate(self.records):
            self._bucket_members[record.bucket].append(i)
        # indices whose image (or control image) failed to load; shared by the loading threads
        self.unreadable: set = set()
        self._unreadable_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bucket_keys(self) -> List[str]:
        """Bucket key of every index, for :class:`BucketBatcher`."""
        return [r.bucket for r in self.records]

    def choose_caption(self, index: int, epoch: int) -> Tuple[str, str]:
        """(field, text) of the caption sample ``index`` trains on in ``epoch``."""
        captions = self.records[index].captions
        rng = np.random.default_rng([self.seed, epoch, index])
        first, second = CAPTION_FIELDS if rng.random() < self.real_prompt_ratio else CAPTION_FIELDS[::-1]
        return (first, captions[first]) if captions[first] else (second, captions[second])

    def load_image(self, index: int) -> np.ndarray:
        """Float32 (3, H, W) pixels in [-1, 1] at the record's training size."""
        record = self.records[index]
        try:
            return load_image(record.file, record.size, self.resample)
        except Exception as e:  # never decoded before (or changed since): name it instead of a bare trace
            raise DatasetError(f"cannot load {record.file} (record '{record.path}'): "
                               f"{type(e).__name__}: {e}") from e

    def load_control(self, index: int) -> np.ndarray:
        """Float32 (3, H, W) control image in [-1, 1] at the record's training size: its own file,
        or the Canny edge map of the training image."""
        record = self.records[index]
        if self.control[1] == "canny":
            from pixart.utils.edges import canny

            pixels = np.round((self.load_image(index).transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)
            return canny(pixels).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        try:
            return load_image(record.control_file, record.size, self.resample)
        except Exception as e:
            raise DatasetError(f"cannot load the control image {record.control_file} (record '{record.path}'): "
                               f"{type(e).__name__}: {e}") from e

    def get(self, index: int, epoch: int) -> dict:
        """One training sample (see :meth:`sample`); in image mode, when the record's image cannot
        be loaded, the sample of the next loadable record of its bucket in index order (wrapping
        around) instead. The choice depends only on the files, so every rank makes the same one
        for the same index; the first failure of an index is logged with the count so far, and
        the index is not tried again. DatasetError if no image of the bucket loads."""
        if self.cache_dir is not None:
            return self.sample(index, epoch)
        members = self._bucket_members[self.records[index].bucket]
        start = bisect.bisect_left(members, index)  # members are in index order
        for k in range(len(members)):
            candidate = members[(start + k) % len(members)]
            if candidate in self.unreadable:
                continue
            try:
                return self.sample(candidate, epoch)
            except DatasetError as e:
                self._count_unreadable(candidate, e)
        raise DatasetError(f"no image of bucket {self.records[index].bucket} can be loaded "
                           f"({len(members)} records, the first {self.records[members[0]].file})")

    def _count_unreadable(self, index: int, error: DatasetError) -> None:
        with self._unreadable_lock:
            if index in self.unreadable:  # another thread found it first
                return
            self.unreadable.add(index)
            count = len(self.unreadable)
        logger.warning("skipping an unreadable image: %s; another image of its bucket takes its place "
                       "(%d unreadable image%s found so far; --verify_images finds them all at start)",
                       error, count, "" if count == 1 else "s")

    def sample(self, index: int, epoch: int) -> dict:
        """The training sample of record ``index``.

        Always: ``caption`` (str), ``img_hw`` float32 (2,) original height and width,
        ``aspect_ratio`` float32 () the bucket's ratio (the micro-conditions of α 1024).
        Image mode adds ``image`` float32 (3, H, W) in [-1, 1]. Cache mode adds instead
        ``latent_mean``, ``latent_std`` float32 (C, H/f, W/f), ``caption_emb`` float32
        (L, D) and ``caption_mask`` int32 (L,). With a ControlNet: ``control`` (3, H, W), or
        from the cache ``control_mean`` (C, H/f, W/f). Class-conditioned: ``class_id`` int32 (),
        and no caption features from the cache.
        """
        record = self.records[index]
        field, text = self.choose_caption(index, epoch)
        sample = {"caption": text,
                  "img_hw": np.array([record.height, record.width], dtype=np.float32),
                  "aspect_ratio": np.float32(record.bucket)}
        if self.class_conditioned:
            sample["class_id"] = np.int32(record.class_id)
        if self.cache_dir is None:
            sample["image"] = self.load_image(index)
            if self.control:
                sample["control"] = self.load_control(index)
            return sample
        path = cache_path(self.cache_dir, record.path, record.size)
        entry = read_cache_entry(path)
        sample.update(latent_mean=entry.latent_mean.astype(np.float32), latent_std=entry.latent_std.astype(np.float32))
        if not self.class_conditioned:
            sample.update(self._cached_caption(path, record, entry, field))
        if self.control:
            if entry.control_mean is None:
                raise DatasetError(f"{path}: cache entry of '{record.path}' has no control latents; re-run the "
                                   f"feature-caching tool with the ControlNet settings")
            sample["control_mean"] = entry.control_mean.astype(np.float32)
        return sample

    @staticmethod
    def _cached_caption(path: str, record: Record, entry, field: str) -> dict:
        if field not in entry.captions:
            raise DatasetError(f"{path}: cache entry of '{record.path}' has no embedding for its "
                               f"'{field}' caption; re-run the feature-caching tool")
        emb, mask = entry.captions[field]
        return dict(caption_emb=emb.astype(np.float32), caption_mask=mask.astype(np.int32))


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples of one bucket: arrays gain a leading batch axis, strings form a list."""
    return {key: [s[key] for s in samples] if isinstance(samples[0][key], str)
            else np.stack([s[key] for s in samples]) for key in samples[0]}


def iterate_batches(dataset: TrainDataset, batcher: BucketBatcher, epoch: int, start_step: int = 0,
                    num_threads: int = 0) -> Iterator[dict]:
    """This rank's collated batches of ``epoch`` from ``start_step`` on.

    With ``num_threads`` > 0, samples are loaded by a thread pool that keeps the next two
    batches in flight while the current one trains (PIL decoding releases the GIL).
    """
    index_batches = batcher.batches(epoch, start_step)
    if num_threads <= 0:
        for indices in index_batches:
            yield collate([dataset.get(i, epoch) for i in indices])
        return
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        pending = collections.deque()

        def submit_next() -> None:
            indices = next(index_batches, None)
            if indices is not None:
                pending.append([pool.submit(dataset.get, i, epoch) for i in indices])

        for _ in range(3):  # the batch to yield now plus two ahead
            submit_next()
        while pending:
            samples = [future.result() for future in pending.popleft()]
            submit_next()
            yield collate(samples)
