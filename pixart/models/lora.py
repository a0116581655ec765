"""LoRA for the PixArt transformer, in the formats PyTorch users already have.

A LoRA adapter adds ``scale * B A x`` to a layer's output (A: rank x in, B: out x rank); for
the patch-embedding conv, A is a conv with the patch kernel and B a 1x1 conv, which on the
flattened patches our patch embedding computes are the same two matmuls.

Names and scales are PEFT's, on diffusers' ``PixArtTransformer2DModel`` module names:
``transformer_blocks.0.attn1.to_q`` and so on (``pixart_checkpoint.diffusers_modules`` maps our
layers to them; our fused ``attn.qkv`` carries the q, k and v adapters on its three row
blocks). Which modules are adapted, with which rank and scale: ``lora_spec.LoraSpec``.

* Training: :func:`attach_lora` puts trainable :class:`LoRA` cells on the targeted layers
  (the base stays frozen); :func:`save_peft` writes them as a PEFT adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
  loads onto diffusers' model.
* Inference: :func:`read_lora` reads a PEFT folder (the official PixArt LoRA script's, mindone's,
  ours) or a single-file ``pytorch_lora_weights.safetensors`` (diffusers ``save_lora_weights``);
  :class:`LoraMerger` adds them into the base weights once, and changes the scale exactly by
  starting again from the kept base weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from pixart.errors import ModelLoadError
from pixart.models.lora_spec import CONFIG_NAME, LoraSpec
from pixart.models.pixart import dense
from pixart.models.pixart_checkpoint import diffusers_modules

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SINGLE_FILE_PREFIXES = ("transformer.", "unet.")

# ------------------------------------------------------------------------------------- the cells

class LoRAPart(nn.Cell):
    """One module's factors: ``lora_A`` (r, in), ``lora_B`` (out, r), times ``scale``."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.lora_A = Parameter(Tensor(np.zeros((rank, in_features), np.float32)), name="lora_A")
        self.lora_B = Parameter(Tensor(np.zeros((out_features, rank), np.float32)), name="lora_B")
        self.scale = float(scale)

    def construct(self, x):
        return dense(dense(x, self.lora_A.astype(x.dtype)), self.lora_B.astype(x.dtype)) * self.scale

    def delta_weight(self) -> np.ndarray:
        return (self.lora_B.asnumpy().astype(np.float64) @ self.lora_A.asnumpy()) * self.scale


class LoRA(nn.Cell):
    """The adapter of one of our layers: the LoRAs of the diffusers modules it computes, each on
    its rows of the output (a fused q/k/v projection has up to three; rows of an untargeted
    module get nothing). ``construct(x)`` is the addition to the layer's output.

    rows: (first row, end row) of every module the layer computes, in order; parts: the
    ``LoRAPart`` of each, None where the module is not targeted."""

    def __init__(self, rows: Sequence[Tuple[int, int]], parts: Sequence[Optional[LoRAPart]], dropout: float = 0.0):
        super().__init__()
        self.rows = tuple(rows)
        self.part_index = tuple(-1 if part is None else sum(q is not None for q in parts[:i])
                                for i, part in enumerate(parts))
        self.parts = nn.CellList([part for part in parts if part is not None])
        self.out_features = self.rows[-1][1]
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None

    def construct(self, x):
        if self.dropout is not None:
            x = self.dropout(x)
        pieces = []
        for i in range(len(self.rows)):
            if self.part_index[i] >= 0:
                pieces.append(self.parts[self.part_index[i]](x))
            else:
                start, end = self.rows[i]
                pieces.append(ops.zeros(x.shape[:-1] + (end - start,), x.dtype))
        return pieces[0] if len(pieces) == 1 else ops.concat(pieces, axis=-1)

    def part(self, i: int) -> Optional[LoRAPart]:
        """The LoRA of the i-th module the layer computes, or None."""
        return None if self.part_index[i] < 0 else self.parts[self.part_index[i]]

    def delta_weight(self) -> np.ndarray:
        """The (out, in) weight change with the same effect (float64)."""
        delta = np.zeros((self.out_features, self.parts[0].lora_A.shape[1]), np.float64)
        for i, (start, end) in enumerate(self.rows):
            if self.part(i) is not None:
                delta[start:end] = self.part(i).delta_weight()
        return delta


def _slot_rows(slot_name: str, out_features: int) -> List[Tuple[str, int, int]]:
    """(diffusers module, first row, end row) of every module one of our layers computes."""
    modules = diffusers_modules(slot_name)
    size = out_features // len(modules)
    return [(module, i * size, (i + 1) * size) for i, module in enumerate(modules)]


