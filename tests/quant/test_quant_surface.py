"""The public surface of quant/: integer codes, the step size shaped for a tensor, module
replacement; and the structure around it: no private name of a quant/ module read outside it, no import
cycle inside quant/."""
import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from yolo_qat.quant import LSQQuantizer, MIN_SCALE, QuantConv2d, broadcast_scale, replace_module

ROOT = Path(__file__).resolve().parents[2]
QUANT = ROOT / "quant"


def _expected_codes(values, steps, qmin, qmax, offset=0.0):
    """clamp(round((v - b) / s)) in Python floats, one value at a time: round() is half-to-even, as torch's."""
    return torch.tensor([[max(qmin, min(qmax, round((v - offset) / s))) for v in row] for row, s in zip(values, steps)])


# -- codes --------------------------------------------------------------------------------------------------
def test_codes_per_tensor_on_a_hand_made_tensor():
    q = LSQQuantizer(3, signed=True)  # codes -4..3
    q.set_scale(0.5)
    # exact half-steps (0.25 -> 0.5 -> 0, 0.75 -> 1.5 -> 2, -1.25 -> -2.5 -> -2), clipping on both sides
    row = [0.25, 0.75, -1.25, 0.1, -0.6, 1.4, 9.0, -9.0, 0.0]
    assert torch.equal(q.codes(torch.tensor([row])), _expected_codes([row], [0.5], -4, 3).float())
    assert q.codes(torch.tensor([row])).tolist()[0] == [0, 2, -2, 0, -1, 3, 3, -4, 0]


def test_codes_per_channel_weight():
    q = LSQQuantizer(4, signed=True, per_channel=True, axis=0, channels=2)
    q.set_scale([0.5, 0.125])
    rows = [[0.25, -0.3, 2.0, 5.0], [0.0625, -0.2, 0.9, -3.0]]
    w = torch.tensor(rows).reshape(2, 1, 2, 2)  # (out, in, kh, kw): one step per output channel
    expected = _expected_codes(rows, [0.5, 0.125], -8, 7).reshape(2, 1, 2, 2).float()
    assert torch.equal(q.codes(w), expected)
    conv = QuantConv2d(1, 2, 2, bias=False, w_bits=4, per_channel=True)
    with torch.no_grad():
        conv.weight.copy_(w)
    conv.weight_quantizer.set_scale([0.5, 0.125])
    assert torch.equal(conv.integer_weight(), expected)


def test_codes_with_lsq_plus_offset():
    q = LSQQuantizer(2, signed=False, learn_offset=True)  # codes 0..3
    q.set_scale(0.5, offset=-0.25)
    row = [-0.25, 0.0, 0.5, 1.0, 2.0, -1.0]
    assert torch.equal(q.codes(torch.tensor([row])), _expected_codes([row], [0.5], 0, 3, offset=-0.25).float())


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("offset", [False, True], ids=["lsq", "lsq+"])
def test_codes_are_the_codes_of_the_forward(per_channel, offset):
    """forward(x) == codes(x) * s + b bit for bit, ties included (the per-tensor forward runs the fused
    kernel, the per-channel one the reference): the one integer-code function describes the forward."""
    torch.manual_seed(0)
    q = LSQQuantizer(4, signed=not offset, per_channel=per_channel, axis=0, channels=6, learn_offset=offset)
    steps = torch.rand(6 if per_channel else 1) * 0.2 + 0.05
    q.set_scale(steps, offset=torch.full_like(steps, -0.3) if offset else None)
    x = torch.randn(6, 3, 5, 5)
    x.view(6, -1)[:, :8] = (torch.arange(8) - 4.5) * steps.view(-1, 1)  # exact half-steps (as close as fp32 gets)
    s, b = q.scale_for(x), (broadcast_scale(q.offset.detach(), x, 0 if per_channel else None) if offset else 0.0)
    with torch.no_grad():
        assert torch.equal(q(x), q.codes(x) * s + b)
    conv = QuantConv2d.from_conv(nn.Conv2d(3, 6, 5), 4, 4, per_channel=per_channel)
    assert torch.equal(conv.quantized_weight().detach(),
                       conv.integer_weight() * conv.weight_quantizer.scale_for(conv.weight))


