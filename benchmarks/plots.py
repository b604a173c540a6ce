"""Diagnostics of one QAT run: scale trajectories (raw vs EMA), latent-weight distance to the rounding
threshold, per-layer oscillation shares, and summary numbers of scale oscillation.

``ScaleRecorder`` is an Ultralytics callback object: register ``recorder.on_train_batch_end`` on a QAT
trainer (``trainer.add_callback("on_train_batch_end", recorder.on_train_batch_end)``). After every
optimizer step it records the weight and activation step size of every quantized conv, for the raw
model (``trainer.model``) and for the EMA (``trainer.ema.ema``), keeping the last ``window`` steps.
Then ``recorder.save(out_dir)`` writes the arrays, the PNGs and returns the summary numbers.
"""
from __future__ import annotations

import csv
import json
from collections import deque
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from yolo_qat.quant import quant_convs  # noqa: E402

KINDS = ("weight", "act")


def layer_scales(model: nn.Module) -> dict[str, np.ndarray]:
    """{"weight": (L,), "act": (L,)} mean step size of every quantized conv (per-channel: the mean)."""
    convs = quant_convs(getattr(model, "module", model))
    w = [float(m.weight_quantizer.scale.mean()) for m in convs.values()]
    a = [float(m.input_quantizer.scale.mean()) for m in convs.values()]
    return {"weight": np.asarray(w), "act": np.asarray(a)}


