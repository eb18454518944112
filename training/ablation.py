"""Controlled one-factor experiments with the FS 3D CNN (template) on one split: the diagnosis behind
the small profile's encoder strides (docs/training.md, "Measured: Table 1").

```
python -m training.ablation --data /tmp/cohort-tune --repeat 0 --set 'stage_strides=[2,1,1]' --epochs 30
python -m training.ablation --data /tmp/cohort-tune --probe --pstride 2 --pdepth 3 --pnorm group --lr 1e-3
```

A diagnostic, not a protocol: every epoch it prints training, validation AND test loss/AUC of the
split, so run it on a *tuning* cohort (another generator seed, e.g. ``generate /tmp/cohort-tune --seed
1``), never on the cohort whose Table 1 you report. ``--set key=<json>`` overrides one ``fs3dcnn``
hparam over the small profile's (which now has the fix: ``stage_strides`` [2, 1, 1], one block per
stage; the diagnosis's baseline is ``--set 'stage_strides=[2,2,2]' --set 'blocks_per_stage=[2,2,2]'``);
``--balanced`` samples classes evenly, ``--pos-weight`` weights the CE N / (2 n_c). ``--probe`` swaps in a minimal CNN (two 3x3x3 convs, optional
strided convs ``--pdepth``, norm ``--pnorm``, global max pooling, one linear layer). Arrays come from
the same spec and cache as the protocol; the loop is a plain Adam loop (batch 4, flips on x).
"""
import argparse, json, sys, time
from pathlib import Path
import numpy as np, torch
from torch import nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from models.fs3dcnn import FAMILY as FS3D
from training.protocols import load_config
from training.protocols import promptnet as P
from training.data import VolumeCache

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="/tmp/cohort-tune")
ap.add_argument("--repeat", type=int, default=0)
ap.add_argument("--set", action="append", default=[])      # model hparam overrides as k=json
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--wd", type=float, default=0.0)
ap.add_argument("--opt", default="adam")
ap.add_argument("--epochs", type=int, default=30)
ap.add_argument("--bs", type=int, default=4)
ap.add_argument("--balanced", action="store_true")
ap.add_argument("--pos-weight", action="store_true")       # class weights N/(K n_c)
ap.add_argument("--flip", default="0")
ap.add_argument("--probe", action="store_true")
ap.add_argument("--pstride", type=int, default=1)
ap.add_argument("--pnorm", default="none")
ap.add_argument("--pdepth", type=int, default=0)   # extra strided conv layers
ap.add_argument("--pwidth", type=int, default=8)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--tag", default="")
a = ap.parse_args()
torch.set_num_threads(1)
cfg = load_config("promptnet", profile="small")
cases = P._load_cases(Path(a.data), cfg)
plan = P._make_plan(cases, cfg, 5)
sp = plan[a.repeat]
hp = P.model_hparams(cfg, "fs3dcnn")
for s in a.set:
    k, v = s.split("=", 1); hp[k] = json.loads(v)
spec = P.spec_with_spacing(FS3D, hp, cfg["data"]["spacing"])
cache = VolumeCache(spec, Path(a.data).parent / (Path(a.data).name + "-cache"))
X = np.stack([np.stack([cache.get(c).arrays[r] for r in FS3D.input_roles]) for c in cases]).astype(np.float32)
X = torch.from_numpy(X)
y = torch.tensor([c.labels["grade"] for c in cases])
torch.manual_seed(a.seed); rng = np.random.default_rng(a.seed)
if a.probe:
    from models.common3d import norm3d
    W = a.pwidth
    nm = lambda c: norm3d(c, 2, a.pnorm)
    layers = [nn.Conv3d(4, W, 3, stride=a.pstride, padding=1), nm(W), nn.ReLU(), nn.Conv3d(W, W, 3, padding=1), nm(W), nn.ReLU()]
    for _ in range(a.pdepth):
        layers += [nn.Conv3d(W, W, 3, stride=2, padding=1), nm(W), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(W, 2))
    fwd = lambda x: model(x)
else:
    model = FS3D.build(hp); fwd = lambda x: model(x).logits
nparam = sum(p.numel() for p in model.parameters())
opt = (torch.optim.AdamW if a.opt == "adamw" else torch.optim.Adam)(model.parameters(), lr=a.lr, weight_decay=a.wd)
tr, va, te = sp.train, sp.val, sp.test
ytr = y[tr].numpy(); n1 = ytr.sum(); n0 = len(ytr) - n1
cw = torch.tensor([len(ytr) / (2 * n0), len(ytr) / (2 * n1)], dtype=torch.float32) if a.pos_weight else None
flip_axes = [int(f) for f in a.flip.split(",") if f != ""]
def scores(idx):
    model.eval(); out = []
    with torch.no_grad():
        for i in range(0, len(idx), 8):
            z = fwd(X[idx[i:i+8]]); out.append((z[:, 1] - z[:, 0]))
    z = torch.cat(out); yy = y[idx]
    loss = F.cross_entropy(torch.stack([torch.zeros_like(z), z], 1), yy).item()
    return roc_auc_score(yy.numpy(), z.numpy()), loss, z
print(f"# {a.tag} params={nparam} train={len(tr)} (LGG {n0}) val={len(va)} test={len(te)} hp={ {k: hp[k] for k in hp if k in ('stem_stride','stage_strides','groups','widths','stem_width','pooling','dropout')} }", flush=True)
t0 = time.time(); hist = []
for ep in range(a.epochs):
    model.train()
    if a.balanced:
        w = np.where(ytr == 1, 0.5 / n1, 0.5 / n0); order = rng.choice(len(tr), len(tr), p=w / w.sum())
    else:
        order = rng.permutation(len(tr))
    for i in range(0, len(order), a.bs):
        b = tr[order[i:i+a.bs]]
        xb = X[b].clone()
        for ax in flip_axes:
            m = torch.from_numpy(rng.random(len(b)) < 0.5)
            if m.any(): xb[m] = xb[m].flip(ax + 2)
        loss = F.cross_entropy(fwd(xb), y[b], weight=cw)
        opt.zero_grad(); loss.backward(); opt.step()
    atr, ltr, _ = scores(tr); av, lv, _ = scores(va); at, lt, _ = scores(te)
    hist.append((ep + 1, ltr, atr, lv, av, lt, at))
    print(f"ep{ep+1:3d} tr {ltr:.3f}/{atr:.3f}  val {lv:.3f}/{av:.3f}  test {lt:.3f}/{at:.3f}  {time.time()-t0:.0f}s", flush=True)
h = np.array(hist)
bv = int(np.argmax(h[:, 4])); bl = int(np.argmin(h[:, 3]))
print(f"SUMMARY {a.tag}: last val {h[-1,4]:.3f} test {h[-1,6]:.3f} | best-valAUC ep{bv+1} test {h[bv,6]:.3f} | best-valloss ep{bl+1} test {h[bl,6]:.3f} | mean test last5 {h[-5:,6].mean():.3f} | {time.time()-t0:.0f}s")