def lora_plan(model, spec: LoraSpec) -> Dict[str, List[Optional[Tuple[str, int, float]]]]:
    """{layer name: per module it computes, (module, rank, scale) if targeted else None} for every
    layer with at least one targeted module."""
    plan = {}
    for slot_name, slot in model.adapter_slots().items():
        parts = [(module, *spec.rank_and_scale(module)) if spec.targets(module) else None
                 for module in diffusers_modules(slot_name)]
        if any(parts):
            plan[slot_name] = parts
    return plan


def attach_lora(model, spec: LoraSpec, seed: int = 0) -> Dict[str, LoRA]:
    """Trainable LoRA cells on every targeted layer of ``model``; returns {layer name: cell}.

    Initialised as PEFT does by default: A kaiming-uniform (a = sqrt(5), i.e. U(+-1/sqrt(in))),
    B zero, so the adapted model starts equal to the base. ValueError if nothing is targeted.
    """
    plan = lora_plan(model, spec)
    if not plan:
        raise ValueError(f"no layer matches the LoRA targets {spec.target_modules!r}")
    rng = np.random.default_rng(seed)
    slots = model.adapter_slots()
    cells = {}
    for slot_name, parts in plan.items():
        weight_shape = slots[slot_name].weight.shape
        in_features = int(np.prod(weight_shape[1:]))
        rows = [(start, end) for _, start, end in _slot_rows(slot_name, weight_shape[0])]
        built = []
        for planned, (start, end) in zip(parts, rows):
            if planned is None:
                built.append(None)
                continue
            _, rank, scale = planned
            part = LoRAPart(in_features, end - start, rank, scale)
            bound = 1.0 / math.sqrt(in_features)
            part.lora_A.set_data(Tensor(rng.uniform(-bound, bound, (rank, in_features)).astype(np.float32)))
            built.append(part)
        cells[slot_name] = LoRA(rows, built, spec.lora_dropout)
    model.attach_adapters(cells)
    return cells


def lora_parameters(cells: Dict[str, LoRA]) -> List[Parameter]:
    return [p for cell in cells.values() for p in cell.get_parameters()]


# ------------------------------------------------------------------------------------- files

@dataclasses.dataclass
class LoraWeights:
    """An adapter as read from a file: per diffusers module its factors A (r, in: flattened for a
    conv), B (out, r) and scale, and what it was read from."""
    factors: Dict[str, Tuple[np.ndarray, np.ndarray, float]]
    source: str
    note: str = ""


def _adapted_modules(cells: Dict[str, "LoRA"]):
    """(our layer, diffusers module, its LoRAPart) of every adapted module."""
    for slot_name, cell in cells.items():
        for i, (module, _, _) in enumerate(_slot_rows(slot_name, cell.out_features)):
            if cell.part(i) is not None:
                yield slot_name, module, cell.part(i)


def save_peft(cells: Dict[str, LoRA], spec: LoraSpec, folder: str, patch_kernel: Tuple[int, ...] = (),
              values: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Write the adapter as a PEFT folder, keys ``base_model.model.<module>.lora_A.weight`` /
    ``.lora_B.weight``; the patch embedding's as conv kernels (A: r x C x p x p with
    ``patch_kernel`` = (C, p, p), B: out x r x 1 x 1), as PEFT keeps a Conv2d's. ``values``
    ({parameter name: array}, e.g. an EMA) replaces the cells' current factors."""
    from pixart.utils.files import write_text_atomically
    from pixart.utils.safetensors_io import save_file

    values = values or {}
    tensors = {}
    for slot_name, module, part in _adapted_modules(cells):
        a, b = (values.get(p.name, p.asnumpy()) for p in (part.lora_A, part.lora_B))
        if slot_name == "x_embedder.proj":
            a, b = a.reshape((a.shape[0],) + tuple(patch_kernel)), b.reshape(b.shape + (1, 1))
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    write_text_atomically(os.path.join(folder, CONFIG_NAME), json.dumps(spec.to_peft_config(), indent=2))


def parameter_values(cells: Dict[str, LoRA], lora: "LoraWeights") -> Dict[str, np.ndarray]:
    """{parameter name: array} of attached cells, taken from a saved adapter of the same recipe;
    ModelLoadError if any module's factors are missing, extra or shaped otherwise."""
    adapted = {module: part for _, module, part in _adapted_modules(cells)}
    missing, extra = sorted(set(adapted) - set(lora.factors)), sorted(set(lora.factors) - set(adapted))
    if missing or extra:
        raise ModelLoadError(f"LoRA {lora.source} does not match the adapter being trained: "
                             f"missing {missing[:4]}, unexpected {extra[:4]}")
    values = {}
    for module, part in adapted.items():
        a, b, _ = lora.factors[module]
        if a.shape != tuple(part.lora_A.shape) or b.shape != tuple(part.lora_B.shape):
            raise ModelLoadError(f"LoRA {lora.source}: {module} is {a.shape} x {b.shape}, the adapter being "
                                 f"trained has {tuple(part.lora_A.shape)} x {tuple(part.lora_B.shape)}")
        values[part.lora_A.name], values[part.lora_B.name] = a, b
    return values


