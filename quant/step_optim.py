"""Adam for quantizer step sizes, with updates relative to the step.

Adam moves a parameter by about ``lr`` per step in absolute terms, whatever the size of its gradient.
At the paper's lr (1e-4) that is ~1% of a per-tensor 4-bit weight step (~1e-2), but an 8-bit or a
per-channel step of a small-weight channel can be ~1e-5: a few Adam steps drive it to the floor, where
every weight of the channel quantizes to zero. So each step size ``s`` is trained through the
reparametrisation ``u = r * log(s / r)``, with Adam on ``u``:

    ds/du = s / r,   s <- s * exp(-lr * adam_direction(g * s / r) / r)

``r`` (the *reference step*) is, per quantizer, its largest step at the first update, times
``max(1, levels / 15)``: the per-tensor step the same range would have on a 4-bit grid. Consequences:
- a per-tensor step of at most 4 bits has ``r = s`` at the start, where ``du = ds`` and ``g * s / r = g``:
  the first-order update is the paper's (Adam at ``lr`` on ``s``), and so is Adam's epsilon;
- every step of a quantizer moves by the same *relative* amount, ``lr / r`` per Adam unit (at most
  ``MAX_RELATIVE_MOVE``: a reference below ``lr / MAX_RELATIVE_MOVE``, 1e-3 at the paper's lr, counts as that), so an 8-bit
  or per-channel step moves no faster, relative to itself, than the 4-bit per-tensor step of that
  tensor: it cannot be driven to the floor in a handful of updates, and it stays positive by
  construction (no clamp needed).
LSQ+ offsets keep plain Adam: they are not bounded below and move in the units of the tensor.

``r`` is kept in the optimizer state (saved with it), so a resumed run continues with the same
reference. State loaded from a plain ``torch.optim.Adam`` (checkpoints of runs that trained steps in
absolute terms) has no ``r``: it is taken from the step's value at the next update, where
``g * s / r = g`` again for a per-tensor step, so the loaded moments stay meaningful.
"""
from __future__ import annotations

import torch
from torch import nn

from .grid import MIN_SCALE
from .lsq import LSQQuantizer

REFERENCE_LEVELS = 15  # the levels of a 4-bit grid: the paper's per-tensor step is the reference
STEP_UPDATES = ("relative", "absolute")
MAX_RELATIVE_MOVE = 0.1  # the largest share of itself a step moves per Adam unit (references below lr / 0.1)


def reference_factor(quantizer) -> float:
    """``max(1, levels / 15)``: the factor from a quantizer's step to the 4-bit step of the same range."""
    return max(1.0, (quantizer.qmax - quantizer.qmin) / REFERENCE_LEVELS)


