"""The training data pipeline: bucket tables, validation, sampling, caption choice, cache."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from pixart.data.buckets import (OFFICIAL_BASE_SIZES, bucket_table, nearest_bucket, official_table,
                                 resize_and_center_crop, resolution_binning)
from pixart.data.cache import CacheEntry, CacheError, cache_path, read_cache_entry, write_cache_entry
from pixart.data.dataset import DatasetError, TrainDataset, collate, iterate_batches, load_image
from pixart.data.batching import BucketBatcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TABLE = os.path.join(REPO, "..", "shared", "reference", "aspect_ratio_buckets.json")
PACKAGED_TABLE = os.path.join(REPO, "pixart", "data", "aspect_ratio_buckets.json")


def make_image(path, height, width, seed=0, **save_args):
    """Random RGB pixels, saved in the format the file extension names."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, **save_args)


def write_dataset(tmp_path, records, images=()):
    """Write (name, height, width) images and the label file; returns (json_path, image_dir)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    for i, (name, h, w) in enumerate(images):
        make_image(image_dir / name, h, w, seed=i)
    json_path = tmp_path / "labels.json"
    json_path.write_text(json.dumps(records))
    return str(json_path), str(image_dir)


def label(name, h, w, prompt="a prompt", sharegpt4v="a long caption"):
    record = {"path": name, "prompt": prompt, "height": h, "width": w, "ratio": h / w}
    if sharegpt4v is not None:
        record["sharegpt4v"] = sharegpt4v
    return record


def good_dataset(tmp_path, sizes, **labels):
    images = [(f"img{i}.png", h, w) for i, (h, w) in enumerate(sizes)]
    return write_dataset(tmp_path, [label(n, h, w, **labels) for n, h, w in images], images)


# ---------------------------------------------------------------- bucket tables

def test_packaged_table_equals_shared_reference():
    if not os.path.isfile(SHARED_TABLE):
        pytest.skip("../shared/reference/aspect_ratio_buckets.json is absent (it is beside the repo in CI)")
    with open(SHARED_TABLE) as f, open(PACKAGED_TABLE) as g:
        assert json.load(f) == json.load(g)


@pytest.mark.parametrize("base", OFFICIAL_BASE_SIZES)
def test_official_tables(base):
    for test, n in ((False, 40), (True, 33)):
        table = bucket_table(base, test=test)
        assert len(table) == n
        ratios = [float(k) for k in table]
        assert ratios == sorted(ratios) and (ratios[0], ratios[-1]) == (0.25, 4.0)


@pytest.mark.parametrize("base,divisor", [(32, 16), (64, 16), (96, 16), (128, 16), (64, 8), (768, 16)])
@pytest.mark.parametrize("test", [False, True])
def test_scaled_tables_are_valid(base, divisor, test):
    table = bucket_table(base, test=test, divisor=divisor)
    sizes = list(table.values())
    assert 2 <= len(table) <= (33 if test else 40)
    assert len(set(sizes)) == len(sizes)
    assert all(h % divisor == 0 and w % divisor == 0 and h > 0 and w > 0 for h, w in sizes)
    keys = [float(k) for k in table]
    shape_ratios = [h / w for h, w in sizes]
    assert keys == sorted(keys) and all(a < b for a, b in zip(shape_ratios, shape_ratios[1:]))
    assert all(k == str(round(h / w, 2)) for k, (h, w) in table.items())
    assert table["1.0"] == (base, base)
    assert keys[0] <= 0.34 and keys[-1] >= 3.0  # the range survives rounding
    assert all(0.5 * base ** 2 <= h * w <= 2 * base ** 2 for h, w in sizes)


def test_bucket_table_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        bucket_table(0)
    with pytest.raises(ValueError, match="official"):
        official_table(300)


def test_resolution_binning_uses_test_tables():
    assert resolution_binning(1024, 1024, 1024) == (1024, 1024)
    table = official_table(512, test=True)
    want = table[min(table, key=lambda k: abs(float(k) - 600 / 1000))]
    assert resolution_binning(600, 1000, 512) == want
    assert resolution_binning(600, 1000, 64) in bucket_table(64, test=True).values()


# ---------------------------------------------------------------- resize and crop

@pytest.mark.parametrize("src", [(50, 100), (100, 50), (7, 3), (333, 517), (10, 20), (64, 64)])
@pytest.mark.parametrize("dst", [(32, 32), (16, 64), (48, 32), (96, 160)])
def test_resize_and_center_crop_exact_shape(src, dst):
    image = Image.new("RGB", (src[1], src[0]))
    assert resize_and_center_crop(image, *dst).size == (dst[1], dst[0])


def test_crop_without_resize_keeps_the_center_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (50, 100, 3), dtype=np.uint8)
    out = np.asarray(resize_and_center_crop(Image.fromarray(pixels), 50, 60))
    np.testing.assert_array_equal(out, pixels[:, 20:80])


def test_resize_then_crop_keeps_the_center_content():
    # A black square in the middle third of a white 3:1 image fills the crop's middle.
    pixels = np.full((100, 300, 3), 255, dtype=np.uint8)
    pixels[25:75, 100:200] = 0
    out = np.asarray(resize_and_center_crop(Image.fromarray(pixels), 32, 32)).astype(int)
    assert out.shape == (32, 32, 3)
    assert out[8:24, 4:28].max() < 30          # inside the square
    assert out[:5].min() > 225 and out[-5:].min() > 225  # above and below it


def test_load_image_range_and_layout(tmp_path):
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "red.png")
    x = load_image(str(tmp_path / "red.png"), (16, 32))
    assert x.dtype == np.float32 and x.shape == (3, 16, 32)
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1:], -1.0)
    # Transparent pixels come out white, not the colour hidden under alpha 0.
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    np.testing.assert_allclose(load_image(str(tmp_path / "clear.png"), (16, 16)), 1.0)


# ---------------------------------------------------------------- dataset

RATIO_SIZES = [(64, 256), (100, 100), (120, 90), (90, 160), (300, 80), (77, 131), (131, 77), (60, 230), (240, 61)]


def test_bucketing_matches_nearest_ratio_of_official_512_table(tmp_path):
    with open(PACKAGED_TABLE) as f:
        table512 = json.load(f)["ASPECT_RATIO_512"]
    json_path, image_dir = good_dataset(tmp_path, RATIO_SIZES)
    ds = TrainDataset(json_path, image_dir, 512)
    assert len(ds) == len(RATIO_SIZES)
    for record, (h, w) in zip(ds.records, RATIO_SIZES):
        key = min(table512, key=lambda k: abs(float(k) - h / w))
        assert record.bucket == key and record.size == tuple(table512[key])
    sample = ds.get(0, epoch=0)
    assert sample["image"].shape == (3, *ds.records[0].size)
    np.testing.assert_array_equal(sample["img_hw"], [64, 256])
    assert sample["aspect_ratio"] == np.float32(ds.records[0].bucket)


def test_fixed_size_mode(tmp_path):
    json_path, image_dir = good_dataset(tmp_path, RATIO_SIZES[:4])
    ds = TrainDataset(json_path, image_dir, 32, multi_scale=False)
    assert set(ds.bucket_keys) == {"1.0"}
    assert all(ds.get(i, 0)["image"].shape == (3, 32, 32) for i in range(len(ds)))


def test_small_base_buckets(tmp_path):
    json_path, image_dir = good_dataset(tmp_path, RATIO_SIZES)
    ds = TrainDataset(json_path, image_dir, 32)
    for i, record in enumerate(ds.records):
        assert record.size == nearest_bucket(record.height, record.width, bucket_table(32))[1]
        assert ds.get(i, 0)["image"].shape == (3, *record.size)


def test_bad_records_are_skipped_and_counted(tmp_path, caplog):
    images = [("good0.png", 40, 40), ("good1.png", 40, 60), ("wide.png", 20, 200), ("tall.png", 200, 40),
              ("fallback.png", 40, 40), ("truncated.jpg", 64, 64)]
    records = [label("good0.png", 40, 40), label("good1.png", 40, 60),
               label("gone.png", 40, 40),                                   # missing file
               label("corrupt.png", 40, 40),                                # random bytes
               label("truncated.jpg", 64, 64),                              # cut in half
               label("wide.png", 20, 200),                                  # ratio 0.1
               label("tall.png", 200, 40),                                  # ratio 5.0
               label("good0.png", 40, 40, prompt="  ", sharegpt4v=None),    # empty after fallback
               label("good0.png", 40, 40, prompt="", sharegpt4v="\n"),      # empty after fallback
               label("fallback.png", 40, 40, prompt="", sharegpt4v="only the long one"),  # kept
               {"prompt": "no path"}, "not an object",                      # malformed
               label("good1.png", 40, 60, prompt=["not", "a", "string"])]   # malformed
    json_path, image_dir = write_dataset(tmp_path, records, images)
    (tmp_path / "images" / "corrupt.png").write_bytes(os.urandom(500))
    jpeg = tmp_path / "images" / "truncated.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])

    with caplog.at_level(logging.INFO, logger="pixart.data"):
        ds = TrainDataset(json_path, image_dir, 64, verify_images=True)
    assert [r.path for r in ds.records] == ["good0.png", "good1.png", "fallback.png"]
    assert dict(ds.summary.skipped) == {"missing file": 1, "unreadable image": 2, "ratio out of range": 2,
                                        "empty caption": 2, "malformed record": 3}
    assert ds.summary.total == len(records) and ds.summary.kept == 3
    text = caplog.text
    assert "gone.png" in text and "corrupt.png" in text and "truncated.jpg" in text
    assert "unreadable image: 2" in text and "3 of 13 records usable" in text

    # Without verifying, labelled sizes are trusted and neither bad image is opened at start (they
    # are found when loaded: test_an_unreadable_image_is_replaced_when_first_loaded) ...
    trusting = TrainDataset(json_path, image_dir, 64)
    assert trusting.summary.skipped["unreadable image"] == 0 and trusting.summary.kept == 5
    # ... and reading only the header of an unlabelled one cannot see the truncation.
    unlabelled = [{k: v for k, v in r.items() if k not in ("height", "width")} if isinstance(r, dict) else r
                  for r in records]
    (tmp_path / "unlabelled.json").write_text(json.dumps(unlabelled))
    headers = TrainDataset(str(tmp_path / "unlabelled.json"), image_dir, 64)
    assert dict(headers.summary.skipped)["unreadable image"] == 1 and headers.summary.sizes_from_labels == 0


def test_per_record_warnings_are_capped(tmp_path, caplog):
    records = [label(f"gone{i}.png", 40, 40) for i in range(15)] + [label("img0.png", 40, 40)]
    json_path, image_dir = write_dataset(tmp_path, records, [("img0.png", 40, 40)])
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        ds = TrainDataset(json_path, image_dir, 64)
    assert ds.summary.skipped["missing file"] == 15
    assert sum("skipping" in m for m in caplog.messages) == 10
    assert "only counted" in caplog.text and "missing file: 15" in caplog.text


@pytest.mark.parametrize("size_from", ["decoded file", "header", "label"])
def test_exif_orientation_decides_the_bucket(tmp_path, size_from):
    """The file's size is taken after EXIF orientation; a label's size is taken as that already."""
    record = {"decoded file": label("rotated.jpg", 40, 80), "label": label("rotated.jpg", 80, 40),
              "header": {"path": "rotated.jpg", "prompt": "a prompt"}}[size_from]
    json_path, image_dir = write_dataset(tmp_path, [record])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    make_image(os.path.join(image_dir, "rotated.jpg"), 40, 80, exif=exif)
    ds = TrainDataset(json_path, image_dir, 64, verify_images=size_from == "decoded file")
    assert (ds.records[0].height, ds.records[0].width) == (80, 40) and ds.records[0].size == (96, 48)
    with Image.open(os.path.join(image_dir, "rotated.jpg")) as im:
        upright = resize_and_center_crop(im.transpose(Image.ROTATE_270), 96, 48)
    np.testing.assert_allclose(ds.get(0, 0)["image"], np.asarray(upright).transpose(2, 0, 1) / 127.5 - 1,
                               atol=1e-6)


def test_ratio_bounds_are_inclusive_at_4_5(tmp_path):
    json_path, image_dir = good_dataset(tmp_path, [(180, 40), (19, 90), (182, 40), (23, 100)])
    ds = TrainDataset(json_path, image_dir, 64)
    assert [r.path for r in ds.records] == ["img0.png", "img3.png"]  # 4.5 and 0.23 kept; 0.211, 4.55 out
    assert ds.summary.skipped["ratio out of range"] == 2


def test_a_wrong_label_size_is_trusted_unless_verified_and_still_crops(tmp_path):
    images = [("a.png", 40, 80)]
    json_path, image_dir = write_dataset(tmp_path, [label("a.png", 80, 40)], images)
    verified = TrainDataset(json_path, image_dir, 64, verify_images=True)
    assert verified.summary.label_size_mismatch == 1
    assert (verified.records[0].height, verified.records[0].width) == (40, 80)
    trusting = TrainDataset(json_path, image_dir, 64)
    assert trusting.summary.label_size_mismatch == 0 and trusting.summary.sizes_from_labels == 1
    record = trusting.records[0]
    assert (record.height, record.width) == (80, 40) and record.size == (96, 48)
    assert trusting.get(0, 0)["image"].shape == (3, 96, 48)  # the landscape file, cropped to the portrait bucket
    assert not trusting.unreadable


def test_labelled_sizes_open_no_image_at_start(tmp_path, monkeypatch):
    sizes = [(40, 40), (40, 80), (64, 48)]
    json_path, image_dir = good_dataset(tmp_path, sizes)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    ds = TrainDataset(json_path, image_dir, 64)
    assert opened == [] and ds.summary.sizes_from_labels == 3
    assert [(r.height, r.width) for r in ds.records] == sizes
    TrainDataset(json_path, image_dir, 64, verify_images=True)
    assert len(opened) == 3
    (tmp_path / "unlabelled.json").write_text(json.dumps([{"path": f"img{i}.png", "prompt": "p"} for i in range(3)]))
    headers = TrainDataset(str(tmp_path / "unlabelled.json"), image_dir, 64)
    assert len(opened) == 6 and [(r.height, r.width) for r in headers.records] == sizes


def test_an_unreadable_image_is_replaced_when_first_loaded(tmp_path, caplog):
    # bucket 1.0: img0, bad1, img2, bad3 (the last wraps around to the first); bucket 0.5: img4
    names = ["img0.jpg", "bad1.jpg", "img2.jpg", "bad3.jpg", "img4.jpg"]
    sizes = [(40, 40)] * 4 + [(40, 80)]
    json_path, image_dir = write_dataset(tmp_path, [label(n, h, w) for n, (h, w) in zip(names, sizes)],
                                         [(n, h, w) for n, (h, w) in zip(names, sizes)])
    for name in ("bad1.jpg", "bad3.jpg"):
        path = tmp_path / "images" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = TrainDataset(json_path, image_dir, 64)
    assert len(ds) == 5 and not ds.unreadable  # nothing decoded at start
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        batches = list(iterate_batches(ds, BucketBatcher(ds.bucket_keys, 2, shuffle=False), 0, num_threads=2))
    assert [b["image"].shape for b in batches] == [(2, 3, 64, 64)] * 2
    assert ds.unreadable == {1, 3}
    assert "bad1.jpg" in caplog.text and "bad3.jpg" in caplog.text and "2 unreadable images found so far" in caplog.text
    np.testing.assert_array_equal(batches[0]["image"][1], ds.get(2, 0)["image"])  # bad1 -> img2
    np.testing.assert_array_equal(batches[1]["image"][1], ds.get(0, 0)["image"])  # bad3 -> img0
    # known now: no second warning; another process (rank) makes the same choice
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        assert ds.get(3, 1)["caption"] == ds.get(0, 1)["caption"]
    assert caplog.text == ""
    other = TrainDataset(json_path, image_dir, 64)
    np.testing.assert_array_equal(other.get(3, 0)["image"], batches[1]["image"][1])
    # a bucket with no loadable image is an error, not a wrong shape
    (tmp_path / "images" / "img4.jpg").write_bytes(b"gone bad")
    with pytest.raises(DatasetError, match="no image of bucket 0.5"):
        ds.get(4, 0)


def test_all_bad_raises(tmp_path):
    json_path, image_dir = write_dataset(tmp_path, [label("gone.png", 40, 40), label("x.png", 1, 1, "", "")])
    with pytest.raises(DatasetError, match=r"no usable record(.|\n)*empty caption: 1(.|\n)*missing file: 1"):
        TrainDataset(json_path, image_dir, 64)


@pytest.mark.parametrize("content,match", [(None, "does not exist"), ("{oops", "not valid JSON"),
                                           ('{"path": "a"}', "JSON list"), ("[]", "no records")])
def test_bad_label_files(tmp_path, content, match):
    (tmp_path / "images").mkdir()
    if content is not None:
        (tmp_path / "labels.json").write_text(content)
    with pytest.raises(DatasetError, match=match):
        TrainDataset(str(tmp_path / "labels.json"), str(tmp_path / "images"), 64)


@pytest.mark.parametrize("ratio,field", [(1.0, "prompt"), (0.0, "sharegpt4v")])
def test_real_prompt_ratio_selects_the_field(tmp_path, ratio, field):
    json_path, image_dir = good_dataset(tmp_path, [(40, 40)] * 6)
    ds = TrainDataset(json_path, image_dir, 64, real_prompt_ratio=ratio)
    text = {"prompt": "a prompt", "sharegpt4v": "a long caption"}[field]
    for epoch in range(3):
        assert all(ds.choose_caption(i, epoch) == (field, text) for i in range(len(ds)))
    assert ds.get(0, 0)["caption"] == text


def test_caption_choice_is_seeded_and_falls_back(tmp_path):
    json_path, image_dir = good_dataset(tmp_path, [(40, 40)] * 40)
    a = TrainDataset(json_path, image_dir, 64, seed=3)
    b = TrainDataset(json_path, image_dir, 64, seed=3)
    picks = [a.choose_caption(i, 1)[0] for i in range(40)]
    assert picks == [b.choose_caption(i, 1)[0] for i in range(40)]
    assert 5 < picks.count("prompt") < 35
    assert picks != [a.choose_caption(i, 2)[0] for i in range(40)]

    json_path, image_dir = good_dataset(tmp_path, [(40, 40)] * 3, sharegpt4v=None)
    ds = TrainDataset(json_path, image_dir, 64, real_prompt_ratio=0.0)
    assert all(ds.choose_caption(i, 0) == ("prompt", "a prompt") for i in range(3))


def test_real_prompt_ratio_is_checked(tmp_path):
    json_path, image_dir = good_dataset(tmp_path, [(40, 40)])
    with pytest.raises(ValueError, match="real_prompt_ratio"):
        TrainDataset(json_path, image_dir, 64, real_prompt_ratio=1.5)


def test_iterate_batches_threads_match_serial(tmp_path):
    json_path, image_dir = good_dataset(tmp_path, [(40, 40)] * 5 + [(40, 80)] * 4)
    ds = TrainDataset(json_path, image_dir, 32, seed=1)
    sampler = BucketBatcher(ds.bucket_keys, batch_size=2, seed=1)
    serial = list(iterate_batches(ds, sampler, epoch=0))
    threaded = list(iterate_batches(ds, sampler, epoch=0, num_threads=2))
    assert len(serial) == len(threaded) == len(sampler) == 4
    for a, b in zip(serial, threaded):
        assert a["caption"] == b["caption"] and len(a["caption"]) == 2
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["image"].shape[:2] == (2, 3) and a["img_hw"].shape == (2, 2)


# ---------------------------------------------------------------- sampler

UNEVEN = ["0.25"] * 1 + ["0.5"] * 17 + ["1.0"] * 30 + ["2.0"] * 5 + ["4.0"] * 9


def rank_batches(keys, batch, world, epoch, seed=0, **kw):
    return [list(BucketBatcher(keys, batch, world, r, seed, **kw).batches(epoch)) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_runs_the_same_steps(world):
    for epoch in range(3):
        per_rank = rank_batches(UNEVEN, 2, world, epoch)
        steps = {len(b) for b in per_rank}
        assert steps == {len(BucketBatcher(UNEVEN, 2, world))}
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen))  # disjoint shards, no repeats
        for batches in per_rank:
            assert all(len(b) == 2 and len({UNEVEN[i] for i in b}) == 1 for b in batches)


@pytest.mark.parametrize("world", [2, 3])
def test_dropped_count_is_reported(world, caplog):
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        sampler = BucketBatcher(UNEVEN, 2, world)
    used = len(sampler) * 2 * world
    assert sampler.num_dropped == len(UNEVEN) - used > 0
    assert f"{sampler.num_dropped} of {len(UNEVEN)} samples are dropped" in caplog.text
    seen = {i for batches in rank_batches(UNEVEN, 2, world, 0) for b in batches for i in b}
    assert len(seen) == used


@pytest.mark.parametrize("batch,world", [(3, 2), (2, 3), (1, 6)])
def test_union_of_ranks_equals_single_process(batch, world):
    for epoch in range(2):
        single = list(BucketBatcher(UNEVEN, batch * world, seed=7).batches(epoch))
        ranks = rank_batches(UNEVEN, batch, world, epoch, seed=7)
        assert [sum((r[k] for r in ranks), []) for k in range(len(single))] == single


def test_shuffle_is_seeded_per_epoch():
    sampler = BucketBatcher(UNEVEN, 2, seed=5)
    assert list(sampler.batches(1)) == list(BucketBatcher(UNEVEN, 2, seed=5).batches(1))
    assert list(sampler.batches(1)) != list(sampler.batches(2))
    ordered = list(BucketBatcher(UNEVEN, 2, shuffle=False).batches(0))
    assert ordered[0] == [1, 2]  # bucket 0.25 has one image, which is dropped


def test_resume_mid_epoch_reproduces_the_rest():
    for rank in range(2):
        sampler = BucketBatcher(UNEVEN, 2, world_size=2, rank=rank, seed=11)
        full = list(sampler.batches(4))
        for start in (0, 3, len(full) - 1, len(full)):
            assert list(sampler.batches(4, start_step=start)) == full[start:]
    epoch, step = sampler.position(2 * len(sampler) + 3)
    assert (epoch, step) == (2, 3)
    with pytest.raises(ValueError, match="start_step"):
        next(sampler.batches(0, start_step=len(sampler) + 1))


def test_sampler_rejects_impossible_setups():
    with pytest.raises(ValueError, match="no bucket holds a full global batch of 64"):
        BucketBatcher(UNEVEN, 32, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BucketBatcher(UNEVEN, 2, world_size=2, rank=2)


# ---------------------------------------------------------------- feature cache

def make_entry(rng, fields=("prompt", "sharegpt4v")):
    return CacheEntry(
        latent_mean=rng.standard_normal((4, 4, 2)).astype(np.float32),
        latent_std=rng.random((4, 4, 2)).astype(np.float32),
        captions={f: (rng.standard_normal((7, 16)).astype(np.float16), (np.arange(7) < 3 + i).astype(np.int8))
                  for i, f in enumerate(fields)})


def test_cache_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    entry = make_entry(rng)
    path = cache_path(str(tmp_path), "sub/./a.png", (32, 16))
    assert path == cache_path(str(tmp_path), "sub/a.png", (32, 16))
    assert path != cache_path(str(tmp_path), "sub/a.png", (16, 32))
    write_cache_entry(path, entry)
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary left over
    back = read_cache_entry(path)
    for name in ("latent_mean", "latent_std"):
        assert getattr(back, name).dtype == getattr(entry, name).dtype
        np.testing.assert_array_equal(getattr(back, name), getattr(entry, name))
    assert back.captions.keys() == entry.captions.keys()
    for field, (emb, mask) in entry.captions.items():
        assert back.captions[field][0].dtype == np.float16
        np.testing.assert_array_equal(back.captions[field][0], emb)
        np.testing.assert_array_equal(back.captions[field][1], mask)


def test_cache_errors(tmp_path):
    with pytest.raises(CacheError, match="no such cache entry"):
        read_cache_entry(str(tmp_path / "none.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CacheError, match="unreadable"):
        read_cache_entry(str(tmp_path / "bad.npz"))
    bad = make_entry(np.random.default_rng(0))
    bad.latent_std = bad.latent_std[:2]
    with pytest.raises(CacheError, match="latent_mean"):
        write_cache_entry(str(tmp_path / "x.npz"), bad)


def test_dataset_reads_the_cache(tmp_path, caplog):
    json_path, image_dir = good_dataset(tmp_path, [(40, 40), (40, 80), (40, 40)])
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    plain = TrainDataset(json_path, image_dir, 32)
    rng = np.random.default_rng(1)
    entries = {}
    for record in plain.records[:2]:  # the third has no entry
        entries[record.path] = make_entry(rng)
        write_cache_entry(cache_path(str(cache_dir), record.path, record.size), entries[record.path])
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        ds = TrainDataset(json_path, image_dir, 32, cache_dir=str(cache_dir), real_prompt_ratio=0.0)
    assert len(ds) == 2 and ds.summary.skipped == {"missing cache entry": 1}
    sample = ds.get(1, epoch=0)
    entry = entries[ds.records[1].path]
    assert "image" not in sample and sample["caption"] == "a long caption"
    np.testing.assert_array_equal(sample["latent_mean"], entry.latent_mean)
    np.testing.assert_array_equal(sample["caption_emb"], entry.captions["sharegpt4v"][0].astype(np.float32))
    assert sample["caption_emb"].dtype == np.float32 and sample["caption_mask"].dtype == np.int32
    batch = collate([ds.get(0, 0), ds.get(0, 1)])
    assert batch["latent_std"].shape == (2, 4, 4, 2) and batch["caption_mask"].shape == (2, 7)


def test_cache_features_under_msrun_writes_the_single_process_entries(tmp_path):
    """tools/cache_features.py launched by msrun on 2 workers (each encoding every other image) writes
    the very entries of one process, and rank 0 counts them all. One image per VAE batch: CPU
    convolutions of batches of other sizes differ in the last bits (about 2e-6), which is not
    what is tested here."""
    import subprocess
    import sys

    from tests.conftest import ROOT, run_msrun

    data = tmp_path / "digits"
    subprocess.run([sys.executable, "-m", "tools.digits.prepare", "--limit", "2", "--heldout_per_digit", "1",
                    "--output_dir", str(data)], cwd=ROOT, check=True, capture_output=True)
    args = ["-c", "configs/train/pixart-digits.yaml", "--json_path", str(data / "train.json"), "--image_dir",
            str(data), "--cache_batch_size", "1"]
    single, parallel, logs = tmp_path / "single", tmp_path / "parallel", tmp_path / "logs"
    proc = subprocess.run([sys.executable, "tools/cache_features.py", *args, "--feature_cache", str(single)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker_logs = run_msrun(["tools/cache_features.py", *args, "--feature_cache", parallel], logs, timeout=600)

    def entries(folder):
        return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                      for name in names)

    assert len(entries(single)) == 11 and entries(parallel) == entries(single)  # 10 images + the null caption
    for name in entries(single):
        with np.load(single / name) as a, np.load(parallel / name) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), name
    summary = [line for text in worker_logs.values() for line in text.splitlines() if "entries written" in line]
    assert len(summary) == 1 and "10 entries written, 0 already there, 10 images, 2 workers" in summary[0], summary
