"""Mixed precision: the sensitivity proxy, the per-target cost model, the allocator, the recipe round trip and the
command line (quant/sensitivity.py, quant/costs.py, quant/allocate.py, engine/sensitivity.py, mixed_precision.py)."""
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from yolo_qat import models  # noqa: E402,F401  (the YOLO layer policy)
from yolo_qat.quant import QuantRecipe, calibrate, layer_bits, quant_convs, quantize_model  # noqa: E402
from yolo_qat.quant.allocate import allocate, brute_force  # noqa: E402
from yolo_qat.quant.costs import (FLOAT, LayerGeometry, bitops, htp_int4_rule, paying_widths, runs,  # noqa: E402
                                  weight_bits, weight_cost)
from yolo_qat.quant.sensitivity import collect_inputs, layer_sensitivity, lowered, nsr, recipe_names, spearman  # noqa: E402


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.SiLU(),
                         nn.Conv2d(16, 16, 1), nn.SiLU(), nn.Conv2d(16, 4, 1))


def quantized_tiny(target="sim"):
    m = tiny_net()
    quantize_model(m, QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, per_channel=True, target=target))
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    calibrate(m, batches, num_batches=2)
    return m.eval(), batches


def yolo(task="detect", nc=3):
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    torch.manual_seed(0)
    cls, cfg = (SegmentationModel, "yolov8n-seg.yaml") if task == "segment" else (DetectionModel, "yolov8n.yaml")
    return cls(cfg, nc=nc, verbose=False)


# ------------------------------------------------------------------------------------------------------ proxy

def test_proxy_zero_at_reference_grows_as_bits_drop_and_lowering_restores():
    m, batches = quantized_tiny()
    samples = collect_inputs(m, batches)
    names = list(quant_convs(m))
    with torch.no_grad():
        before = m(batches[0]).clone()
    widths = {n: [(8, 8), (6, 8), (4, 8), (2, 8), (8, 3)] for n in names}
    sens = layer_sensitivity(m, widths, batches, samples)
    for n in names:
        s = sens[n]
        assert s[(8, 8)] == 0.0
        assert 0 < s[(6, 8)] < s[(4, 8)] < s[(2, 8)], (n, s)
        assert s[(8, 3)] > 0, (n, s)  # the input quantizer at 3 bits (re-ranged on the layer's calibration inputs)
    with torch.no_grad():
        after = m(batches[0])
    assert torch.equal(before, after)  # every quantizer put back bit for bit
    assert layer_bits(m) == {n: (8, 8) for n in names}


def test_lowered_changes_only_that_layer_and_needs_inputs_for_activations():
    m, batches = quantized_tiny()
    convs = quant_convs(m)
    name = list(convs)[1]
    old = {n: c.weight_quantizer.scale.clone() for n, c in convs.items()}
    with lowered(convs[name], 4, 8):
        assert layer_bits(m)[name] == (4, 8)
        assert convs[name].integer_weight().abs().max() <= 8
        assert all(torch.equal(c.weight_quantizer.scale, old[n]) for n, c in convs.items() if n != name)
    assert torch.equal(convs[name].weight_quantizer.scale, old[name])
    with pytest.raises(ValueError, match="collect_inputs"):
        with lowered(convs[name], 8, 4):
            pass
    assert layer_bits(m)[name] == (8, 8)


def test_lowered_keeps_the_narrow_grid_and_unshares_an_encoding_of_other_bits():
    m = yolo()
    quantize_model(m, QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, target="ort"))
    imgs = [torch.rand(2, 3, 64, 64)]
    calibrate(m, imgs, num_batches=1)
    m.eval()
    convs = quant_convs(m)
    shared = next(n for n, c in convs.items() if c.input_source is not None)
    samples = collect_inputs(m, imgs)
    with lowered(convs[shared], 8, 4, samples[shared]):
        assert convs[shared].input_source is None and convs[shared].input_quantizer.bits == 4
    assert convs[shared].input_source is not None and convs[shared].input_quantizer.bits == 8
    n = yolo()
    quantize_model(n, QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, target="npu"))
    c = next(iter(quant_convs(n).values()))
    with lowered(c, 4, 8):
        assert (c.weight_quantizer.qmin, c.weight_quantizer.qmax) == (-7, 7)