# -- the step size shaped for a tensor ---------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis, expected", [
    ((8, 4, 3, 3), 0, (8, 1, 1, 1)),   # conv weight, per output channel
    ((8, 16), 0, (8, 1)),              # linear weight, per output feature
    ((2, 8, 5, 5), 1, (1, 8, 1, 1)),   # activations, per channel
    ((8, 4, 3, 3), None, (1, 1, 1, 1)),
    ((8, 16), None, (1, 1)),
])
def test_broadcast_scale_shapes(shape, axis, expected):
    x = torch.randn(shape)
    n = shape[axis] if axis is not None else 1
    s = torch.arange(1, n + 1, dtype=torch.float32)
    b = broadcast_scale(s, x, axis)
    assert b.shape == expected
    idx = [slice(None)] * len(shape)
    for c in range(n):  # slice c of x is divided by step c
        if axis is not None:
            idx[axis] = c
        torch.testing.assert_close((x / b)[tuple(idx)], x[tuple(idx)] / s[c], rtol=0, atol=0)


def test_broadcast_scale_refuses_a_step_count_that_does_not_fit():
    with pytest.raises(ValueError, match="5 step sizes for 8 slices"):
        broadcast_scale(torch.ones(5), torch.zeros(8, 4, 3, 3), 0)
    with pytest.raises(ValueError, match="axis=None"):
        broadcast_scale(torch.ones(8), torch.zeros(8, 4, 3, 3), None)
    assert broadcast_scale(torch.tensor(0.5), torch.zeros(3), None).shape == (1,)  # a 0-d step too


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (6, 10)], ids=["conv", "linear"])
def test_scale_for_floors_and_shapes_the_step(shape):
    q = LSQQuantizer(4, per_channel=True, axis=0, channels=6)
    w = torch.randn(shape)
    q.init_from_weight(w)
    (step,) = q.parameters()  # the learnable step sizes
    with torch.no_grad():
        step[0] = -1.0  # an optimizer step can push a step size below zero; the forward uses the floor
    s = q.scale_for(w)
    assert s.shape == (6,) + (1,) * (len(shape) - 1) and not s.requires_grad
    assert float(s.flatten()[0]) == pytest.approx(MIN_SCALE) and torch.equal(s.flatten()[1:], q.scale[1:])
    assert q.scale_for(w, grad=True).requires_grad  # for losses that train the step (dampening)


# -- replace_module ------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 2, 1), nn.ReLU()
        self.inner = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(nn.Conv2d(2, 2, 3)))


def test_replace_module_on_nested_names():
    model = nn.Sequential(_Block(), nn.Conv2d(2, 2, 1))
    before = dict(model.named_modules())
    for name in ("0.conv", "0.inner.1.0", "1", "0.inner"):
        new = nn.Identity()
        replace_module(model, name, new)
        after = dict(model.named_modules())
        assert after[name] is new
        # everything else stays: the other names keep their modules (those below the new one are gone)
        assert all(after[n] is m for n, m in before.items() if n in after and n != name)
        assert not [n for n in after if n.startswith(name + ".")]
        before = after
    assert list(after) == ["", "0", "0.conv", "0.act", "0.inner", "1"]


@pytest.mark.parametrize("name", ["0.nope", "2", "0.conv.weight", "", "x.y.z"])
def test_replace_module_refuses_a_name_that_is_no_submodule(name):
    model = nn.Sequential(_Block(), nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="has no submodule"):
        replace_module(model, name, nn.Identity())