def load_into(cells: Dict[str, LoRA], lora: "LoraWeights") -> None:
    """Copy a saved adapter's factors into attached cells of the same recipe (resuming training)."""
    params = {p.name: p for cell in cells.values() for p in cell.get_parameters()}
    for name, value in parameter_values(cells, lora).items():
        params[name].set_data(Tensor(value))


def read_lora(path: str) -> LoraWeights:
    """A LoRA adapter from a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors`` or
    ``.bin``) or a single ``.safetensors`` file (diffusers ``save_lora_weights``: ``transformer.`` /
    ``unet.`` prefixes, ``lora_A``/``lora_B`` or ``lora.down``/``lora.up``, no alpha: scale 1 unless
    an ``.alpha`` entry says otherwise). ModelLoadError naming what does not fit, never half a load."""
    if os.path.isdir(path):
        return _read_peft_folder(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return _read_single_file(path)
    raise ModelLoadError(f"LoRA {path}: expected a PEFT adapter folder (with {CONFIG_NAME}) or a .safetensors file")


def _read_peft_folder(folder: str) -> LoraWeights:
    from pixart.utils import safetensors_io, torch_pickle

    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        single = os.path.join(folder, "pytorch_lora_weights.safetensors")
        if os.path.isfile(single):
            return _read_single_file(single)
        raise ModelLoadError(f"LoRA {folder}: no {CONFIG_NAME} (and no pytorch_lora_weights.safetensors): "
                             f"not a PEFT adapter folder")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"LoRA {config_path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"LoRA {config_path}: expected a JSON object")
    spec = LoraSpec.from_peft_config(config, config_path)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(weights):
        sd = safetensors_io.load_file(weights)
    elif os.path.isfile(os.path.join(folder, "adapter_model.bin")):
        sd = torch_pickle.load(os.path.join(folder, "adapter_model.bin"))
        sd = {k: v for k, v in sd.items() if isinstance(v, np.ndarray)} if isinstance(sd, dict) else {}
    else:
        raise ModelLoadError(f"LoRA {folder}: no {WEIGHTS_NAME} (or adapter_model.bin) next to {CONFIG_NAME}")
    pairs = _pair_factors(sd, folder, {"lora_A": "A", "lora_B": "B"})
    factors = {}
    for module, (a, b) in pairs.items():
        if not spec.targets(module):
            raise ModelLoadError(f"LoRA {folder}: {module} carries factors but is not among its target_modules")
        _, scale = spec.rank_and_scale(module)
        factors[module] = (a, b, scale)
    return LoraWeights(factors, folder)


def _read_single_file(path: str) -> LoraWeights:
    from pixart.utils import safetensors_io

    sd = safetensors_io.load_file(path)
    alphas = {k[:-len(".alpha")]: float(np.asarray(v).reshape(-1)[0]) for k, v in sd.items() if k.endswith(".alpha")}
    sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    pairs = _pair_factors(sd, path, {"lora_A": "A", "lora_B": "B", "lora.down": "A", "lora.up": "B"})
    factors = {}
    for module, (a, b) in pairs.items():
        rank = a.shape[0]
        alpha = next((v for k, v in alphas.items() if _strip_prefix(k) == module), None)
        factors[module] = (a, b, 1.0 if alpha is None else alpha / rank)
    note = "" if alphas else (f"{os.path.basename(path)} stores no alpha: its LoRA is applied at scale 1 "
                              f"(--lora_scale sets another)")
    return LoraWeights(factors, path, note)


def _strip_prefix(key: str) -> str:
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for prefix in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _pair_factors(sd: Dict[str, np.ndarray], source: str, names: Dict[str, str]):
    """{module: (A, B)} from keys ``<prefix><module>.<name>[.default].weight``; every key must fit."""
    pattern = re.compile(r"^(?P<module>.+)\.(?P<name>" + "|".join(re.escape(n) for n in names) +
                         r")(\.default)?\.weight$")
    found: Dict[str, Dict[str, np.ndarray]] = {}
    unmatched = []
    for key, value in sd.items():
        m = pattern.match(key)
        if not m:
            unmatched.append(key)
            continue
        module = _strip_prefix(m.group("module"))
        found.setdefault(module, {})[names[m.group("name")]] = np.asarray(value, np.float32)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f", ... ({len(unmatched)} in all)" if len(unmatched) > 5 else "")
        raise ModelLoadError(f"LoRA {source}: keys that are not LoRA factors of a diffusers PixArt module "
                             f"(kohya-style or another model's?): {shown}")
    half = sorted(m for m, f in found.items() if len(f) != 2)
    if half:
        raise ModelLoadError(f"LoRA {source}: {', '.join(half[:5])} has only one of its two factors")
    if not found:
        raise ModelLoadError(f"LoRA {source}: no LoRA factors found")
    pairs = {}
    for module, f in found.items():
        a, b = f["A"], f["B"]
        a = a.reshape(a.shape[0], -1)          # a conv A (r, C, p, p): flattened as our patches are
        b = b.reshape(b.shape[0], b.shape[1])  # a 1x1 conv B (out, r, 1, 1)
        if a.shape[0] != b.shape[1]:
            raise ModelLoadError(f"LoRA {source}: {module}: lora_A has rank {a.shape[0]}, lora_B {b.shape[1]}")
        pairs[module] = (a, b)
    return pairs


