"""Bit allocation under a budget: one width per layer, minimum summed sensitivity, total cost within the budget.

This is a multiple-choice knapsack (each layer picks exactly one of its widths). It is solved exactly by dynamic
programming over the budget: with n layers, k widths each and S budget states, O(n k S) numpy work (a YOLO has
~60-120 quantized convs and 2-4 widths that pay: milliseconds at S = 20000). A greedy pass (lower the layer with the
least sensitivity per saved byte until the budget holds) is optimal only when each layer's sensitivity-vs-cost curve
is convex and the last step fits exactly; measured sensitivities are neither, and the exact answer costs no more
here. No solver dependency (an ILP would need PuLP or OR-tools for the same answer).

Costs are integers (bits, bit-ops). The DP runs on the costs above each layer's cheapest width, in units of their
greatest common divisor when that leaves at most ``max_states`` budget states (then the answer is exact); otherwise
in units of budget / ``max_states`` with every cost rounded up, which keeps the answer within the budget and optimal
for the rounded costs (``Allocation.exact`` False; at most n units of budget go unused).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

Width = tuple[int, int]


@dataclass
class Allocation:
    widths: dict[str, Width]  # layer -> (w_bits, a_bits)
    sensitivity: float  # summed sensitivity of the chosen widths
    cost: int  # summed cost of the chosen widths
    budget: int
    exact: bool  # optimal for the true costs (False: for costs rounded up to ``unit``)
    unit: int  # the DP's cost unit


def _key(sens) -> tuple[float, float]:
    """(primary, secondary) of a sensitivity: a float, or a pair whose second member breaks ties of the first."""
    return (float(sens[0]), float(sens[1])) if isinstance(sens, (tuple, list)) else (float(sens), 0.0)


def allocate(options: dict[str, dict[Width, tuple]], budget: int | float, max_states: int = 20000) -> Allocation:
    """``options``: {layer: {width: (cost, sensitivity)}}, a sensitivity a float or a pair (primary, tie-breaker:
    e.g. a second proxy where the first is 0 for several widths). The widths minimising summed sensitivity
    (lexicographically for pairs) with summed cost <= ``budget``; among equal sensitivities, the cheaper.
    ValueError when even the cheapest widths exceed it."""
    if not options:
        raise ValueError("allocate: no layers to allocate")
    names = list(options)
    for n in names:
        if not options[n]:
            raise ValueError(f"allocate: layer {n!r} has no width to choose from")
    # each layer's widths by cost, cheapest first (ties in sensitivity go to the cheaper: only a strictly better
    # candidate replaces the one kept)
    opts = {n: sorted(options[n].items(), key=lambda kv: (kv[1][0], _key(kv[1][1]))) for n in names}
    base = sum(o[0][1][0] for o in opts.values())
    if base > budget:
        raise ValueError(f"allocate: the budget {budget:g} is below the cheapest allocation ({base:g}: every layer at "
                         f"its narrowest width that pays)")
    extra = {n: [int(c - o[0][1][0]) for _, (c, *_) in o] for n, o in opts.items()}
    room = int(min(budget - base, sum(max(e) for e in extra.values())))
    g = 0
    for e in extra.values():
        for v in e:
            g = math.gcd(g, v)
    g = g or 1
    exact = room // g <= max_states
    unit = g if exact else math.ceil(room / max_states)
    states = room // unit
    cost_units = {n: [math.ceil(v / unit) for v in e] for n, e in extra.items()}

    dp1, dp2 = np.zeros(states + 1), np.zeros(states + 1)
    choices = []
    for n in names:
        new1, new2 = np.full(states + 1, np.inf), np.full(states + 1, np.inf)
        pick = np.zeros(states + 1, dtype=np.int16)
        for j, ((_, (_, sens)), cu) in enumerate(zip(opts[n], cost_units[n])):
            if cu > states:
                continue
            s1, s2 = _key(sens)
            c1, c2 = np.full(states + 1, np.inf), np.full(states + 1, np.inf)
            c1[cu:] = dp1[:states + 1 - cu] + s1
            c2[cu:] = dp2[:states + 1 - cu] + s2
            better = (c1 < new1) | ((c1 == new1) & (c2 < new2))
            new1, new2 = np.where(better, c1, new1), np.where(better, c2, new2)
            pick = np.where(better, j, pick)
        dp1, dp2 = new1, new2
        choices.append(pick)
    s = states
    chosen = {}
    for n, pick in zip(reversed(names), reversed(choices)):
        j = int(pick[s])
        chosen[n] = opts[n][j][0]
        s -= cost_units[n][j]
    widths = {n: chosen[n] for n in names}
    total_cost = sum(options[n][w][0] for n, w in widths.items())
    total_sens = sum(_key(options[n][w][1])[0] for n, w in widths.items())
    return Allocation(widths, float(total_sens), int(total_cost), int(budget), exact, int(unit))


def brute_force(options: dict[str, dict[Width, tuple]], budget: int | float) -> tuple[float, dict]:
    """The optimum by enumeration (for checking ``allocate`` on a few layers): (summed primary sensitivity, widths);
    pairs compare lexicographically, as in ``allocate``."""
    names = list(options)
    best = ((math.inf, math.inf), None)
    for combo in itertools.product(*(list(options[n]) for n in names)):
        cost = sum(options[n][w][0] for n, w in zip(names, combo))
        if cost <= budget:
            keys = [_key(options[n][w][1]) for n, w in zip(names, combo)]
            sens = (sum(k[0] for k in keys), sum(k[1] for k in keys))
            if sens < best[0]:
                best = (sens, dict(zip(names, combo)))
    return best[0][0], best[1]