# -- no private name of quant/ read outside its module -------------------------------------------------------
def _docstrings(tree):
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            out.add(id(body[0].value))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _targets(node) -> list:
    if isinstance(node, ast.Assign):
        return node.targets
    return [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []


def defined_privates(tree) -> set[str]:
    """Private names a module defines: the functions, classes and variables of its top level and of its
    class bodies, and every ``self._x`` it assigns."""
    names = set()
    for scope in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        for node in scope.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            names.update(t.id for t in _targets(node) if isinstance(t, ast.Name))
    names.update(t.attr for node in ast.walk(tree) for t in _targets(node)
                 if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self")
    # torch's own hooks a quant class overrides (_apply, _load_from_state_dict, ...) are torch's protocol
    return {n for n in names if _is_private(n) and not hasattr(nn.Conv2d, n)
            and not hasattr(torch.autograd.Function, n)}


def private_reads(source: str, privates: dict[str, str], own: set[str], in_quant: bool = False) -> list[str]:
    """Every place in ``source`` that reads a name of ``privates`` ({name: defining module}) that it does
    not define itself (``own``): attribute reads, private imports from quant (relative ones too when the
    source is in quant/: ``in_quant``), getattr/hasattr with the name, and string constants holding
    ``._name`` (state-dict keys)."""
    tree = ast.parse(source)
    foreign = {n: m for n, m in privates.items() if n not in own}
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in foreign:
            found.append(f"line {node.lineno}: .{node.attr} ({foreign[node.attr]})")
        elif isinstance(node, ast.ImportFrom) and \
                ((node.level and in_quant) or _names_quant(node.module or "")):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1 and \
                isinstance(node.args[1], ast.Constant) and node.args[1].value in foreign:
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found += [f"line {node.lineno}: string {node.value!r} names .{n}" for n in foreign
                      if re.search(rf"\.{re.escape(n)}\b", node.value)]
    return found


def _names_quant(module: str) -> bool:
    return module == "yolo_qat.quant" or module.startswith("yolo_qat.quant.")


def _quant_privates() -> dict[str, str]:
    out = {}
    for path in sorted(QUANT.glob("*.py")):
        for name in defined_privates(ast.parse(path.read_text(encoding="utf-8"))):
            out.setdefault(name, path.name)
    return out


def _repo_sources():
    skip = {"tests", "runs", "datasets", "__pycache__"}  # tests are white-box: they may pin internals
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if not any(p in skip or p.startswith(".") for p in parts[:-1]):
            yield path


def test_the_scan_finds_private_reads():
    privates = {"_is_init": "lsq.py", "_scale": "lsq.py", "_set_module": "convert.py"}
    src = ('"""A docstring may mention q._is_init."""\n'
           "from yolo_qat.quant.convert import _set_module\n"
           "def f(q, state, prefix):\n"
           "    a = q._is_init\n"
           "    b = getattr(q, '_scale')\n"
           "    return state[prefix + 'weight_quantizer._scale']\n")
    found = private_reads(src, privates, own=set())
    assert len(found) == 4, found
    assert private_reads(src, privates, own={"_is_init", "_scale", "_set_module"}) == ["line 2: import _set_module"]
    assert {"_is_init", "_scale", "_resize", "_grad_factor"} <= set(_quant_privates())
    assert "_load_from_state_dict" not in _quant_privates()  # torch's hook, overridden


def test_no_private_name_of_quant_is_read_outside_its_module():
    privates = _quant_privates()
    sources = list(_repo_sources())
    assert any(p.parent.name == "deploy" for p in sources) and any(p.parent.name == "engine" for p in sources)
    bad = {}
    for path in sources:
        source = path.read_text(encoding="utf-8")
        found = private_reads(source, privates, defined_privates(ast.parse(source)), in_quant=path.parent == QUANT)
        if found:
            bad[str(path.relative_to(ROOT))] = found
    assert not bad, f"private names of quant/ read outside their module (use the public surface): {bad}"


# -- no import cycle inside quant/ ---------------------------------------------------------------------------
def quant_imports(path: Path) -> set[str]:
    """quant/ modules ``path`` imports, anywhere in the file (a function-local import counts too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out.update([node.module] if node.module else [a.name for a in node.names])
            elif (node.module or "").startswith("quant."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("quant."))
    return {m.split(".")[0] for m in out}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycle_in_quant():
    assert find_cycle({"lsq": {"range_init"}, "range_init": {"lsq", "grid"}}) == ["lsq", "range_init", "lsq"]
    graph = {p.stem: quant_imports(p) for p in QUANT.glob("*.py") if p.stem != "__init__"}
    assert "grid" in graph["range_init"] and "range_init" in graph["lsq"]  # the scan sees the imports
    assert find_cycle(graph) is None
