"""gradio_demo.py served for real and driven from headless Chromium (Playwright).

A tiny random PixArt-Σ (built like test_sample.py's, real file formats, real T5 tokenizer from
../shared) is served by ``python gradio_demo.py`` on a free loopback port. The browser types a
prompt, clicks Generate and reads the image back from the page; two pages submit at once and
each must get its own result; an empty prompt must be answered in the page and the server must
go on working. Chromium is Debian's (/usr/bin/chromium, installed by .ci/run); Playwright never
downloads a browser. A screenshot is left in test-artifacts/gradio_demo.png.
"""
import io
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
SERVER_START_S = 300   # imports (MindSpore, gradio) and model loading on a slow CI machine
GENERATE_S = 180       # one request, first graph compilation included


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, shared_dir):
    from tests.test_sample import build_components

    folder = tmp_path_factory.mktemp("pixart-tiny-demo")
    tokenizer = os.path.join(shared_dir, "t5_tokenizer")
    build_components(folder, tokenizer)
    ckpt = folder / "transformer.ckpt"
    subprocess.run([sys.executable, "tools/convert.py", "--source", str(folder / "transformer"), "--target", str(ckpt),
                    "--model_max_length", "300"], cwd=ROOT, check=True, capture_output=True)
    return dict(ckpt=ckpt, vae=folder / "vae", text_encoder=folder / "text_encoder",
                tokenizer=tokenizer)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    out = tmp / "out"
    cmd = [sys.executable, "gradio_demo.py", "--checkpoint", str(tiny_model["ckpt"]), "--vae_root",
           str(tiny_model["vae"]), "--text_encoder_root", str(tiny_model["text_encoder"]), "--tokenizer_root",
           tiny_model["tokenizer"], "--image_height", "64", "--image_width", "64", "--sampling_steps", "4",
           "--port", str(port), "--output_path", str(out)]
    # GRADIO_TEMP_DIR: gradio's file cache in the test's folder, not /tmp/gradio; GLOG_v=3: MindSpore errors only
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp / "gradio-cache"), GLOG_v="3")
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        # its own session, so the whole server (and anything it starts) is stopped by its group id
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail():
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + SERVER_START_S
        while not answers(url):
            if proc.poll() is not None:
                pytest.fail(f"gradio_demo.py exited with {proc.returncode} before serving:\n{log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"gradio_demo.py did not answer on {url} within {SERVER_START_S} s:\n{log_tail()}")
            time.sleep(1)
        yield types.SimpleNamespace(url=url, out=out, proc=proc, log_tail=log_tail)
    finally:
        stop(proc)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"Chromium is not installed ({CHROMIUM} is missing); the web demo test needs it: "
                    f"`apt-get install chromium` (.ci/run installs it on a clean machine)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def open_page(browser, server):
    pages = []

    def opener():
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(server.url, wait_until="domcontentloaded")
        page.wait_for_selector("#generate", timeout=60_000)
        pages.append(page)
        return page

    yield opener
    for page in pages:
        page.close()


def fill_form(page, prompt, seed, width, height, steps=None):
    page.fill("#prompt textarea", prompt)
    page.uncheck("#randomize input")
    page.fill("#seed input", str(seed))
    for elem, value in (("#width", width), ("#height", height), ("#steps", steps)):
        if value is not None:  # a slider's number box takes the value on Enter
            page.fill(f"{elem} input[type=number]", str(value))
            page.press(f"{elem} input[type=number]", "Enter")


def start_generation(page):
    """Click Generate; returns the info text before, to tell the next result from the last one."""
    before = page.input_value("#info textarea")
    page.click("#generate")
    return before


def wait_for_result(page, server, before):
    """Wait until the info line shows a new finished result; return (info, seed used, images)."""
    try:
        page.wait_for_function("([sel, before]) => { const e = document.querySelector(sel);"
                               " return e !== null && e.value.includes('saved as') && e.value !== before; }",
                               arg=["#info textarea", before], timeout=GENERATE_S * 1000)
    except Exception:
        pytest.fail(f"no result in the page within {GENERATE_S} s; page says:\n"
                    f"{page.inner_text('body')[-1500:]}\nserver log:\n{server.log_tail()}")
    sources = []
    for src in page.eval_on_selector_all("#gallery img", "els => els.map(e => e.src)"):
        if src not in sources:
            sources.append(src)
    images = []
    for src in sources:  # fetched as the browser would, then decoded: a real PNG, not just a tag
        response = page.request.get(src)
        assert response.ok, f"{src}: HTTP {response.status}"
        images.append(np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB")))
    return page.input_value("#info textarea"), int(page.input_value("#seed_used input")), images


def saved_pngs(server):
    return sorted(p for p in os.listdir(server.out) if p.endswith(".png")) if server.out.exists() else []


def test_generate_shows_and_saves_an_image(open_page, server, tiny_model, tmp_path):
    page = open_page()
    fill_form(page, "A red apple", seed=7, width=96, height=64)
    info, seed, images = wait_for_result(page, server, start_generation(page))
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "gradio_demo.png"), full_page=True)
    assert seed == 7 and "s/step" in info and "sampled at 64x96" in info, info
    assert len(images) == 1 and images[0].shape == (64, 96, 3), [im.shape for im in images]
    assert images[0].std() > 1, "the image is flat"
    saved = saved_pngs(server)
    assert saved, "nothing saved"
    meta = Image.open(server.out / saved[-1]).text
    assert meta["prompt"] == "A red apple" and meta["seed"] == "7" and meta["sampling_method"] == "dpm"
    assert np.array_equal(np.asarray(Image.open(server.out / saved[-1]).convert("RGB")), images[0])

    # the page and sample.py, given the same prompt, seed and settings, make the same image
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tiny_model["ckpt"]), "--vae_root",
                           str(tiny_model["vae"]), "--text_encoder_root", str(tiny_model["text_encoder"]),
                           "--tokenizer_root", tiny_model["tokenizer"], "--prompt", "A red apple", "--seed", "7",
                           "--image_height", "64", "--image_width", "96", "--sampling_steps", "4",
                           "--output_path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (png,) = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    from_cli = np.asarray(Image.open(tmp_path / png).convert("RGB")).astype(int)
    assert np.abs(from_cli - images[0]).max() <= 1, "the demo and sample.py disagree"


