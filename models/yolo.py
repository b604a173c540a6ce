"""The original anchor-based YOLOv5 / YOLOv7 heads and models, under the module path their
checkpoints pickle (``models.yolo``): ``Detect``, ``Segment`` (yolov5 v6.x / v7.0), ``IDetect``
(yolov7), ``DetectionModel`` (``Model``, yolov5 before v6.2 and yolov7), ``SegmentationModel``.

The models subclass Ultralytics' DetectionModel / SegmentationModel, so its trainer, validator,
``fuse()``, ``load()`` and ``_predict_once`` (the same ``m.f`` / ``m.i`` / ``save`` scheme as yolov5)
run them; ``__init__`` builds from the ORIGINAL yaml format (``depth_multiple``, ``anchors``, modules by
name), which Ultralytics' own loader must never see (it renames '*u.yaml' files and strips scales).

Outputs, as upstream:
- train mode: Detect / IDetect -> list of nl raw maps (B, na, H, W, no); Segment -> (maps, proto);
- eval: Detect / IDetect -> (pred, maps), Segment -> (pred, proto, maps); pred (B, sum(na*H*W), no) with
  xy = (2 sig - 0.5 + cell) * stride and wh = (2 sig)^2 * anchor in pixels, sigmoid objectness and
  classes, and (Segment) the nm mask coefficients as they are;
- ``export = True`` on the head: eval returns (pred,) / (pred, proto) only (yolov5's export layout).
"""
from __future__ import annotations

import ast
import math
from copy import deepcopy
from pathlib import Path

import torch
import yaml
from torch import nn
from ultralytics.nn import tasks
from ultralytics.utils import LOGGER

from .common import (C3, SPP, SPPCSPC, SPPF, Bottleneck, Concat, Conv, Focus, ImplicitA, ImplicitM, MP, Proto,
                     RepConv, SP)
from .loss import YOLOv5DetLoss, YOLOv5SegLoss
from .registry import ORIGINAL_CFGS

__all__ = ["Detect", "Segment", "IDetect", "DetectionModel", "Model", "SegmentationModel", "parse_model",
           "load_original_yaml", "check_anchor_order"]


class Detect(nn.Module):
    """Anchor-based YOLO head: one 1x1 conv per level to na * (5 + nc) channels.

    ``anchors`` (buffer, (nl, na, 2)) holds the anchors in units of each level's stride. yolov5 (v6.0+)
    keeps ``anchor_grid`` as a list of per-level caches; yolov5 v5.0 and yolov7 pickle it as a buffer
    of pixel anchors (nl, 1, na, 1, 1, 2), which is then the source of the anchor sizes.
    """

    stride = None  # set by the model build
    dynamic = False  # rebuild the grids on every call
    export = False  # eval returns the predictions only
    max_det = 300  # set by Ultralytics' trainer on every head; NMS (outside the model) applies it here
    inplace = True  # yolov5 attribute, kept for checkpoints and Ultralytics' loader (decoding is out of place)

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace

    def __setstate__(self, state):
        super().__setstate__(state)
        # Pickled grid caches follow the convention of the release that wrote them (yolov5 v6.0/v6.1 and
        # yolov7 cache cell indices, v6.2+ cells - 0.5): drop them, forward rebuilds them in ours.
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        if isinstance(self.anchor_grid, list):
            self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]

    def _conv(self, i, x):
        return self.m[i](x)

    def forward(self, x):
        return self._forward(x, self._conv)

    def _forward(self, x, conv):
        z = []
        for i in range(self.nl):
            x[i] = conv(i, x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                z.append(self._decode(i, x[i]).view(bs, -1, self.no))
        if self.training:
            return x
        pred = torch.cat(z, 1)
        return (pred,) if self.export else (pred, x)

    def _decode(self, i, p):
        ny, nx = p.shape[2:4]
        if self.dynamic or self.grid[i].shape[2:4] != (ny, nx) or self.grid[i].device != p.device:
            self.grid[i], anchor_wh = self._make_grid(nx, ny, i)
            if isinstance(self.anchor_grid, list):
                self.anchor_grid[i] = anchor_wh
        anchor_wh = self.anchor_grid[i]  # (1, na, ny, nx, 2) cache or (1, na, 1, 1, 2) pixel-anchor buffer
        xy, wh, conf, extra = p.split((2, 2, self.nc + 1, self.no - self.nc - 5), 4)
        xy = (xy.sigmoid() * 2 + self.grid[i]) * self.stride[i]
        wh = (wh.sigmoid() * 2) ** 2 * anchor_wh
        return torch.cat((xy, wh, conf.sigmoid(), extra), 4)  # mask coefficients (Segment) stay linear

    def _make_grid(self, nx, ny, i):
        d, t = self.anchors.device, self.anchors.dtype
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t),
                                indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # the -0.5 of xy = 2 sig - 0.5 + cell
        anchor_wh = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).expand(shape)
        return grid, anchor_wh

    def bias_init(self, cf=None):
        """Priors of the output biases (Focal Loss paper, sec. 3.3): objectness for 8 objects per 640x640
        image, classes 0.6 / (nc - 0.99999) (yolov5) or per-class frequencies ``cf``."""
        for mi, s in zip(self.m, self.stride):
            b = mi.bias.detach().view(self.na, -1).clone()
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:5 + self.nc] += math.log(0.6 / (self.nc - 0.99999)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)


