"""Driver used on the GPU machine to train the shipped MiniFlux (see assets/miniflux/MODEL_CARD.md).

Run from the repo root with the diffusers wheel installed and the Emoji-64 npz at .cache/emoji64.npz:
  MINUTES=13.3 SESSION=8.0 python3 rtlynx/train/device_job.py train1   # fresh; full state kept in /tmp/mf
  MINUTES=13.3 SESSION=5.3 python3 rtlynx/train/device_job.py train2   # resume; FID if .cache/inception_fp16.pt
Outputs in $OUT: EMA fp16 shards, small.tar (config, tokenizer, loss.json, sample sheets), fid.json.
It registers `rtlynx` as a bare namespace package so only the modules it needs are imported.
"""
import json, os, pathlib, shutil, sys, tarfile, time, types
root = pathlib.Path(__file__).resolve().parents[2]  # repo root
pkg = types.ModuleType("rtlynx"); pkg.__path__ = [str(root / "rtlynx")]; sys.modules["rtlynx"] = pkg  # skip lead's __init__
import torch
from rtlynx.train.reference import TrainConfig, sample_sheet, train
OUT = pathlib.Path(os.environ.get("OUT", "/tmp/out")); OUT.mkdir(parents=True, exist_ok=True)
phase = sys.argv[1]
print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", flush=True)
cfg = TrainConfig(data=str(root / ".cache/emoji64.npz"), out="/tmp/mf", minutes=float(os.environ.get("MINUTES", 13.3)),
                  session_minutes=float(os.environ.get("SESSION", 8.0)), compile=os.environ.get("COMPILE", "1") == "1",
                  batch_size=int(os.environ.get("BS", 512)), lr=float(os.environ.get("LR", 8e-4)),
                  model=json.loads(os.environ.get("MODEL", "{}")))
if phase == "train2" and not pathlib.Path("/tmp/mf/ckpt.pt").exists():
    print("COLD: no /tmp/mf/ckpt.pt"); sys.exit(3)
t0 = time.time()
res = train(cfg, resume=(phase == "train2"), progress=False)
print(f"train call took {time.time() - t0:.1f}s", flush=True)
m = res["model"]
small = []
for g in (2.0, 4.0, 7.0):
    t0 = time.time()
    p = OUT / f"samples_g{g:g}.png"; sample_sheet(m, p, guidance_scale=g); small.append(p)
    print(f"sheet g={g} {time.time() - t0:.1f}s", flush=True)
if phase == "train2" and (root / ".cache/inception_fp16.pt").exists():
    from rtlynx.eval.fid import fid_of_model
    r = fid_of_model(m, cfg.data, root / ".cache/inception_fp16.pt", n=int(os.environ.get("NFID", 5000)), progress=False)
    (OUT / "fid.json").write_text(json.dumps(r, indent=1)); print("FID", json.dumps(r), flush=True)
for f in sorted(pathlib.Path("/tmp/mf/ema").glob("*.safetensors")):
    shutil.copy(f, OUT / f.name)
with tarfile.open(OUT / "small.tar", "w") as tf:
    for f in ["config.json", "tokenizer.json", "loss.json"]:
        tf.add(f"/tmp/mf/ema/{f}", arcname=f)
    for p in small:
        tf.add(p, arcname=p.name)
for p in small:
    p.unlink()
print("done", flush=True)