class ScaleRecorder:
    """Step sizes of every quantized conv after each optimizer step, raw and EMA, last ``window`` steps."""

    def __init__(self, window: int = 200):
        self.window = window
        self.steps: deque[int] = deque(maxlen=window)
        self.raw = {k: deque(maxlen=window) for k in KINDS}
        self.ema = {k: deque(maxlen=window) for k in KINDS}
        self.layers: list[str] = []
        self.trainer = None
        self._last_step = -1

    def on_train_batch_end(self, trainer) -> None:
        self.trainer = trainer
        step = int(getattr(trainer, "qat_step", 0))
        if step == self._last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self._last_step = step
        if not self.layers:
            self.layers = list(quant_convs(getattr(trainer.model, "module", trainer.model)))
        raw = layer_scales(trainer.model)
        ema_model = trainer.ema.ema if getattr(trainer, "ema", None) else trainer.model
        ema = layer_scales(ema_model)
        self.steps.append(step)
        for k in KINDS:
            self.raw[k].append(raw[k])
            self.ema[k].append(ema[k])

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"steps": np.asarray(self.steps)}
        for k in KINDS:
            out[f"raw_{k}"] = np.stack(self.raw[k]) if self.raw[k] else np.zeros((0, len(self.layers)))
            out[f"ema_{k}"] = np.stack(self.ema[k]) if self.ema[k] else np.zeros((0, len(self.layers)))
        return out

    def save(self, out_dir: str | Path, osc_csv: str | Path | None = None, n_layers: int = 4) -> dict:
        """Write scales.npz, the PNGs and diagnostics.json into ``out_dir``; return the summary."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arr = self.arrays()
        np.savez(out / "scales.npz", layers=np.asarray(self.layers), **arr)
        summary = {"recorded_steps": int(len(arr["steps"])), "last_step": int(arr["steps"][-1]) if len(arr["steps"]) else 0}
        for src in ("raw", "ema"):
            for k in KINDS:
                summary.update({f"{src}_{k}_{n}": v for n, v in scale_oscillation(arr[f"{src}_{k}"]).items()})
        plot_scale_trajectories(arr, self.layers, out / "scale_trajectories.png", n_layers)
        if self.trainer is not None:
            models = {"raw": self.trainer.model}
            if getattr(self.trainer, "ema", None):
                models["EMA"] = self.trainer.ema.ema
            summary["near_threshold_share"] = plot_threshold_histogram(models, out / "threshold_distance.png")
        if osc_csv is not None and Path(osc_csv).is_file():
            plot_layer_oscillations(osc_csv, out / "layer_oscillations.png")
        (out / "diagnostics.json").write_text(json.dumps(summary, indent=1))
        return summary


def scale_oscillation(traj: np.ndarray) -> dict[str, float]:
    """Over a (T, L) trajectory: mean over layers of the relative std of the step size (std / mean)
    and of the share of consecutive updates whose sign flips (0 for a monotone scale, ~1 for a
    scale that jumps back and forth every step)."""
    if traj.shape[0] < 3:
        return {"scale_rel_std": float("nan"), "scale_flip_rate": float("nan")}
    rel_std = traj.std(0) / np.maximum(np.abs(traj.mean(0)), 1e-12)
    d = np.sign(np.diff(traj, axis=0))
    both = (d[1:] != 0) & (d[:-1] != 0)
    flips = ((d[1:] * d[:-1]) < 0).sum(0) / np.maximum(both.sum(0), 1)
    return {"scale_rel_std": float(rel_std.mean()), "scale_flip_rate": float(flips.mean())}


def _pick_layers(arr: dict, n: int) -> list[int]:
    """The ``n`` layers whose raw weight scale moves most (relative std): the interesting trajectories."""
    traj = arr["raw_weight"]
    if traj.shape[0] == 0:
        return []
    rel = traj.std(0) / np.maximum(traj.mean(0), 1e-12)
    return list(np.argsort(-rel)[:n])


def plot_scale_trajectories(arr: dict, layers: list[str], path: Path, n_layers: int = 4) -> None:
    idx = _pick_layers(arr, n_layers)
    fig, axes = plt.subplots(2, max(len(idx), 1), figsize=(3.2 * max(len(idx), 1), 5.5), squeeze=False)
    for col, i in enumerate(idx):
        for row, k in enumerate(KINDS):
            ax = axes[row][col]
            ax.plot(arr["steps"], arr[f"raw_{k}"][:, i], lw=0.8, label="raw")
            ax.plot(arr["steps"], arr[f"ema_{k}"][:, i], lw=1.4, label="EMA")
            ax.set_title(f"{layers[i]} {k} scale", fontsize=7)
            ax.tick_params(labelsize=6)
            if row == 1:
                ax.set_xlabel("optimizer step", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def threshold_distances(model: nn.Module) -> np.ndarray:
    """``w/s - floor(w/s) - 0.5`` of every in-range latent weight: 0 means on a rounding threshold."""
    out = []
    for m in quant_convs(getattr(model, "module", model)).values():
        q = m.weight_quantizer
        w = m.weight.detach().float()
        x = (w / q.scale_for(w)).flatten()
        x = x[(x >= q.qmin - 0.5) & (x <= q.qmax + 0.5)]
        out.append((x - torch.floor(x) - 0.5).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def plot_threshold_histogram(models: dict[str, nn.Module], path: Path, near: float = 0.05) -> dict[str, float]:
    """Histogram per model; returns the share of weights within ``near`` of a threshold."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    shares = {}
    for name, model in models.items():
        d = threshold_distances(model)
        shares[name] = float((np.abs(d) < near).mean()) if d.size else float("nan")
        ax.hist(d, bins=100, range=(-0.5, 0.5), histtype="step", density=True, label=f"{name} ({100 * shares[name]:.1f}% within {near})")
    ax.set_xlabel("w/s - floor(w/s) - 0.5   (0 = rounding threshold)", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return shares


def last_epoch_layer_oscillations(osc_csv: str | Path) -> dict[str, float]:
    with open(osc_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last = max(int(r["epoch"]) for r in rows)
    return {r["layer"]: float(r["osc_share"]) for r in rows if int(r["epoch"]) == last}


def plot_layer_oscillations(osc_csv: str | Path, path: Path) -> None:
    shares = last_epoch_layer_oscillations(osc_csv)
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(shares)), 3.2))
    ax.bar(range(len(shares)), [100 * v for v in shares.values()])
    ax.set_xticks(range(len(shares)))
    ax.set_xticklabels(list(shares), rotation=90, fontsize=4)
    ax.set_ylabel("oscillating weights (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_results_table(results: list[dict], columns: list[str], bits: list, metrics: list[str],
                       fp: dict, path: Path) -> None:
    """The reproduction table as grouped bars: one panel per metric, one group per bit width, one bar
    per column (mean over seeds, whiskers = sample std, dots = the single seeds), FP as a line."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    width = 0.8 / max(len(columns), 1)
    colors = plt.get_cmap("tab10")
    for ax, metric in zip(axes[0], metrics):
        for j, col in enumerate(columns):
            for i, b in enumerate(bits):
                vals = [100 * r[metric] for r in results
                        if r["bits"] == b and r["column"] == col and r.get(metric) is not None]
                if not vals:
                    continue
                x = i + (j - (len(columns) - 1) / 2) * width
                ax.bar(x, np.mean(vals), width * 0.9, color=colors(j % 10), label=col if i == 0 else None,
                       yerr=np.std(vals, ddof=1) if len(vals) > 1 else None, capsize=2)
                ax.plot([x] * len(vals), vals, "k.", ms=3)
        if fp.get(metric) is not None:
            ax.axhline(100 * fp[metric], color="k", ls="--", lw=1, label="FP")
        ax.set_xticks(range(len(bits)), [f"W{b}A{b}" if "a" not in str(b) else f"W{str(b).replace('a', 'A')}" for b in bits])
        ax.set_ylabel(f"{metric} mAP50-95 (%)")
        lo = min([100 * r[metric] for r in results if r.get(metric) is not None] or [0])
        ax.set_ylim(max(0.0, lo - 3), None)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
