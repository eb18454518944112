"""CPU inference speed-ups per family: fp32 vs bf16 autocast, channels-last, torch.compile, ONNX Runtime.

    python benchmarks/inference.py [--family all|fs3dcnn|promptnet|crossmodal|mmdlm] [--repeats N]
                                   [--threads 2] [--variants fp32 predict bf16 channels_last compile onnx]
                                   [--max-pass-s 120] [--json out.json] [--markdown] [--quick]
                                   [--render out.json ...]

Every family is built at its paper-size DEFAULT hyper-parameters (random weights, seed 0) and fed
one random input of the default size at batch 1 (speed does not depend on the values; the
probability deltas below are those of an untrained network on noise, a proxy only). Each family
runs in a fresh subprocess, with ``torch.set_num_threads(--threads)`` and one inter-op thread.

Variants (every one on the same weights and the same input):

- ``fp32``: the bare network forward under ``torch.inference_mode`` (the baseline; the node runs
  the same forward inside the family's ``predict``).
- ``predict``: the family's ``predict`` exactly as the node calls it (``dicomnode/stages/infer.py``:
  ``inference_mode`` except for crossmodal, whose Grad-CAM head needs autograd; ``saliency=False``
  for the 3D seed-000 families), fp32. Shows what the node pays on top of the forward.
- ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the fp32 forward. Skipped (one
  line why) where one bf16 convolution is ``--slow-factor`` times slower than fp32, i.e. on a CPU
  without native bf16 (AVX2 only), where a paper-size pass takes from minutes to an hour.
- ``channels_last``: a copy of the model in ``torch.channels_last_3d`` (Conv3d families) or
  ``torch.channels_last`` (MMDLM's 2D ResNets), input likewise, fp32.
- ``compile``: ``torch.compile`` (default backend, inductor) of the fp32 forward; the first call
  (compilation plus one forward) is reported separately, compiled cold (a fresh inductor cache;
  ``--warm-inductor-cache`` uses the shared one).
- ``onnx``: ``torch.onnx.export`` of the fp32 forward (the dynamo exporter, else the TorchScript
  one) run by ONNX Runtime's CPU provider with ``--threads`` intra-op threads.

Timing: each variant runs once untimed (its warm-up; its output probabilities are compared with
fp32's: max |dp| over all tasks and classes), then ``--repeats`` rounds time every variant once,
interleaved (the order rotates per round) so that the machine's load drifts over all of them
alike; the table shows the median (and the minimum, and the process CPU time: on a shared machine
the wall clock includes waiting for a core). A warm-up pass that runs longer than max(``--max-pass-s``,
``--stop-factor`` x fp32's warm-up) is stopped (SIGALRM, taken between ops, so it may overrun by one
op) and the variant reported as slower than that; a variant whose warm-up took more than
``--slow-factor`` times fp32's is not repeated (its warm-up is its time, "1 pass"). fp32 is never
stopped.

``--quick`` builds tiny models (``benchmarks/models.py``'s QUICK_HPARAMS): a smoke run, not a
measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.models import QUICK_HPARAMS, _cpu_name, network_input_shape, spec_output_shape  # noqa: E402

VARIANTS: tuple[str, ...] = ("fp32", "predict", "bf16", "channels_last", "compile", "onnx")


class PassTimeout(BaseException):
    """Raised by SIGALRM inside a pass that overran its budget (BaseException: nothing swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (taken when control returns to Python, i.e. between ops)."""
    if not seconds or seconds <= 0:
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise PassTimeout(f"stopped after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: BaseException) -> str:
    """An exception as one short line: the first line of its innermost cause (which names the reason)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if len(msg) > 220:
        msg = msg[:217] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# --------------------------------------------------------------------------- the probability network


def make_prob_module(name: str, family: Any, model: Any) -> Any:
    """An ``nn.Module`` over positional tensors returning (B, K) float32 probabilities.

    K: the classes of every task in order (softmax for the single-task 3D families, (1 - p, p) of
    each sigmoid head for MMDLM), the same numbers the family's ``predict`` reports. Positional
    tensors so that torch.compile and torch.onnx.export see a plain signature.
    """
    import torch
    from torch import nn

    class Probs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            if name in ("fs3dcnn", "promptnet"):
                return torch.softmax(self.net(tensors[0]).logits.float(), dim=1)
            if name == "crossmodal":
                out = self.net(dict(zip(family.input_roles, tensors)))
                return torch.softmax(out.logits.float(), dim=1)
            if name == "mmdlm":
                *vols, mask = tensors
                out = self.net(dict(zip(family.input_roles, vols)), mask)
                ps = [torch.sigmoid(out.logits[t].float()) for t in self.net.tasks]
                return torch.cat([torch.stack([1.0 - p, p], dim=1) for p in ps], dim=1)
            raise ValueError(f"no forward rule for family {name!r}")

    return Probs().eval()


def bf16_conv_slowdown(conv_dim: int) -> float:
    """How many times slower one bf16-autocast convolution is than fp32 here (a few seconds to find out).

    Without native bf16 (AVX512-BF16 or AMX; ``torch.backends.cpu.get_cpu_capability()`` says AVX2)
    oneDNN falls back to reference kernels, tens to hundreds of times slower than fp32, and a
    single paper-size Conv3d then runs for minutes: one full pass would cost the machine ~an hour.
    """
    import torch

    if conv_dim == 3:
        conv, x = torch.nn.Conv3d(16, 16, 3, padding=1).eval(), torch.randn(1, 16, 8, 32, 32)
    else:
        conv, x = torch.nn.Conv2d(32, 32, 3, padding=1).eval(), torch.randn(2, 32, 56, 56)
    best: dict[bool, float] = {}
    with torch.inference_mode():
        for bf16 in (False, True, False, True, False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                t0 = time.perf_counter()
                conv(x)
                best[bf16] = min(best.get(bf16, float("inf")), time.perf_counter() - t0)
    return best[True] / best[False]


def export_view(name: str, model: Any) -> tuple[Any, str]:
    """The model as an exporter can trace it, and a note saying what was changed ("" if nothing).

    crossmodal: ``forward`` reads which roles are active from a buffer (``activation_rank.tolist()``),
    a data-dependent branch torch.export refuses. For a fixed checkpoint the active roles are a
    constant, so the exported copy (sharing the weights) answers the current ones as a constant;
    the numbers are unchanged (checked: max |dp| vs fp32).
    """
    if name == "crossmodal":
        roles = tuple(model.active_roles)
        cls = type(model)
        frozen = type(cls.__name__ + "ActiveRolesFrozen", (cls,), {"active_roles": property(lambda self: roles)})
        view = copy.copy(model)  # shares parameters, buffers and submodules
        view.__class__ = frozen
        return view, f"active roles frozen to {','.join(roles)} for export"
    if name == "mmdlm" and getattr(model, "extractor_chunk", 0):
        # ``extractor_chunk`` splits the real slices into chunks by a data-dependent count, which the
        # TorchScript exporter bakes in wrongly (ORT: "Split size 64 exceeds the remaining size").
        # In eval mode chunking changes nothing (BatchNorm uses running statistics): export unchunked.
        view = copy.copy(model)
        view.extractor_chunk = 0
        return view, f"exported without extractor_chunk ({model.extractor_chunk}: all slices in one batch)"
    return model, ""


def make_inputs(name: str, family: Any, shape: tuple[int, ...]) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """Random batch-1 inputs: (the role dict ``predict`` takes, the positional tensors of the module)."""
    import torch

    g = torch.Generator().manual_seed(1)
    roles = {r: torch.randn(1, *shape, generator=g) for r in family.input_roles}
    if name in ("fs3dcnn", "promptnet"):
        return roles, (torch.stack([roles[r] for r in family.input_roles], dim=1),)
    if name == "crossmodal":
        return roles, tuple(roles[r].unsqueeze(1) for r in family.input_roles)  # (B, 1, D, H, W)
    if name == "mmdlm":
        mask = torch.ones(1, shape[0], dtype=torch.bool)
        return {**roles, "slice_mask": mask}, (*(roles[r] for r in family.input_roles), mask)
    raise ValueError(f"no input rule for family {name!r}")


def predict_probs(name: str, family: Any, model: Any, inputs: dict[str, Any]) -> Any:
    """The family's ``predict`` as ``dicomnode/stages/infer.py`` runs it, as (B, K) probabilities."""
    import inspect

    import torch

    kwargs: dict[str, Any] = {}
    if "saliency" in inspect.signature(family.predict).parameters:
        kwargs["saliency"] = False
    grad = contextlib.nullcontext() if name == "crossmodal" else torch.inference_mode()
    with grad:
        pred = family.predict(model, inputs, device="cpu", autocast_dtype=None, **kwargs)
    tasks = list(getattr(model, "tasks", None) or pred.labels)
    return torch.cat([pred.probabilities[t].float() for t in tasks], dim=1)


# --------------------------------------------------------------------------- one family, in a subprocess


def worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, prepare every variant, warm each up, time them interleaved; a JSON-able result."""
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    from models.families import get_family

    torch.manual_seed(0)
    family = get_family(name)
    hp = {**family.default_hparams(), **(QUICK_HPARAMS[name] if args.quick else {})}
    shape = network_input_shape(name, hp)
    spec_shape = None if args.quick else spec_output_shape(family.default_spec())
    model = family.build(hp).eval()
    params = sum(p.numel() for p in model.parameters())
    inputs, pos = make_inputs(name, family, shape)
    probs_mod = make_prob_module(name, family, model)
    conv_dims = {m.weight.dim() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))}
    fmt = torch.channels_last_3d if 5 in conv_dims else torch.channels_last

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, Callable[[], Any]] = {}

    def inference(fn: Callable[..., Any], *a: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return fn(*a)
        return run

    # ---- build every requested variant (failures become one-line rows)
    for v in args.variants:
        row: dict[str, Any] = {"family": name, "variant": v}
        rows[v] = row
        try:
            if v == "fp32":
                runners[v] = inference(probs_mod, *pos)
            elif v == "predict":
                runners[v] = lambda: predict_probs(name, family, model, inputs)
            elif v == "bf16":
                def run_bf16() -> Any:
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                        return probs_mod(*pos)
                runners[v] = run_bf16
            elif v == "channels_last":
                cl_mod = make_prob_module(name, family, copy.deepcopy(model).to(memory_format=fmt))
                # 3D families: the (B, C, D, H, W) volumes too; MMDLM's (B, S, H, W) input is not NCHW
                # (its ResNets see (N, 1, H, W) slices, where either layout is the same memory).
                cl_pos = tuple(t.contiguous(memory_format=fmt) if t.dim() == 5 else t for t in pos)
                row["note"] = "torch.channels_last_3d" if fmt is torch.channels_last_3d else "torch.channels_last"
                runners[v] = inference(cl_mod, *cl_pos)
            elif v == "compile":
                compiled = torch.compile(probs_mod)
                runners[v] = inference(compiled, *pos)
            elif v == "onnx":
                view, why = export_view(name, model)
                runners[v] = build_onnx(make_prob_module(name, family, view), pos, args, row, log)
                if why:
                    row["note"] = f"{row['note']}; {why}"
        except PassTimeout as exc:
            row["error"] = f"setup {exc}"
        except Exception as exc:  # noqa: BLE001 - one line per failed variant is the report
            row["error"] = one_line(exc)
            log(f"{v}: {row['error']}")
            if args.verbose:
                traceback.print_exc()

    # ---- bf16 without native kernels would take minutes to hours: measure one convolution first
    if "bf16" in runners and not args.force_bf16:
        slowdown = bf16_conv_slowdown(3 if fmt is torch.channels_last_3d else 2)
        rows["bf16"]["conv_slowdown"] = slowdown
        log(f"bf16: one Conv{3 if fmt is torch.channels_last_3d else 2}d is {slowdown:.1f}x slower than fp32")
        if slowdown > args.slow_factor:
            rows["bf16"]["error"] = (
                f"skipped: a bf16 Conv{3 if fmt is torch.channels_last_3d else 2}d runs {slowdown:.0f}x slower than "
                f"fp32 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bf16); --force-bf16 runs it")
            del runners["bf16"]

    # ---- warm-up: first (untimed) pass of each variant; its output is compared with fp32's
    ref = None
    fp32_first: float | None = None

    def pass_limit(fp32_s: float | None) -> float:
        """A pass is stopped after max(--max-pass-s, --stop-factor x fp32's warm-up)."""
        return max(args.max_pass_s, args.stop_factor * (fp32_s or 0.0))

    for v, run in list(runners.items()):
        row = rows[v]
        limit = None if v == "fp32" else args.compile_timeout_s if v == "compile" else pass_limit(fp32_first)
        log(f"{v}: warm-up pass" + (f" (limit {limit:.0f} s)" if limit else ""))
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            with time_limit(limit):
                out = run()
        except PassTimeout:
            elapsed = time.perf_counter() - t0
            row["error"] = (f"first call stopped after {elapsed:.0f} s (limit {limit:.0f} s)" if v == "compile" else
                            f"stopped: > {elapsed:.0f} s per pass (limit {limit:.0f} s)")
            row["lower_bound_s"] = elapsed
            del runners[v]
            log(f"{v}: {row['error']}")
            continue
        except Exception as exc:  # noqa: BLE001
            row["error"] = one_line(exc)
            del runners[v]
            log(f"{v}: {row['error']}")
            if args.verbose:
                traceback.print_exc()
            continue
        first = time.perf_counter() - t0
        row["first_s"] = first
        p = out.detach().float().cpu() if hasattr(out, "detach") else torch.as_tensor(out).float()
        row["probs"] = p.flatten().tolist()
        if v == "fp32":
            ref, fp32_first = p, first
        if ref is not None and p.shape == ref.shape:
            row["max_dp"] = float((p - ref).abs().max())
        elif ref is not None:
            row["error"] = f"output shape {tuple(p.shape)} != fp32's {tuple(ref.shape)}"
        log(f"{v}: first pass {first:.2f} s, max|dp| {row.get('max_dp', float('nan')):.2e}")
        if (v not in ("fp32", "compile", "onnx") and fp32_first and first > args.slow_factor * fp32_first):
            row["times"] = [first]
            row["cpu_times"] = [time.process_time() - c0]
            row["note"] = (row.get("note", "") + f"; 1 pass only (>{args.slow_factor:g}x fp32)").lstrip("; ")
            del runners[v]

    def result(rounds: int) -> dict[str, Any]:
        """The JSON-able result after ``rounds`` timed rounds (also written to --partial-json per round)."""
        for v, row in rows.items():
            if row.get("times"):
                row["median_s"] = statistics.median(row["times"])
                row["min_s"] = min(row["times"])
            if row.get("cpu_times"):
                row["cpu_s"] = statistics.median(row["cpu_times"])
            if v == "compile" and "first_s" in row and "median_s" in row:
                row["compile_s"] = max(0.0, row["first_s"] - row["median_s"])
        base = rows.get("fp32", {}).get("median_s")
        for row in rows.values():
            if base and "median_s" in row:
                row["ratio"] = row["median_s"] / base
        return {
            "family": name, "quick": args.quick, "input_shape": list(shape), "params": params,
            "spec_shape": None if spec_shape is None else list(spec_shape), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device_name": _cpu_name(),
            "loadavg": os.getloadavg()[0], "repeats": rounds, "peak_rss_mib": _peak_rss_mib(),
            "rows": copy.deepcopy(list(rows.values())),
        }

    def save_partial(rounds: int) -> None:
        if args.partial_json:
            Path(args.partial_json).write_text(json.dumps(result(rounds)))

    # ---- timed rounds, interleaved, order rotated per round
    save_partial(0)
    order = list(runners)
    for r in range(args.repeats):
        k = r % max(1, len(order))
        for v in order[k:] + order[:k]:
            if v not in runners:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            runners[v]()  # no limit: its warm-up was within the limit
            rows[v].setdefault("times", []).append(time.perf_counter() - t0)
            rows[v].setdefault("cpu_times", []).append(time.process_time() - c0)
        log(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{v} {rows[v]['times'][-1]:.2f}s" for v in order if v in runners and rows[v].get("times"))
            + f" (peak RSS {_peak_rss_mib():.0f} MiB)")
        save_partial(r + 1)

    return result(rounds=args.repeats)


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_onnx(probs_mod: Any, pos: tuple[Any, ...], args: argparse.Namespace, row: dict[str, Any],
               log: Callable[[str], None]) -> Callable[[], Any]:
    """Export ``probs_mod`` to ONNX (dynamo exporter, else TorchScript) and return an ORT runner."""
    import numpy as np
    import torch

    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeError(f"onnxruntime is not installed ({exc})") from exc
    tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-")
    path = Path(tmp.name) / "model.onnx"
    names = [f"in{i}" for i in range(len(pos))]
    errors: list[str] = []
    t0 = time.perf_counter()
    exporter = None
    for dynamo in (True, False):
        kind = "dynamo" if dynamo else "torchscript"
        log(f"onnx: exporting ({kind})")
        try:
            extra: dict[str, Any] = {"external_data": True} if dynamo else {"opset_version": 17}
            with time_limit(args.compile_timeout_s), torch.no_grad(), warnings_off():
                torch.onnx.export(probs_mod, pos, str(path), input_names=names, output_names=["probs"],
                                  dynamo=dynamo, **extra)
            exporter = kind
            break
        except PassTimeout as exc:
            errors.append(f"{kind} export {exc}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{kind}: {one_line(exc)}")
            log(f"onnx: {kind} export failed: {errors[-1]}")
    if exporter is None:
        tmp.cleanup()
        raise RuntimeError("export failed: " + " | ".join(errors))
    export_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        row["onnx_mib"] = sum(f.stat().st_size for f in Path(tmp.name).iterdir()) / 2**20
    finally:
        tmp.cleanup()  # the session holds the model in memory
    wanted = {i.name for i in sess.get_inputs()}
    feed = {n: t.numpy() for n, t in zip(names, pos) if n in wanted}
    row["export_s"] = export_s
    row["note"] = f"{exporter} export {export_s:.0f} s, ORT {ort.__version__}" + (
        f" (dynamo failed: {errors[0]})" if errors else "")

    def run() -> Any:
        return torch.from_numpy(np.asarray(sess.run(["probs"], feed)[0]))

    return run


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- driver and table


def run_family(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One family in a fresh interpreter (no allocator, thread-pool or compile-cache carry-over)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--max-pass-s", str(args.max_pass_s),
           "--compile-timeout-s", str(args.compile_timeout_s), "--slow-factor", str(args.slow_factor),
           "--stop-factor", str(args.stop_factor),
           "--variants", *args.variants]
    cmd += [flag for flag, on in (("--quick", args.quick), ("--verbose", args.verbose),
                                  ("--force-bf16", args.force_bf16)) if on]
    # What the worker measured so far, after every round: kept if it (or this process) dies; next to
    # --json when given, so that a run killed from outside still leaves its rounds on disk.
    partial = (args.json.with_name(f"{args.json.name}.{name}.partial") if args.json
               else Path(tempfile.gettempdir()) / f"bench-inference-{os.getpid()}-{name}.partial")
    partial.unlink(missing_ok=True)
    cmd += ["--partial-json", str(partial)]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        if not args.warm_inductor_cache:  # the compile time a freshly deployed node pays
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=args.timeout,
                                  cwd=REPO, env=env)
            why = f"worker exited {proc.returncode}"
            lines = proc.stdout.strip().splitlines()
        except subprocess.TimeoutExpired:
            why, lines = f"worker ran past --timeout {args.timeout:.0f} s", []
    if lines and why.endswith(" 0"):
        partial.unlink(missing_ok=True)
        return json.loads(lines[-1])
    if partial.exists():  # keep what it measured, and say the rounds are fewer than asked
        res = json.loads(partial.read_text())
        res["error"] = f"{why} after {res['repeats']} of {args.repeats} rounds"
        partial.unlink(missing_ok=True)
        return res
    return {"family": name, "error": why, "rows": []}


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["family", "variant", "median s", "vs fp32", "max |dp|", "min s", "CPU s", "note"]
    body: list[list[str]] = []
    for res in results:
        if res.get("error"):
            body.append([res["family"], "-", "-", "-", "-", "-", "-", f"ERROR: {res['error']}"])
        for r in res["rows"]:
            note = r.get("note", "")
            if r.get("error"):
                note = f"FAILED: {r['error']}" + (f" [{note}]" if note else "")
            if r["variant"] == "compile" and "compile_s" in r:
                note = (f"compile {r['compile_s']:.0f} s (first call {r['first_s']:.0f} s)"
                        + (f"; {note}" if note else ""))
            med = r.get("median_s")
            if med is None and r.get("lower_bound_s"):
                med_s = f"> {r['lower_bound_s']:.0f} s"
            else:
                med_s = _s(med) if med is not None else "-"
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            dp = f"{r['max_dp']:.1e}" if "max_dp" in r else "-"
            body.append([res["family"], r["variant"], med_s, ratio, dp, _s(r.get("min_s")), _s(r.get("cpu_s")), note])
    if markdown:
        cell = lambda c: c.replace("|", "\\|")  # noqa: E731
        out = ["| " + " | ".join(map(cell, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(map(cell, row)) + " |" for row in body]
        return "\n".join(out)
    n = len(head) - 1
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(n)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells[:n], widths))) + "  " + cells[n]
    lines = [fmt(head), "-" * (sum(widths) + 2 * n + 4)]
    lines += [fmt(b) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="all", help="all (default) or one of the family names")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every variant once)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (and ORT's); default 2")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--max-pass-s", type=float, default=120.0,
                    help="a warm-up pass is stopped after max(this, --stop-factor x fp32's warm-up) seconds")
    ap.add_argument("--stop-factor", type=float, default=3.0, help="see --max-pass-s")
    ap.add_argument("--compile-timeout-s", type=float, default=1800.0,
                    help="limit for torch.compile's first call and for the ONNX export")
    ap.add_argument("--slow-factor", type=float, default=5.0,
                    help="a variant whose warm-up is this many times fp32's is not repeated")
    ap.add_argument("--force-bf16", action="store_true",
                    help="run bf16 even where one bf16 convolution is --slow-factor times slower than fp32")
    ap.add_argument("--warm-inductor-cache", action="store_true",
                    help="let torch.compile use the shared inductor cache (default: a fresh one, cold compile)")
    ap.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per family subprocess")
    ap.add_argument("--quick", action="store_true", help="tiny models and inputs: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failed variants on stderr")
    ap.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                    help="measure nothing: print the tables of earlier --json files (concatenated)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--partial-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    if "fp32" not in args.variants:
        args.variants = ["fp32", *args.variants]  # the reference for the ratio and |dp|
    args.variants = list(dict.fromkeys(args.variants))

    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    if args.render:
        results = [res for path in args.render for res in json.loads(path.read_text())]
        report(results, args)
        return 0

    from models.families import FAMILY_NAMES, available_family_names

    if args.family == "all":
        names = list(available_family_names())
    elif args.family in FAMILY_NAMES:
        names = [args.family]
    else:
        ap.error(f"unknown family {args.family!r}; known: all, {', '.join(FAMILY_NAMES)}")
    print(f"torch threads: {args.threads} (intra-op; inter-op 1; ONNX Runtime intra-op {args.threads}); "
          f"repeats: {args.repeats}; variants: {' '.join(args.variants)}", flush=True)
    results = []
    for name in names:
        res = run_family(name, args)
        results.append(res)
        print(table([res]), flush=True)
        if args.json:  # after every family: a run cut short keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    print()
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r.get("error") for r in results) else 0


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The whole table, the conditions it was measured under, and (``--markdown``) the Markdown table."""
    print(table(results))
    ok = [r for r in results if r.get("rows")]  # a worker that died keeps the rounds it finished
    if ok:
        r0 = ok[0]
        print(f"\ncpu: {r0['device_name']} (torch capability {r0['cpu_capability']}), torch {r0['torch']}, "
              f"torch threads {r0['threads']} (inter-op {r0['interop_threads']}); batch 1, default input sizes: "
              + ", ".join(f"{r['family']} {'x'.join(map(str, r['input_shape']))}" for r in ok)
              + f"; median (and min) of {r0['repeats']} interleaved passes after one warm-up; vs fp32 = median "
              f"time / fp32's (< 1 is faster); CPU s = process CPU seconds per pass (all threads); max |dp| = "
              f"largest change of any output probability vs fp32 on the same input; "
              f"1-min load average at the end of each family: " + ", ".join(f"{r['loadavg']:.1f}" for r in ok))
        for r in ok:
            if r.get("spec_shape") and tuple(r["spec_shape"]) != tuple(r["input_shape"]):
                print(f"WARNING: {r['family']}: default_spec produces {tuple(r['spec_shape'])} per role but the "
                      f"network expects {tuple(r['input_shape'])}")
    if args.markdown:
        print()
        print(table(results, markdown=True))


if __name__ == "__main__":
    sys.exit(main())
