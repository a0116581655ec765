"""train.py on small synthetic images in several aspect ratios with a tiny model.

The VAE and T5 are tiny random diffusers/transformers models saved as real folders; the
tokenizer is the real T5 one from ../shared. Features are cached once per module (the
cache tool is itself under test) so most runs train from the cache.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, run_msrun

TINY_MODEL = {"depth": 2, "hidden_size": 64, "num_heads": 4, "caption_channels": 32, "model_max_length": 16,
              "input_size": 8, "pe_interpolation": 0.125}
SIZES = [(64, 64)] * 4 + [(48, 80)] * 4 + [(80, 48)] * 4  # three buckets of four images


def make_images(folder, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "images", exist_ok=True)
    records = []
    for i, (h, w) in enumerate(sizes):
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = 255 - img[0, 0]
        name = f"img{i:02d}.png"
        Image.fromarray(img).save(folder / "images" / name)
        records.append({"path": name, "prompt": f"a square number {i}", "sharegpt4v": f"a picture {i}",
                        "height": h, "width": w, "ratio": h / w})
    with open(folder / "labels.json", "w") as f:
        json.dump(records, f)
    return folder / "labels.json", folder / "images"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_dir):
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval().save_pretrained(folder / "t5")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
                  block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256).eval().save_pretrained(folder / "vae")
    labels, images = make_images(folder)
    config = folder / "tiny.yaml"
    config.write_text("\n".join([
        f"json_path: {labels}", f"image_dir: {images}", f"vae_root: {folder / 'vae'}",
        f"text_encoder_root: {folder / 't5'}", f"tokenizer_root: {os.path.join(shared_dir, 't5_tokenizer')}",
        f"model_config: '{json.dumps(TINY_MODEL)}'", "image_size: 64", "multi_scale: true", "batch_size: 4",
        "optimizer: adamw", "lr: 1.0e-3", "weight_decay: 0.0", "betas: [0.9, 0.999]", "eps: [1.0e-8]",
        "warmup_steps: 0", "grad_clip: 1.0", "ema_decay: 0.99", "log_every: 1", "tensorboard: false",
        "progress: false", "num_workers: 0"]) + "\n")
    cache = folder / "cache"
    run_tool("tools/cache_features.py", "-c", config, "--feature_cache", cache)
    return {"folder": folder, "config": config, "cache": cache}


def run_tool(script, *args, env=None, check=True):
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def train(ws, output, *args, check=True):
    return run_tool("train.py", "-c", ws["config"], "--output_path", output, *args, check=check)


def final_weights(output, step):
    """The trained weights of a checkpoint: the model's, or a LoRA run's adapter factors."""
    from pixart.models.pixart_checkpoint import read_mindspore_checkpoint
    from pixart.utils.safetensors_io import load_file

    folder = os.path.join(output, "checkpoints", f"step-{step:08d}")
    if os.path.isdir(os.path.join(folder, "adapter")):
        return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))
    return read_mindspore_checkpoint(os.path.join(folder, "model.ckpt"))[0]


@pytest.fixture(scope="module")
def base_checkpoint(workspace):
    """Random base weights of the tiny architecture (every layer non-zero) for LoRA runs."""
    from pixart.models.pixart import PixArtConfig, build_model
    from pixart.models.pixart_checkpoint import save_mindspore_checkpoint

    config = PixArtConfig(**TINY_MODEL)
    rng = np.random.default_rng(3)
    weights = {name: (p.asnumpy() + rng.standard_normal(p.shape) * 0.05).astype(np.float32)
               for name, p in build_model(config).parameters_and_names()}
    path = workspace["folder"] / "base.ckpt"
    save_mindspore_checkpoint(weights, config, str(path))
    return path


@pytest.fixture(scope="module")
def reference_run(workspace, base_checkpoint, tmp_path_factory):
    """``reference_run(kind)``: the output folder of one uninterrupted single-process run of 8
    steps with a checkpoint every 2 (all kept), trained once per kind for every test that compares
    against it. A step's weights do not depend on --max_steps or on the checkpoints written
    (tested: the runs compared against these stop at other steps)."""
    runs = {}

    def run(kind):
        if kind not in runs:
            runs[kind] = tmp_path_factory.mktemp(f"reference-{kind}") / "run"
            train(workspace, runs[kind], "--feature_cache", workspace["cache"], "--max_steps", "8", "--ckpt_every",
                  "2", "--keep_last", "0", *kind_args(kind, base_checkpoint))
        return runs[kind]

    return run


def kind_args(kind, base):
    """Flags of a full finetune, a LoRA finetune, or an LCM distillation of the base."""
    return {"full": [], "lora": ["--checkpoint", base, "--lora_rank", "4", "--lora_alpha", "8"],
            "lcm": ["--checkpoint", base, "--objective", "lcm", "--ema_decay", "0.95", "--class_dropout_prob", "0"]}[kind]


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def without_key_biases(weights):
    """The weights less the attention key biases. Softmax ignores a key bias (it adds the same
    q.b to every score of a row), so its gradient is rounding noise, which Adam turns into steps
    of the learning rate whichever way it rounds (measured up to 1.3e-5 at lr 1e-3 between one
    process and two workers; everything else within 2.5e-6)."""
    out = dict(weights)
    for name, value in weights.items():
        if name.endswith("attn.qkv.bias"):
            n = len(value) // 3
            out[name] = np.concatenate([value[:n], value[2 * n:]])
        elif name.endswith("cross_attn.kv_linear.bias"):
            out[name] = value[len(value) // 2:]
    return out


def read_log(output):
    import csv
    with open(os.path.join(output, "train_log.csv")) as f:
        return list(csv.DictReader(f))


def test_loss_goes_down(workspace, tmp_path):
    out = tmp_path / "run"
    # measured: the mean loss of steps 71-100 is 0.16x that of steps 1-30 (0.22x at step 300)
    train(workspace, out, "--feature_cache", workspace["cache"], "--max_steps", "100", "--ckpt_every", "1000")
    losses = np.array([float(r["loss"]) for r in read_log(out)])
    assert len(losses) == 100
    first, last = losses[:30].mean(), losses[-30:].mean()
    assert last < 0.7 * first, f"loss did not fall: first 30 steps {first:.4f}, last 30 {last:.4f}"
    assert os.path.isfile(out / "checkpoints" / "step-00000100" / "ema.ckpt")


def test_images_and_cache_train_the_same(workspace, reference_run, tmp_path):
    images = tmp_path / "images"
    proc = train(workspace, images, "--max_steps", "2", "--resume", "latest")
    assert "no checkpoint in" in proc.stderr and "starting fresh" in proc.stderr  # nothing to resume yet
    assert max_diff(final_weights(images, 2), final_weights(reference_run("full"), 2)) < 1e-5


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_dynamic_shapes_and_streamed_mode_train_as_one_graph_per_bucket(workspace, base_checkpoint, reference_run,
                                                                        tmp_path, kind):
    static, dynamic, streamed = reference_run(kind), tmp_path / "dynamic", tmp_path / "streamed"
    common = ["--feature_cache", workspace["cache"], "--max_steps", "4", *kind_args(kind, base_checkpoint)]
    # 4 steps of 4 images: every one of the 3 buckets; validation samples through the same model
    validation = ["--validation_every", "4", "--validation_prompts", "a square", "--validation_steps", "2"]
    train(workspace, dynamic, *common, "--dynamic_shapes", "true", *validation)
    assert max_diff(final_weights(static, 4), final_weights(dynamic, 4)) < 1e-6
    assert os.listdir(dynamic / "validation" / "step-00000004")
    if kind == "full":  # --mode streamed trains every weight; its validation streams too
        train(workspace, streamed, *common, "--mode", "streamed", *validation)
        assert max_diff(without_key_biases(final_weights(static, 4)),
                        without_key_biases(final_weights(streamed, 4))) < 1e-5
        assert os.listdir(streamed / "validation" / "step-00000004")
    else:
        refused = train(workspace, streamed, *common, "--mode", "streamed", check=False)
        assert refused.returncode != 0
        assert "--mode streamed trains every weight" in refused.stderr.strip().splitlines()[-1]
        assert not streamed.exists()


def test_recompute_trains_as_without(workspace, base_checkpoint, reference_run, tmp_path):
    """--recompute (activation checkpointing, with LoRA adapters inside the recomputed cells)."""
    out = tmp_path / "recompute"
    train(workspace, out, "--feature_cache", workspace["cache"], "--max_steps", "2", *kind_args("lora", base_checkpoint),
          "--recompute", "true")
    assert max_diff(final_weights(reference_run("lora"), 2), final_weights(out, 2)) < 1e-6


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_kill_and_resume_matches_uninterrupted(workspace, base_checkpoint, reference_run, tmp_path, kind):
    straight, interrupted = reference_run(kind), tmp_path / "interrupted"
    common = ["--feature_cache", workspace["cache"], "--max_steps", "8", "--ckpt_every", "2", "--keep_last", "2",
              *kind_args(kind, base_checkpoint)]
    proc = subprocess.Popen([sys.executable, "train.py", "-c", str(workspace["config"]), "--output_path",
                             str(interrupted), *map(str, common)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = interrupted / "checkpoints" / "step-00000004"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists()
    assert not (interrupted / "checkpoints" / "step-00000008").exists(), "the run finished before it was killed"
    train(workspace, interrupted, *common, "--resume", "latest")
    assert max_diff(final_weights(straight, 8), final_weights(interrupted, 8)) < 1e-6
    steps = [int(r["step"]) for r in read_log(interrupted)]
    assert steps == list(range(1, 9)), steps
    assert len(os.listdir(interrupted / "checkpoints")) == 2  # keep_last


@pytest.mark.parametrize("kind", ["full", "lora", "lcm"])
def test_two_workers_match_one_process(workspace, base_checkpoint, reference_run, tmp_path, kind):
    single, parallel = reference_run(kind), tmp_path / "parallel"  # one process, batch 4
    common = ["--feature_cache", workspace["cache"], "--max_steps", "4", "--ckpt_every", "4",
              *kind_args(kind, base_checkpoint)]
    logs = tmp_path / "msrun_logs"
    # rank 0 alone validates, then both ranks meet in a barrier; it must change nothing of the training
    validation = ["--validation_every", "2", "--validation_prompts", "a cat", "--validation_steps", "2"] \
        if kind == "full" else []
    # the LoRA and LCM workers compile one graph for every bucket: still the single process's training
    dynamic = ["--dynamic_shapes", "true"] if kind != "full" else []
    worker_logs = run_msrun(["train.py", "-c", workspace["config"], "--output_path", parallel, *common, *validation,
                             *dynamic, "--batch_size", "2", "--use_parallel", "True"], logs)
    assert max_diff(*(without_key_biases(final_weights(out, 4)) for out in (single, parallel))) < 1e-5
    if validation:
        assert sorted(os.listdir(parallel / "validation")) == ["step-00000002", "step-00000004"]
    checksums = {line.split("checksum")[1].strip() for text in worker_logs.values()
                 for line in text.splitlines() if "weights checksum" in line}
    assert len(worker_logs) == 2 and len(checksums) == 1, checksums


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_draws_its_rows_of_the_single_process_draws(world):
    """Noise, timesteps and drop flags of a rank's rows equal those rows of a 1-process run."""
    from pixart.diffusion.objectives import DiffusionObjective, LCMObjective
    from pixart.training.trainer import draw_sample_noise

    g, shape = 8, (4, 6, 5)
    for draw_timesteps in (DiffusionObjective.draw_timesteps, LCMObjective.draw_timesteps):
        single = draw_sample_noise(draw_timesteps, 7, 3, range(g), shape, 0.5)
        b = g // world
        ranks = [draw_sample_noise(draw_timesteps, 7, 3, range(r * b, (r + 1) * b), shape, 0.5) for r in range(world)]
        for whole, parts in zip(single, zip(*ranks)):
            np.testing.assert_array_equal(whole, np.concatenate(parts))
    t, noise, posterior_noise, drop = single
    assert t.dtype == np.int32 and noise.shape == posterior_noise.shape == (g, *shape) and drop.dtype == bool
    # every sample and every micro-batch draws its own numbers
    assert len(set(t.tolist())) > 1 and 0 < drop.sum() < g
    assert len({noise[i].tobytes() for i in range(g)}) == g and not np.array_equal(noise, posterior_noise)
    assert not np.array_equal(draw_sample_noise(draw_timesteps, 7, 4, range(g), shape, 0.5)[1], noise)


