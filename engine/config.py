"""QATConfig: the QAT settings that Ultralytics' own cfg does not know, as plain data.

They travel inside the trainer's overrides under the single key ``qat`` (a dict): the trainer pops
it before Ultralytics validates the overrides, then puts it back on ``trainer.args.qat`` so that it
is written to args.yaml, to every checkpoint's ``train_args`` (resume reads it back from there) and
to the pickled args Ultralytics' DDP launcher hands to each worker.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from quant import QuantRecipe

METHODS = ("lsq", "dampen", "freeze")


@dataclass
class QATConfig:
    recipe: dict = field(default_factory=lambda: QuantRecipe().to_dict())
    method: str = "lsq"
    ema_decay: float = 0.9999  # 0 = no EMA: the raw LSQ model is validated and saved
    ema_tau: float = 2000.0  # EMA warm-up in optimizer steps: a = decay * (1 - exp(-t / tau))
    scale_lr: float = 1e-4  # Adam, no weight decay, for step sizes and LSQ+ offsets
    dampen_lambda: float = 1e-2  # final dampening strength (method=dampen)
    freeze_th_start: float = 0.04  # freezing threshold at the start of its cosine (method=freeze)
    freeze_th_end: float = 0.01
    schedule_start: float = 0.25  # dampening / freezing are off for this share of training
    osc_momentum: float = 0.01  # m in f <- m * osc + (1 - m) * f
    osc_threshold: float = 0.01  # a weight "oscillates" in the reports when f exceeds this
    calib_batches: int = 8  # batches that initialise the activation quantizers
    bn_reestimate: bool = False  # recompute BN statistics with the quantized forward after QAT
    bn_batches: int = 50
    recompute_input: bool = False  # QuantConv2d.recompute_input: less training memory, slower steps

    def __post_init__(self):
        self.recipe = QuantRecipe.from_any(self.recipe).to_dict()  # raises ValueError on bad bits
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid: allowed values are {METHODS}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} is invalid: allowed values are in [0, 1)")
        if self.ema_tau <= 0:
            raise ValueError(f"ema_tau={self.ema_tau!r} is invalid: allowed values are > 0 (optimizer steps)")
        if self.scale_lr < 0:
            raise ValueError(f"scale_lr={self.scale_lr!r} is invalid: allowed values are >= 0")
        if not 0.0 <= self.schedule_start < 1.0:
            raise ValueError(f"schedule_start={self.schedule_start!r} is invalid: allowed values are in [0, 1)")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches={self.calib_batches!r} is invalid: allowed values are >= 1")

    @classmethod
    def from_any(cls, cfg: "QATConfig | dict | None") -> "QATConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"QAT config has unknown field(s) {sorted(unknown)}: allowed fields are {sorted(known)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        return asdict(self)
