"""The Python parts of benchmarks/gpu_check.sh. Lines start with [PASS] / [FAIL] / [INFO].

    python benchmarks/gpu_check.py units [--device cuda]      # kernels (per tensor, per channel) vs reference,
                                                              # saved bytes, AMP inf,
                                                              # devices, host syncs per step, fake-quant op time
    python benchmarks/gpu_check.py qat --amp on|off --report R.json -- <train_qat.py arguments>

``qat`` runs engine.cli.main (what train_qat.py runs) with ``--amp`` or ``--no-amp`` (Ultralytics' AMP check,
which needs a download, is skipped), and callbacks that count non-finite losses, GradScaler back-offs (skipped steps) and
check every LSQ step size / offset finite and > 0 at each epoch end and in the saved last.pt.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


def report(status: str, name: str, detail: str = "") -> None:
    RESULTS.append((status, name, detail))
    print(f"[{status}] {name}: {detail}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    report("PASS" if ok else "FAIL", name, detail)
    return ok


def _bits(t):
    return t.contiguous().view({torch.float32: torch.int32, torch.float16: torch.int16,
                                torch.bfloat16: torch.int16}[t.dtype])


def _same(a, b):
    a, b = a.contiguous(), b.contiguous()
    na, nb = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(na, nb) and torch.equal(_bits(a)[~na], _bits(b)[~nb]))


def kernel_checks(dev):
    """The Triton op (lsq_fake_quant on CUDA) against the reference on the same device, bit for bit."""
    from yolo_qat.quant import fused as fused_lsq
    from yolo_qat.quant.grid import qrange
    from yolo_qat.quant.lsq import lsq_fake_quant

    mod = fused_lsq.triton_module()
    if mod is None:
        return check("triton kernels", False, "quant.lsq_triton could not be imported")
    try:  # directly (lsq_fake_quant would fall back to the reference, with a warning, if a kernel failed)
        t0 = time.perf_counter()
        xt = torch.randn(2, 3, 4, 5, device=dev, dtype=torch.float16, requires_grad=True)
        st = torch.tensor([0.1], device=dev, requires_grad=True)
        mod.fake_quant(xt, st, st * -1, 0, 15, 0.1, 1e-8).float().sum().backward()
        torch.cuda.synchronize()
        report("PASS", "triton kernels compile and run", f"{time.perf_counter() - t0:.1f} s (first call)")
    except Exception as e:
        return check("triton kernels compile and run", False, f"{type(e).__name__}: {str(e)[:400]}")
    bad, n = [], 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for nhwc in (False, True):
            for bits, signed, off in ((4, False, -0.25), (8, False, 0.5), (4, True, None), (2, True, None)):
                for special in (False, True):
                    qmin, qmax = qrange(bits, signed)
                    g = torch.Generator(device="cpu").manual_seed(bits + 7 * nhwc)
                    x = (torch.randn(4, 24, 33, 35, generator=g) * 0.06 * qmax * 0.5).to(dev)
                    x.view(-1)[:64] = (torch.arange(-32, 32, device=dev) + 0.5) * 0.0625  # ties
                    if special:
                        x.view(-1)[-4:] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], device=dev)
                    x = x.to(dtype)
                    if nhwc:
                        x = x.contiguous(memory_format=torch.channels_last)
                    dy = torch.randn(x.shape, generator=g).to(dev).to(dtype)
                    s = torch.tensor([0.0625], device=dev)
                    b = None if off is None else torch.tensor([off], device=dev)
                    outs = []
                    for fused in (True, False):
                        xa = x.detach().clone().requires_grad_()
                        sa = s.clone().requires_grad_()
                        ba = None if b is None else b.clone().requires_grad_()
                        y = lsq_fake_quant(xa, sa, qmin, qmax, 0.01, None, ba, fused=fused)
                        y.backward(dy)
                        outs.append((y.detach(), xa.grad, sa.grad, None if ba is None else ba.grad))
                    (y, dx, ds, db), (yr, dxr, dsr, dbr) = outs
                    n += 1
                    tag = f"{dtype} nhwc={nhwc} {bits}-bit offset={off} special={special}"
                    if y.dtype != dtype or not _same(y, yr):
                        bad.append(f"{tag}: y")
                    if not _same(dx, dxr):
                        bad.append(f"{tag}: dx")
                    for name, a, r in (("ds", ds, dsr), ("db", db, dbr)):
                        if a is None:
                            continue
                        if special:
                            if torch.isnan(a).all() != torch.isnan(r).all():
                                bad.append(f"{tag}: {name} NaN-ness")
                        elif not torch.allclose(a, r, rtol=1e-5, atol=1e-6):
                            bad.append(f"{tag}: {name} {a.item():.8g} vs {r.item():.8g}")
    check("triton still in use after the comparisons (no fallback)", fused_lsq.triton_module() is not None)
    check("triton vs reference on CUDA (y, dx bit for bit; ds, db 1e-5)", not bad,
          f"{n} cases" + (f"; {len(bad)} differ: {bad[:4]}" if bad else ""))


def channel_kernel_checks(dev):
    """The per-channel Triton op (weight quantizers: lsq_fake_quant with axis=0 on CUDA) against the reference on
    the same device: y, dx bit for bit, ds / db per channel to 1e-5; conv-weight shapes NCHW and channels_last,
    ties, NaN / inf, steps at and below the floor; deterministic ds; the input alone saved (no silent fallback)."""
    from yolo_qat.quant import fused as fused_lsq
    from yolo_qat.quant.grid import MIN_SCALE, qrange
    from yolo_qat.quant.lsq import lsq_fake_quant

    mod = fused_lsq.triton_module()
    if mod is None:
        return check("per-channel triton kernels", False, "quant.lsq_triton could not be imported")
    try:  # directly: lsq_fake_quant would fall back to the reference (with a warning) if a kernel failed
        t0 = time.perf_counter()
        wt = torch.randn(8, 3, 3, 3, device=dev, requires_grad=True)
        st = torch.full((8,), 0.1, device=dev, requires_grad=True)
        mod.fake_quant(wt, st, None, -8, 7, 0.1, MIN_SCALE, axis=0).sum().backward()
        torch.cuda.synchronize()
        report("PASS", "per-channel triton kernels compile and run", f"{time.perf_counter() - t0:.1f} s (first call)")
    except Exception as e:
        return check("per-channel triton kernels compile and run", False, f"{type(e).__name__}: {str(e)[:400]}")
    bad, n = [], 0
    # a 1x1 conv, a 3x3 (144 weights a channel: one block), a 3x3 with 2304 a channel (several blocks)
    for shape in ((32, 16, 1, 1), (64, 16, 3, 3), (24, 256, 3, 3)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for nhwc in (False, True):
                for bits, signed, off in ((4, True, None), (2, True, None), (8, True, None), (4, False, -0.25)):
                    for special in (False, True):
                        qmin, qmax = qrange(bits, signed)
                        C = shape[0]
                        g = torch.Generator(device="cpu").manual_seed(bits + 7 * nhwc + C)
                        s = torch.tensor([2.0 ** -(2 + c % 4) for c in range(C)])
                        s[-1], s[-2] = MIN_SCALE, 0.0  # at the floor, below it (straight-through gradient)
                        x = torch.randn(shape, generator=g) * s.view(-1, 1, 1, 1).clamp_min(0.01) * qmax * 0.5
                        k = torch.arange(-4, 4) + 0.5  # ties: x / s = k + 0.5 in every channel
                        x.view(C, -1)[:, :8] = k[:8] * s.view(-1, 1)
                        if special:
                            x.view(C, -1)[0, -1] = float("nan")
                            x.view(C, -1)[1, -3:] = torch.tensor([float("inf"), -float("inf"), 1e30])
                        x = x.to(dev).to(dtype)
                        if nhwc:
                            x = x.contiguous(memory_format=torch.channels_last)
                        dy = torch.randn(shape, generator=g).to(dev).to(dtype)
                        s = s.to(dev)
                        b = None if off is None else torch.tensor([off * (c % 3) for c in range(C)], device=dev)
                        outs = []
                        for fused in (True, True, False):
                            xa = x.detach().clone().requires_grad_()
                            sa = s.clone().requires_grad_()
                            ba = None if b is None else b.clone().requires_grad_()
                            y = lsq_fake_quant(xa, sa, qmin, qmax, 0.01, 0, ba, fused=fused)
                            y.backward(dy)
                            outs.append((y.detach(), xa.grad, sa.grad, None if ba is None else ba.grad))
                        (y, dx, ds, db), (_, _, ds2, db2), (yr, dxr, dsr, dbr) = outs
                        n += 1
                        tag = f"{tuple(shape)} {dtype} nhwc={nhwc} {bits}-bit offset={off} special={special}"
                        if y.dtype != dtype or not _same(y, yr):
                            bad.append(f"{tag}: y")
                        if not _same(dx, dxr):
                            bad.append(f"{tag}: dx")
                        if not _same(ds, ds2) or (db is not None and not _same(db, db2)):
                            bad.append(f"{tag}: ds/db differ between two runs")
                        for name, a, r in (("ds", ds, dsr), ("db", db, dbr)):
                            if a is None:
                                continue
                            na, nr = torch.isnan(a), torch.isnan(r)
                            if not torch.equal(na, nr):
                                bad.append(f"{tag}: {name} NaN channels")
                            elif not torch.allclose(a[~na], r[~nr], rtol=1e-5, atol=1e-6):
                                i = int(((a - r).abs().nan_to_num(0)).argmax())
                                bad.append(f"{tag}: {name}[{i}] {a[i].item():.8g} vs {r[i].item():.8g}")
    check("triton still in use after the per-channel comparisons (no fallback)", fused_lsq.triton_module() is not None)
    check("per-channel triton vs reference on CUDA (y, dx bit for bit; ds, db 1e-5; ds deterministic)", not bad,
          f"{n} cases" + (f"; {len(bad)} differ: {bad[:4]}" if bad else ""))

    # the dispatch: lsq_fake_quant(axis=0) on CUDA runs the kernels (the input alone saved, not the reference's
    # fp32 mask and error), and the time of one weight fake-quant forward + backward
    w = torch.randn(256, 128, 3, 3, device=dev, requires_grad=True)
    sw = torch.full((256,), 0.01, device=dev, requires_grad=True)
    tot = []

    def pack(t):
        tot.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lsq_fake_quant(w, sw, -8, 7, 0.01, 0, None, fused=True)
    own = w.numel() * w.element_size()
    check("per-channel dispatch: lsq_fake_quant(axis=0) on CUDA saves the input alone", sum(tot) <= own + 4096,
          f"{sum(tot) / own:.3f}x the weight's bytes (the reference keeps ~2x)")
    res = {}
    for fused in (True, False):
        for _ in range(3):
            lsq_fake_quant(w, sw, -8, 7, 0.01, 0, None, fused=fused).sum().backward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            lsq_fake_quant(w, sw, -8, 7, 0.01, 0, None, fused=fused).sum().backward()
        torch.cuda.synchronize()
        res[fused] = (time.perf_counter() - t) / 20 * 1000
    report("INFO", "per-channel fake-quant fwd+bwd, 256x128x3x3 fp32 weight",
           f"triton {res[True]:.3f} ms, reference {res[False]:.3f} ms, ratio {res[False] / res[True]:.1f}x")


def saved_and_inf_checks(dev):
    from yolo_qat.quant.lsq import lsq_fake_quant

    def saved(fused, x, s, b):
        tot = []

        def pack(t):
            tot.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lsq_fake_quant(x, s, 0, 15, 0.01, None, b, fused=fused)
        return sum(tot), y

    x = torch.randn(8, 32, 80, 80, device=dev, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    s = torch.tensor([0.05], device=dev, requires_grad=True)
    b = torch.tensor([-0.1], device=dev, requires_grad=True)
    own = x.numel() * x.element_size()
    tri, _ = saved(True, x, s, b)
    ref, _ = saved(False, x, s, b)
    check("saved for backward (fp16 NHWC input)", tri <= own + 64,
          f"triton {tri / own:.3f}x the input's bytes, reference {ref / own:.2f}x")
    # an activation that overflowed to inf under fp16 AMP: finite scale / offset gradients (the clip gradient)
    xi = x.detach().clone()
    xi.view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), 6e4], device=dev, dtype=torch.float16)
    for fused in (True, False):
        xa = xi.clone().requires_grad_()
        sa, ba = s.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16):
            y = lsq_fake_quant(xa, sa, 0, 15, 0.01, None, ba, fused=fused)
        y.float().sum().backward()
        check(f"inf input gives finite gradients ({'triton' if fused else 'reference'})",
              bool(torch.isfinite(sa.grad).all() and torch.isfinite(ba.grad).all() and torch.isfinite(xa.grad).all()),
              f"ds={sa.grad.item():.4g} db={ba.grad.item():.4g}")


def op_time(dev):
    """One fake-quant forward + backward on a 32 x 64 x 160 x 160 fp16 channels_last activation."""
    from yolo_qat.quant.lsq import lsq_fake_quant

    x = torch.randn(32, 64, 160, 160, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    s = torch.tensor([0.05], device=dev, requires_grad=True)
    b = torch.tensor([-0.1], device=dev, requires_grad=True)
    dy = torch.randn_like(x)
    res = {}
    for fused in (True, False):
        xa = x.clone().requires_grad_()
        for _ in range(3):
            lsq_fake_quant(xa, s, 0, 15, 0.01, None, b, fused=fused).backward(dy)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        for _ in range(10):
            lsq_fake_quant(xa, s, 0, 15, 0.01, None, b, fused=fused).backward(dy)
        torch.cuda.synchronize()
        res[fused] = ((time.perf_counter() - t) / 10 * 1000, (torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    report("INFO", "fake-quant fwd+bwd, 32x64x160x160 fp16 NHWC",
           f"triton {res[True][0]:.2f} ms (peak +{res[True][1]:.0f} MiB), reference {res[False][0]:.2f} ms "
           f"(peak +{res[False][1]:.0f} MiB), ratio {res[False][0] / res[True][0]:.1f}x")


def device_checks(dev):
    import copy

    from benchmarks.step_time import build_fp
    from yolo_qat.quant import quantize_model
    from yolo_qat.quant.qc import insert_qc

    fp = build_fp("yolov5n").to(dev)
    q = quantize_model(copy.deepcopy(fp), {"w_bits": 4, "a_bits": 4})  # no .to(): created where the layers are
    off = [n for n, t in list(q.named_parameters()) + list(q.named_buffers()) if t.device.type != dev.type]
    check(f"quantize_model on a {dev.type} model: every parameter and buffer there", not off,
          f"{len(off)} elsewhere: {off[:3]}")
    insert_qc(q)
    off = [n for n, t in list(q.named_parameters()) + list(q.named_buffers()) if t.device.type != dev.type]
    check(f"insert_qc on a {dev.type} model: every parameter and buffer there", not off,
          f"{len(off)} elsewhere: {off[:3]}")


def sync_checks(dev, amp=True):
    from benchmarks.host_sync import CASES, count_step

    rows = []
    for cfg, method, kw in CASES:
        name = f"{cfg} {method}" + "".join(f" +{k}" for k in kw)
        try:
            c = count_step(cfg, method, dev, amp and dev.type == "cuda", imgsz=128 if dev.type == "cuda" else 64,
                           batch=4 if dev.type == "cuda" else 2, **kw)
        except Exception as e:  # one case must not hide the others
            report("FAIL", f"syncs {name}", f"{type(e).__name__}: {str(e)[:200]}")
            continue
        ours = {k: v for k, v in c.by_site.items() if "ultralytics/" not in k and "/torch/" not in k}
        rows.append((name, c.total, sum(ours.values()), c.cuda_warnings))
        allowed = 1 if cfg == "yolov5n-seg" else 0
        check(f"syncs per step {name} (AMP {amp})", sum(ours.values()) <= allowed,
              f"ours {sum(ours.values())}, all (incl. Ultralytics' loss) {c.total}, cuda sync warnings "
              f"{c.cuda_warnings}" + (f"; ours at {dict(list(ours.items())[:3])}" if ours else ""))
    return rows


def units(args):
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    cuda = dev.type == "cuda"
    report("INFO", "device", f"{torch.cuda.get_device_name(dev) if cuda else 'cpu (dry run)'}, torch {torch.__version__}")
    gpu = (kernel_checks, channel_kernel_checks, saved_and_inf_checks, op_time, device_checks, sync_checks)
    for fn in gpu if cuda else (device_checks, sync_checks):
        try:
            fn(dev)
        except Exception as e:
            import traceback

            traceback.print_exc()
            report("FAIL", fn.__name__, f"{type(e).__name__}: {str(e)[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))
    return 1 if any(r[0] == "FAIL" for r in RESULTS) else 0


# ------------------------------------------------------------------------------------------------- qat
def qat(args, argv):
    import yolo_qat.engine.cli as cli
    from yolo_qat.engine.trainer import _all_finite
    from yolo_qat.quant import LSQQuantizer
    from ultralytics.utils.torch_utils import unwrap_model

    want_amp = args.amp == "on"
    argv = [*argv, "--amp" if want_amp else "--no-amp"]
    # Ultralytics' AMP check loads yolo26n.pt, which cannot be downloaded offline: skip it (True when AMP is asked)
    import ultralytics.engine.trainer as ut

    ut.check_amp = lambda *a, **k: want_amp
    rep = {"amp": args.amp, "steps": 0, "nonfinite_loss_steps": 0, "scaler_backoffs": 0, "problems": [],
           "scale_min": None}
    st = {"scale": None}

    def quantizers(model):
        return [m for m in unwrap_model(model).modules() if isinstance(m, LSQQuantizer)]

    def on_train_start(tr):
        rep["trainer_amp"], rep["scaler"] = bool(tr.amp), bool(tr.scaler.is_enabled())
        rep["optimizers"] = [type(tr.optimizer).__name__ + ("(fused)" if tr.optimizer.defaults.get("fused") else ""),
                             type(tr.scale_optimizer).__name__ +
                             ("(fused)" if tr.scale_optimizer.defaults.get("fused") else "")]
        st["scale"] = tr.scaler.get_scale() if rep["scaler"] else None

    def on_train_batch_end(tr):
        rep["steps"] += 1
        if tr.loss is not None and not bool(torch.isfinite(tr.loss).all()):
            rep["nonfinite_loss_steps"] += 1
        if st["scale"] is not None:
            s = tr.scaler.get_scale()
            rep["scaler_backoffs"] += s < st["scale"]
            st["scale"] = s

    def check_q(model, where):
        qs = quantizers(model)
        if not qs:
            return
        lo = min(m.step_size.min().item() for m in qs)
        bad = [i for i, m in enumerate(qs) if not all(bool(torch.isfinite(p).all()) for p in m.parameters())]
        rep["scale_min"] = lo if rep["scale_min"] is None else min(lo, rep["scale_min"])
        if bad or lo <= 0:
            rep["problems"].append(f"{where}: {len(bad)} quantizers non-finite, min raw step {lo:.3g}")

    def on_fit_epoch_end(tr):
        check_q(tr.model, f"epoch {tr.epoch + 1}")

    def on_train_end(tr):
        rep["save_dir"] = str(tr.save_dir)

    rc = cli.main(argv, callbacks={"on_train_start": [on_train_start], "on_train_batch_end": [on_train_batch_end],
                                   "on_fit_epoch_end": [on_fit_epoch_end], "on_train_end": [on_train_end]})
    rep["exit_code"] = rc
    if rc == 0 and rep.get("save_dir"):
        from yolo_qat.models.checkpoint import load_checkpoint

        last = Path(rep["save_dir"]) / "weights" / "last.pt"
        if last.is_file():
            model, ckpt = load_checkpoint(last)
            if not _all_finite(model.state_dict()):
                rep["problems"].append("last.pt: non-finite tensors")
            check_q(model, "last.pt")
        else:
            rep["problems"].append("no last.pt")
    elif rc:
        rep["problems"].append(f"train_qat exit status {rc}")
    if rep["steps"] and rep["nonfinite_loss_steps"] > max(2, rep["steps"] // 10):
        rep["problems"].append(f"{rep['nonfinite_loss_steps']}/{rep['steps']} steps with a non-finite loss")
    Path(args.report).write_text(json.dumps(rep, indent=1, default=str))
    print(f"QAT REPORT amp={rep.get('trainer_amp')} optimizers={rep.get('optimizers')} steps={rep['steps']} "
          f"nonfinite_loss_steps={rep['nonfinite_loss_steps']} scaler_backoffs={rep['scaler_backoffs']} "
          f"min_step={rep['scale_min']} problems={rep['problems']}", flush=True)
    return rc or (1 if rep["problems"] else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["units", "qat"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    ap.add_argument("--amp", choices=["on", "off"], default="on")
    ap.add_argument("--report", default="qat_report.json")
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    return units(args) if args.what == "units" else qat(args, rest)


if __name__ == "__main__":
    sys.exit(main())
