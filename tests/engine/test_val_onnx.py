"""val.py --weights model.onnx: an exported file scored by onnxruntime equals its checkpoint.

Each case exports a quantized model (W4A4, first/last 8 bit, calibrated on the embedded images) at
imgsz 64 and runs ``val.py --weights ckpt.pt model.onnx --no-rect`` (checkpoint on square letterboxed
batches, the input the static-shape file sees). Models are untrained, so mAP is ~0 and equal mAPs alone
would prove little: the predictions both rows were scored on are compared too (same detections, boxes
to 1e-2 px, scores to 1e-4, same masks). They can only differ where onnxruntime and PyTorch round an
activation tie differently (tests/deploy/test_export.py), hence "nearly all" rather than "all".
"""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from yolo_qat import deploy
import val
from yolo_qat.engine.calib import calibration_loader, preprocess
from yolo_qat.engine.onnx_val import onnx_info, shape_notes
from yolo_qat.models.checkpoint import save_checkpoint
from yolo_qat.quant import calibrate, quantize_model
from builders import qat_like_model

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "original-yolo"
IMGSZ = 64
CASES = {"yolov5nu": "anchor-free det", "yolov8n-seg": "anchor-free seg", "yolov5n-orig": "original det",
         "yolov5n-seg-orig": "original seg"}


def original_quantized(data, name):
    from yolo_qat.models.original import load_original

    m, _ = load_original(FIX / f"{name}.pt")
    loader, _ = calibration_loader(data, "segment" if "seg" in name else "detect", IMGSZ, 4,
                                   save_dir=data.parent / "calib_build")
    q = quantize_model(m, {"w_bits": 4, "a_bits": 4, "first_last_bits": 8, "per_channel": True}).eval()
    calibrate(q, [preprocess(b)["img"] for b in loader], num_batches=2)
    return q


def model_for(data, name):
    if name.endswith("-orig"):
        if not FIX.is_dir():
            pytest.skip(f"fixtures not found at {FIX}")
        return original_quantized(data, name)
    return qat_like_model(data, cfg=f"{name}.yaml", bits=4)


def top_predictions(path, k=20):
    by_image = {}
    for p in json.loads(Path(path).read_text()):
        by_image.setdefault(p["image_id"], []).append(p)
    return {i: sorted(ps, key=lambda p: -p["score"])[:k] for i, ps in by_image.items()}


def matched_share(a, b, masks):
    """Share of a's top detections that b has too: same class, box to 1e-2 px, score to 1e-4 (and mask)."""
    hits = total = 0
    for img, pa in a.items():
        for p in pa:
            total += 1
            hits += any(q["category_id"] == p["category_id"] and abs(q["score"] - p["score"]) < 1e-4
                        and np.abs(np.subtract(q["bbox"], p["bbox"])).max() < 1e-2
                        and (not masks or q["segmentation"] == p["segmentation"]) for q in b.get(img, []))
    return hits / max(total, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_map_equals_checkpoint(data, tmp_path, monkeypatch, capsys, name):
    q = model_for(data, name)
    seg = "seg" in name
    ckpt = save_checkpoint(tmp_path / f"{name}.pt", q)
    path = deploy.export_onnx(q, tmp_path / f"{name}.onnx", IMGSZ)
    info = onnx_info(path)
    assert info["original"] == name.endswith("-orig") and info["task"] == ("segment" if seg else "detect")
    assert (info["batch"], info["imgsz"]) == (1, [IMGSZ, IMGSZ])

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res.json"
    assert val.main(["--weights", str(ckpt), str(path), "--data", str(data), "--imgsz", str(IMGSZ), "--batch", "4",
                     "--no-rect", "--device", "cpu", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "--batch 4 ignored" in captured.err and "(1, 3, 64, 64)" in captured.err  # one paragraph, then on
    table = captured.out[captured.out.rindex("model (mAP %)"):].splitlines()
    assert "box.map coco" in table[0] and ("mask.map ultra" in table[0]) == seg and len(table) >= 3
    res = json.loads(out.read_text())
    r_pt, r_onnx = res[str(ckpt)], res[str(path)]
    keys = ("box.map", "box.map50", "mask.map", "mask.map50") if seg else ("box.map", "box.map50")
    for k in keys:
        assert abs(r_pt[k] - r_onnx[k]) <= 0.003, (k, r_pt[k], r_onnx[k])  # pycocotools, 0.3 points
        assert abs(r_pt["ultralytics"][k] - r_onnx["ultralytics"][k]) <= 0.003, k
    a, b = top_predictions(r_pt["predictions"]), top_predictions(r_onnx["predictions"])
    assert sum(map(len, a.values())) >= 20  # an untrained model at conf 0.001 still has candidates
    assert matched_share(a, b, seg) >= 0.9 and matched_share(b, a, seg) >= 0.9


def test_rect_note_and_bad_onnx(data, tmp_path, monkeypatch, capsys):
    """Checkpoint and export with rect batches: a note says their inputs differ. A non-YOLO .onnx: one paragraph."""
    q = qat_like_model(data, cfg="yolov5nu.yaml", bits=8)
    ckpt = save_checkpoint(tmp_path / "q.pt", q)
    path = deploy.export_onnx(q, tmp_path / "q.onnx", IMGSZ, batch=2)
    monkeypatch.chdir(tmp_path)
    assert val.main(["--weights", str(ckpt), str(path), "--data", str(data), "--imgsz", str(IMGSZ),
                     "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--no-rect" in err and "ignored" not in err  # --imgsz as exported, no --batch: nothing contradicts
    m = onnx.load(str(path))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "bare.onnx"))
    assert val.main(["--weights", str(tmp_path / "bare.onnx"), "--data", str(data)]) == 2
    assert "no YOLO export metadata" in capsys.readouterr().err


def test_shape_notes():
    info = {"dynamic": False, "imgsz": [320, 320], "batch": 1}
    assert shape_notes(info, None, None) is None and shape_notes(info, 320, 1) is None
    note = shape_notes(info, 640, 8)
    assert "--imgsz 640 and --batch 8 ignored" in note and "(1, 3, 320, 320)" in note and "\n" not in note
    assert shape_notes({**info, "dynamic": True}, 640, 8) is None