def test_lowered_to_float_is_the_conv_without_its_quantizers_and_restores():
    m, batches = quantized_tiny()
    convs = quant_convs(m)
    name = list(convs)[2]
    with torch.no_grad():
        before = m(batches[0]).clone()
        convs[name].weight_quantizer.enabled = convs[name].input_quantizer.enabled = False
        unquantized = m(batches[0]).clone()
        convs[name].weight_quantizer.enabled = convs[name].input_quantizer.enabled = True
        with lowered(convs[name], *FLOAT):
            assert torch.equal(m(batches[0]), unquantized)
        assert torch.equal(m(batches[0]), before)
    assert not torch.equal(unquantized, before)
    sens = layer_sensitivity(m, {name: [(8, 8), (2, 8), FLOAT]}, batches)[name]
    assert sens[(8, 8)] == 0 and 0 < sens[FLOAT] < sens[(2, 8)]  # float differs from W8A8 far less than W2 does
    # a conv reading a shared encoding keeps it: the tensor is quantized by the layer that makes it
    y = yolo()
    quantize_model(y, QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, target="ort"))
    calibrate(y, [torch.rand(2, 3, 64, 64)], num_batches=1)
    shared = next(c for c in quant_convs(y).values() if c.input_source is not None)
    with lowered(shared, *FLOAT):
        assert shared.input_source is not None and not shared.weight_quantizer.enabled
    assert shared.weight_quantizer.enabled and shared.input_quantizer.enabled


def test_yolo_proxy_groups_and_geometry():
    from yolo_qat.engine.sensitivity import layer_geometry, yolo_noise, yolo_outputs

    for task, groups in (("detect", 2), ("segment", 4)):
        m = yolo(task)
        quantize_model(m, QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None))
        calibrate(m, [torch.rand(2, 3, 64, 64)], num_batches=1)
        m.eval()
        img = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            out = yolo_outputs(m, img)
        assert len(out) == groups and out[0].shape[1] == 4 and out[1].shape[1] == 3
        assert yolo_noise(out, out) == 0.0
        noisy = [o + 0.01 * o.std() * torch.randn_like(o) for o in out]
        assert 0 < yolo_noise(noisy, out) < 1e-3
    geo = layer_geometry(m, 64)
    stem = geo["model.0.conv"]  # 3x3 stride 2: 64 -> 32
    assert stem.macs == stem.params * 32 * 32 and stem.stride == (2, 2) and stem.kernel == (3, 3)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # average ranks for ties
    assert nsr([torch.tensor([1.0, 3.0])], [torch.tensor([1.0, 2.0])]) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ cost model

def geo(k=1, cout=64, stride=1, cin=64):
    return LayerGeometry("l", cin, cout, (k, k), (stride, stride), 1, cout * cin * k * k, cout * cin * k * k * 100)


def test_npu_int4_pays_at_runtime_only_where_the_htp_rule_holds():
    ok = geo(1, 64, 1)
    assert htp_int4_rule(ok) and weight_bits("npu", ok, 4) == 4 and weight_bits("npu", ok, 3) == 4
    for bad in (geo(3, 64, 1), geo(1, 32, 1), geo(1, 64, 2)):
        assert not htp_int4_rule(bad)
        assert weight_bits("npu", bad, 4) == 8  # runs, widened to INT8: no gain
        assert weight_bits("npu", bad, 4, "onnx") == 4  # the file still stores INT4
        assert paying_widths("npu", bad, [(8, 8), (4, 8)], ("runtime",)) == [(8, 8)]
    assert paying_widths("npu", ok, [(8, 8), (4, 8), (3, 8)], ("runtime",)) == [(8, 8), (4, 8)]  # 3 costs what 4 does
    assert not runs("npu", (4, 4)) and runs("npu", (4, 8))


def test_tensorrt_never_below_8_and_ort_only_in_the_packed_checkpoint():
    widths = [(w, 8) for w in (8, 6, 4, 3, 2)]
    for layer in (geo(1, 64, 1), geo(3, 16, 2)):
        for w, _ in widths:
            for kind in ("runtime", "onnx"):
                assert weight_bits("tensorrt", layer, w, kind) == 8
                assert weight_bits("ort", layer, w, kind) == 8
        assert paying_widths("tensorrt", layer, widths, ("runtime", "onnx", "bitops")) == [(8, 8)]
        assert paying_widths("ort", layer, widths, ("runtime", "onnx", "bitops")) == [(8, 8)]
        assert paying_widths("ort", layer, widths, ("packed",)) == widths  # export.py --format packed: b bits
    assert not runs("tensorrt", (8, 4)) and runs("ort", (4, 4))


