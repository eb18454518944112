"""Model cost: parameters, forward latency and peak memory per family, batch 1 and 4.

    python benchmarks/models.py [--families fs3dcnn mmdlm ...] [--device cpu|cuda] [--quick]
                                [--runs N] [--batches 1 4] [--json out.json] [--predict]

Every family is measured at its DEFAULT input size (from ``default_hparams``;
checked against ``default_spec``), in eval mode under ``torch.no_grad``: the
median of ``--runs`` timed forwards after two warm-up forwards (three on CUDA).
On CUDA each configuration runs in fp32 and under bf16 autocast. ``--predict``
also times the family's ``predict`` (forward plus its explanation: Grad-CAM for
the 3D models, attention for MMDLM), which is what the node runs.

Peak memory. CPU: each (family, batch, dtype) runs in a fresh subprocess; its
RSS high-water mark (VmHWM) is reset after the model and inputs exist
(``/proc/self/clear_refs``), so "peak" is the extra resident memory the first
forward needs (activations, workspace), and "total" the process's whole
high-water mark (model, inputs, interpreter, torch). Allocator caching makes
later forwards look cheaper, so the first forward is the one measured.
CUDA: ``torch.cuda.max_memory_allocated`` over the first forward, less what was
allocated before it.

``--quick`` builds tiny models on tiny inputs: a smoke run that keeps the
script from rotting (the test suite runs it for one family), not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tiny configurations for --quick (same shapes as the families' own tests).
QUICK_HPARAMS: dict[str, dict[str, Any]] = {
    "fs3dcnn": {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [8, 8, 16],
                "blocks_per_stage": [1, 1, 1], "groups": 4, "fc_hidden": [16, 8]},
    "promptnet": {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [8, 8, 16],
                  "blocks_per_stage": [1, 1, 1], "groups": 4, "fc_hidden": [16, 8]},
    "crossmodal": {"input_size": [8, 16, 16], "widths": [8, 8, 16, 16], "blocks": [1, 1, 1, 1],
                   "guide_channels": 4, "attention_reduction": 4, "hidden": 16},
    "mmdlm": {"resnet_layers": [1, 1, 1, 1], "resnet_widths": [4, 8, 8, 16], "mil_hidden_dim": 8,
              "mil_attention_dim": 8, "projection_dim": 4, "fusion_dim": 4, "slice_size": [32, 32],
              "slice_count": 6},
}


def network_input_shape(name: str, hp: Mapping[str, Any]) -> tuple[int, ...]:
    """The per-role tensor shape (without batch) the built network accepts, from its hparams."""
    if name in ("fs3dcnn", "promptnet"):
        return tuple(int(s) for s in hp["input_shape"])
    if name == "crossmodal":
        return tuple(int(s) for s in hp["input_size"])
    if name == "mmdlm":
        return (int(hp["slice_count"]), *(int(s) for s in hp["slice_size"]))
    raise ValueError(f"no input shape rule for family {name!r}")


def spec_output_shape(spec: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The per-role array shape ``apply_spec`` produces for ``spec`` (None if it is data-dependent)."""
    shape: list[int] | None = None
    for t in spec["transforms"]:
        if t["name"] == "crop_or_pad":
            shape = list(t["shape"])
        elif t["name"] == "transpose" and shape is not None:
            shape = [shape[a] for a in t["axes"]]
    if spec.get("slices"):
        return (int(spec["slices"]["count"]), *(int(s) for s in spec["slices"]["size"]))
    return tuple(shape) if shape is not None else None


