"""The model family: architectures and published sampling defaults of each member, and the public few-step
releases built on them (full models, LoRA adapters, replacement transformers; ../shared/FEWSTEP.md)."""

from __future__ import annotations

from dataclasses import dataclass

from .mmdit import MMDiTConfig

STABILITY_LICENCE = "Stability AI Community License"
UNVERIFIED = "UNVERIFIED"


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance: v += scale * (v_cond - v_cond_without(layers)) for steps in (start*N, stop*N)."""

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2


@dataclass(frozen=True)
class LoRA:
    """A LoRA adapter file on the hub, applied to the base model at `scale`."""

    repo_id: str
    file: str
    scale: float = 1.0

    @property
    def location(self) -> str:
        """`org/name/file.safetensors`, as `--lora` and `load_pipeline(loras=...)` name a hub file."""
        return f"{self.repo_id}/{self.file}"


@dataclass(frozen=True)
class Preset:
    """A published model: where its weights live, its transformer and its sampling defaults.

    `repo_id` is the model loaded (the base, for an adapter or a replacement transformer); `lora` is applied to
    it, `transformer_repo` ("org/name" or "org/name/folder") replaces its transformer. `sigmas` (one per step,
    the terminal 0 implied) and `scales` (latent sides per step, scale-wise only) go to the sampler.
    `unverified` names the fields whose values no source confirms (FEWSTEP.md); `note` says what is known."""

    name: str
    repo_id: str | None
    transformer: MMDiTConfig
    num_steps: int
    guidance_scale: float
    skip_layer_guidance: SkipLayerGuidance | None = None
    shift: float = 3.0
    sampler: str = "euler"
    sigmas: tuple[float, ...] | None = None
    scales: tuple[int, ...] | None = None
    lora: LoRA | None = None
    transformer_repo: str | None = None
    use_t5: bool = True
    licence: str = STABILITY_LICENCE
    unverified: tuple[str, ...] = ()
    note: str = ""

    @property
    def few_step(self) -> bool:
        return self.num_steps <= 8 and self.guidance_scale <= 1.0

    @property
    def architecture(self) -> str:
        return next(name for name, config in ARCHITECTURES.items() if config == self.transformer)

    @property
    def base_weights(self) -> bool:
        """Whether the preset is its repo's own weights (no adapter, no replacement transformer)."""
        return self.lora is None and self.transformer_repo is None

    def sampler_options(self) -> dict:
        """Keyword options of `make_sampler` for this preset's sampler."""
        return {"scales": self.scales} if self.scales is not None else {}


SD3_MEDIUM = MMDiTConfig(num_layers=24, num_attention_heads=24, pos_embed_max_size=192)
SD35_MEDIUM = MMDiTConfig(
    num_layers=24, num_attention_heads=24, pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13))
)
SD35_LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, pos_embed_max_size=192, qk_norm=True)
ARCHITECTURES = {"SD3 Medium": SD3_MEDIUM, "SD3.5 Medium": SD35_MEDIUM, "SD3.5 Large": SD35_LARGE}

SD3_MEDIUM_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"
SD35_MEDIUM_REPO = "stabilityai/stable-diffusion-3.5-medium"
SD35_LARGE_REPO = "stabilityai/stable-diffusion-3.5-large"

# SwD (yandex-research/swd): LoRAs in PEFT's layout, scale-wise sampling of the raw sigmas (the repo's
# FlowMatchingSolver applies no shift; timesteps are sigma * 1000).
SWD_6 = dict(scales=(32, 48, 64, 80, 96, 128), sigmas=(1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022))
SWD_LARGE_4 = dict(scales=(64, 80, 96, 128), sigmas=(1.0, 0.8959, 0.7371, 0.6022))
SWD_MEDIUM_4 = dict(scales=(32, 64, 96, 128), sigmas=(1.0, 0.9454, 0.7904, 0.6022))
SWD_LICENCE = f"Apache-2.0 (LoRA); {STABILITY_LICENCE} (base)"
PEFT_FILE = "adapter_model.safetensors"  # PEFT's save_pretrained name (next to adapter_config.json)


def _swd(size: str, steps: int, base: str, config: MMDiTConfig, values: dict, unverified: tuple[str, ...] = (),
         note: str = "") -> Preset:
    repo = f"yresearch/swd-{size}-{steps}-steps"
    return Preset(f"swd-{size}-{steps}-steps", base, config, steps, 0.0, shift=1.0, sampler="scale-wise",
                  lora=LoRA(repo, PEFT_FILE), licence=SWD_LICENCE, unverified=unverified, note=note, **values)


