"""Recipes: one validated pydantic schema, TOML in, JSON/TOML out.

Every section forbids unknown keys and checks ranges, so a typo is an error that names the field, never a
silently ignored setting. `load_recipe(path, overrides)` applies `--set section.key=value` overrides before
validation, so overrides are checked exactly like the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, field_validator,
                      model_validator)

from .errors import UserError

try:  # Python ≥ 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

DATASETS = ("digits", "mnist", "cifar10", "celeba", "imagefolder")
LABELLED = {"digits": 10, "mnist": 10, "cifar10": 10}


def _true_or_false(v: Any) -> Any:
    if v is True or v is False:
        return v
    raise ValueError("must be true or false")


# TOML's booleans only: pydantic's lax bool would read 1, "yes" or "on" as true
Bool = Annotated[bool, BeforeValidator(_true_or_false)]


def _number(v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, str):  # pydantic's lax mode reads true as 1 and "0.1" as 0.1
        raise ValueError(f"must be a number, not {json.dumps(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    if isinstance(v, int) and not -(2**63) <= v < 2**63:  # beyond int64 nothing downstream can hold it
        raise ValueError(f"{v} is out of range (at most 2^63 - 1)")
    return v


MAX_BATCH = 2**20  # images in one batch (train.batch_size, sample.batch_size, --batch-size)
# sampling steps or denoiser calls of one run (sample.steps, --steps, --nfe): as many as the finest VP
# discretisation a recipe may have (diffusion.timesteps); far beyond it a σ grid cannot even be allocated, and
# `--nfe` searching its step count would not return
MAX_STEPS = 100_000
# images of one sample or eval-fid run (sample.n, --n): 200× the 50,000 of the FID protocol; every image is held
# in memory, and beyond int64 even its label cannot be
MAX_IMAGES = 10_000_000

FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # float32's normal range (σ bounds)

# TOML's numbers only: a boolean or a string in a number's place is a mistake, not a 1
Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: Literal["digits", "mnist", "cifar10", "celeba", "imagefolder"] = "digits"
    root: str = Field("data", description="where torchvision datasets live (or are downloaded to)")
    path: Optional[str] = Field(None, description="imagefolder: the folder of images (labels from sub-folders)")
    download: Bool = False
    split: Literal["train", "test", "all"] = "train"
    resolution: Optional[Int] = Field(None, ge=4, le=1024, description="None: the dataset's own size")
    hflip: Bool = False
    class_conditional: Bool = Field(True, description="train with labels when the dataset has them")
    on_bad_image: Literal["fail", "skip"] = "fail"
    num_workers: Int = Field(2, ge=0, le=64)


class ModelConfig(_Strict):
    arch: Literal["unet"] = "unet"
    channels: Int = Field(64, ge=8, le=1024)
    channel_mult: list[Int] = Field(default_factory=lambda: [1, 2], min_length=1, max_length=8)
    num_res_blocks: Int = Field(2, ge=1, le=8)
    attention_resolutions: list[Int] = Field(default_factory=list)
    head_channels: Int = Field(32, ge=4)
    dropout: Float = Field(0.0, ge=0.0, lt=1.0)
    noise_embedding: Literal["positional", "fourier"] = "positional"
    guidance_embedding: Bool = Field(False, description="a guidance-scale input w (guidance-distilled students)")

    @model_validator(mode="after")
    def _mults_positive(self) -> "ModelConfig":
        for i, m in enumerate(self.channel_mult):
            if m < 1:
                raise ValueError(f"channel_mult[{i}] = {m}: must be ≥ 1")
        return self


class DiffusionConfig(_Strict):
    process: Literal["vp_linear", "vp_cosine", "ve", "edm", "flow"] = "edm"
    parameterization: Literal["eps", "x0", "v", "flow", "edm", "consistency"] = "edm"
    sigma_min: Optional[Float] = Field(None, gt=0)
    sigma_max: Optional[Float] = Field(None, gt=0)
    sigma_data: Float = Field(0.5, gt=0)
    timesteps: Int = Field(1000, ge=2, le=100000, description="VP: number of discrete steps T")
    beta_start: Float = Field(1e-4, gt=0, lt=1)
    beta_end: Float = Field(0.02, gt=0, lt=1)
    weighting: Literal["natural", "min_snr", "edm"] = "natural"
    min_snr_gamma: Float = Field(5.0, gt=0)
    sigma_sampling: Literal["default", "discrete", "lognormal", "loguniform", "uniform_t", "logit_normal"] = "default"
    p_mean: Float = -1.2
    p_std: Float = Field(1.2, gt=0)

    @model_validator(mode="after")
    def _ranges(self) -> "DiffusionConfig":
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min = {self.sigma_min} must be below sigma_max = {self.sigma_max}")
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start = {self.beta_start} must be below beta_end = {self.beta_end}")
        if self.sigma_sampling == "discrete" and not self.process.startswith("vp_"):
            raise ValueError(f"sigma_sampling = 'discrete' needs a VP process, not process = {self.process!r}")
        # the range the process will really have, defaults included: one end set against the other's default,
        # or a VP schedule whose ᾱ_T underflows (σ_max = ∞), would only fail at the first sample or as a NaN loss
        from .processes import make_process

        try:
            p = make_process(self.process, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                             sigma_data=self.sigma_data, timesteps=self.timesteps, beta_start=self.beta_start,
                             beta_end=self.beta_end)
        except (ArithmeticError, RuntimeError) as e:
            raise ValueError(f"the {self.process} process cannot be built from these values ({e})") from None
        for which in ("sigma_min", "sigma_max"):
            v = getattr(self, which)
            if v is not None and not FLOAT32_TINY <= v <= FLOAT32_MAX:
                # the network sees σ in float32: a level it rounds to 0 or ∞ gives a NaN image, and a Karras grid
                # from 1e-300 repeats its last level (0), which no sampler accepts — found only at the first grid
                raise ValueError(f"{which} = {v:g}: must be in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}] (σ reaches "
                                 f"the network in float32)")
        if not math.isfinite(p.sigma_max):
            raise ValueError(f"beta_end = {self.beta_end}, timesteps = {self.timesteps}: the {self.process} "
                             f"schedule's ᾱ_T underflows to 0 (σ_max = ∞); lower beta_end or timesteps")
        if not 0 < p.sigma_min < p.sigma_max:
            which = "sigma_max" if self.sigma_min is None and self.sigma_max is not None else "sigma_min"
            raise ValueError(f"{which} = {getattr(self, which)}: the {self.process} process then has σ_min = "
                             f"{p.sigma_min:g} ≥ σ_max = {p.sigma_max:g} (set both, σ_min < σ_max)")
        return self


class TrainConfig(_Strict):
    seed: Int = Field(0, ge=0)
    # a batch is built in memory at once: 2^20 images is past any device's memory at any resolution here
    batch_size: Int = Field(128, ge=1, le=MAX_BATCH)
    lr: Float = Field(1e-3, gt=0, le=1.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Int = Field(0, ge=0)
    weight_decay: Float = Field(0.0, ge=0)
    adam_betas: tuple[Float, Float] = (0.9, 0.999)
    grad_clip: Optional[Float] = Field(1.0, gt=0)
    ema_decay: Optional[Float] = Field(None, ge=0, lt=1)
    ema_halflife_kimg: Optional[Float] = Field(None, gt=0, description="EMA half-life in thousands of images")
    ema_rampup_ratio: Optional[Float] = Field(None, gt=0, description="half-life ≤ ratio × images seen (EDM)")
    max_steps: Int = Field(1000, ge=1)
    max_minutes: Optional[Float] = Field(None, gt=0, description="wall-clock budget; stops cleanly when spent")
    log_every: Int = Field(50, ge=1)
    checkpoint_every: Int = Field(1000, ge=1)
    sample_every: Int = Field(1000, ge=1)
    sample_grid: Int = Field(64, ge=1, le=1024, description="images in each progress grid")
    keep_last: Int = Field(3, ge=1, description="periodic checkpoints kept (the newest is never deleted)")
    bf16: Bool = False
    p_uncond: Float = Field(0.0, ge=0, le=1, description="class-label dropout for classifier-free guidance")
    device: str = "auto"
    skip_nonfinite: Int = Field(0, ge=0)
    compile: Bool = False
    # channels_last weights and batches: "auto" turns it on where it was measured to pay (diffcli.runtime)
    channels_last: Union[StrictBool, Literal["auto"]] = "auto"

    @field_validator("channels_last", mode="before")
    @classmethod
    def _layout(cls, v: Any) -> Any:
        if v is True or v is False or v == "auto":
            return v
        raise ValueError('must be true, false or "auto"')

    @model_validator(mode="after")
    def _ema(self) -> "TrainConfig":
        if self.ema_decay is not None and self.ema_halflife_kimg is not None:
            raise ValueError("set only one of ema_decay and ema_halflife_kimg")
        for i, b in enumerate(self.adam_betas):
            if not 0 <= b < 1:
                raise ValueError(f"adam_betas[{i}] = {b}: must be in [0, 1)")
        return self


def _known_schedule(name: Optional[str]) -> Optional[str]:
    from .samplers import SCHEDULES  # lazy: recipes stay importable without torch

    if name is not None and name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return name


def _known_sampler(name: str) -> str:
    from .samplers import SAMPLER_INFO  # lazy, as above

    if name not in SAMPLER_INFO:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_INFO)}")
    return name


class SampleConfig(_Strict):
    sampler: str = "ddim"
    schedule: Optional[str] = None
    steps: Int = Field(50, ge=1, le=MAX_STEPS)
    eta: Float = Field(0.0, ge=0, le=1)
    cfg: Float = Field(1.0, ge=0)
    n: Int = Field(64, ge=1, le=MAX_IMAGES)
    batch_size: Int = Field(256, ge=1, le=MAX_BATCH)
    seed: Int = Field(0, ge=0)

    # not "tuned": a tuned solver belongs to one checkpoint (`diffcli sample CKPT --schedule tuned`)
    _schedule = field_validator("schedule")(lambda cls, v: _known_schedule(v))
    _sampler = field_validator("sampler")(lambda cls, v: _known_sampler(v))


def model_resolution_problem(m: "ModelConfig", res: int) -> str | None:
    """What is wrong with the UNet for images of res × res, or None: its down-sampling must divide res and its
    attention resolutions must be among its levels. Checked at recipe load where the resolution is known, and
    by `diffcli train` once an image folder without data.resolution is read."""
    down = 2 ** (len(m.channel_mult) - 1)
    if res % down:
        return (f"model.channel_mult = {m.channel_mult} down-samples {down}×, which does not divide the "
                f"resolution {res}")
    levels = {res // 2**i for i in range(len(m.channel_mult))}
    for r in m.attention_resolutions:
        if r not in levels:
            return (f"model.attention_resolutions has {r}, not one of the UNet's resolutions "
                    f"{sorted(levels, reverse=True)}")
    return None


class Recipe(_Strict):
    task: Literal["denoiser", "classifier"] = "denoiser"
    name: Optional[str] = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @model_validator(mode="after")
    def _cross(self) -> "Recipe":
        d, m = self.data, self.model
        if d.name == "imagefolder" and not d.path:
            raise ValueError("data.path is required when data.name = 'imagefolder'")
        labelled = d.name in LABELLED or d.name == "imagefolder"
        if self.train.p_uncond > 0 and not (d.class_conditional and labelled):
            raise ValueError(f"train.p_uncond = {self.train.p_uncond} (CFG label dropout) needs a class-conditional "
                             f"dataset; data.name = {_toml_value(d.name)}, data.class_conditional = "
                             f"{_toml_value(d.class_conditional)}")
        if self.task == "classifier" and not labelled:
            raise ValueError(f"task = 'classifier' needs a labelled dataset, not data.name = {d.name!r}")
        res = d.resolution or {"digits": 8, "mnist": 28, "cifar10": 32, "celeba": 64}.get(d.name)
        problem = model_resolution_problem(m, res) if res is not None else None
        if problem:
            raise ValueError(problem)
        # attention splits a width c into max(1, c // head_channels) heads, which must divide c: the middle block
        # (deepest width) always attends, the other levels where their resolution is listed
        widths = {m.channels * m.channel_mult[-1]}
        if res is not None:
            widths |= {m.channels * mult for i, mult in enumerate(m.channel_mult)
                       if res // 2**i in m.attention_resolutions}
        for c in sorted(widths):
            heads = max(1, c // m.head_channels)
            if c % heads:
                raise ValueError(f"model.head_channels = {m.head_channels} splits the {c}-channel attention into "
                                 f"{heads} heads, which do not divide {c}; choose a divisor of {c}")
        return self

    # --- serialisation --------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json()

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.model_dump(mode="json")))


def _drop_none(d: Any) -> Any:
    """TOML has no null: an unset optional is simply absent (and validates back to None)."""
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def format_validation_error(err: ValidationError, source: str, given: frozenset[str] = frozenset()) -> str:
    """One line naming every bad field and its value: `recipe.toml: train.lr = -1: must be > 0`; a field in
    `given` (set on the command line: --set, --max-steps) says so, since the file does not hold that value."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) if str(p).isprintable() else repr(p) for p in e["loc"])  # one line, always
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and isinstance(e["input"], dict):  # a whole unknown [section]
            keys = ", ".join(str(k) if str(k).isprintable() else repr(k) for k in e["input"])
            keys = keys if len(keys) <= 60 else keys[:57] + "…"
            parts.append(f"unknown section [{loc}] (holding {keys or 'nothing'})")
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!s} = {_short(e['input'])}")
        elif e["type"] == "missing":
            parts.append(f"{loc}: missing")
        elif loc:
            where = " (from the command line)" if any(loc == g or loc.startswith(g + ".") for g in given) else ""
            parts.append(f"{loc} = {_short(e['input'])}{where}: {msg}")
        else:
            parts.append(msg)
    return f"{source}: " + "; ".join(parts)


