"""QC on every deploy target (quant/targets.py): the fold check is right for sim, ort, npu and tensorrt, det and seg.

What this guards. On the integer targets most convs read a tensor another module encoded (``input_source``: a
block output, a residual sum, a C2f split) as it is; their own input quantizer never runs, and QAT trains the
encoding away from it. A fold check that evaluated such a conv in float64 on its input re-quantized by that
unused quantizer would find every one of them "different from its float64 evaluation" by thousands of times the
float32 bound, and QC could not finish. On ``ort`` and ``npu`` a folded
layer's output goes straight into an 8-bit quantizer: an output that sits within the float32 bounds of a rounding
tie may take the other code after folding; the check counts those as ties and still fails a wrong fold.

Models: yolov8n / yolov8n-seg, W4A8 per channel (the recipe every target takes), BN statistics and quantizer
ranges from the embedded data, then a few QAT steps (``qat_steps``), at 64 px; the scale test below uses real
photographs (tests/real_photos.py) at 256 px.
"""
import copy
import json

import pytest
import torch
from torch import nn

from yolo_qat import models  # noqa: F401  (registers the YOLO policy)
from yolo_qat.models.checkpoint import load_checkpoint, save_checkpoint
from yolo_qat.quant import quant_convs
from yolo_qat.quant.qc import (EPS32, FoldCheckError, _chain, _fan_in, default_bn_pairs, downstream_ties, fold_qc_checked,
                      insert_qc, layer_output_f64, qc_modules)
from yolo_qat.quant.qc import fold_into_bn as right_fold_into_bn
from yolo_qat.quant.qconv import QuantConv2d
from yolo_qat.quant.targets import TARGET_NAMES
from builders import fp_like_model, qat_like_model

KINDS = {"det": "yolov8n.yaml", "seg": "yolov8n-seg.yaml"}
W4A8 = {"w_bits": 4, "a_bits": 8, "per_channel": True}


def assert_downstream(target, layers):
    """The quantizer the check found after each folded layer is the one the target puts there."""
    for n, r in layers.items():
        if target in ("ort", "npu"):  # a quantizer on every conv output (after BN and QC), taking it as it is
            assert r["through"] is None and r["downstream"].endswith((".act.pre", ".quantizer")), (n, r["downstream"])
        elif target == "tensorrt" and r["into"] == "bn":  # the block output's encoding, after the fused SiLU
            assert r["through"] == "SiLU" and r["downstream"].endswith(".act.out"), (n, r["downstream"])
        else:  # sim (a float SiLU whose output each conv quantizes), TensorRT's head outputs (float)
            assert r["downstream"] is None and "ties" not in r, (n, r["downstream"])