def test_sim_is_nominal_and_bitops_count_runtime_bits():
    layer = geo(3, 16, 1, 8)
    assert weight_cost("sim", layer, 3) == layer.params * 3
    assert bitops("sim", layer, 4, 6) == layer.macs * 24
    assert bitops("ort", layer, 4, 4) == layer.macs * 64  # u8 activations, int8 weights whatever the codes
    # activation widths pay under bit-ops only (weights bytes do not see them)
    assert paying_widths("sim", layer, [(8, 8), (8, 4)], ("runtime",)) == [(8, 8)]
    assert paying_widths("sim", layer, [(8, 8), (8, 4)], ("bitops",)) == [(8, 8), (8, 4)]


def test_float_costs_what_the_target_runs_it_in():
    layer = geo(1, 64, 1)
    for target, runtime in (("tensorrt", 16), ("npu", 16), ("ort", 32), ("sim", 32)):
        assert runs(target, FLOAT)
        assert weight_bits(target, layer, FLOAT[0]) == runtime  # TensorRT / HTP run unquantized layers in FP16
        assert weight_bits(target, layer, FLOAT[0], "onnx") == 32 and weight_bits(target, layer, 32, "packed") == 32
        assert bitops(target, layer, *FLOAT) == layer.macs * runtime * runtime
        # the widest option always pays: it is the only way to lose nothing to quantization
        assert paying_widths(target, layer, [FLOAT, (8, 8), (4, 8)])[0] == FLOAT


# ------------------------------------------------------------------------------------------------- allocator

def test_allocator_hand_checked_case_where_greedy_fails():
    # All at 8 bits costs 260. b's 4-bit width saves the most per unit of sensitivity (80 for 1.0), so a greedy
    # pass lowers it first; when the budget asks for a saving of 40 only, lowering a alone (0.6) is the optimum.
    opts = {"a": {(8, 8): (80, 0.0), (4, 8): (40, 0.6)},
            "b": {(8, 8): (100, 0.0), (4, 8): (20, 1.0)},
            "c": {(8, 8): (80, 0.0), (4, 8): (40, 0.7)}}
    a = allocate(opts, 220)
    assert a.widths == {"a": (4, 8), "b": (8, 8), "c": (8, 8)} and a.cost == 220 and a.exact
    assert a.sensitivity == pytest.approx(0.6)
    # a saving of 60: b alone (1.0) beats a + c (1.3)
    a = allocate(opts, 200)
    assert a.widths == {"a": (8, 8), "b": (4, 8), "c": (8, 8)} and a.cost == 180
    # a saving of 90: b + a (1.6) beats b + c (1.7); a + c saves 80 only
    a = allocate(opts, 170)
    assert a.widths == {"a": (4, 8), "b": (4, 8), "c": (8, 8)} and a.cost == 140
    assert allocate(opts, 260).widths == {n: (8, 8) for n in opts}
    with pytest.raises(ValueError, match="cheapest"):
        allocate(opts, 99)
    # pairs: equal primaries (0: e.g. losses that went down) are told apart by the second member
    tie = {"a": {(8, 8): (80, (0.0, 0.0)), (4, 8): (40, (0.0, 0.3))},
           "b": {(8, 8): (80, (0.0, 0.0)), (4, 8): (40, (0.0, 0.1))}}
    assert allocate(tie, 120).widths == {"a": (8, 8), "b": (4, 8)}
    assert allocate(tie, 160).widths == {"a": (8, 8), "b": (8, 8)}  # both fit at 8: no tie to break