# ------------------------------------------------------------------------------------- merging

def slot_shapes(model) -> Dict[str, Tuple[int, ...]]:
    """{layer name: weight shape} of every adapter slot of ``model``."""
    return {name: tuple(slot.weight.shape) for name, slot in model.adapter_slots().items()}


def state_dict_slot_shapes(sd: Dict[str, np.ndarray]) -> Dict[str, Tuple[int, ...]]:
    """The same from official-named weights alone (no model built): every weight of a layer
    diffusers has a module for."""
    shapes = {}
    for key, value in sd.items():
        if key.endswith(".weight"):
            try:
                diffusers_modules(key[:-len(".weight")])
            except KeyError:
                continue
            shapes[key[:-len(".weight")]] = tuple(value.shape)
    return shapes


def lora_deltas(shapes: Dict[str, Tuple[int, ...]], lora: LoraWeights, scale: float = 1.0) -> Dict[str, np.ndarray]:
    """{layer name: float64 weight change in the layer weight's shape} of ``lora`` times ``scale``,
    for the layers ``shapes`` describes. ModelLoadError listing every module the model does not
    have or whose factors do not fit."""
    index = {}
    for slot_name, shape in shapes.items():
        for module, start, end in _slot_rows(slot_name, shape[0]):
            index[module] = (slot_name, start, end)
    deltas: Dict[str, np.ndarray] = {}
    problems = []
    for module, (a, b, module_scale) in lora.factors.items():
        if module not in index:
            problems.append(f"{module}: no such module in this model")
            continue
        slot_name, start, end = index[module]
        in_features = int(np.prod(shapes[slot_name][1:]))
        if a.shape[1] != in_features or b.shape[0] != end - start:
            problems.append(f"{module}: factors {a.shape} x {b.shape} do not fit a {in_features} -> "
                            f"{end - start} layer")
            continue
        delta = deltas.setdefault(slot_name, np.zeros((shapes[slot_name][0], in_features), np.float64))
        delta[start:end] += (b.astype(np.float64) @ a) * (module_scale * scale)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise ModelLoadError(f"LoRA {lora.source} does not fit this transformer (another architecture?): {shown}")
    return {name: delta.reshape(shapes[name]) for name, delta in deltas.items()}


class LoraMerger:
    """LoRA adapters merged into a model's weights: no cost per step. ``set_scales`` changes the
    scales exactly: merged weights are always recomputed from the kept base weights of the
    layers the adapters touch, never by subtracting a merged delta back out."""

    def __init__(self, model, loras: Sequence[LoraWeights]):
        self.model = model
        shapes = slot_shapes(model)
        self.unit_deltas = [lora_deltas(shapes, lora) for lora in loras]
        slots = model.adapter_slots()
        touched = sorted({name for deltas in self.unit_deltas for name in deltas})
        self.base = {name: slots[name].weight.asnumpy().copy() for name in touched}
        self.scales: Tuple[float, ...] = ()

    def set_scales(self, scales: Sequence[float]) -> None:
        scales = tuple(float(s) for s in scales)
        if len(scales) != len(self.unit_deltas):
            raise ValueError(f"{len(scales)} LoRA scales for {len(self.unit_deltas)} adapters")
        if scales == self.scales:
            return
        slots = self.model.adapter_slots()
        for name, base in self.base.items():
            total = sum((deltas[name] * s for deltas, s in zip(self.unit_deltas, scales) if name in deltas),
                        np.zeros(base.shape, np.float64))
            slots[name].weight.set_data(Tensor((base.astype(np.float64) + total).astype(np.float32)))
        self.scales = scales
