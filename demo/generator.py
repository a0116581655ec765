"""The web demo's model side: models loaded once, a request checked, images generated and saved.

Kept apart from ``gradio_demo.py`` (the page) so that it has no gradio in it and can be tested
alone. One ``DemoGenerator`` owns one set of models; a lock makes sure they run one
request at a time whatever the web server's threading, because a MindSpore cell (and its compiled
graph) is not meant to be called from two threads at once.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from pixart.data.buckets import bucket_table
from pixart.diffusion.samplers import SAMPLERS
from pixart.errors import InputError, RequestError
from pixart.models.text_encoder import check_prompt, encode_prompts, normalize_prompt
from pixart.pipelines.text_to_image import PixArtPipeline, TextEmbeddings
from pixart.utils.images import generation_metadata, save_png, slug
from pixart.utils.seeds import MAX_SEED, image_seeds

MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_LORA_STRENGTH = 2.0


@dataclasses.dataclass
class Request:
    prompt: str
    negative_prompt: str = ""
    sampling_method: str = "dpm"
    sampling_steps: int = 20
    guidance_scale: float = 4.5
    seed: Optional[int] = None      # None: draw a random one (reported back)
    height: int = 1024
    width: int = 1024
    num_images: int = 1
    lora_strength: float = 1.0      # multiplies every --lora_scale (0: the base model alone)
    control_image: Optional[np.ndarray] = None   # (H, W, 3) uint8, for a ControlNet model
    control_strength: float = 1.0
    control_preprocess: str = "none"             # none: the image is an edge map; canny: make one


@dataclasses.dataclass
class MergedLoras:
    """The LoRA adapters merged into the demo's transformer: their names and the --lora_scale
    values that strength 1 means."""
    merger: object                  # pixart.models.lora.LoraMerger
    names: List[str]
    scales: List[float]

    def apply(self, strength: float) -> str:
        """Merge at ``strength`` times the scales (exactly: from the base weights); a metadata label."""
        scales = [s * strength for s in self.scales]
        self.merger.set_scales(scales)
        return ", ".join(f"{name}@{scale:g}" for name, scale in zip(self.names, scales))


@dataclasses.dataclass
class Generation:
    images: List[np.ndarray]        # (H, W, 3) uint8 each
    paths: List[str]                # the saved PNGs, in the same order
    seed: int                       # image k used seed + k
    info: str                       # one line for the page: sizes, timing, where saved
    control: Optional[np.ndarray] = None  # the edge map the images followed (ControlNet models)


class DemoGenerator:
    """Text encoder + pipeline kept in memory between requests.

    The T5 encoder stays loaded (unlike sample.py, which releases it before loading the transformer)
    because every request encodes its prompt. The pipeline's compiled denoiser is reused: sampler,
    steps, guidance, seed and prompt are inputs to one compiled graph; only a new latent shape (size
    or number of images) or a prompt in another 64-token length step (``TextEmbeddings.trimmed``)
    compiles another.
    """

    def __init__(self, tokenizer, text_encoder, max_length: int, pipeline: PixArtPipeline, output_path: str,
                 checkpoint_name: str, use_resolution_binning: bool = True, max_images: int = 4,
                 loras: Optional[MergedLoras] = None):
        self.loras = loras
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self.pipeline = pipeline
        self.output_path = output_path
        self.checkpoint_name = checkpoint_name
        self.use_resolution_binning = use_resolution_binning
        self.max_images = max_images
        self._lock = threading.Lock()

    @property
    def base_size(self) -> int:
        """The square image size, in pixels, the transformer was trained at."""
        return self.pipeline.trained_size

    @property
    def size_limits(self):
        return self.pipeline.size_limits

    def aspect_ratios(self) -> Dict[str, Tuple[int, int]]:
        """Choices for the page: "H x W (ratio)" -> (height, width), the inference buckets of this model's size."""
        table = bucket_table(self.base_size, test=True)
        return {f"{h} x {w}  (h/w {ratio})": (h, w) for ratio, (h, w) in table.items()}

    def check(self, request: Request) -> None:
        """Raise RequestError with a message for the page if ``request`` cannot be generated."""
        try:
            check_prompt(request.prompt, "The prompt")
        except InputError as e:
            raise RequestError(f"{e}.") from None
        if request.sampling_method not in SAMPLERS:
            raise RequestError(f"Unknown sampler {request.sampling_method!r}; choose one of {', '.join(SAMPLERS)}.")
        if not _is_int(request.sampling_steps) or not 1 <= request.sampling_steps <= MAX_STEPS:
            raise RequestError(f"Steps must be a whole number from 1 to {MAX_STEPS}, got {request.sampling_steps}.")
        if not _is_number(request.guidance_scale) or not 0 <= request.guidance_scale <= MAX_GUIDANCE:
            raise RequestError(f"Guidance scale must be between 0 and {MAX_GUIDANCE:g}, got {request.guidance_scale}.")
        if request.seed is not None and (not _is_int(request.seed) or not 0 <= request.seed <= MAX_SEED):
            raise RequestError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {request.seed}.")
        if not _is_int(request.num_images) or not 1 <= request.num_images <= self.max_images:
            raise RequestError(f"Number of images must be from 1 to {self.max_images}, got {request.num_images}.")
        if not _is_number(request.lora_strength) or not 0 <= request.lora_strength <= MAX_LORA_STRENGTH:
            raise RequestError(f"LoRA strength must be between 0 and {MAX_LORA_STRENGTH:g}, got {request.lora_strength}.")
        controlled = self.pipeline.controlled
        if controlled and request.control_image is None:
            raise RequestError("This model is steered by a control image: upload an edge map (or a photo with "
                               "Canny edges).")
        if request.control_image is not None:
            if not controlled:
                raise RequestError("This model has no ControlNet: a control image cannot steer it.")
            image = request.control_image
            if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
                raise RequestError("The control image could not be read.")
            if not _is_number(request.control_strength) or not 0 <= request.control_strength <= 2:
                raise RequestError(f"Control strength must be between 0 and 2, got {request.control_strength}.")
            if request.control_preprocess not in ("none", "canny"):
                raise RequestError(f"Control preprocessing must be none or canny, got {request.control_preprocess!r}.")
        lim = self.size_limits
        for name, value in (("Width", request.width), ("Height", request.height)):
            if not _is_int(value) or not lim.minimum <= value <= lim.maximum or value % lim.step:
                raise RequestError(f"{name} must be a multiple of {lim.step} from {lim.minimum} to {lim.maximum} "
                                   f"pixels for this model, got {value}.")

    def generate(self, request: Request,
                 on_progress: Optional[Callable[[float, str], None]] = None) -> Generation:
        """Check, encode, sample, save. ``on_progress(fraction, what)`` is called as work advances.
        Raises RequestError for a bad request; the same request with the same seed gives the same images."""
        self.check(request)
        report = on_progress or (lambda fraction, what: None)
        n = request.num_images
        seeds = image_seeds(n, request.seed)  # as sample.py: image k can be regenerated alone from seed + k
        seed = seeds[0]
        steps_label = f"{request.sampling_method}, {request.sampling_steps} steps"
        control = self.control_edges(request)
        with self._lock:
            lora_label = self.loras.apply(request.lora_strength) if self.loras else ""
            report(0.0, "encoding the prompt")
            texts = [normalize_prompt(request.prompt), normalize_prompt(request.negative_prompt)]  # as sample.py
            emb, mask = encode_prompts(texts, self.tokenizer, self.text_encoder, self.max_length)
            cond, uncond = TextEmbeddings(emb[:1], mask[:1]).repeat(n), TextEmbeddings(emb[1:], mask[1:]).repeat(n)
            try:
                result = self.pipeline(cond, uncond, request.height, request.width,
                                       sampling_method=request.sampling_method,
                                       sampling_steps=request.sampling_steps,
                                       guidance_scale=request.guidance_scale, seeds=seeds,
                                       use_resolution_binning=self.use_resolution_binning, progress=False,
                                       step_callback=lambda i, total: report(i / total, f"denoising ({steps_label})"),
                                       control_image=control, control_strength=request.control_strength)
            except InputError as e:  # the pipeline's own checks, e.g. a size the model cannot sample
                raise RequestError(str(e)) from None
        gen_h, gen_w = result.generated_size
        paths = []
        for image, image_seed in zip(result.images, seeds):
            meta = generation_metadata(request.prompt, request.negative_prompt, image_seed, request.sampling_method,
                                       request.sampling_steps, request.guidance_scale, self.checkpoint_name,
                                       (request.height, request.width), (gen_h, gen_w), lora_label)
            paths.append(save_png(image, self.output_path, slug(request.prompt), meta))
        binned = "" if (gen_h, gen_w) == (request.height, request.width) else " (nearest trained aspect ratio)"
        seeds_text = f"seed {seed}" if n == 1 else f"seeds {seed}..{seed + n - 1}"
        names = [os.path.basename(p) for p in paths]
        saved = names[0] if n == 1 else f"{names[0]} .. {names[-1]}"
        info = (f"{n} image(s) of {request.height}x{request.width}, sampled at {gen_h}x{gen_w}{binned}; "
                f"{steps_label}: {result.seconds_per_step:.3f} s/step, {result.total_seconds:.1f} s in all; "
                f"{seeds_text}; saved as {saved}")
        return Generation(list(result.images), paths, seed, info, control)

    @staticmethod
    def control_edges(request: Request) -> Optional[np.ndarray]:
        """The request's control image as an (H, W, 3) uint8 edge map (Canny's when asked), or None."""
        image = request.control_image
        if image is None:
            return None
        image = np.asarray(image)
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        image = image.astype(np.uint8)
        if request.control_preprocess == "canny":
            from pixart.utils.edges import canny
            image = canny(image)
        return image


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
