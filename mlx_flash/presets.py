"""The model family: architectures and published sampling defaults of each member."""

from __future__ import annotations

from dataclasses import dataclass

from .mmdit import MMDiTConfig


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance: v += scale * (v_cond - v_cond_without(layers)) for steps in (start*N, stop*N)."""

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2


@dataclass(frozen=True)
class Preset:
    """A published model: where its weights live, its transformer and its sampling defaults."""

    name: str
    repo_id: str | None
    transformer: MMDiTConfig
    num_steps: int
    guidance_scale: float
    skip_layer_guidance: SkipLayerGuidance | None = None
    shift: float = 3.0

    @property
    def few_step(self) -> bool:
        return self.num_steps <= 8 and self.guidance_scale <= 1.0


SD3_MEDIUM = MMDiTConfig(num_layers=24, num_attention_heads=24, pos_embed_max_size=192)
SD35_MEDIUM = MMDiTConfig(
    num_layers=24, num_attention_heads=24, pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13))
)
SD35_LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, pos_embed_max_size=192, qk_norm=True)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", SD3_MEDIUM, 28, 7.0),
        Preset(
            "sd3.5-medium",
            "stabilityai/stable-diffusion-3.5-medium",
            SD35_MEDIUM,
            40,
            4.0,
            SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, stop=0.2),
        ),
        Preset("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", SD35_LARGE, 28, 3.5),
        Preset("sd3.5-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo", SD35_LARGE, 4, 0.0),
        # SD3.5-Flash: the few-step distillation of SD3.5 Medium. Its weights are not on the hub yet: load it
        # from a local folder or single file with this preset's architecture and few-step defaults.
        Preset("sd3.5-flash", None, SD35_MEDIUM, 4, 0.0),
    )
}