def test_allocator_matches_brute_force_and_respects_the_budget():
    rng = random.Random(0)
    rounded = 0
    for trial in range(40):
        opts = {}
        for i in range(rng.randint(2, 6)):
            size = rng.choice([9, 27, 64, 144, 576, 1000])
            ws = rng.sample([8, 6, 5, 4, 3, 2], rng.randint(1, 4))
            if trial % 2:  # pairs: the primary proxy often 0 (a loss that went down), a second one breaks the ties
                opts[f"l{i}"] = {(w, 8): (size * w, (0.0, 0.0) if w == max(ws) else
                                          (rng.choice([0.0, 0.0, 0.5, 1.0]), rng.random())) for w in ws}
            else:
                opts[f"l{i}"] = {(w, 8): (size * w, 0.0 if w == max(ws) else rng.random() / w) for w in ws}
        lo = sum(min(c for c, _ in o.values()) for o in opts.values())
        hi = sum(max(c for c, _ in o.values()) for o in opts.values())
        budget = rng.randint(lo, hi)
        best, best_widths = brute_force(opts, budget)
        for states in (20000, 7):  # exact, and costs rounded up to a coarse unit
            a = allocate(opts, budget, max_states=states)
            assert a.cost <= budget and a.cost == sum(opts[n][w][0] for n, w in a.widths.items())
            if a.exact:
                assert a.sensitivity == pytest.approx(best), (trial, opts, budget)
                if trial % 2:  # the tie-breaker too: the same summed pair as the enumeration's optimum
                    pair = [sum(s[i] for s in (opts[n][w][1] for n, w in ws.items())) for i in (0, 1)
                            for ws in (a.widths, best_widths)]
                    assert pair[0] == pytest.approx(pair[1]) and pair[2] == pytest.approx(pair[3]), (trial, opts)
            else:
                rounded += 1
                assert a.sensitivity >= best - 1e-12
    assert rounded > 10  # the rounded-up path ran too


# --------------------------------------------------------------------------------- recipe and command line

def fake_report(model, target="npu"):
    """A sensitivity report of ``model`` as engine.sensitivity.measure writes it, with made-up sensitivities."""
    from yolo_qat.engine.sensitivity import layer_geometry

    q = quantize_model(model, QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, per_channel=True, target=target))
    calibrate(q, [torch.rand(1, 3, 64, 64)], num_batches=1)
    geo = layer_geometry(q, 64)
    rng = random.Random(1)
    layers = []
    for n, g in geo.items():
        layers.append({**g.to_dict(), "sensitivity": {"w8a8": 0.0, "w4a8": rng.random(), "w3a8": 2 + rng.random()}})
    r = QuantRecipe(w_bits=8, a_bits=8, first_last_bits=None, per_channel=True, target=target).to_dict()
    return {"weights": "fp.pt", "task": "detect", "imgsz": 64, "recipe": r, "reference": [8, 8], "measure": "runtime",
            "layers": layers}


def test_recipe_round_trip_through_train_qat_config(tmp_path):
    from yolo_qat.engine.cli import parse_args, qat_config
    from yolo_qat.engine.sensitivity import MixedPrecisionConfig, mixed_precision

    report = fake_report(yolo())
    total = sum(layer["params"] for layer in report["layers"])
    qualifying = [layer for layer in report["layers"] if htp_int4_rule(LayerGeometry.from_dict(layer))]
    q_params = sum(layer["params"] for layer in qualifying)
    budget = (8 * total - 4 * q_params) / 8 + 1  # bytes: every qualifying layer at 4 bits, no room for one at 8
    cfg = MixedPrecisionConfig(budget_bytes=budget)
    res = mixed_precision(None, report=report, cfg=cfg, out=tmp_path / "recipe.yaml", log=lambda *a: None)
    alloc = res["allocation"]
    lowered_layers = {n for n, w in alloc.widths.items() if w != (8, 8)}
    assert lowered_layers == {layer["name"] for layer in qualifying}  # npu: INT4 only where HTP runs it
    assert all(alloc.widths[n] == (4, 8) for n in lowered_layers)  # W3 costs what W4 does there: never bought
    assert alloc.cost <= alloc.budget
    assert "total:" in res["table"] and "W4A8" in res["table"]
    # the file as train_qat.py reads it (--config), and what quantize_model makes of it
    opt = parse_args(["--weights", "fp.pt", "--config", str(tmp_path / "recipe.yaml"), "--method", "lsq"])
    recipe = qat_config(opt).recipe
    assert recipe["target"] == "npu" and recipe["per_channel"] is True
    m = quantize_model(yolo(), recipe)
    names = recipe_names(m)  # npu wraps the head's final convs (their output quantizer): recipes name the FP conv
    assert any(n != names[n] for n in names)
    assert {names[n]: bits for n, bits in layer_bits(m).items()} == alloc.widths
    # a tighter budget than the qualifying layers allow is one paragraph naming the floor and the reason
    with pytest.raises(ValueError, match="HTP runs INT4 weights only on 1x1"):
        mixed_precision(None, report=report, cfg=MixedPrecisionConfig(budget_bytes=budget - 2), log=lambda *a: None)