def forward_fn(name: str, family: Any, model: Any, inputs: dict[str, Any]) -> Callable[[], Any]:
    """A closure running the bare network forward on ``inputs`` (the families' forward signatures differ)."""
    import torch

    if name in ("fs3dcnn", "promptnet"):
        x = torch.stack([inputs[r] for r in family.input_roles], dim=1)
        return lambda: model(x)
    if name == "crossmodal":
        return lambda: model({r: inputs[r] for r in family.input_roles})
    if name == "mmdlm":
        return lambda: model({r: inputs[r] for r in family.input_roles}, inputs["slice_mask"])
    raise ValueError(f"no forward rule for family {name!r}")


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(name: str, batch: int, device: str, dtype: str, quick: bool, runs: int, with_predict: bool) -> dict:
    """One measurement, in this (fresh) process; returns a JSON-able row."""
    import torch

    from models.families import get_family

    torch.manual_seed(0)
    family = get_family(name)
    hp = {**family.default_hparams(), **(QUICK_HPARAMS[name] if quick else {})}
    shape = network_input_shape(name, hp)
    spec_shape = None if quick else spec_output_shape(family.default_spec())
    dev = torch.device(device)
    model = family.build(hp).eval().to(dev)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs: dict[str, Any] = {r: torch.randn(batch, *shape, device=dev) for r in family.input_roles}
    if name == "mmdlm":
        inputs["slice_mask"] = torch.ones(batch, shape[0], dtype=torch.bool, device=dev)
    run = forward_fn(name, family, model, inputs)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    cpu_times: list[float] = []

    def once() -> float:
        ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad(), ctx:
            run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        cpu_times.append(time.process_time() - c0)
        return time.perf_counter() - t0

    # first forward: the memory measurement
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first = once()
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        total_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            reset = True
        except OSError:
            reset = False
        base = _proc_kib("VmRSS")
        first = once()
        hwm = _proc_kib("VmHWM")
        peak_mib = (hwm - base) / 1024 if reset else float("nan")
        total_mib = hwm / 1024
    # one more warm-up (the allocator settles: glibc raises its mmap threshold after the first
    # large frees, so the first repeats still page-fault); two more on CUDA (cudnn autotune, lazy init)
    for _ in range(2 if dev.type == "cuda" else 1):
        once()
    cpu_times.clear()
    times = [once() for _ in range(runs)]
    row: dict[str, Any] = {
        "family": name, "device": device, "dtype": dtype, "batch": batch, "quick": quick,
        "input_shape": list(shape), "spec_shape": None if spec_shape is None else list(spec_shape),
        "roles": list(family.input_roles), "params": params, "trainable_params": trainable,
        "first_forward_s": first, "latency_s": statistics.median(times), "latency_min_s": min(times),
        "latency_max_s": max(times), "runs": runs, "peak_mib": peak_mib, "total_mib": total_mib,
        "cpu_s": statistics.median(cpu_times), "loadavg": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
    }
    if with_predict:
        pinputs = {k: v for k, v in inputs.items()}
        family.predict(model, pinputs, device=device, autocast_dtype=autocast_dtype)  # warm-up
        ptimes = []
        for _ in range(max(1, runs)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            family.predict(model, pinputs, device=device, autocast_dtype=autocast_dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ptimes.append(time.perf_counter() - t0)
        row["predict_s"] = statistics.median(ptimes)
    return row


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu x{os.cpu_count()}"


def measure(name: str, batch: int, device: str, dtype: str, quick: bool, runs: int, with_predict: bool,
            timeout: float) -> dict:
    """Run one measurement in a fresh interpreter (clean RSS high-water mark, no allocator carry-over)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(batch), device, dtype,
           "--runs", str(runs)]
    if quick:
        cmd.append("--quick")
    if with_predict:
        cmd.append("--predict")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        return {"family": name, "device": device, "dtype": dtype, "batch": batch,
                "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (f"{'family':<11}{'dev':<5}{'dtype':<6}{'B':>2}  {'input (per role)':<18}{'params':>12}"
            f"{'fwd median':>12}{'per case':>11}{'CPU time':>10}{'peak MiB':>10}{'total MiB':>10}")
    if any("predict_s" in r for r in rows):
        head += f"{'predict':>10}"
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['family']:<11}{r['device']:<5}{r['dtype']:<6}{r['batch']:>2}  ERROR: {r['error']}")
            continue
        shape = "x".join(str(s) for s in r["input_shape"])
        line = (f"{r['family']:<11}{r['device']:<5}{r['dtype']:<6}{r['batch']:>2}  {shape:<18}"
                f"{r['params']:>12,}{_fmt_s(r['latency_s']):>12}{_fmt_s(r['latency_s'] / r['batch']):>11}"
                f"{_fmt_s(r['cpu_s']):>10}{r['peak_mib']:>10.0f}{r['total_mib']:>10.0f}")
        if "predict_s" in r:
            line += f"{_fmt_s(r['predict_s']):>10}"
        out.append(line)
    return "\n".join(out)


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=None, help="default: every family whose code exists")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny models and inputs: a smoke run")
    ap.add_argument("--runs", type=int, default=None, help="timed forwards (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--predict", action="store_true", help="also time the family's predict (with explanations)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement subprocess")
    ap.add_argument("--worker", nargs=4, metavar=("FAMILY", "BATCH", "DEVICE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    runs = args.runs if args.runs is not None else (20 if args.device == "cuda" else 3)

    if args.worker:
        name, batch, device, dtype = args.worker
        row = worker(name, int(batch), device, dtype, args.quick, runs, args.predict)
        print(json.dumps(row))
        return 0

    from models.families import FAMILY_NAMES, available_family_names

    names = args.families or list(available_family_names())
    unknown = [n for n in names if n not in FAMILY_NAMES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {list(FAMILY_NAMES)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is available")
    dtypes = ["fp32", "bf16"] if args.device == "cuda" else ["fp32"]
    rows: list[dict] = []
    for name in names:
        for batch in args.batches:
            for dtype in dtypes:
                row = measure(name, batch, args.device, dtype, args.quick, runs, args.predict, args.timeout)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    shown = [r for r in rows if "error" not in r]
    if shown:
        loads = ", ".join(f"{r['loadavg']:.1f}" for r in shown)
        print(f"\ndevice: {shown[0]['device_name']}, torch threads {shown[0]['threads']}; "
              f"latency = median of {runs} forward(s) after warm-up (wall clock; CPU time = process CPU "
              f"seconds of that forward, all threads); peak = extra RSS/allocation of the first forward; "
              f"1-min load average at each measurement: {loads}")
    warned: set[str] = set()
    for r in shown:
        if r.get("spec_shape") and tuple(r["spec_shape"]) != tuple(r["input_shape"]) and r["family"] not in warned:
            warned.add(r["family"])
            print(f"WARNING: {r['family']}: default_spec produces {tuple(r['spec_shape'])} per role but the "
                  f"network expects {tuple(r['input_shape'])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
