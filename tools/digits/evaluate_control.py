#!/usr/bin/env python
"""Rate the digits ControlNet: do the generated digits follow the control edges, and the prompt?

    python -m tools.digits.evaluate_control --controlnet models/digits-controlnet/controlnet.ckpt
    python -m tools.digits.evaluate_control --controlnet ... --per_digit 10 --picture docs/digits_controlnet.png

For held-out digits (never trained on), the control image is the Canny edge map of the digit and
the prompt names the same digit ("the digit 3"). Each is sampled twice with the same seed: by the
base model (the prompt alone) and with the ControlNet. Reported:

* edge agreement between the Canny edges of the generated image and the control edges: the
  symmetric Chamfer distance (the mean distance, in pixels, from each edge pixel of one map to the
  nearest of the other, both ways averaged) and the IoU of the edge pixels; means over the digits;
* prompt adherence of both, rated by the committed classifier (the prompt and the control agree,
  so the class should survive the control).
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controlnet", required=True, help="the control branch (.ckpt from train.py or tools/convert.py)")
    p.add_argument("--config", default="configs/inference/pixart-digits.yaml", help="the base model's inference config")
    p.add_argument("--data_dir", default="data/digits", help="prepared digits (python -m tools.digits.prepare)")
    p.add_argument("--classifier", default="models/digits-classifier", help="the judge of the digit class")
    p.add_argument("--per_digit", type=int, default=10, help="held-out digits per class")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="digit k is sampled with seed + k")
    p.add_argument("--picture", help="also save control / base / controlled rows of the first digit of each class")
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


def edge_agreement(edge_map: np.ndarray, control: np.ndarray):
    """(Chamfer distance in pixels, IoU) of two (H, W, 3) edge maps, white on black."""
    a, b = edge_map[..., 0] > 0, control[..., 0] > 0
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    pa, pb = np.argwhere(a).astype(np.float64), np.argwhere(b).astype(np.float64)
    if not len(pa) or not len(pb):
        return float(max(edge_map.shape[:2])), iou  # no edges on one side: as far as the image is wide
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return float((d.min(1).mean() + d.min(0).mean()) / 2), iou


def held_out_digits(data_dir: str, per_digit: int):
    """[(digit, (32, 32, 3) uint8 image)], the first ``per_digit`` held-out images of each class."""
    with open(os.path.join(data_dir, "heldout.json")) as f:
        records = json.load(f)
    chosen = []
    for digit in range(10):
        mine = [r for r in records if r["digit"] == digit][:per_digit]
        chosen += [(digit, np.asarray(Image.open(os.path.join(data_dir, r["path"])).convert("RGB"))) for r in mine]
    return chosen


def load_models(config: dict, controlnet: str):
    """(base pipeline, controlled pipeline, tokenizer) of the digits model."""
    from pixart.models.autoencoder_kl import AutoencoderKL
    from pixart.models.controlnet import load_control_pixart, read_controlnet
    from pixart.models.pixart_checkpoint import load_pixart
    from pixart.pipelines.text_to_image import PixArtPipeline

    base, _ = load_pixart(config["checkpoint"], input_size=config.get("input_size"),
                          pe_interpolation=config.get("pe_interpolation"))
    vae = AutoencoderKL.from_pretrained(config["vae_root"])
    controlled = load_control_pixart(base, read_controlnet(controlnet), controlnet)
    return PixArtPipeline(base, vae), PixArtPipeline(controlled, vae)


def rate(digits, config: dict, controlnet: str, classifier: str, steps: int = 20, guidance: float = 4.5,
         seed: int = 0):
    """Sample each (digit, image) of ``digits`` with the base model and with the ControlNet (the
    image's Canny edges as the control, the same seed). (report, control edge maps, images by name)."""
    from pixart.models.text_encoder import encode_prompts_staged
    from pixart.pipelines.text_to_image import TextEmbeddings
    from pixart.utils.edges import canny
    from tools.digits.classifier import load_classifier, predict
    from tools.digits.data import NUMBER_WORDS

    prompts = [f"the digit {NUMBER_WORDS[d]}" for d in range(10)]
    emb, mask = encode_prompts_staged(prompts + [""], config["text_encoder_root"], config["tokenizer_root"],
                                      config["model_max_length"])
    text, null = TextEmbeddings(emb[:-1], mask[:-1]), TextEmbeddings(emb[-1:], mask[-1:])
    base, controlled = load_models(config, controlnet)
    side = config["image_height"]
    outputs = {"base": [], "controlled": []}
    controls = [canny(image) for _, image in digits]
    for k, ((digit, _), control) in enumerate(zip(digits, controls)):
        for name, pipeline in (("base", base), ("controlled", controlled)):
            extra = {"control_image": control} if name == "controlled" else {}
            result = pipeline(text.take([digit]), null, side, side, sampling_steps=steps, guidance_scale=guidance,
                              seeds=[seed + k], use_resolution_binning=False, progress=False, **extra)
            outputs[name].append(result.images[0])
    wanted = np.array([d for d, _ in digits])
    judge = load_classifier(classifier)
    report = {"digits": len(digits), "steps": steps, "guidance": guidance}
    for name, images in outputs.items():
        predicted, _ = predict(judge, np.stack(images))
        chamfer, iou = np.mean([edge_agreement(canny(im), c) for im, c in zip(images, controls)], axis=0)
        report[name] = {"chamfer_px": float(chamfer), "edge_iou": float(iou),
                        "adherence": float((predicted == wanted).mean())}
    return report, controls, outputs


def main(argv=None) -> int:
    import yaml

    from pixart.runtime import setup_device
    from pixart.utils.images import make_grid

    args = parse_args(argv)
    setup_device("CPU")
    with open(args.config) as f:
        config = yaml.safe_load(f)
    digits = held_out_digits(args.data_dir, args.per_digit)
    report, controls, outputs = rate(digits, config, args.controlnet, args.classifier, args.steps, args.guidance,
                                     args.seed)
    print(f"{len(digits)} held-out digits, their Canny edges as the control, the same seeds:")
    for name in outputs:
        print(f"  {name:10s}  Chamfer distance {report[name]['chamfer_px']:.2f} px   edge IoU "
              f"{report[name]['edge_iou']:.3f}   prompt adherence {100 * report[name]['adherence']:.1f}%")
    if args.picture:
        first = [[d for d, _ in digits].index(d) for d in range(10)]
        rows = [controls[i] for i in first] + [outputs["base"][i] for i in first] + \
            [outputs["controlled"][i] for i in first]
        grid = make_grid(np.stack(rows), columns=10)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.picture)
        print(f"saved {args.picture}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