def _toml_value(v: Any) -> str:
    """A value as the recipe spells it: true, "ddim", [1, 2] (json's spelling is TOML's for these)."""
    try:
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (bool, str, list, tuple)) else repr(v)
    except (TypeError, ValueError):
        return repr(v)


def _short(v: Any) -> str:
    s = _toml_value(v) if not isinstance(v, dict) else "{…}"
    return s if len(s) <= 60 else s[:57] + "…"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). The value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if not all(path):
        raise UserError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw.strip()
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {text!r}: {p} is not a section")
        node[path[-1]] = value
    return data


# --- distillation recipes (diffcli distill; diffcli.distill) -------------------------------------------------
DISTILL_METHODS = ("progressive", "consistency", "guidance", "reflow")


class ProgressiveConfig(_Strict):
    """Salimans & Ho 2022: halving rounds from teacher_steps down to target_steps (train.max_steps in total)."""
    teacher_steps: Int = Field(64, ge=2, le=4096, description="DDIM steps of the first teacher")
    target_steps: Int = Field(1, ge=1, description="steps of the last student; teacher_steps / 2^k")
    schedule: str = Field("karras", description="σ grid of the DDIM teacher (diffcli.samplers.SCHEDULES)")
    parameterization: Literal["teacher", "x0", "v"] = "teacher"
    w_min: Optional[Float] = Field(None, ge=0, description="guidance-distilled teacher (Meng et al. 2023, stage "
                                   "two): lowest CFG scale w drawn; default the teacher's own range")
    w_max: Optional[Float] = Field(None, ge=0, description="guidance-distilled teacher: highest w drawn")

    _schedule = field_validator("schedule")(lambda cls, v: _known_schedule(v))

    @model_validator(mode="after")
    def _halving(self) -> "ProgressiveConfig":
        n, k = self.teacher_steps, self.target_steps
        ratio = n // k if k and n % k == 0 else 0
        if k >= n or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"target_steps = {k} is not reachable from teacher_steps = {n} by halving "
                             f"(need teacher_steps = target_steps · 2^k, k ≥ 1)")
        if self.w_min is not None and self.w_max is not None and self.w_min > self.w_max:
            raise ValueError(f"w_min = {self.w_min} must not exceed w_max = {self.w_max}")
        return self