def test_two_pages_at_once_get_their_own_results(open_page, server):
    a, b = open_page(), open_page()
    fill_form(a, "a red apple", seed=11, width=96, height=64)
    fill_form(b, "a blue bird", seed=12, width=64, height=80)
    saved_before = saved_pngs(server)
    before_a, before_b = start_generation(a), start_generation(b)  # both queued before either finishes
    info_a, seed_a, images_a = wait_for_result(a, server, before_a)
    info_b, seed_b, images_b = wait_for_result(b, server, before_b)
    assert seed_a == 11 and images_a[0].shape == (64, 96, 3), (info_a, images_a[0].shape)
    assert seed_b == 12 and images_b[0].shape == (80, 64, 3), (info_b, images_b[0].shape)
    saved_after = saved_pngs(server)
    assert set(saved_before) < set(saved_after) and len(saved_after) == len(saved_before) + 2, "overwritten or lost"

    # page b now asks for a's settings: the same seed and settings give the same image, to the level
    # (the second decode of a shape runs compiled, which may move a value by one level: README, VAE)
    fill_form(b, "a red apple", seed=11, width=96, height=64)
    _, _, again = wait_for_result(b, server, start_generation(b))
    assert np.abs(again[0].astype(int) - images_a[0]).max() <= 1, "same seed and settings gave a different image"


def test_bad_input_is_answered_in_the_page_and_the_server_goes_on(open_page, server):
    page = open_page()
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    page.wait_for_selector("text=The prompt is empty", timeout=60_000)
    assert server.proc.poll() is None, "the server died on a bad request"
    assert answers(server.url)
    # a progress bar shows while sampling: watch for it, then check the next request still works
    page.evaluate("() => { window.progressSeen = false; new MutationObserver(() => {"
                  " if (document.body.innerText.includes('denoising')) window.progressSeen = true; })"
                  ".observe(document.body, {subtree: true, childList: true, characterData: true}); }")
    fill_form(page, "a small cactus", seed=3, width=64, height=64, steps=60)
    info, seed, images = wait_for_result(page, server, start_generation(page))
    assert seed == 3 and images[0].shape == (64, 64, 3), info
    assert page.evaluate("window.progressSeen"), "no progress shown while denoising"