def test_keep_float_puts_the_layers_that_lose_most_at_8_bits_in_exclude(tmp_path):
    """tensorrt: nothing below INT8 pays, so its only mixed precision is INT8 against FP16; the allocation keeps the
    layers float where 8 bits cost most per byte, and the recipe excludes them."""
    from yolo_qat.engine.cli import parse_args, qat_config
    from yolo_qat.engine.sensitivity import MixedPrecisionConfig, mixed_precision

    report = fake_report(yolo(), target="tensorrt")
    small = sorted(report["layers"], key=lambda layer: layer["params"])
    worst, second = small[3], small[4]  # small layers: the budget below affords both, and nothing more
    for layer in report["layers"]:
        gain = {worst["name"]: 5.0, second["name"]: 2.0}.get(layer["name"], 1e-3)
        layer["sensitivity"]["float"] = -gain  # what float gains over W8A8
        for k in list(layer["sensitivity"]):
            if k not in ("w8a8", "float"):
                del layer["sensitivity"][k]  # tensorrt: W4 / W3 would not pay
    total = sum(layer["params"] for layer in report["layers"])
    budget = (8 * total + 8 * (worst["params"] + second["params"])) / 8  # bytes: those two in FP16
    res = mixed_precision(None, report=report, cfg=MixedPrecisionConfig(budget_bytes=budget, keep_float=True),
                          out=tmp_path / "recipe.yaml", log=lambda *a: None)
    kept = {n for n, w in res["allocation"].widths.items() if w == FLOAT}
    assert kept == {worst["name"], second["name"]}
    assert res["recipe"]["exclude"] == [worst["name"], second["name"]] and not res["recipe"]["overrides"]
    assert "FP16" in res["table"] and "2 kept in FP16" in res["table"]
    opt = parse_args(["--weights", "fp.pt", "--config", str(tmp_path / "recipe.yaml"), "--method", "lsq"])
    m = quantize_model(yolo(), qat_config(opt).recipe)
    names = recipe_names(m)
    assert {names[n] for n in quant_convs(m)} == {layer["name"] for layer in report["layers"]} - kept
    # without keep_float the measured float widths are not offered
    res = mixed_precision(None, report=report, cfg=MixedPrecisionConfig(budget_bytes=budget), log=lambda *a: None)
    assert FLOAT not in res["allocation"].widths.values() and not res["recipe"]["exclude"]


