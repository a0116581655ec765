"""Starting a model from another model's weights where they fit (train.py --init_from).

PixArt-α's recipe trains a class-conditional model first and starts the text-conditioned one
from it: the patch and timestep embedders, self-attention, MLP and final projection carry the
same names and shapes in both (the official names), and are loaded; cross-attention, the caption
projection and adaLN-single are new; the class table and the per-block adaLN modulations are
dropped. The same loader starts a model of another depth or width from a released checkpoint.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List

import numpy as np

from pixart.errors import ModelLoadError

# Conditioning embedders may differ in shape for a reason (another token count, another number
# of classes): kept at their initialisation and reported. Any other shape difference means
# another architecture than the one asked for, and is refused.
_EXPLAINED_RESHAPE = re.compile(r"^y_embedder\.")


@dataclasses.dataclass
class PartialLoad:
    """What ``load_matching`` did, by parameter name."""
    source: str
    loaded: List[str]
    new: List[str]         # the model's, absent from the source: initialised
    dropped: List[str]     # the source's, absent from the model: ignored
    reshaped: List[str]    # in both with other shapes (conditioning embedders only): initialised

    def __str__(self) -> str:
        lines = [f"--init_from {self.source}: loaded {len(self.loaded)} tensors, {len(self.new)} new, "
                 f"{len(self.dropped)} dropped" + (f", {len(self.reshaped)} of another shape kept new"
                                                    if self.reshaped else "")]
        for title, names in (("loaded", self.loaded), ("new", self.new), ("dropped", self.dropped),
                             ("another shape, kept new", self.reshaped)):
            if names:
                lines.append(f"  {title}: " + ", ".join(group_names(names)))
        return "\n".join(lines)


def group_names(names: List[str]) -> List[str]:
    """Parameter names with their block index folded: ``blocks.{0-27}.attn.qkv.weight`` stands for
    the 28 names exactly (an index list such as ``{0,2,5}`` where they are not a run)."""
    groups: Dict[tuple, List[int]] = {}
    for name in names:
        m = re.match(r"^(.*?\.)(\d+)(\..*)$", name)
        key = (m.group(1), m.group(3)) if m else (name, "")
        groups.setdefault(key, []).append(int(m.group(2)) if m else -1)
    out = []
    for (head, tail), indices in sorted(groups.items()):
        indices = sorted(indices)
        if indices == [-1]:
            out.append(head)
        elif len(indices) == 1:
            out.append(f"{head}{indices[0]}{tail}")
        elif indices == list(range(indices[0], indices[-1] + 1)):
            out.append(f"{head}{{{indices[0]}-{indices[-1]}}}{tail}")
        else:
            out.append(f"{head}{{{','.join(map(str, indices))}}}{tail}")
    return out


def load_matching(model, sd: Dict[str, np.ndarray], source: str) -> PartialLoad:
    """Copy every tensor of ``sd`` whose name and shape match a parameter of ``model``; the rest
    of the model keeps its values. ModelLoadError when nothing matches (not a relative of this
    model) or a tensor other than a conditioning embedder has another shape."""
    import mindspore as ms

    params = dict(model.parameters_and_names())
    shared = sorted(set(params) & set(sd))
    reshaped = [n for n in shared if tuple(sd[n].shape) != tuple(params[n].shape)]
    unexplained = [f"{n}: {tuple(sd[n].shape)} there, {tuple(params[n].shape)} here" for n in reshaped
                   if not _EXPLAINED_RESHAPE.match(n)]
    if unexplained:
        raise ModelLoadError(f"--init_from {source}: {len(unexplained)} tensor(s) have the model's names but other "
                             f"shapes, so it is another architecture (set --model_config to match it): "
                             + "; ".join(unexplained[:4]) + (" ..." if len(unexplained) > 4 else ""))
    loaded = [n for n in shared if n not in reshaped]
    if not loaded:
        raise ModelLoadError(f"--init_from {source}: no tensor has a name of this model; it is not a PixArt or DiT "
                             f"checkpoint in the official names")
    for name in loaded:
        params[name].set_data(ms.Tensor(np.asarray(sd[name], np.float32)))
    return PartialLoad(source, loaded, sorted(set(params) - set(sd)), sorted(set(sd) - set(params)), reshaped)
