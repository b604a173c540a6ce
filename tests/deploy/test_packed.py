"""Packed integer checkpoints: bitstream round trips, size, identical outputs after reload."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from yolo_qat import deploy
from yolo_qat.deploy.bitpack import pack_codes, unpack_codes
from yolo_qat.models.checkpoint import save_checkpoint
from yolo_qat.quant import calibrate, quant_convs, quantize_model
from builders import build, images

ROOT = Path(__file__).resolve().parents[2]


def flat(y):
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for v in (y.values() if isinstance(y, dict) else y) for t in flat(v)]


def quantized(cfg, cls, bits, per_channel):
    q = quantize_model(build(cfg, cls), {"w_bits": bits, "a_bits": bits, "per_channel": per_channel}).eval()
    calibrate(q, [images(8, 64, s) for s in range(2)], num_batches=2)
    return q


@pytest.mark.parametrize("bits", range(2, 9))
def test_bitstream_round_trip(bits):
    qmin = -(2 ** (bits - 1))
    codes = torch.randint(qmin, 2 ** (bits - 1), (3, 5, 7))  # 105 values: not a multiple of 8 bits
    data = pack_codes(codes, bits, qmin)
    assert data.dtype == torch.uint8 and data.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(data, bits, qmin, codes.numel()).reshape(codes.shape).long(), codes)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.tensor([2 ** (bits - 1)]), bits, qmin)


@pytest.mark.parametrize("cfg,cls,per_channel", [("yolov5nu.yaml", DetectionModel, False),
                                                 ("yolov8n-seg.yaml", SegmentationModel, True)])
def test_w4a4_packed_small_and_identical(tmp_path, cfg, cls, per_channel):
    q = quantized(cfg, cls, 4, per_channel)
    fp32 = save_checkpoint(tmp_path / "q.pt", q).stat().st_size
    packed = deploy.save_packed(q, tmp_path / "q.qpk").stat().st_size
    print(f"{cfg} W4A4: fp32 checkpoint {fp32 / 1e6:.2f} MB, packed {packed / 1e6:.2f} MB ({fp32 / packed:.1f}x)")
    assert fp32 >= 6 * packed, (fp32, packed)
    r = deploy.load_packed(tmp_path / "q.qpk")
    assert type(r) is type(q) and r.quant_recipe == q.quant_recipe and r.names == q.names
    x = images(2, 64, seed=9)
    with torch.no_grad():
        for a, b in zip(flat(q(x)), flat(r(x)), strict=True):
            assert torch.equal(a, b)
    for n, m in quant_convs(r).items():  # same integer codes and scales
        assert torch.equal(m.weight_quantizer(m.weight), quant_convs(q)[n].weight_quantizer(quant_convs(q)[n].weight)), n


def test_fused_and_qc_folded_model_round_trips(tmp_path):
    """A QC checkpoint carries corrections folded into BN or into QuantConv2d.fold_affine (head
    convs get an out_scale and a new bias); a fused model has no BN left. Both must reload."""
    q = quantized("yolov5nu.yaml", DetectionModel, 3, True)
    g = torch.Generator().manual_seed(0)
    for n, m in quant_convs(q).items():
        if m.bias is not None:  # head prediction convs: no BN after them
            m.fold_affine(1 + 0.1 * torch.randn(m.out_channels, generator=g), 0.1 * torch.randn(m.out_channels, generator=g))
    q.fuse(verbose=False)
    deploy.save_packed(q, tmp_path / "f.qpk")
    r = deploy.load_packed(tmp_path / "f.qpk")
    x = images(1, 64, seed=4)
    with torch.no_grad():
        for a, b in zip(flat(q(x)), flat(r(x)), strict=True):
            assert torch.equal(a, b)


def test_cli_packed_and_bad_input(tmp_path):
    q = quantized("yolov5nu.yaml", DetectionModel, 4, False)
    ckpt = save_checkpoint(tmp_path / "q.pt", q)
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), "--weights", str(ckpt), "--format", "packed",
                        "--imgsz", "64"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q.qpk").is_file() and "identical outputs" in r.stdout and "larger" in r.stdout
    (tmp_path / "junk.qpk").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        deploy.load_packed(tmp_path / "junk.qpk")
    torch.save({"format": "other"}, tmp_path / "other.qpk")
    with pytest.raises(ValueError, match="not a packed quantized checkpoint"):
        deploy.load_packed(tmp_path / "other.qpk")


# The original anchor-based YOLOv5 / YOLOv7 models (models.yolo)
from yolo_qat.models.original import load_original  # noqa: E402
from yolo_qat.models.yolo import DetectionModel as OriginalDetectionModel  # noqa: E402
from builders import FIX, FIXTURES, needs_fixtures  # noqa: E402


def quantized_original(model, bits=4, per_channel=True):
    q = quantize_model(model, {"w_bits": bits, "a_bits": bits, "first_last_bits": 8, "per_channel": per_channel,
                               "weight_init": "lsq"}).eval()
    calibrate(q, [images(4, 64, s) for s in range(2)], num_batches=2)
    return q


def assert_round_trip(q, path):
    deploy.save_packed(q, path)
    r = deploy.load_packed(path)
    assert type(r) is type(q) and r.quant_recipe == q.quant_recipe and r.names == q.names
    x = images(2, 64, seed=9)
    with torch.no_grad():
        for a, b in zip(flat(q(x)), flat(r(x)), strict=True):  # pred, (proto), raw maps
            assert torch.equal(a, b)
    for n, m in quant_convs(r).items():
        qm = quant_convs(q)[n]
        assert torch.equal(m.weight_quantizer(m.weight), qm.weight_quantizer(qm.weight)), n
    assert torch.equal(r.model[-1].anchors, q.model[-1].anchors) and torch.equal(r.stride, q.stride)
    return r


@needs_fixtures
@pytest.mark.parametrize("name,bits,per_channel", [("yolov5n", 4, False), ("yolov5n-seg", 3, True),
                                                   ("yolov7-tiny", 4, True)])
def test_original_checkpoints_round_trip(tmp_path, name, bits, per_channel):
    q = quantized_original(load_original(FIX / FIXTURES[name])[0], bits, per_channel)
    assert_round_trip(q, tmp_path / "q.qpk")
    # fused (BN and, for IDetect, ImplicitM in output scales; ImplicitA kept) with QC-style head corrections
    g = torch.Generator().manual_seed(0)
    for m in q.model[-1].m:
        c = m.out_channels
        m.fold_affine(1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g))
    q.fuse(verbose=False)
    r = assert_round_trip(q, tmp_path / "f.qpk")
    assert r.is_fused()


def test_original_anchors_come_from_the_state_dict(tmp_path):
    """Anchors AutoAnchor set after the build (here placeholders from `anchors=3`) are restored from the
    packed tensors, not rebuilt from the yaml."""
    m = OriginalDetectionModel("yolov5n", nc=3, anchors=3, verbose=False)
    with torch.no_grad():
        m.model[-1].anchors.copy_(torch.tensor([[[1.2, 1.6], [2.0, 3.7], [4.1, 2.9]],
                                                [[1.9, 3.8], [3.9, 2.8], [3.7, 7.4]],
                                                [[3.6, 2.8], [4.9, 6.2], [11.6, 10.2]]]))
    q = quantized_original(m)
    r = assert_round_trip(q, tmp_path / "a.qpk")
    assert r.yaml["anchors"] == 3


@needs_fixtures
def test_cli_packs_a_quantized_original_checkpoint(tmp_path, capsys):
    import export

    q = quantized_original(load_original(FIX / FIXTURES["yolov7-tiny"])[0])
    ckpt = save_checkpoint(tmp_path / "v7.pt", q)
    assert export.main(["--weights", str(ckpt), "--format", "packed", "--imgsz", "64"]) == 0
    assert "identical outputs" in capsys.readouterr().out
    assert type(deploy.load_packed(tmp_path / "v7.qpk")).__name__ == "QuantOriginalDetectionModel"