def test_cli_reallocates_from_a_sensitivity_file_and_reports_input_errors(tmp_path, capsys):
    import mixed_precision as mp

    report = fake_report(yolo(), target="sim")
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(report))
    out = tmp_path / "r.yaml"
    assert mp.main(["--sensitivity", str(path), "--budget-bits", "5", "--out", str(out), "--project",
                    str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "total:" in text and str(out) in text
    r = yaml.safe_load(out.read_text())
    assert r["target"] == "sim" and r["w_bits"] == 8 and r["first_last_bits"] is None and r["overrides"]
    params = {layer["name"]: layer["params"] for layer in report["layers"]}
    bits = {n: r["overrides"].get(n, {"w_bits": 8})["w_bits"] for n in params}
    assert sum(params[n] * bits[n] for n in params) <= 5 * sum(params.values())
    for argv, msg in ((["--sensitivity", str(path)], "no budget"),
                      (["--budget-bits", "5"], "--weights is required"),
                      (["--sensitivity", str(tmp_path / "nope.json"), "--budget-bits", "5"], "does not exist"),
                      (["--sensitivity", str(path), "--budget-bits", "1"], "cannot be met"),
                      (["--sensitivity", str(path), "--budget-bits", "5", "--w-bits-choices", "8", "9"], "2..8"),
                      (["--sensitivity", str(path), "--budget-bits", "5", "--budget-bytes", "9"], "one budget")):
        assert mp.main(argv + ["--project", str(tmp_path / "runs")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mixed_precision.py: error: ") and msg in err and err.count("\n") == 1, (argv, err)


def test_measure_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys):
    """mixed_precision.py on an FP checkpoint: calibration on the dataset, the proxy of every paying width, the mAP
    check and the recipe."""
    import mixed_precision as mp
    from yolo_qat.data.embedded import ensure_embedded_dataset
    from yolo_qat.models.checkpoint import save_checkpoint

    data = ensure_embedded_dataset(root=tmp_path / "ds", n_train=4, n_val=2, imgsz=64)
    fp = save_checkpoint(tmp_path / "fp.pt", yolo(nc=4))  # the embedded dataset's 4 classes
    rc = mp.main(["--weights", str(fp), "--data", str(data), "--imgsz", "64", "--batch", "2", "--target", "npu",
                  "--budget-bits", "7.5", "--calib-images", "4", "--calib-batches", "1", "--validate-layers", "2",
                  "--keep-float",
                  "--project", str(tmp_path / "runs"), "--name", "mp"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "runs" / "mp" / "sensitivity.json").read_text())
    assert report["recipe"]["target"] == "npu" and report["reference"] == [8, 8]
    for layer in report["layers"]:
        g = LayerGeometry.from_dict(layer)
        want = {"w8a8", "w4a8", "float"} if htp_int4_rule(g) else {"w8a8", "float"}  # W3 costs what W4 does on npu
        assert set(layer["sensitivity"]) == want, layer["name"]
        assert layer["sensitivity"]["w8a8"] == {"loss": 0.0, "noise": 0.0}  # the reference: no change
        assert all(v["noise"] >= 0 and set(v) == {"loss", "noise"} for v in layer["sensitivity"].values())
    val = report["validation"]
    assert all(row["width"] != "w32a32" for row in val["layers"])  # the mAP check lowers, never keeps float
    assert len(val["layers"]) == 2 and set(val["spearman"]) == {"loss", "noise"}
    assert "box.map" in val["spearman"]["loss"]
    r = yaml.safe_load((tmp_path / "runs" / "mp" / "recipe.yaml").read_text())
    assert QuantRecipe(**r).target == "npu"
    # the before-QAT comparison at equal bits reads that measurement
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mixed_precision_ptq as bench

    rows = bench.run(bench.build_parser().parse_args(
        ["--weights", str(fp), "--data", str(data), "--imgsz", "64", "--batch", "2", "--sensitivity",
         str(tmp_path / "runs" / "mp" / "sensitivity.json"), "--w-bits", "4", "--seeds", "0", "--calib-batches", "1",
         "--project", str(tmp_path / "runs"), "--name", "ptq"]))
    assert rows[0]["recipe"].startswith("uniform W4A8") and len(rows) == 3
    # npu runtime accounting: the uniform W4 costs 8 bits on every conv outside the HTP rule, so its budget is above
    # 4 bits, and the allocations stay within it
    assert 4 < rows[0]["avg_bits"] < 8 and all(row["avg_bits"] <= rows[0]["avg_bits"] + 1e-9 for row in rows[1:])
    assert (tmp_path / "runs" / "ptq" / "results.json").is_file()
    # float against 8 bits per layer: FP, uniform W8A8, first/last convs in float, the allocations with float
    rows = bench.run(bench.build_parser().parse_args(
        ["--weights", str(fp), "--data", str(data), "--imgsz", "64", "--batch", "2", "--sensitivity",
         str(tmp_path / "runs" / "mp" / "sensitivity.json"), "--w-bits", "--float-bits", "9", "--seeds", "0",
         "--calib-batches", "1", "--project", str(tmp_path / "runs"), "--name", "ptq-float"]))
    names = [row["recipe"] for row in rows]
    assert names[:3] == ["FP checkpoint", "uniform W8A8 (all convs)", "W8A8, first/last convs in float"]
    assert len(rows) == 5 and names[4].endswith("9.000 bits")
    assert rows[1]["avg_bits"] == 8 < rows[2]["avg_bits"] and rows[3]["avg_bits"] <= rows[2]["avg_bits"] + 1e-9
    assert 8 <= rows[4]["avg_bits"] <= 9  # within its budget (float convs in FP16 on npu)