class ConsistencyConfig(_Strict):
    """Song et al. 2023 (CD/CT) with Song & Dhariwal 2024's pseudo-Huber loss and CT curriculum."""
    mode: Literal["cd", "ct"] = "cd"
    num_scales: Int = Field(18, ge=2, le=10000, description="N of the Karras grid (CT: the final N)")
    ct_initial_scales: Int = Field(10, ge=2, description="CT: N at step 0, doubled along training")
    sigma_min: Float = Field(0.002, gt=0)
    rho: Float = Field(7.0, gt=0)
    loss: Literal["pseudo_huber", "l2", "lpips"] = "pseudo_huber"
    huber_c: Optional[Float] = Field(None, gt=0, description="default 0.00054·sqrt(dim) (Song & Dhariwal 2024)")
    target_ema: Optional[Float] = Field(None, ge=0, lt=1, description="μ of the target network; default CD 0.95, "
                                        "CT 0 (stop-gradient, Song & Dhariwal 2024)")
    sample_steps: Int = Field(1, ge=1, le=64, description="steps the student samples with by default")
    level_sampling: Optional[Literal["uniform", "lognormal"]] = Field(
        None, description="how the grid interval n is drawn; default CD 'uniform' (Song et al. 2023), CT "
        "'lognormal' (discretised log-normal over σ, Song & Dhariwal 2024)")
    p_mean: Float = Field(-1.1, description="log-normal level sampling: mean of log σ")
    p_std: Float = Field(2.0, gt=0, description="log-normal level sampling: std of log σ")