@pytest.mark.parametrize("rank,world,validated,barriers", [(0, 1, 1, 0), (0, 2, 1, 1), (1, 2, 0, 1)])
def test_validation_on_rank_0_ends_in_a_barrier_of_every_rank(monkeypatch, rank, world, validated, barriers):
    from pixart.training import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "all_reduce_sum", lambda values: calls.append("barrier") or values)
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)  # the loop's bookkeeping, no model
    trainer.rank, trainer.world, trainer.is_main = rank, world, rank == 0
    trainer.validate = lambda step: calls.append(f"validate {step}")
    trainer.validate_and_wait(6)
    assert calls == ["validate 6"] * validated + ["barrier"] * barriers


def test_bad_config_key_and_missing_data(workspace, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(workspace["config"].read_text() + "learning_rate: 0.1\n")
    proc = run_tool("train.py", "-c", bad, check=False)
    assert proc.returncode == 2 and "unknown key(s) learning_rate" in proc.stderr
    proc = train(workspace, tmp_path / "x", "--image_dir", tmp_path / "nowhere", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    for flags, message in ((["--attention", "flash"], "--attention flash cannot run here: flash attention runs on "
                                                      "Ascend NPUs only, not on CPU"),
                           (["--jit_level", "O2"], "--jit_level O2 (the GE backend) runs on Ascend only"),
                           (["--dtype", "bf16"], "--dtype bf16 is not supported on CPU")):
        proc = train(workspace, tmp_path / "y", *flags, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-800:]
        assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------ one run per folder, safe resume

def checkpoint_steps(output):
    return sorted(os.listdir(output / "checkpoints"))


def test_a_second_run_into_a_used_folder_is_refused_unless_asked(workspace, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run("full"), out)
    common = ["--feature_cache", workspace["cache"], "--ckpt_every", "2"]
    before = {name: os.path.getmtime(out / "checkpoints" / name / "model.ckpt") for name in checkpoint_steps(out)}
    log_before = read_log(out)
    proc = train(workspace, out, *common, "--max_steps", "2", "--seed", "7", check=False)
    assert proc.returncode == 1 and "already holds a training run (checkpoints up to step 8)" in proc.stderr
    assert "--resume latest" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert {n: os.path.getmtime(out / "checkpoints" / n / "model.ckpt") for n in checkpoint_steps(out)} == before
    assert read_log(out) == log_before
    train(workspace, out, *common, "--max_steps", "2", "--seed", "7", "--overwrite", "True")
    assert checkpoint_steps(out) == ["step-00000002"] and len(read_log(out)) == 2
    with open(out / "checkpoints" / "step-00000002" / "state.json") as f:
        recorded = json.load(f)["config"]
    assert recorded["seed"] == 7 and recorded["lr"] == 1e-3 and recorded["architecture"]["hidden_size"] == 64


def test_resume_problems_are_messages_and_latest_skips_a_broken_checkpoint(workspace, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run("full"), out)  # checkpoints at steps 2, 4, 6, 8
    common = ["--feature_cache", workspace["cache"], "--ckpt_every", "2", "--keep_last", "0"]
    for resume, message in (("lastest", "did you mean 'latest'"), (str(tmp_path / "nowhere"), "not a checkpoint folder")):
        proc = train(workspace, out, *common, "--max_steps", "9", "--resume", resume, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    newest = out / "checkpoints" / "step-00000008"
    with open(newest / "model.ckpt", "r+b") as f:  # cut short, as a disk that filled up mid-write would
        f.truncate(100)
    proc = train(workspace, out, *common, "--max_steps", "9", "--resume", str(newest), check=False)
    assert proc.returncode == 1 and "cannot be loaded" in proc.stderr and "step-00000006" in proc.stderr
    proc = train(workspace, out, *common, "--max_steps", "7", "--resume", "latest", "--lr", "5e-4")
    assert "step-00000008 cannot be loaded" in proc.stderr and "resumed from" in proc.stderr
    assert "step-00000006" in proc.stderr and "lr: 0.001 -> 0.0005" in proc.stderr
    assert [int(r["step"]) for r in read_log(out)][-1] == 7


def test_train_refuses_weights_of_another_architecture(workspace, reference_run, tmp_path):
    other = dict(TINY_MODEL, hidden_size=32, num_heads=2)
    proc = train(workspace, tmp_path / "other", "--feature_cache", workspace["cache"], "--max_steps", "1",
                 "--checkpoint", reference_run("full") / "checkpoints" / "step-00000002" / "model.ckpt",
                 "--model_config", json.dumps(other), check=False)
    assert proc.returncode == 1 and "does not match the model" in proc.stderr and "Traceback" not in proc.stderr
    assert "shape mismatch" in proc.stderr


def test_lora_training_keeps_the_base_and_saves_a_peft_adapter(workspace, base_checkpoint, tmp_path):
    """In process: after LoRA training every base weight is bit-identical, only adapters moved,
    and the checkpoint holds the adapter (and its EMA) as PEFT folders, no copy of the base."""
    from pixart.cli import parse_with_config
    from pixart.cli.training import build_parser
    from pixart.models.lora import read_lora
    from pixart.models.pixart_checkpoint import read_mindspore_checkpoint
    from pixart.training.config import TrainConfig, model_config
    from pixart.training.trainer import Trainer

    out = tmp_path / "lora"
    args = parse_with_config(build_parser(""), ["-c", str(workspace["config"]), "--output_path", str(out),
                                                "--feature_cache", str(workspace["cache"]), "--max_steps", "3",
                                                *map(str, kind_args("lora", base_checkpoint))])
    cfg = TrainConfig.from_namespace(args)
    trainer = Trainer(cfg, model_config(cfg))
    trainer.fit()
    base, _ = read_mindspore_checkpoint(str(base_checkpoint))
    after = {name: p.asnumpy() for name, p in trainer.model.parameters_and_names()}
    for name, value in base.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    moved = [p for p in trainer.step.params if "lora_A" in p.name or "lora_B" in p.name]
    assert moved and all(".adapter." in p.name for p in trainer.step.params)
    assert any(np.abs(p.asnumpy()).max() > 0 for p in moved if "lora_B" in p.name)  # B started at zero
    folder = out / "checkpoints" / "step-00000003"
    assert sorted(os.listdir(folder)) == ["adapter", "adapter_ema", "optimizer.ckpt", "state.json"]
    lora = read_lora(str(folder / "adapter"))
    assert len(lora.factors) == len(moved) // 2 and "pos_embed.proj" in lora.factors
    with open(folder / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs", "train"))))
def test_train_configs_parse(name):
    from pixart.cli import parse_with_config
    from pixart.cli.training import build_parser
    from pixart.training.config import TrainConfig

    args = parse_with_config(build_parser(""), ["-c", os.path.join(ROOT, "configs", "train", name),
                                                "--json_path", "x.json", "--image_dir", "."])
    cfg = TrainConfig.from_namespace(args)
    spec = cfg.lora_spec()
    assert spec is not None if "lora" in name else (spec is None) == (cfg.lora_rank == 0)
    if spec:
        assert spec.rank_and_scale("transformer_blocks.0.attn1.to_q") == (cfg.lora_rank, 1.0)
        assert cfg.checkpoint.startswith("models/")


def test_controlnet_training_keeps_the_base_and_resumes(workspace, base_checkpoint, tmp_path):
    """train.py --controlnet_blocks on Canny edges of the images (computed, no cache): only the
    branch is trained and saved; a kill-free resume continues it; the branch starts as copies."""
    from pixart.models.controlnet import load_control_pixart, read_controlnet
    from pixart.models.pixart_checkpoint import load_pixart

    out = tmp_path / "control"
    common = ["--checkpoint", base_checkpoint, "--controlnet_blocks", "1", "--control_preprocess", "canny",
              "--ckpt_every", "2", "--keep_last", "0", "--class_dropout_prob", "0.5"]
    train(workspace, out, *common, "--max_steps", "2")
    train(workspace, out, *common, "--max_steps", "3", "--resume", "latest")
    folder = out / "checkpoints" / "step-00000003"
    assert sorted(os.listdir(folder)) == ["controlnet.ckpt", "controlnet_ema.ckpt", "optimizer.ckpt", "state.json"]
    control = read_controlnet(str(folder / "controlnet.ckpt"))
    assert sorted({k.split(".")[1] for k in control}) == ["0"]
    assert np.abs(control["controlnet.0.after_proj.weight"]).max() > 0  # trained away from zero
    base, _ = load_pixart(str(base_checkpoint))
    model = load_control_pixart(base, control)  # loads onto the unchanged base
    assert not model.zero_projections()


def test_two_stage_recipe_class_dit_then_text_pixart(workspace, tmp_path):
    """Stage 1 trains a class-conditional DiT from the label file's class ids (from the cache, no
    T5); stage 2 starts the text-conditioned PixArt from it: exactly the shared tensors are loaded
    (lr 1e-12 keeps them as loaded), the run lists loaded / new / dropped, mismatches are refused."""
    from pixart.models.pixart_checkpoint import read_mindspore_checkpoint

    with open(workspace["folder"] / "labels.json") as f:
        records = json.load(f)
    labels = tmp_path / "classes.json"  # class ids and no captions
    labels.write_text(json.dumps([dict(path=r["path"], class_id=i % 3) for i, r in enumerate(records)]))
    dit = ["--model", "DiT-XL-2-256x256", "--model_config", json.dumps(
        {"depth": 2, "hidden_size": 64, "num_heads": 4, "input_size": 8, "num_classes": 3})]
    class_cache = tmp_path / "class-cache"
    run_tool("tools/cache_features.py", "-c", workspace["config"], "--json_path", labels, "--feature_cache",
             class_cache, *dit)
    stage1 = tmp_path / "stage1"
    train(workspace, stage1, "--feature_cache", class_cache, "--json_path", labels, "--max_steps", "3", *dit)
    assert np.isfinite([float(r["loss"]) for r in read_log(stage1)]).all()
    stage1_ckpt = stage1 / "checkpoints" / "step-00000003" / "model.ckpt"
    class_weights = read_mindspore_checkpoint(str(stage1_ckpt))[0]
    assert "y_embedder.embedding_table.weight" in class_weights
    # the DiT's cache holds latents only: cached again for the text model, every entry is redone
    proc = run_tool("tools/cache_features.py", "-c", workspace["config"], "--feature_cache", class_cache)
    assert f"{len(records)} entries written, 0 already there" in proc.stdout, proc.stdout[-1000:]

    stage2 = tmp_path / "stage2"
    proc = train(workspace, stage2, "--feature_cache", workspace["cache"], "--max_steps", "1", "--lr", "1e-12",
                 "--init_from", stage1_ckpt)
    report = proc.stderr + proc.stdout
    assert "loaded 24 tensors, 22 new, 7 dropped" in report, report[-3000:]
    assert "dropped: blocks.{0-1}.adaLN_modulation.1.bias" in report
    text_weights = final_weights(stage2, 1)
    shared = [k for k in text_weights if k in class_weights]
    assert len(shared) == 24 and "blocks.1.attn.qkv.weight" in shared and "t_embedder.mlp.2.weight" in shared
    for name in shared:
        np.testing.assert_allclose(text_weights[name], class_weights[name], rtol=0, atol=1e-9, err_msg=name)

    wider = dict(TINY_MODEL, hidden_size=32, num_heads=2)
    for extra, message in [(["--model_config", json.dumps(wider)], "other shapes, so it is another architecture"),
                           (["--checkpoint", stage1_ckpt], "give one of them")]:
        proc = train(workspace, tmp_path / "refused", "--feature_cache", workspace["cache"], "--max_steps", "1",
                     "--init_from", stage1_ckpt, *extra, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    missing = tmp_path / "no-class.json"
    missing.write_text(json.dumps(records))
    proc = train(workspace, tmp_path / "no-class", "--feature_cache", workspace["cache"], "--json_path", missing,
                 "--max_steps", "1", *dit, check=False)
    assert proc.returncode == 1 and "bad class id" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
