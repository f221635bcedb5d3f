"""`rtlynx analyze`: per-layer weight-vs-activation N:M error of a model, as CSV + PNG."""

from __future__ import annotations

from pathlib import Path

from ..validate import arg_int
from . import help_of


TINY = ("tiny-flux", "tiny-qwen-image", "tiny-z-image")


def load_model_and_inputs(spec: str, batches: int, seed: int):
    """(model, list of forward kwargs, label) for a model spec: a tiny random diffusers model,
    "miniflux" (the shipped trained model, real sampling-trajectory inputs) or a local diffusers
    model directory (random latent inputs)."""
    import torch

    from ..integrations.diffusers import example_inputs, tiny_transformer

    if spec in TINY:
        model = tiny_transformer(spec.removeprefix("tiny-"), seed=seed)
        return model, [example_inputs(model, seed=seed + i) for i in range(batches)], spec
    if spec == "miniflux":
        return miniflux_inputs(batches, seed)
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"rtlynx analyze: unknown model {spec!r}: use one of {TINY}, 'miniflux' or a local "
                         "diffusers model directory")
    model = load_local_model(path)
    torch.manual_seed(seed)
    return model, [example_inputs(model, seed=seed + i) for i in range(batches)], path.name


def load_local_model(path: Path):
    """A diffusers model from a local folder: the model's own folder, or a pipeline folder (its transformer/).
    Anything else ends the command with one line saying what the folder is."""
    import json

    import diffusers

    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"  # a pipeline folder (model_index.json + one folder per component)
    where = f"rtlynx analyze: {path}"
    if not (path / "config.json").is_file():
        raise SystemExit(f"{where} is not a diffusers model folder (no config.json, no transformer/config.json)")
    try:
        name = json.loads((path / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"{where}: config.json is not a diffusers config ({e})")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise SystemExit(f"{where} holds {name or 'no _class_name'!s}, not a diffusers model class: give the "
                         "transformer's folder or a pipeline folder holding transformer/")
    try:
        return cls.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"{where}: cannot load the {name}: {first}")


def miniflux_inputs(batches: int, seed: int, steps: int = 20, every: int = 4):
    """The shipped mini-FLUX's transformer and real inputs: the transformer's forward kwargs along dense
    sampling trajectories of the demo prompts (every ``every``-th step, so early and late t both count)."""
    import torch

    from ..demo import DEMO_PROMPTS
    from ..models.miniflux import load_miniflux

    model = load_miniflux(device="cuda" if torch.cuda.is_available() else "cpu")
    calls = []
    hook = model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    try:
        for b in range(batches):
            model.sample(DEMO_PROMPTS, num_steps=steps, seed=seed + b)
    finally:
        hook.remove()
    return model.transformer, calls[::every], "mini-FLUX"


def run(args) -> int:
    from .. import analysis
    from ..reference import check_pattern

    try:
        check_pattern(args.n, args.m)  # before the model loads
    except (TypeError, ValueError) as e:
        raise SystemExit(f"rtlynx analyze: --n {args.n} --m {args.m}: {e}") from None
    model, inputs, label = load_model_and_inputs(args.model, args.batches, args.seed)
    rows = analysis.analyze(model, inputs, n=args.n, m=args.m, preset=args.preset, max_tokens=args.max_tokens)
    if not rows:
        raise SystemExit("rtlynx analyze: no sparsifiable layer saw any input")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = analysis.write_csv(rows, out / "layer_errors.csv")
    png_path = analysis.plot(rows, out / "layer_errors.png", title=f"{label}: {args.n}:{args.m} per-layer output error",
                             n=args.n, m=args.m)
    print(analysis.report(rows))
    print(f"wrote {csv_path} and {png_path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("analyze", help=help_of("analyze"))
    p.add_argument("--model", default="tiny-flux",
                   help=f"{', '.join(TINY)}, miniflux (shipped model) or a local diffusers model dir")
    p.add_argument("--out", default="rtlynx-analysis", help="output directory")
    p.add_argument("--n", type=arg_int(1), default=2, help="N of the N:M pattern (kept per group)")
    p.add_argument("--m", type=arg_int(2), default=4, help="M of the N:M pattern (group size along K)")
    p.add_argument("--preset", default=None, help="which layers (none: every token linear)")
    p.add_argument("--batches", type=arg_int(1), default=2, help="forward passes to collect inputs from")
    p.add_argument("--max-tokens", type=arg_int(1), default=4096, help="input rows kept per layer")
    p.add_argument("--seed", type=arg_int(0), default=0, help="seed of the model weights (tiny models) and inputs")
    p.set_defaults(func=run)