def test_request_checks():
    """The generator's own checks, without a server: the messages the page shows."""
    from demo.generator import DemoGenerator, Request, RequestError

    from pixart.pipelines.text_to_image import SizeLimits

    pipeline = types.SimpleNamespace(trained_size=64, size_limits=SizeLimits.for_model(8, 2, 8), controlled=False)
    gen = DemoGenerator(None, None, 300, pipeline, "unused", "tiny.ckpt", max_images=4)
    assert gen.size_limits.minimum == 16 and gen.size_limits.maximum == 128 and gen.size_limits.step == 16
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in gen.aspect_ratios().values())
    gen.check(Request("a cat", height=64, width=128))
    bad = [(dict(prompt=" \n"), "prompt is empty"), (dict(width=100), "multiple of 16"),
           (dict(height=256), "from 16 to 128"), (dict(sampling_steps=0), "Steps"),
           (dict(sampling_steps=2.5), "whole number"),
           (dict(sampling_method="euler"), "Unknown sampler"), (dict(num_images=5), "from 1 to 4"),
           (dict(guidance_scale=float("nan")), "Guidance"), (dict(seed=-1), "Seed"),
           (dict(control_image=np.zeros((64, 64, 3), np.uint8)), "has no ControlNet")]
    for change, message in bad:
        fields = dict(prompt="a cat", height=64, width=64)
        fields.update(change)
        with pytest.raises(RequestError, match=message):
            gen.check(Request(**fields))
    pipeline.controlled = True
    with pytest.raises(RequestError, match="upload an edge map"):
        gen.check(Request("a cat", height=64, width=64))
    edges = np.zeros((64, 64, 3), np.uint8)
    gen.check(Request("a cat", height=64, width=64, control_image=edges))
    for change, message in [(dict(control_strength=3.0), "Control strength"),
                            (dict(control_preprocess="sobel"), "none or canny"),
                            (dict(control_image=np.zeros((0, 4), np.uint8)), "could not be read")]:
        fields = dict(prompt="a cat", height=64, width=64, control_image=edges)
        fields.update(change)
        with pytest.raises(RequestError, match=message):
            gen.check(Request(**fields))


def test_help_explains_the_flags():
    proc = subprocess.run([sys.executable, "gradio_demo.py", "-h"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--config", "--checkpoint", "--vae_root", "--text_encoder_root", "--tokenizer_root", "--dtype",
                 "--image_height", "--image_width", "--port", "--host", "--share", "--output_path"):
        assert flag in proc.stdout, flag
    assert "default 7788" in proc.stdout and "default 127.0.0.1" in proc.stdout
    assert "--latents LATENTS" not in proc.stdout  # accepted for sample.py configs, but nothing to do in a page


def test_changing_settings_reuses_the_compiled_model(tiny_model, tmp_path):
    """Sampler, steps, guidance, seed and prompt change nothing compiled; only a new shape compiles once more."""
    from mindspore.graph import api

    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.models.t5 import T5Encoder
    from pixart.models.text_encoder import load_tokenizer
    from demo.generator import DemoGenerator, Request
    from pixart.pipelines.text_to_image import PixArtPipeline

    model, _ = load_pixart(str(tiny_model["ckpt"]))
    pipeline = PixArtPipeline(model, AutoencoderKL.from_pretrained(str(tiny_model["vae"])))
    t5 = T5Encoder.from_pretrained(str(tiny_model["text_encoder"]))
    gen = DemoGenerator(load_tokenizer(tiny_model["tokenizer"]), t5, 300, pipeline, str(tmp_path), "tiny.ckpt")
    progress = []
    first = gen.generate(Request("a cat", sampling_steps=3, seed=1, height=64, width=64),
                         on_progress=lambda fraction, what: progress.append(fraction))
    assert progress[-1] == 1.0 and len(progress) >= 4 and first.seed == 1
    gen.generate(Request("a cat", sampling_steps=3, seed=2, height=64, width=64))  # the VAE decode compiles now
    compiled = len(api.ms_compile_cache)
    for sampler, steps, guidance in (("ddim", 5, 2.0), ("iddpm", 4, 7.5), ("dpm", 2, 3.0)):
        gen.generate(Request("a dog", sampling_method=sampler, sampling_steps=steps, guidance_scale=guidance, seed=None,
                             height=64, width=64))
    assert len(api.ms_compile_cache) == compiled, "a settings change recompiled the denoiser or the decoder"
    assert len(os.listdir(tmp_path)) == 5