class Segment(Detect):
    """yolov5-seg head: Detect with nm mask coefficients per anchor, plus Proto on the P3 input."""

    def __init__(self, nc=80, anchors=(), nm=32, npr=256, ch=(), inplace=True):
        super().__init__(nc, anchors, ch, inplace)
        self.nm = nm
        self.npr = npr
        self.no = 5 + nc + nm
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.proto = Proto(ch[0], npr, nm)

    def forward(self, x):
        p = self.proto(x[0])
        out = self._forward(x, self._conv)
        if self.training:
            return out, p
        return (out[0], p) if self.export else (out[0], p, out[1])


class IDetect(Detect):
    """yolov7's head: per level an ImplicitA added to the input and an ImplicitM multiplied to the output
    of the 1x1 conv; ``anchor_grid`` is a buffer of pixel anchors (nl, 1, na, 1, 1, 2)."""

    def __init__(self, nc=80, anchors=(), ch=()):
        nn.Module.__init__(self)
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.ia = nn.ModuleList(ImplicitA(x) for x in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def _conv(self, i, x):
        return self.im[i](self.m[i](self.ia[i](x)))

    def fuseforward(self, x):
        """The forward of a head whose implicit layers upstream's fuse() folded (a fused yolov7 pickle
        binds ``forward`` to this)."""
        return self._forward(x, Detect._conv.__get__(self))

    def bias_init(self, cf=None):
        """As Detect's, with yolov7's class prior 0.6 / (nc - 0.99) over every column after objectness."""
        for mi, s in zip(self.m, self.stride):
            b = mi.bias.detach().view(self.na, -1).clone()
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)

    @torch.no_grad()
    def fuse_implicit(self):
        """Fold the implicit layers into the 1x1 convs, W(x + a) + b = Wx + (Wa + b) and m(Wx + b') =
        (mW)x + mb', and replace them by identities (so fused parameter counts match upstream's). A
        quantized conv (one with ``fold_affine``) takes ImplicitM into its output scale, so its integer
        weights stay; its ImplicitA stays in place (the offset is added before the input quantizer,
        where no exact fold exists)."""
        for i, conv in enumerate(self.m):
            if conv.kernel_size != (1, 1):
                raise ValueError(f"IDetect.fuse_implicit: expected 1x1 output convs, got {conv.kernel_size}")
            quantized = hasattr(conv, "fold_affine")
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device))
            if isinstance(self.ia[i], ImplicitA) and not quantized:
                conv.bias += conv.weight.flatten(1) @ self.ia[i].implicit.reshape(-1).to(conv.weight.dtype)
                self.ia[i] = nn.Identity()
            if isinstance(self.im[i], ImplicitM):
                g = self.im[i].implicit.reshape(-1)
                if quantized:
                    conv.fold_affine(g, torch.zeros_like(g))
                else:
                    conv.weight *= g.view(-1, 1, 1, 1).to(conv.weight.dtype)
                    conv.bias *= g.to(conv.bias.dtype)
                self.im[i] = nn.Identity()

    def implicit_fused(self) -> bool:
        if "forward" in self.__dict__:  # fused by upstream's code before pickling
            return True
        return not any(isinstance(im, ImplicitM) for im in self.im) and \
            not any(isinstance(ia, ImplicitA) and not hasattr(c, "fold_affine") for c, ia in zip(self.m, self.ia))