def qat_steps(model, data_yaml, steps=2, lr=1e-3, imgsz=64):
    """A few QAT steps (Adam on the weights and every quantizer, BN statistics frozen), as QAT leaves a model:
    the encodings of shared tensors move away from the input quantizers of the convs that read them as they are."""
    from yolo_qat.engine.calib import calibration_loader, ensure_loss_args, preprocess
    from yolo_qat.models.facts import model_task

    ensure_loss_args(model)
    loader, _ = calibration_loader(data_yaml, model_task(model), imgsz, 4, save_dir=data_yaml.parent / "qat_build")
    batches = [preprocess(b) for b in loader]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        loss, _ = model.loss(batches[i % len(batches)])
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def qc_like_corrections(model, size=2e-3, seed=0):
    """Corrections of the size a few Adam steps at lr 1e-4..1e-3 give: gamma = 1 + N(0, size), beta = N(0, size)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in qc_modules(model).values():
            w.qc.gamma.copy_(1 + size * torch.randn(w.qc.gamma.shape, generator=g))
            w.qc.beta.copy_(size * torch.randn(w.qc.beta.shape, generator=g))


@pytest.fixture(scope="module")
def trained(data):
    """{(target, kind): W4A8 model after QAT steps}, built on first use; tests take copies."""
    class Lazy(dict):
        def __missing__(self, key):
            target, kind = key
            q = qat_like_model(data, KINDS[kind], recipe={**W4A8, "target": target})
            self[key] = qat_steps(q, data)
            return self[key]

    return Lazy()


def layer_inputs(model, x):
    """{QCConv name: its input} in one eval forward."""
    inputs = {}
    hooks = [w.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, w in qc_modules(model).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return inputs


@torch.no_grad()
def old_fp32_ratios(model, x):
    """{layer: the previous check's fp32 ratio}: the fp32 forward of each (conv, QC, BN) against a float64
    evaluation on the input re-quantized by the conv's own input quantizer, with the bias parameter as it is
    (what the check computed before it followed the forward). > 1 failed the fold."""
    pairs, mods = default_bn_pairs(model), dict(model.named_modules())
    out = {}
    for n, xi in layer_inputs(model, x).items():
        w = mods[n]
        conv, qc, bn = w.conv, w.qc, mods[pairs[n]] if n in pairs else None
        xq, wq = conv.input_quantizer(xi.float()), conv.weight_quantizer(conv.weight.float())
        ref = layer_output_f64(conv, qc, bn, xi, conv_out=conv.convolve(xq.double(), wq.double()), as_run=False)
        mag = layer_output_f64(conv, qc, bn, xi, True, conv_out=conv.convolve(xq.double().abs(), wq.double().abs()),
                               as_run=False)
        diff = (_chain(conv, qc, bn)(xi).double() - ref).abs()
        out[n] = (diff / ((_fan_in(conv) + 8) * EPS32 * mag)).max().item()
    return out


def probe(n=2, size=64, seed=7):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGET_NAMES)
def test_fold_check_passes_on_every_target_where_the_old_one_failed(target, trained):
    m = copy.deepcopy(trained[target, "det"])
    shared = {n for n, c in quant_convs(m).items() if c.input_source is not None}
    insert_qc(m)
    qc_like_corrections(m)
    x = probe()
    old = old_fp32_ratios(m, x)
    rep = fold_qc_checked(m, lambda: m(x))
    assert len(rep["layers"]) == len(old) and not rep["unchecked"] and rep["worst_ratio"] <= 1
    # what the fold check follows: a conv reading a shared encoding as it is (none on sim)
    assert (target == "sim") == (not shared), len(shared)
    failed_before = {n for n, r in old.items() if r > 1}
    assert failed_before <= shared  # only those failed before, and on the integer
    if shared:  # targets (trained encodings) nearly all of them did
        assert len(failed_before) >= len(shared) // 2, (len(failed_before), len(shared))
    assert_downstream(target, rep["layers"])
    print(f"\n{target}: old check failed {len(failed_before)} of {len(old)} layers ({len(shared)} read a shared "
          f"encoding), new check passes (worst {rep['worst_ratio']:.2g}), {rep['ties']} ties")


def _beta_unscaled(bn, gamma, beta):  # adds beta to BN's bias without BN's scale k
    right_fold_into_bn(bn, gamma, torch.zeros_like(beta))
    with torch.no_grad():
        bn.bias.add_(beta.reshape(-1).to(bn.bias))


_right_fold_affine = QuantConv2d.fold_affine


def _gamma_forgotten(conv, scale, shift):  # the output scale keeps its old value
    _right_fold_affine(conv, torch.ones_like(scale), shift)


PLANTED = {"beta_unscaled_into_bn": ("fold_into_bn", _beta_unscaled),
           "gamma_forgotten_in_conv": ("fold_affine", _gamma_forgotten)}


@pytest.mark.parametrize("bug", list(PLANTED))
@pytest.mark.parametrize("target", TARGET_NAMES)
def test_fold_check_fails_a_planted_fold_bug_on_every_target(target, bug, trained, monkeypatch):
    import yolo_qat.quant.qc as qcmod

    where, wrong = PLANTED[bug]
    if where == "fold_into_bn":
        monkeypatch.setattr(qcmod, "fold_into_bn", wrong)
    else:
        monkeypatch.setattr(QuantConv2d, "fold_affine", wrong)
    m = copy.deepcopy(trained[target, "det"])
    insert_qc(m)
    qc_like_corrections(m)
    x = probe()
    with pytest.raises(FoldCheckError) as e:
        fold_qc_checked(m, lambda: m(x))
    into = "the BatchNorm after it" if where == "fold_into_bn" else "the conv's output scale and bias"
    msg = str(e.value)
    assert e.value.ratio > 10 and f"'{e.value.layer}'" in msg and into in msg and "\n" not in msg, msg
    assert "bug in the folding code" in msg
    if where == "fold_affine":  # only the head's final convs fold into their own output scale
        assert e.value.layer.startswith("model.22.") and e.value.layer.endswith(("2", "2.conv"))


def test_the_quantizer_after_a_layer_is_the_one_that_takes_its_output_as_it_is():
    from test_qc import X, randomise_corrections, toy_model

    m = toy_model()
    m[0].act = nn.Identity()  # the next conv's input quantizer takes block 0's BN output as it is
    insert_qc(m)
    randomise_corrections(m)
    layers = fold_qc_checked(m, lambda: m(X))["layers"]
    assert layers["0.conv"]["downstream"] == "1.conv.conv.input_quantizer" and layers["0.conv"]["ties"] >= 0
    assert layers["1.conv"]["downstream"] is None  # a float SiLU comes first
    assert layers["2"]["downstream"] is None and "ties" not in layers["2"]  # the model's output


def test_downstream_ties_counts_ties_and_fails_a_code_changed_away_from_one():
    from yolo_qat.quant.act import output_quantizer

    q = output_quantizer(8)
    q.set_scale(torch.tensor([0.1]), offset=torch.tensor([-1.0]))  # zero point 10
    ref = torch.tensor([0.45, 0.45, 1.2, 3.0], dtype=torch.float64)  # the first two on the tie between codes 14 and 15
    before = torch.tensor([0.45 - 1e-6, 0.45, 1.2, 3.0])
    after = torch.tensor([0.45 + 1e-6, 0.45, 1.2, 3.0])
    band = torch.full((4,), 2e-6, dtype=torch.float64)
    assert downstream_ties(q, before, after, ref, band) == {"ties": 1, "tie_ratio": pytest.approx(0, abs=0.02)}
    moved = after.clone()
    moved[2] = 1.3  # a whole step from a tie: no rounding can do this
    r = downstream_ties(q, before, moved, ref, band)
    assert r["ties"] == 2 and r["tie_ratio"] > 1e3, r
    assert downstream_ties(q, before, before, ref, band) == {"ties": 0, "tie_ratio": 0.0}


def test_a_code_changed_away_from_a_tie_fails_in_one_paragraph_naming_layer_and_quantizer():
    from yolo_qat.quant.qc import _failure_message

    ok = {"into": "bn", "fold_ratio": 0.4, "fp32_ratio": 0.01, "ties": 2, "tie_ratio": 0.3,
          "downstream": "model.4.act.pre", "max_diff": 1e-7, "at_value": 0.5}
    bad = {**ok, "ties": 3, "tie_ratio": 4e3, "downstream": "model.6.cv1.act.pre"}
    msg = _failure_message({"model.4.conv": ok, "model.6.cv1.conv": bad}, "model.6.cv1.conv")
    assert "'model.6.cv1.conv'" in msg and "'model.6.cv1.act.pre'" in msg and "3 outputs" in msg, msg
    assert "4e+03 times farther from a rounding tie" in msg and "1 of 2 folded layers fail" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# QC for every target, task and loss (labels, distillation, label-free): in process (run_qc), and for ``ort``, the
# target QC could not finish on, through correct_qc.py
MODES = {"labels": [], "distill": ["--distill"], "label-free": ["--no-labels"]}
# every target with every mode, the task alternating: each target and each mode runs on det and on seg
RUNS = [(t, list(KINDS)[(i + j) % 2], mode) for i, t in enumerate(TARGET_NAMES) for j, mode in enumerate(MODES)]


@pytest.fixture(scope="module")
def teachers(data):
    """{kind: the FP model the trained models were quantized from}."""
    class Lazy(dict):
        def __missing__(self, kind):
            self[kind] = fp_like_model(data, KINDS[kind])[0]
            return self[kind]

    return Lazy()


def qc_in_process(model, data, mode, teacher) -> dict:
    from yolo_qat.engine.qc import run_qc

    where = {"source": data.parent / "images" / "train"} if mode == "label-free" else {"data": data}
    _, rep = run_qc(model, imgsz=64, batch=4, steps=1, measure_loss=False,
                    teacher=None if mode == "labels" else teacher, **where)
    assert not qc_modules(model)
    return rep


def qc_cli(qat, data, mode, teacher, tmp_path, monkeypatch, capsys) -> tuple[dict, str]:
    import correct_qc

    monkeypatch.chdir(tmp_path)
    source = ["--source", str(data.parent / "images" / "train")] if mode == "label-free" else ["--data", str(data)]
    kd = ["--teacher", str(teacher)] if mode != "labels" else []
    rc = correct_qc.main(["--weights", str(qat), *source, *MODES[mode], *kd, "--imgsz", "64", "--batch", "4",
                          "--steps", "1", "--no-val", "--no-measure-loss", "--name", "t"])
    out = capsys.readouterr().out
    assert rc == 0, out
    folded, ckpt = load_checkpoint(tmp_path / "runs" / "qc" / "t" / "weights" / "qc.pt")
    assert not qc_modules(folded) and ckpt["quant_recipe"]["target"] == "ort"
    return json.loads((tmp_path / "runs" / "qc" / "t" / "qc_report.json").read_text()), out


@pytest.mark.filterwarnings("ignore:calib_images")
@pytest.mark.parametrize("target,kind,mode", RUNS)
def test_qc_runs_and_folds_for_every_target(target, kind, mode, data, trained, teachers, tmp_path, monkeypatch,
                                            capsys):
    if target == "ort":
        qat = save_checkpoint(tmp_path / "qat.pt", trained[target, kind])
        fp = save_checkpoint(tmp_path / "fp.pt", teachers[kind])
        rep, out = qc_cli(qat, data, mode, fp, tmp_path, monkeypatch, capsys)
    else:
        rep, out = qc_in_process(copy.deepcopy(trained[target, kind]), data, mode, teachers[kind]), None
    fold = rep["fold"]
    assert fold["passed"] and not fold["unchecked"] and len(fold["layers"]) == rep["corrected_convs"]
    assert len(rep["history"]) == 1 and ("distill" in rep) == (mode != "labels")
    assert rep.get("distill", {}).get("label_free", False) == (mode == "label-free")
    assert_downstream(target, fold["layers"])
    if out is not None:  # the summary says how many outputs sat on a tie
        assert f"{fold['ties']} outputs of {fold['tie_layers']} layers sat on a rounding tie" in out, out


# ---------------------------------------------------------------------------------------------
# At a scale where ties happen: yolov8n for ort on real photographs at 256 px. The old check fails most layers there
# (calibration alone puts a conv's own input quantizer a little off the encoding it reads; QAT moves them apart),
# folding changes some conv-output codes (outputs on a rounding tie: float32 reordering, and the int32 bias of the
# head convs re-rounded to the folded accumulator grid), and with those codes pinned the folded model computes the
# unfolded model's outputs bit for bit.
SCALE_IMGSZ = 256


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from real_photos import real_photo_dataset

    return real_photo_dataset(tmp_path_factory.mktemp("photos") / "ds", n_train=8, n_val=2, imgsz=SCALE_IMGSZ)


@pytest.fixture(scope="module", params=["ort", "tensorrt"])
def at_scale(request, photos):
    """(target, unfolded model with QC corrections, the folded one, its fold report, the old check's ratios, probe)
    for yolov8n W4A8 on real photos: ``ort`` (a quantizer on every conv output), ``tensorrt`` (block encodings after
    the fused SiLU)."""
    from yolo_qat.engine.calib import calibration_loader, preprocess

    q = qat_like_model(photos, KINDS["det"], recipe={**W4A8, "target": request.param}, imgsz=SCALE_IMGSZ)
    qat_steps(q, photos, steps=2, imgsz=SCALE_IMGSZ)
    insert_qc(q)
    qc_like_corrections(q)
    loader, _ = calibration_loader(photos, "detect", SCALE_IMGSZ, 2, shuffle=False, save_dir=photos.parent / "probe")
    x = preprocess(next(iter(loader)))["img"]
    old = old_fp32_ratios(q, x)
    unfolded = copy.deepcopy(q)
    report = fold_qc_checked(q, lambda: q(x))
    return request.param, unfolded, q, report, old, x


def tie_distance(quantizer, x: torch.Tensor) -> torch.Tensor:
    """How far each value of ``x`` lies from the nearest rounding tie of ``quantizer``, in steps (float64)."""
    b = quantizer.effective_offset(grad=False)  # None on a symmetric grid
    z = (x.double() - (0 if b is None else b.double())) / quantizer.scale.double()
    return (z - z.floor() - 0.5).abs()


@torch.no_grad()
def run_with_ties_pinned(unfolded, folded, quantizer_names, x):
    """Both models' outputs on ``x``, the folded one run with the output of every named quantizer replaced by what
    the unfolded model's quantizer gave: where its codes differ, that is the tie taken the other way.
    Returns (outputs unfolded, outputs folded, [(quantizer, codes that differed, their largest distance from a tie,
    in steps, measured on the unfolded value)])."""
    recorded, changed = {}, []
    mods_u, mods_f = dict(unfolded.named_modules()), dict(folded.named_modules())

    def record(q, a, y, n):
        recorded[n] = (a[0].detach().clone(), q.codes(a[0]), y.detach().clone())

    def pin(q, a, y, n):
        x_u, codes_u, y_u = recorded[n]
        differ = q.codes(a[0]) != codes_u
        if differ.any():
            changed.append((n, int(differ.sum()), float(tie_distance(q, x_u)[differ].max())))
        return y_u

    hooks = [mods_u[n].register_forward_hook(lambda q, a, y, n=n: record(q, a, y, n)) for n in quantizer_names]
    hooks += [mods_f[n].register_forward_hook(lambda q, a, y, n=n: pin(q, a, y, n)) for n in quantizer_names]
    try:
        ref, out = unfolded.eval()(x), folded.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return ref, out, changed


def flat_outputs(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y.flatten()
    return torch.cat([flat_outputs(v) for v in (y.values() if isinstance(y, dict) else y) if v is not None])


def test_fold_check_at_scale_counts_ties_where_the_old_check_failed(at_scale):
    target, _, _, rep, old, x = at_scale
    failed = sorted(n for n, r in old.items() if r > 1)
    layers = rep["layers"]
    assert len(failed) >= len(layers) // 2 and max(old.values()) > 100, (len(failed), max(old.values()))
    assert rep["worst_ratio"] <= 1 and not rep["unchecked"]
    assert_downstream(target, layers)
    assert rep["ties"] == sum(r.get("ties", 0) for r in layers.values())
    if target == "ort":  # float ties, and the head's int32 biases re-rounded to the folded grid: dozens
        assert rep["ties"] > 0
    tied = {n: r["ties"] for n, r in layers.items() if r.get("ties")}
    print(f"\nyolov8n {target} W4A8 at {x.shape[-1]} px, {x.shape[0]} real photos: the old check fails {len(failed)} "
          f"of {len(layers)} layers (worst {max(old.values()):.3g} x its bound, e.g. {failed[0]}); the new one passes "
          f"(worst {rep['worst_ratio']:.2g}) with {rep['ties']} outputs on a tie in {rep['tie_layers']} layers: {tied}")


def test_folded_codes_equal_unfolded_up_to_the_counted_ties(at_scale):
    target, unfolded, folded, rep, _, x = at_scale
    quantizers = [r["downstream"] for r in rep["layers"].values() if r["downstream"]]
    ref, out, changed = run_with_ties_pinned(unfolded, folded, quantizers, x)
    # the codes that differ end to end are the ties the check counted, layer for layer, and each sat on a tie
    per_layer = {r["downstream"]: r["ties"] for r in rep["layers"].values() if r.get("ties")}
    assert {n: k for n, k, _ in changed} == per_layer
    assert all(d < 1e-2 for _, _, d in changed), changed
    ref, out = flat_outputs(ref), flat_outputs(out)
    if target == "ort":  # with those codes pinned, every other code and every output is the unfolded one, bit for bit
        assert torch.equal(ref, out)
    else:  # every encoding too; TensorRT's head convs output float: their folded parameters round differently
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (out - ref).abs().max()
    print(f"\n{target}: {sum(k for _, k, _ in changed)} codes differ, at most "
          f"{max((d for _, _, d in changed), default=0):.2g} steps from a tie; pinned, the folded model's outputs "
          f"differ from the unfolded model's by {(out - ref).abs().max():.3g} (output range {ref.abs().max():.3g})")
