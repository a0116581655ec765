"""Which modules a LoRA adapter adapts, with which rank and scale: PEFT's rules, no MindSpore.

Module names are diffusers' ``PixArtTransformer2DModel`` ones. A module is targeted when its name
is a target or ends with ``.target`` (for a string ``target_modules``: fully matches it as a
regex) and is not excluded; ``rank_pattern`` / ``alpha_pattern`` override r and alpha for the
modules whose names end with a key (a regex); scale = alpha / r, or alpha / sqrt(r) (rsLoRA).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Optional, Sequence, Tuple, Union

from pixart.errors import ModelLoadError

# the official PixArt LoRA scripts' target list (and mindone's): PEFT name suffixes
OFFICIAL_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                    "linear", "linear_1", "linear_2")
CONFIG_NAME = "adapter_config.json"


# ------------------------------------------------------------------------------------- the recipe

@dataclasses.dataclass
class LoraSpec:
    """Which modules carry an adapter, with which rank and scale: PEFT's ``LoraConfig`` fields."""
    r: int = 16
    lora_alpha: Optional[float] = None        # None: = r (scale 1)
    target_modules: Union[Sequence[str], str] = OFFICIAL_TARGETS
    use_rslora: bool = False
    lora_dropout: float = 0.0
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Dict[str, float] = dataclasses.field(default_factory=dict)
    exclude_modules: Union[Sequence[str], str, None] = None

    def __post_init__(self):
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        if self.r < 1 or any(v < 1 for v in self.rank_pattern.values()):
            raise ValueError(f"LoRA rank must be at least 1, got {self.r} (rank_pattern {self.rank_pattern})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)

    def targets(self, module: str) -> bool:
        """PEFT's rule: ``target_modules`` as a regex (a string) or as names / name suffixes."""
        if _matches(self.exclude_modules, module):
            return False
        return _matches(self.target_modules, module)

    def rank_and_scale(self, module: str) -> Tuple[int, float]:
        r_key, alpha_key = _pattern_key(self.rank_pattern, module), _pattern_key(self.alpha_pattern, module)
        r = self.rank_pattern[r_key] if r_key else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key else self.lora_alpha
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)

    def to_peft_config(self) -> dict:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {"peft_type": "LORA", "task_type": None, "r": self.r, "lora_alpha": self.lora_alpha,
                "target_modules": targets, "exclude_modules": self.exclude_modules, "use_rslora": self.use_rslora,
                "lora_dropout": self.lora_dropout, "rank_pattern": self.rank_pattern,
                "alpha_pattern": self.alpha_pattern, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
                "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None,
                "inference_mode": True}

    @classmethod
    def from_peft_config(cls, config: dict, source: str) -> "LoraSpec":
        if config.get("peft_type", "LORA") != "LORA":
            raise ModelLoadError(f"{source}: a {config.get('peft_type')} adapter, not LoRA")
        for feature, off in (("use_dora", False), ("fan_in_fan_out", False), ("modules_to_save", None)):
            if config.get(feature, off) not in (off, []):
                raise ModelLoadError(f"{source}: {feature}={config[feature]!r} is not supported (plain LoRA only)")
        if config.get("bias", "none") != "none":
            raise ModelLoadError(f"{source}: LoRA with bias={config['bias']!r} is not supported")
        try:
            return cls(r=int(config["r"]), lora_alpha=config.get("lora_alpha", 8),  # PEFT's default alpha is 8
                       target_modules=config.get("target_modules") or (), use_rslora=bool(config.get("use_rslora")),
                       rank_pattern=dict(config.get("rank_pattern") or {}),
                       alpha_pattern=dict(config.get("alpha_pattern") or {}),
                       exclude_modules=config.get("exclude_modules"))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: not a usable LoRA adapter config ({type(e).__name__}: {e})") from None


def _matches(targets, module: str) -> bool:
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + t) for t in targets)


def _pattern_key(patterns: dict, module: str) -> Optional[str]:
    """PEFT's ``get_pattern_key``: the first pattern key the module name ends with (as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None