def check_anchor_order(m: Detect) -> None:
    """Anchors must grow with the stride (upstream's check): reverse them, with their pixel copy, if not."""
    a = m.anchors.prod(-1).mean(-1).view(-1)
    da, ds = a[-1] - a[0], m.stride[-1] - m.stride[0]
    if da and da.sign() != ds.sign():
        LOGGER.info("AutoAnchor: reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)
        if isinstance(m.anchor_grid, torch.Tensor):
            m.anchor_grid[:] = m.anchor_grid.flip(0)


# ---------------------------------------------------------------------------------------------- yaml parser

_MODULES = {c.__name__: c for c in (Conv, Bottleneck, C3, SPP, SPPF, Focus, Concat, Proto, MP, SP, SPPCSPC, RepConv,
                                    Detect, Segment, IDetect)}
_CHANNEL_MODULES = (Conv, Bottleneck, C3, SPP, SPPF, Focus, RepConv, SPPCSPC, nn.Conv2d, nn.ConvTranspose2d)
_REPEAT_MODULES = (C3, SPPCSPC)  # take the depth as their own argument
_HEADS = (Detect, Segment, IDetect)


def load_original_yaml(cfg) -> dict:
    """The dict of an original-format model yaml (path or dict); ValueError if it is not one."""
    if isinstance(cfg, dict):
        d, name = deepcopy(cfg), "the model dict"
    else:
        path = Path(cfg)
        if not path.is_file():
            if str(cfg).removesuffix(".yaml") in ORIGINAL_CFGS:
                path = Path(ORIGINAL_CFGS[str(cfg).removesuffix(".yaml")])
            else:
                raise FileNotFoundError(f"model yaml '{cfg}' does not exist: pass a path or a name from "
                                        f"models/registry.py (e.g. 'yolov5n', 'yolov7-tiny')")
        d, name = yaml.safe_load(path.read_text(encoding="utf-8", errors="ignore")), f"'{path}'"
    missing = [k for k in ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head") if k not in d]
    if missing or "scales" in d:
        raise ValueError(f"{name} is not an original YOLOv5/YOLOv7 model yaml (missing {', '.join(missing) or '-'}"
                         f"{'; it has Ultralytics scales' if 'scales' in d else ''}): anchor-based models need nc, "
                         f"depth_multiple, width_multiple, anchors, backbone and head; build Ultralytics yamls "
                         f"with ultralytics.nn.tasks.DetectionModel instead")
    return d


def _resolve_module(name):
    if not isinstance(name, str):
        return name
    if name in _MODULES:
        return _MODULES[name]
    if name.startswith("nn.") and isinstance(getattr(nn, name[3:], None), type) \
            and issubclass(getattr(nn, name[3:]), nn.Module):
        return getattr(nn, name[3:])
    raise ValueError(f"model yaml names module '{name}', which this repo does not define; supported: "
                     f"{', '.join(sorted(_MODULES))} and torch modules as 'nn.Name'")


def _literal(node):
    return ast.literal_eval(node)


def _resolve_arg(a, names: dict):
    """Upstream eval()s string arguments; only what the original yamls use is accepted here: the names
    nc / anchors / None / True / False, literals, and torch modules such as 'nn.LeakyReLU(0.1)'.
    Anything else (e.g. 'nearest') stays a string, as upstream's NameError fallback leaves it."""
    if not isinstance(a, str):
        return a
    s = a.strip()
    if s in names:
        return names[s]
    if s in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[s]
    try:
        node = ast.parse(s, mode="eval").body
    except SyntaxError:
        return a
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
            and node.func.value.id == "nn":
        cls = _resolve_module(f"nn.{node.func.attr}")
        return cls(*[_literal(x) for x in node.args], **{k.arg: _literal(k.value) for k in node.keywords})
    try:
        return ast.literal_eval(node)
    except ValueError:
        return a


def _make_divisible(x, divisor):
    return math.ceil(x / divisor) * divisor


def parse_model(d: dict, ch: list, verbose: bool = True):
    """nn.Sequential of the layers of an original-format model dict and the sorted list of layer indices
    whose outputs later layers read (upstream's ``save``)."""
    anchors, nc, gd, gw = d["anchors"], d["nc"], d["depth_multiple"], d["width_multiple"]
    ch_mul = d.get("channel_multiple") or 8
    act = d.get("activation")
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    if verbose:
        LOGGER.info(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    default_act = Conv.default_act
    if act:  # yaml-wide activation: applies to this build only, not to later models
        Conv.default_act = _resolve_arg(act, {})
    try:
        layers, save, c2 = [], [], ch[-1]
        for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
            m = _resolve_module(m)
            args = [_resolve_arg(a, {"nc": nc, "anchors": anchors}) for a in args]
            n = n_ = max(round(n * gd), 1) if n > 1 else n
            if m in _CHANNEL_MODULES:
                c1, c2 = ch[f], args[0]
                if c2 != no:
                    c2 = _make_divisible(c2 * gw, ch_mul)
                args = [c1, c2, *args[1:]]
                if m in _REPEAT_MODULES:
                    args.insert(2, n)
                    n = 1
            elif m is nn.BatchNorm2d:
                args = [ch[f]]
            elif m is Concat:
                c2 = sum(ch[x] for x in f)
            elif m in _HEADS:
                args.append([ch[x] for x in f])
                if isinstance(args[1], int):  # a number of anchors per level: placeholders, set by AutoAnchor
                    args[1] = [list(range(args[1] * 2))] * len(f)
                if m is Segment:
                    args[3] = _make_divisible(args[3] * gw, ch_mul)
            else:
                c2 = ch[f]
            m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
            t = f"{m.__module__}.{m.__name__}"
            np_ = sum(x.numel() for x in m_.parameters())
            m_.i, m_.f, m_.type, m_.np = i, f, t, np_
            if verbose:
                LOGGER.info(f"{i:>3}{str(f):>18}{n_:>3}{np_:10.0f}  {t:<40}{str(args):<30}")
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m_)
            if i == 0:
                ch = []
            ch.append(c2)
    finally:
        Conv.default_act = default_act
    return nn.Sequential(*layers), sorted(save)


def initialize_weights(model: nn.Module) -> None:
    """Upstream's BatchNorm settings (eps 1e-3, momentum 0.03). Upstream also switches activations to
    inplace; not done here, so that nothing (quantizer calibration hooks, recomputed inputs) sees a
    tensor it saved change under it."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03


# ---------------------------------------------------------------------------------------------- models

def _apply_to_cache(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn`` (a dtype / device move) on a grid cache of the head, or an empty cache (rebuilt by the next
    forward) when ``fn`` does not apply to it: ``model.to(memory_format=torch.channels_last)``, which
    Ultralytics' AutoBackend calls on CPU, rejects the 5-D caches."""
    try:
        return fn(t)
    except RuntimeError:
        return torch.empty(0)


class DetectionModel(tasks.DetectionModel):
    """yolov5's DetectionModel / yolov7's Model, on Ultralytics' DetectionModel (its forward, predict,
    loss and load). ``DetectionModel(cfg, ch, nc, anchors)``: cfg an original-format yaml (path, name in
    models/registry.py, or dict); ``anchors`` (an int) overrides the yaml's anchors by that many
    placeholders per level, to be set by AutoAnchor, as upstream."""

    task = "detect"  # Ultralytics reads model.task; original pickles do not carry it
    inplace = True  # set by yolov5's __init__, absent from yolov7 pickles

    def __init__(self, cfg="yolov5s.yaml", ch=3, nc=None, anchors=None, verbose=True):
        nn.Module.__init__(self)  # Ultralytics' __init__ would parse the yaml with its own (other) format
        self.yaml = load_original_yaml(cfg)
        if not isinstance(cfg, dict):
            self.yaml_file = Path(cfg).name
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        self.yaml["channels"] = ch  # the key Ultralytics' AutoBackend reads
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info(f"Overriding model.yaml anchors with anchors={anchors}")
            self.yaml["anchors"] = round(anchors)
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch], verbose=verbose)
        self.names = {i: str(i) for i in range(self.yaml["nc"])}
        self.inplace = self.yaml.get("inplace", True)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.inplace = self.inplace
            m.stride = self._probe_strides(ch)
            check_anchor_order(m)
            m.anchors /= m.stride.view(-1, 1, 1)
            self.stride = m.stride
            m.bias_init()
        else:
            self.stride = torch.Tensor([32])
        initialize_weights(self)
        if verbose:
            self.info()
            LOGGER.info("")

    @torch.no_grad()
    def _probe_strides(self, ch: int, s: int = 256) -> torch.Tensor:
        # The head in train mode returns its raw maps; the rest in eval so the BN statistics stay as built.
        m = self.model[-1]
        self.model.eval()
        m.training = True
        out = self.predict(torch.zeros(1, ch, s, s))
        self.model.train()
        maps = out[0] if isinstance(m, Segment) else out
        return torch.tensor([s / x.shape[-2] for x in maps])

    def __setstate__(self, state):
        super().__setstate__(state)
        if isinstance(self.__dict__.get("names"), (list, tuple)):  # yolov7 and old yolov5 pickle a list
            self.names = dict(enumerate(self.names))

    def _apply(self, fn):
        super()._apply(fn)
        m = self.model[-1]
        if isinstance(m, Detect):  # plain attributes, not buffers: move them too
            if isinstance(m.stride, torch.Tensor):
                m.stride = fn(m.stride)
            m.grid = [_apply_to_cache(fn, g) for g in m.grid]
            if isinstance(m.anchor_grid, list):
                m.anchor_grid = [_apply_to_cache(fn, g) for g in m.anchor_grid]
        return self

    def _initialize_biases(self, cf=None):
        self.model[-1].bias_init(cf)

    def is_fused(self):
        head = self.model[-1]
        return super().is_fused() and not any(isinstance(m, RepConv) and not hasattr(m, "rbr_reparam")
                                               for m in self.modules()) \
            and (not isinstance(head, IDetect) or head.implicit_fused())

    def fuse(self, verbose=True, imgsz=640):
        """Conv + BN folded (Ultralytics' loop), RepConv re-parameterised, IDetect's implicit layers folded."""
        for m in self.model.modules():
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
            elif isinstance(m, IDetect) and "forward" not in m.__dict__:
                m.fuse_implicit()
        return super().fuse(verbose=verbose, imgsz=imgsz)

    def init_criterion(self):
        return YOLOv5DetLoss(self)


Model = DetectionModel  # the class name yolov5 < v6.2 and yolov7 pickle


class SegmentationModel(DetectionModel, tasks.SegmentationModel):
    """yolov5's SegmentationModel (a Segment head), on Ultralytics' SegmentationModel."""

    task = "segment"

    def __init__(self, cfg="yolov5s-seg.yaml", ch=3, nc=None, anchors=None, verbose=True):
        super().__init__(cfg, ch, nc, anchors, verbose)

    def init_criterion(self):
        return YOLOv5SegLoss(self)
