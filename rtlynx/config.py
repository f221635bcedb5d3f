"""SparsityConfig: everything `rtlynx.sparsify` needs, validated, versioned, JSON-serializable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import validate
from .reference import check_pattern

BACKENDS = ("auto", "reference", "cusparselt", "lynx")
COMPENSATIONS = ("none", "norm")
K_REMAINDER = ("pad", "dense")
MODES = ("sparse", "dense", "weight")
DTYPES = ("native", "fp8")
CENTRES = (None, "token_mean")
CONFIG_VERSION = 1

# Benchmark timing (rtlynx.benchtools): input sets rotate until their bytes reach BENCH_ROTATE_BYTES, and a single
# input is followed by a read of BENCH_FLUSH_BYTES; both well beyond the 50-60 MB L2 of an H100 / H200.
BENCH_ROTATE_BYTES = 150_000_000
BENCH_FLUSH_BYTES = 256 * 2**20


_is_int = validate.is_int  # kept for the modules that import them from here
_is_real = validate.is_real


@dataclass
class SparsityConfig:
    """How to sparsify a model.

    n, m: the N:M pattern along K (2:4 is what the sparse tensor cores run; 1:4, 4:8, 8:16 for studies).
    preset: "auto" (by model class), a name from ``rtlynx.presets.PRESETS``, or None (use ``include``).
    include / exclude: extra fnmatch globs on qualified module names, added to the preset's.
    compensation: "norm" (per-token norm rescale of the GEMM output) or "none".
    lora_rank: rank of the LoRA branch on the dense input (0 = off).
    backend: "auto" (fastest that runs here), "reference" (pure torch), "cusparselt", "lynx".
    k_remainder: K not a multiple of m: "pad" with zeros (exact for the kept set) or run "dense".
    dense_below_t: run the sparse layers dense while the call's noise level t (1 = noise, 0 = clean) is
        below this, i.e. the final sampling steps (see rtlynx.schedule); None = sparse at every step.
    dense_above_t: run them dense while t is above this, i.e. the first, composition-deciding steps (they matter
        with a strong style adapter: benchmarks/NOTES.md v14); None = off. Both may be set.
    mode: "sparse", "dense" (the original linears, for A/B runs) or "weight" (magnitude N:M on W, a baseline).
    lora: whether the LoRA branches (if any) are on.
    speed_rules: on the GPU kernels, run dense the sites whose shape loses to cuBLAS on the measured kernel
        table (``rtlynx.presets.SPEED_RULES``; reported by ``summary``). The reference path ignores it.
    dtype: "native" (the GEMM runs in the layer's dtype) or "fp8" (kept activations and weights quantised to
        float8 e4m3 with per-token / per-channel scales, rtlynx.reference.fp8): the FP8 sparse kernels for bf16
        sites on an sm_90 GPU (K <= 16384; the weights are quantised once per site and replace the bf16 ones
        there, see keep_dense_weights); elsewhere emulated on the reference path, with a warning on a GPU.
    keep_dense_weights: with dtype="fp8", keep the original bf16 weights next to the FP8 ones (more memory;
        unsparsify / configure(dtype="native") get the exact originals back). False (default): on the FP8 kernels
        a layer's ``weight`` becomes its float8_e4m3fn weight plus a ``weight_scale`` buffer [N] (half the
        memory); whatever needs a bf16 weight (dense mode, the final-steps schedule, unsparsify, a dtype cast)
        dequantises it, which is not the original weight (a one-time warning says so).
    centre: None (prune x, the paper's RT-Lynx) or "token_mean": prune ``x - c`` with c each sample's mean over its
        tokens and add ``c W^T`` (and the LoRA of c) back, exactly (rtlynx.reference.sparse_act_linear's ``centre``):
        the offset the tokens share is kept instead of half of it being pruned away (38 % less pruning residual on
        the mini-FLUX, benchmarks/NOTES.md v13). Costs one reduction over x per site input (the token mean;
        the site kernels' prune subtracts c itself); c itself rides in the site GEMM as extra rows a sample (two; with dtype="fp8" four,
        the second pair carrying the e4m3 rounding of the first, so c W^T is good to ~2^-8 of c on the FP8
        weights and no bf16 weights are needed). A LoRA fitted without it does not fit it: calibrate with the same
        setting.
    fuse_sites: group the layers that read one input into one activation site (one prune, one GEMM; the
        preset's site rules, rtlynx.sites). False: every layer on its own (the v0.1 design, for A/B runs).
    adapter_rank: room for the user's own PEFT adapters in the lynx kernels' LoRA tail, per layer (the summed rank
        of the adapters active on it; rtlynx.sites.adapters). "auto": sized to the adapters when they are first
        active, grown (one reallocation, one recompile under torch.compile) when a larger set is activated; an int
        R > 0: R from the first adapter on (hotswaps and weight changes of adapters summing to <= R never
        reallocate), adapters summing to more run as PEFT's own GEMMs, with a warning; 0: always PEFT's GEMMs.

    A sparsified model holds exactly one SparsityConfig (``rtlynx.sites.Settings``), shared by reference by all
    its sparse layers and sites: configure / save / load / summary / dense_mode read and write that one object.
    """

    n: int = 2
    m: int = 4
    preset: str | None = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    compensation: str = "norm"
    lora_rank: int = 0
    backend: str = "auto"
    k_remainder: str = "pad"
    eps: float = 1e-8
    dense_below_t: float | None = None
    dense_above_t: float | None = None
    mode: str = "sparse"
    lora: bool = True
    speed_rules: bool = True
    fuse_sites: bool = True
    dtype: str = "native"
    keep_dense_weights: bool = False
    adapter_rank: int | str = "auto"
    centre: str | None = None
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self):
        check_pattern(self.n, self.m)
        for name in ("include", "exclude"):  # a bare string would become a tuple of one-letter globs
            globs = getattr(self, name)
            if not isinstance(globs, (list, tuple)) or not all(isinstance(g, str) for g in globs):
                raise ValueError(f"{name} must be a list of glob strings, got {globs!r}")
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        if self.preset is not None and not isinstance(self.preset, str):
            raise ValueError(f"preset must be a name or None, got {self.preset!r}")
        for name, value, allowed in (("compensation", self.compensation, COMPENSATIONS),
                                     ("backend", self.backend, BACKENDS),
                                     ("k_remainder", self.k_remainder, K_REMAINDER),
                                     ("mode", self.mode, MODES),
                                     ("dtype", self.dtype, DTYPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.centre not in CENTRES:
            raise ValueError(f"centre must be one of {CENTRES}, got {self.centre!r}")
        validate.integer("lora_rank", self.lora_rank, 0)
        if self.adapter_rank != "auto":
            validate.integer('adapter_rank (or "auto")', self.adapter_rank, 0)
        for name in ("lora", "speed_rules", "fuse_sites", "keep_dense_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        validate.real("eps", self.eps, 0.0, low_open=True)  # finite too: eps=inf would zero every output
        if self.dense_below_t is not None:
            validate.real("dense_below_t (or None)", self.dense_below_t, 0.0, 1.0, low_open=True)
        if self.dense_above_t is not None:
            validate.real("dense_above_t (or None)", self.dense_above_t, 0.0, 1.0, high_open=True)
            if self.dense_below_t is not None and self.dense_above_t <= self.dense_below_t:
                raise ValueError(f"dense_above_t ({self.dense_above_t}) must be above dense_below_t "
                                 f"({self.dense_below_t}): otherwise every step runs dense (mode='dense' does that)")
        if not _is_int(self.version) or self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not supported (this rtlynx reads {CONFIG_VERSION})")
        if self.preset is None and not self.include:
            raise ValueError("preset=None needs include globs naming the layers to sparsify")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a SparsityConfig is read from a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SparsityConfig fields {sorted(unknown)}")
        return cls(**d)