class StepSizeAdam(torch.optim.Optimizer):
    """Adam (no weight decay) over the parameters of LSQ quantizers: step sizes in relative terms (see the
    module docstring), every other parameter (LSQ+ offsets) as plain Adam. ``step_factors`` maps each
    step-size parameter (by identity) to its ``reference_factor``; parameters not in it train as plain
    Adam. One parameter group, in the order given, so the state of a ``torch.optim.Adam`` built over the
    same list loads into it."""

    def __init__(self, params, step_factors: dict[int, float], lr: float = 1e-4, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        if lr < 0:
            raise ValueError(f"lr={lr!r} is invalid: allowed values are >= 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0.0})
        self.step_factors = dict(step_factors)

    @classmethod
    def for_quantizers(cls, quantizers, lr: float, **kw) -> "StepSizeAdam":
        """Over ``quantizers``' parameters, in module order (each quantizer's step size, then its offset)."""
        params, factors = [], {}
        for q in quantizers:
            for p in q.parameters(recurse=False):
                params.append(p)
            factors[id(q.step_size)] = reference_factor(q)
        return cls(params, factors, lr=lr, **kw)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            steps, others = [], []
            for p in group["params"]:
                if p.grad is not None:
                    (steps if id(p) in self.step_factors else others).append(p)
            self._update(steps, group, relative=True)
            self._update(others, group, relative=False)
        return loss

    def _update(self, params: list, group: dict, relative: bool) -> None:
        """One Adam update of ``params`` with foreach kernels (a few launches for all quantizers, no host sync)."""
        if not params:
            return
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        states = [self._state(p, relative) for p in params]
        grads = [p.grad for p in params]
        if relative:
            floored = torch._foreach_clamp_min([p.detach() for p in params], MIN_SCALE)
            # A reference below lr / MAX_RELATIVE_MOVE (a step calibrated near the floor: an input that is constant
            # or zero) would move the step by a factor exp(lr / r) per update; such steps move by at most that share.
            refs = torch._foreach_clamp_min([st["ref"] for st in states], lr / MAX_RELATIVE_MOVE)
            grads = torch._foreach_div(torch._foreach_mul(grads, floored), refs)  # d loss / d u, u = r log(s / r)
        counts = [st["step"] for st in states]
        torch._foreach_add_(counts, 1.0)
        exp_avg, exp_avg_sq = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        # Bias corrections from the device step counters: 1 - beta^t
        bc1 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta1, counts)), 1.0)
        bc2 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta2, counts)), 1.0)
        denom = torch._foreach_add_(torch._foreach_sqrt_(torch._foreach_div(exp_avg_sq, bc2)), eps)
        direction = torch._foreach_div_(torch._foreach_div(exp_avg, bc1), denom)
        if not relative:
            torch._foreach_add_(params, torch._foreach_mul_(direction, -lr))
            return
        # s <- s exp(-lr * direction / r), from the floored value: a raw step below the floor recovers
        factors = torch._foreach_exp_(torch._foreach_mul_(torch._foreach_div_(direction, refs), -lr))
        torch._foreach_copy_(params, torch._foreach_mul_(floored, factors))

    def _state(self, p: torch.Tensor, relative: bool) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if relative and "ref" not in state:  # first update, or the state of a plain Adam: the reference from now
            ref = p.detach().clamp_min(MIN_SCALE).amax() * self.step_factors[id(p)]
            state["ref"] = ref.expand_as(p).clone()  # one per element: the foreach kernels do not broadcast
        return state


def step_size_optimizer(model: nn.Module, lr: float, update: str = "relative") -> torch.optim.Optimizer:
    """The optimizer of every LSQ quantizer parameter of ``model``: ``relative`` (``StepSizeAdam``) or
    ``absolute`` (``torch.optim.Adam``, the paper's literal recipe, as runs before relative updates)."""
    if update not in STEP_UPDATES:
        raise ValueError(f"step_update={update!r} is invalid: allowed values are {STEP_UPDATES}")
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]  # each once, shared ones too
    if update == "relative":
        return StepSizeAdam.for_quantizers(quantizers, lr=lr)
    return torch.optim.Adam([p for q in quantizers for p in q.parameters(recurse=False)], lr=lr, weight_decay=0.0)



# A step this close to the floor quantizes every weight of its channel (or every input) to zero or one code:
# the channel carries nothing. A hundred times the floor leaves room for honest tiny steps of dead channels,
# which start there, to be told apart from the collapse the report is for by their layer and epoch.
NEAR_FLOOR = 100 * MIN_SCALE


@torch.no_grad()
def steps_near_floor(convs: dict) -> dict[str, int]:
    """Per quantized conv (``quant_convs``' name -> module), how many of the weight and input step sizes it uses
    are at most ``NEAR_FLOOR`` (a shared input encoding counts once, at the first conv that reads it; a conv's own
    input quantizer that a shared one replaces is not looked at); layers with none are left out. One host read."""
    names, counts, seen = [], [], set()
    for name, conv in convs.items():
        source = getattr(conv, "input_source", None)
        used = (getattr(conv, "weight_quantizer", None), source if source is not None else conv.input_quantizer)
        steps = [q.step_size for q in used if isinstance(q, LSQQuantizer) and id(q) not in seen]
        seen.update(id(q) for q in used)
        if steps:
            names.append(name)
            counts.append(sum((s.detach() <= NEAR_FLOOR).sum() for s in steps))
    if not counts:
        return {}
    return {n: int(c) for n, c in zip(names, torch.stack(counts).tolist()) if c}