class GuidanceDistillConfig(_Strict):
    """Meng et al. 2023, stage one: a student that takes the guidance scale w as input."""
    w_min: Float = Field(1.0, ge=0)
    w_max: Float = Field(4.0, ge=0)
    sampler: str = "heun"
    steps: Int = Field(18, ge=1, le=MAX_STEPS)

    @model_validator(mode="after")
    def _range(self) -> "GuidanceDistillConfig":
        if self.w_min > self.w_max:
            raise ValueError(f"w_min = {self.w_min} must not exceed w_max = {self.w_max}")
        return self


class ReflowConfig(_Strict):
    """Liu et al. 2023: (noise, sample) pairs from the teacher's ODE sampler, then a rectified flow on them."""
    num_pairs: Int = Field(2048, ge=2)
    pair_sampler: Literal["heun", "euler", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"] = "heun"
    pair_steps: Int = Field(18, ge=1, le=MAX_STEPS)
    cfg: Float = Field(1.0, ge=0, description="CFG scale of the pair-generating teacher (class-conditional)")
    chunk_size: Int = Field(256, ge=1, description="pairs per stored chunk (resume granularity)")
    student_steps: Int = Field(1, ge=1, le=MAX_STEPS, description="Euler steps the reflowed student samples with")
    straightness_samples: Int = Field(256, ge=2)
    straightness_steps: Int = Field(32, ge=2, le=1000, description="DDIM steps (uniform in flow time) of the "
                                    "straightness measurement")
    distill_steps: Int = Field(0, ge=0, le=64, description="k > 0: follow the reflow with k-step distillation "
                               "on pairs from the reflowed flow (Liu et al. 2023, Sec. 2.3); 0: none")
    distill_fraction: Float = Field(0.5, gt=0, lt=1, description="share of train.max_steps spent on the k-step "
                                    "distillation when distill_steps > 0")


class DistillRecipe(_Strict):
    """`diffcli distill RECIPE --teacher CKPT`: the teacher brings data, network and process; the recipe says
    how to distill. Only the chosen method's section may appear."""
    task: Literal["distill"] = "distill"
    name: Optional[str] = None
    method: Literal["progressive", "consistency", "guidance", "reflow"]
    train: TrainConfig = Field(default_factory=TrainConfig)
    progressive: Optional[ProgressiveConfig] = None
    consistency: Optional[ConsistencyConfig] = None
    guidance: Optional[GuidanceDistillConfig] = None
    reflow: Optional[ReflowConfig] = None

    @model_validator(mode="after")
    def _one_method(self) -> "DistillRecipe":
        for m in DISTILL_METHODS:
            if m != self.method and getattr(self, m) is not None:
                raise ValueError(f"[{m}] holds keys of method {m!r}, but method = {self.method!r}")
        if getattr(self, self.method) is None:
            default = {"progressive": ProgressiveConfig, "consistency": ConsistencyConfig,
                       "guidance": GuidanceDistillConfig, "reflow": ReflowConfig}[self.method]()
            object.__setattr__(self, self.method, default)
        return self

    @property
    def config(self):
        return getattr(self, self.method)

    def to_json(self) -> str:
        return self.model_dump_json()

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.model_dump(mode="json")))