def _hyper(steps: int, guidance: float) -> Preset:
    return Preset(
        f"hyper-sd3-{steps}-steps", SD3_MEDIUM_REPO, SD3_MEDIUM, steps, guidance,
        lora=LoRA("ByteDance/Hyper-SD", f"Hyper-SD3-{steps}steps-CFG-lora.safetensors", 0.125),
        licence=f"{STABILITY_LICENCE} (base); Hyper-SD's own: UNVERIFIED", unverified=("sampler", "shift"),
        note="its files carry pos_embed keys of other sizes (stable-diffusion.cpp PR 520); the card fuses at 0.125")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd3-medium", SD3_MEDIUM_REPO, SD3_MEDIUM, 28, 7.0),
        Preset("sd3.5-medium", SD35_MEDIUM_REPO, SD35_MEDIUM, 40, 4.0,
               SkipLayerGuidance(layers=(7, 8, 9), scale=2.5, start=0.01, stop=0.2)),
        Preset("sd3.5-large", SD35_LARGE_REPO, SD35_LARGE, 28, 3.5),
        Preset("sd3.5-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo", SD35_LARGE, 4, 0.0),
        # SD3.5-Flash: the few-step distillation of SD3.5 Medium. Its weights are not on the hub yet: load it
        # from a local folder or single file with this preset's architecture and few-step defaults.
        Preset("sd3.5-flash", None, SD35_MEDIUM, 4, 0.0),
        Preset("sd3.5-large-turbox", "tensorart/stable-diffusion-3.5-large-TurboX", SD35_LARGE, 8, 1.5, shift=5.0,
               licence=f"{STABILITY_LICENCE} (base); TensorArt's own: UNVERIFIED", unverified=("repo_id",),
               note="card: Euler 'simple', CFG 1-1.5, shift 5 'most important'; ships a full checkpoint or a LoRA "
                    "(whether the repo is in diffusers layout is unverified)"),
        Preset("sd3.5-medium-turbo", "tensorart/stable-diffusion-3.5-medium-turbo", SD35_MEDIUM, 8, 1.5,
               licence=f"{STABILITY_LICENCE} (base); TensorArt's own: UNVERIFIED",
               note="diffusers repo; also LoRAs lora_sd3.5m_turbo_8steps and lora_sd3.5m_4steps"),
        _swd("medium", 4, SD35_MEDIUM_REPO, SD35_MEDIUM, SWD_MEDIUM_4, ("scales", "sigmas"),
             "values of the model card; the GitHub README lists scales 64,80,96,128 and sigmas 1,0.8959,0.7371,0.6022"),
        _swd("medium", 6, SD35_MEDIUM_REPO, SD35_MEDIUM, SWD_6),
        _swd("large", 4, SD35_LARGE_REPO, SD35_LARGE, SWD_LARGE_4,
             note="the README's example code uses sigmas 1,0.8956,0.7363,0.6007 beside its table's values"),
        _swd("large", 6, SD35_LARGE_REPO, SD35_LARGE, SWD_6, ("scales", "sigmas"),
             "the README publishes the 6-step values for Medium only; Large assumed the same"),
        Preset("senseflow-medium", SD35_MEDIUM_REPO, SD35_MEDIUM, 4, 0.0, sigmas=(1.0, 0.9, 0.75, 0.5),
               transformer_repo="domiso/SenseFlow/SenseFlow-SD35M",
               licence=f"Apache-2.0 (transformer, per its card); {STABILITY_LICENCE} (base)",
               unverified=("sigmas", "sampler", "shift", "transformer_repo"),
               note="the folder lacks a config.json (the base's is used); whether it predicts x0 or velocity, and "
                    "whether its sigmas are shifted (as diffusers shifts custom sigmas), is unverified"),
        Preset("senseflow-large", SD35_LARGE_REPO, SD35_LARGE, 4, 0.0,
               transformer_repo="domiso/SenseFlow/SenseFlow-SD35L",
               licence=f"Apache-2.0 (transformer, per its card); {STABILITY_LICENCE} (base)",
               unverified=("sigmas", "sampler", "shift", "transformer_repo")),
        Preset("sid-medium", "YGu1998/SiD-DiT-SD3.5-medium", SD35_MEDIUM, 4, 1.0, shift=1.0,
               sampler="euler-stochastic", sigmas=(1.0, 0.75, 0.5, 0.25),
               licence=f"{STABILITY_LICENCE} (base); SiD's own: UNVERIFIED", unverified=("repo_id",),
               note="t = 1 - i/N with re-noising between steps (optionally shift 3); its own pipeline, whether the "
                    "repo loads as a diffusers folder is unverified"),
        Preset("sid-large", "YGu1998/SiD-DiT-SD3.5-large", SD35_LARGE, 4, 1.0, shift=1.0,
               sampler="euler-stochastic", sigmas=(1.0, 0.75, 0.5, 0.25),
               licence=f"{STABILITY_LICENCE} (base); SiD's own: UNVERIFIED", unverified=("repo_id",),
               note="as sid-medium"),
        Preset("flash-sd3", SD3_MEDIUM_REPO, SD3_MEDIUM, 4, 0.0, lora=LoRA("jasperai/flash-sd3", PEFT_FILE),
               use_t5=False, licence=f"CC-BY-NC-4.0 (LoRA); {STABILITY_LICENCE} (base)",
               unverified=("sampler", "shift", "guidance_scale", "lora"),
               note="trained without T5; its scheduler lives in a diffusers fork"),
        _hyper(4, 3.0),
        _hyper(8, 5.0),
        _hyper(16, 7.0),
    )
}
