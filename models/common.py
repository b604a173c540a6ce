"""Building blocks of the original anchor-based YOLOv5 (ultralytics/yolov5 v6.x / v7.0) and YOLOv7
(WongKinYiu/yolov7), under the module path their checkpoints pickle (``models.common``).

A checkpoint of those repositories unpickles into these classes as it is: every class keeps the
original attribute names and forward semantics. Blocks that Ultralytics also defines with the same
attributes (Conv, C3, Bottleneck, SPPF, SPP, Focus, Concat, Proto) subclass Ultralytics' class, so
Ultralytics' fuse() and the project's quantization policy recognise them; their ``__init__`` builds
the original layout (Ultralytics changed defaults since: SPPF's first conv has no activation there,
Proto upsamples with a transposed conv, Bottleneck takes kernel sizes), and ``forward`` is defined
here wherever Ultralytics' version reads attributes an original pickle does not have.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn import modules as um

__all__ = ["autopad", "Conv", "Bottleneck", "C3", "SPP", "SPPF", "Focus", "Concat", "Proto", "MP", "SP", "SPPCSPC",
           "RepConv", "ImplicitA", "ImplicitM"]


def autopad(k, p=None, d=1):
    """'Same' padding for kernel ``k`` at dilation ``d`` unless ``p`` is given."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(um.Conv):
    """Conv2d (no bias) + BatchNorm2d + activation: ``Conv(c1, c2, k, s, p, g, d, act)`` as in yolov5.

    yolov7's Conv has no dilation argument, so its yamls pass the activation as the 7th positional
    argument (``[c2, k, s, None, 1, nn.LeakyReLU(0.1)]``): a module or a bool in the ``d`` slot is
    taken as ``act`` (a dilation is an int >= 1).
    """

    default_act = nn.SiLU()  # our own instance: Ultralytics' shared one is never touched from here

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        if isinstance(d, (bool, nn.Module)):
            d, act = 1, d
        nn.Module.__init__(self)
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    fuseforward = forward_fuse  # yolov7's name: a fused yolov7 pickle binds `forward` to it


class Bottleneck(um.Bottleneck):
    """1x1 then 3x3 Conv, residual when ``shortcut`` and c1 == c2."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        nn.Module.__init__(self)
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(um.C3):
    """CSP bottleneck with 3 convolutions (yolov5)."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        nn.Module.__init__(self)
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPP(um.SPP):
    """Spatial pyramid pooling: parallel max-pools of sizes ``k``."""

    def __init__(self, c1, c2, k=(5, 9, 13)):
        nn.Module.__init__(self)
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(um.SPPF):
    """SPP with three chained k x k max-pools (= SPP(k, 2k-1, 3k-2)). Unlike Ultralytics 8.4's SPPF,
    the first conv has its activation and there is no ``n`` / ``add``."""

    def __init__(self, c1, c2, k=5):
        nn.Module.__init__(self)
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Focus(um.Focus):
    """Space-to-depth (2x2 pixel blocks into channels), then a Conv (yolov5 before v6.0)."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        nn.Module.__init__(self)
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x):
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(um.Concat):
    """torch.cat of a list of tensors along ``d``."""

    def forward(self, x):
        return torch.cat(x, self.d)


class Proto(um.Proto):
    """Mask prototypes of YOLOv5-seg: Conv 3x3, nearest 2x upsampling, Conv 3x3, Conv 1x1 to ``c2`` masks."""

    def __init__(self, c1, c_=256, c2=32):
        nn.Module.__init__(self)
        self.cv1 = Conv(c1, c_, k=3)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cv2 = Conv(c_, c_, k=3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


class MP(nn.Module):
    """k x k max-pool with stride k (yolov7's downsampling branch)."""

    def __init__(self, k=2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x):
        return self.m(x)


class SP(nn.Module):
    """'Same'-size max-pool (yolov7-tiny's SPP branches)."""

    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x):
        return self.m(x)


class SPPCSPC(nn.Module):
    """yolov7's CSP spatial pyramid pooling block."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5, k=(5, 9, 13)):
        super().__init__()
        c_ = int(2 * c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(c_, c_, 3, 1)
        self.cv4 = Conv(c_, c_, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])
        self.cv5 = Conv(4 * c_, c_, 1, 1)
        self.cv6 = Conv(c_, c_, 3, 1)
        self.cv7 = Conv(2 * c_, c2, 1, 1)

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)))
        return self.cv7(torch.cat((y1, self.cv2(x)), 1))


def _bn_scale_shift(bn: nn.BatchNorm2d):
    k = bn.weight / (bn.running_var + bn.eps).sqrt()
    return k, bn.bias - bn.running_mean * k


class RepConv(nn.Module):
    """yolov7's RepVGG block: 3x3 Conv+BN, 1x1 Conv+BN and (when shapes allow) an identity BN, summed,
    then the activation. ``fuse_repvgg_block`` re-parameterises the three branches into one 3x3 conv
    ``rbr_reparam`` (not a subclass of Ultralytics' RepConv: its branches are named differently)."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False):
        super().__init__()
        if k != 3 or autopad(k, p) != 1:
            raise ValueError(f"RepConv needs a 3x3 kernel with padding 1, got k={k}, p={p}")
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, 1, groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
            self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, 1, groups=g, bias=False), nn.BatchNorm2d(c2))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, 0, groups=g, bias=False), nn.BatchNorm2d(c2))

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)

    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        """The 3x3 kernel and bias of the single conv equal to the three branches (BN in eval mode)."""
        conv3, bn3 = self.rbr_dense
        k3, b3 = _bn_scale_shift(bn3)
        kernel = conv3.weight * k3.view(-1, 1, 1, 1)
        bias = b3.clone()
        conv1, bn1 = self.rbr_1x1
        k1, b1 = _bn_scale_shift(bn1)
        kernel = kernel + F.pad(conv1.weight * k1.view(-1, 1, 1, 1), [1, 1, 1, 1])
        bias = bias + b1
        if self.rbr_identity is not None:
            ki, bi = _bn_scale_shift(self.rbr_identity)
            cin = self.in_channels // self.groups
            eye = torch.zeros_like(kernel)
            idx = torch.arange(self.in_channels, device=kernel.device)
            eye[idx, idx % cin, 1, 1] = 1.0
            kernel = kernel + eye * ki.view(-1, 1, 1, 1)
            bias = bias + bi
        return kernel, bias

    @torch.no_grad()
    def fuse_repvgg_block(self):
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        dense = self.rbr_dense[0]
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, dense.stride, dense.padding, groups=self.groups,
                         bias=True).to(kernel.device, kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        conv.requires_grad_(False)
        self.rbr_reparam = conv
        self.deploy = True
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None


class _Implicit(nn.Module):
    """A learned per-channel vector (YOLOR implicit knowledge, yolov7's IDetect), drawn from N(mean, std)."""

    def __init__(self, channel, mean, std):
        super().__init__()
        self.channel = channel
        self.mean = mean
        self.std = std
        self.implicit = nn.Parameter(torch.empty(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)


class ImplicitA(_Implicit):
    """Added to a head level's input."""

    def __init__(self, channel, mean=0.0, std=0.02):
        super().__init__(channel, mean, std)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(_Implicit):
    """Multiplied to a head level's output."""

    def __init__(self, channel, mean=1.0, std=0.02):
        super().__init__(channel, mean, std)

    def forward(self, x):
        return self.implicit * x