def load_distill_recipe(path: str | Path, overrides: list[str] | None = None) -> DistillRecipe:
    """Read, override and validate a distillation recipe (TOML) — the same one-line errors as load_recipe."""
    return load_recipe(path, overrides, schema=DistillRecipe)


def recipe_from_dict(data: dict, source: str, schema: type[BaseModel] | None = None,
                     given: frozenset[str] = frozenset()) -> Recipe:
    try:
        return (schema or Recipe).model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source, given)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, schema: type[BaseModel] | None = None) -> Recipe:
    """Read, override and validate a TOML recipe; every failure is a one-line UserError naming the file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"recipe {str(p)!r} does not exist")
    if p.is_dir():
        raise UserError(f"recipe {str(p)!r} is a folder, not a TOML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        hint = " (it looks like a checkpoint; the recipe is a .toml file)" if p.suffix == ".safetensors" else ""
        raise UserError(f"recipe {str(p)!r} is not a TOML recipe: not UTF-8 text{hint}") from None
    except OSError as e:
        raise UserError(f"recipe {str(p)!r} cannot be read: {e.strerror or e.__class__.__name__}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {str(p)!r} is not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise UserError(f"recipe {str(p)!r} is not valid TOML: nested too deeply") from None
    data = apply_overrides(data, overrides or [])
    if schema is None and (data.get("task") == "distill" or "method" in data):
        raise UserError(f"recipe {str(p)!r} is a distillation recipe (task = 'distill'); run it with diffcli distill")
    if schema is DistillRecipe and "method" not in data and ("data" in data or "model" in data):
        raise UserError(f"recipe {str(p)!r} is a training recipe (it has [data]/[model] and no method); distill "
                        f"takes a distillation recipe with method = progressive | consistency | guidance | reflow "
                        f"(e.g. recipes/digits-progressive.toml)")
    given = frozenset(".".join(parse_override(o)[0]) for o in overrides or [])
    return recipe_from_dict(data, str(p), schema, given)


def recipe_from_json(text: str, source: str) -> Recipe:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{source}: the embedded recipe is not JSON") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: the embedded recipe is not a JSON object")
    return recipe_from_dict(data, f"{source} (embedded recipe)")


def finite(x: float) -> bool:
    return math.isfinite(x)
