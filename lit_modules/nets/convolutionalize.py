"""FC -> conv: turn a classifier into a fully convolutional net whose output is a class map.

A classifier's head looks at one training-size window of the image. Written as convolutions
(OverFeat, FCN), the same weights slide over a larger image in one pass and share the trunk's
work between overlapping windows. `convolutionalize` reads the module graph (torch.fx), finds
where the spatial map is flattened, and rewrites what follows:

- `Flatten -> Linear(C*h*w, n)` (the digits CNN) and VGG / AlexNet's `AdaptiveAvgPool2d((7, 7))
  -> flatten -> Linear(C*7*7, n)`: the first Linear becomes an (h x w) conv, later Linears 1x1
  convs; the adaptive pool is removed (it is the identity at the training size and would squeeze a
  larger map back to 7x7). Output at the training size: (B, K, 1, 1) == the logits.
- a global pool + Linear head (ResNet, MobileNet, EfficientNet): with `input_size`, the global pool
  becomes a stride-1 pool over a window of the training map size, followed by the head as 1x1
  convs: (B, K, 1, 1) == the logits at the training size, and every location of a larger map is
  the classifier on one training-size window. For an affine head (ResNet's lone Linear) the
  1x1 conv could equally come before the pool (both are linear); pooling first is also right for
  a head with a nonlinearity (MobileNetV3's Linear-Hardswish-Dropout-Linear). Without
  `input_size` the pool is dropped: a per-location class map (CAM-style, stride 32) whose
  spatial mean equals the logits, allowed only for affine heads.

Nets with a global pool *inside* the trunk (squeeze-excitation in MobileNetV3) still accept any
size, but those blocks then see the whole image: map locations are no longer independent windows.
Nothing here imports Lightning.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

Size = tuple[int, int]
PROBE = 224  # probe size when no input_size is given: big enough for every torchvision trunk

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout,
    nn.AlphaDropout,
)  # fmt: skip
_AFFINE_MODULES = (nn.Identity, nn.Dropout, nn.AlphaDropout)  # identity in eval mode
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.dropout, torch.sigmoid, torch.tanh, torch.add, torch.mul,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
}  # fmt: skip
_AFFINE_FUNCTIONS = {F.dropout, torch.add, operator.add, operator.sub, operator.mul,
                     operator.truediv, operator.neg}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "add",
    "sub",
    "mul",
    "div",
    "contiguous",
    "clone",
}
_AFFINE_METHODS = {"add", "sub", "mul", "div", "contiguous", "clone"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _pair(size: int | tuple[int, int] | torch.Size) -> Size:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def require_size(x: torch.Tensor, h: int, w: int, what: str) -> torch.Tensor:
    """Identity that refuses a map smaller than (h, w): the class map would be empty."""
    if isinstance(x, fx.Proxy):  # re-traced (unpickling a net): stay one node of the graph
        return x.tracer.create_proxy("call_function", require_size, (x, h, w, what), {})
    if x.shape[-2] < h or x.shape[-1] < w:
        raise ValueError(
            f"input too small: {what} needs at least {h}x{w}, got "
            f"{x.shape[-2]}x{x.shape[-1]}; a convolutionalized net's smallest input is the "
            "classifier's training size (its window), where the class map is 1x1"
        )
    return x


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # data-dependent control flow in forward
        raise ValueError(
            f"cannot convolutionalize {type(model).__name__}: its forward cannot be traced by "
            f"torch.fx ({type(err).__name__}: {err}); pass the plain classifier (a module whose "
            "forward has no data-dependent branches)"
        ) from err


def _probe(gm: fx.GraphModule, size: Size) -> None:
    """Record every node's output shape in `node.meta["val"]` for a (1, C, *size) input.

    Run on the meta device (shapes only, no arithmetic: VGG16 at 448 costs nothing): every
    parameter and buffer is swapped for a meta tensor of its shape for the run, then put back.
    The probe stops at the first layer that does not fit the map at this size (a Linear on a
    flattened map, a conv bigger than the map); nodes before it keep their shapes, which is all
    the rewrite needs.
    """

    class Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            n.meta["val"] = out  # a meta tensor: its shape is what the rewrite reads
            return out

    first = next((m for m in gm.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"cannot convolutionalize {type(gm).__name__}: it has no Conv2d layer")
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    saved = [(m, dict(m._parameters), dict(m._buffers), m.training) for m in gm.modules()]
    try:
        for m, params, buffers, _ in saved:
            for k, t in {**params, **buffers}.items():
                if t is not None:
                    (m._parameters if k in params else m._buffers)[k] = t.detach().to("meta")
            m.training = False  # BatchNorm on a 1x1 map in train mode refuses a batch of one
        x = torch.zeros(1, first.in_channels, *size, dtype=first.weight.dtype, device="meta")
        with torch.no_grad():
            Prop(gm).run(x)
    except Exception:  # noqa: BLE001, S110 - a layer that does not fit: the nodes before it ran
        pass
    finally:
        for m, params, buffers, training in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)
            m.training = training


def _shape(node: fx.Node) -> torch.Size | None:
    val = node.meta.get("val")
    return val.shape if isinstance(val, torch.Tensor) else None


def _where(gm: fx.GraphModule, node: fx.Node) -> str:
    """A layer's name and type for error messages: `'classifier.1' (LayerNorm)`."""
    if node.op == "call_module":
        return f"{node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.name!r} ({name})"


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does `node` turn a (B, C, h, w) map into (B, D) vectors (Flatten, flatten, view, mean)?"""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    if node.op == "call_function" and node.target is torch.flatten:
        return True
    if node.op == "call_method" and node.target in _FLATTEN_METHODS:
        src = node.args[0]
        before, after = (_shape(src) if isinstance(src, fx.Node) else None), _shape(node)
        return before is not None and after is not None and len(before) == 4 and len(after) == 2
    return False


def _is_spatial_mean(node: fx.Node) -> bool:
    """`x.mean((2, 3))` / `torch.mean(x, (-2, -1))`: a global average pool that also flattens."""
    if not (
        (node.op == "call_method" and node.target == "mean")
        or (node.op == "call_function" and node.target is torch.mean)
    ):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    return isinstance(dims, (tuple, list)) and {d % 4 for d in dims} == {2, 3} and not keep


def _pool_before(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The adaptive pool feeding `node` through single-input elementwise layers, if any."""
    while isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _ADAPTIVE_POOLS):
            return node
        if not isinstance(mod, _ELEMENTWISE_MODULES):
            return None
        node = node.args[0]
    return None


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Replace submodule `target` of `gm` only (fx gave `gm` its own containers, not the model's)."""
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _conv_from_linear(linear: nn.Linear, kernel: Size) -> nn.Conv2d:
    """Linear(C*kh*kw, n) as Conv2d(C, n, kernel): the same weights, viewed (no copy)."""
    kh, kw = kernel
    cin = linear.in_features // (kh * kw)
    w = linear.weight  # (n, C*kh*kw), flattened in (C, kh, kw) order like torch.flatten
    conv = nn.Conv2d(cin, linear.out_features, kernel, bias=linear.bias is not None, device="meta")
    conv.weight = nn.Parameter(w.detach().view(linear.out_features, cin, kh, kw), w.requires_grad)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach(), linear.bias.requires_grad)
    return conv.train(linear.training)


def _bn2d_from_bn1d(bn: nn.BatchNorm1d) -> nn.BatchNorm2d:
    """Per-feature BatchNorm of vectors = per-channel BatchNorm of a 1x1-kernel class map."""
    new = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    return new.train(bn.training)


def _insert_check(gm: fx.GraphModule, before: fx.Node, size: Size, what: str) -> None:
    src = before.args[0]
    with gm.graph.inserting_before(before):
        check = gm.graph.call_function(require_size, (src, *size, what))
    before.replace_input_with(src, check)


class _Head:
    """Rewrites the vector part of the graph (after each flatten) as convolutions on maps."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.kernel: dict[fx.Node, Size | None] = {}  # pending first-Linear kernel; None after one
        self.affine_only: dict[fx.Node, str] = {}  # node -> why its downstream must be affine

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.kernel]

    def visit(self, node: fx.Node) -> None:
        inputs = self._inputs(node)
        if not inputs or node.op == "output":
            return
        kernels = {self.kernel[a] for a in inputs}
        if len(kernels) > 1:
            raise ValueError(
                f"cannot convolutionalize: {_where(self.gm, node)} combines vectors of different "
                "origins (a flattened map and a Linear output)"
            )
        kernel = kernels.pop()
        why = next((self.affine_only[a] for a in inputs if a in self.affine_only), None)
        where = _where(self.gm, node)
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if isinstance(mod, nn.Linear):
                self._linear(node, mod, kernel)
                kernel = None
            elif isinstance(mod, nn.BatchNorm1d) and kernel in (None, (1, 1)):
                _set_module(self.gm, node.target, _bn2d_from_bn1d(mod))
            elif not isinstance(mod, _ELEMENTWISE_MODULES):
                raise ValueError(self._not_elementwise(where, mod))
            affine = isinstance(mod, (nn.Linear, nn.BatchNorm1d, *_AFFINE_MODULES))
        elif node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            affine = node.target in _AFFINE_FUNCTIONS
        elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
            affine = node.target in _AFFINE_METHODS
        else:
            raise ValueError(self._not_elementwise(where, None))
        if why is not None and not affine:
            raise ValueError(
                f"cannot convolutionalize without input_size: {why}, but {where} after it is not "
                "affine, so the pool cannot be dropped; pass input_size (the training size) to "
                "pool over a window of the training map instead"
            )
        self.kernel[node] = kernel
        if why is not None:
            self.affine_only[node] = why

    def _not_elementwise(self, where: str, mod: nn.Module | None) -> str:
        return (
            f"cannot convolutionalize: {where} sits in the classifier head but is not an "
            "elementwise op (it mixes the features of a vector, e.g. LayerNorm or attention), so "
            "it has no convolutional equivalent that acts on each location on its own"
        )

    def _linear(self, node: fx.Node, linear: nn.Linear, kernel: Size | None) -> None:
        kernel = kernel or (1, 1)
        if linear.in_features % (kernel[0] * kernel[1]):
            raise ValueError(
                f"cannot convolutionalize {_where(self.gm, node)}: {linear.in_features} inputs "
                f"are not a whole number of {kernel[0]}x{kernel[1]} maps"
            )
        _set_module(self.gm, node.target, _conv_from_linear(linear, kernel))
        if kernel != (1, 1):
            _insert_check(
                self.gm, node, kernel, f"layer {node.target!r} ({kernel[0]}x{kernel[1]} conv)"
            )


def _flatten_kernel(
    gm: fx.GraphModule, flat: fx.Node, size: Size | None, head: _Head
) -> tuple[Size, fx.Node]:
    """Rewrite the map -> vector step at `flat` (and a pool feeding it).

    Returns the first Linear's kernel and the node of the map the head now reads.
    """
    pool = flat if _is_spatial_mean(flat) else _pool_before(gm, flat.args[0])
    if pool is not None:
        src = pool.args[0]
        return _rewrite_pool(gm, pool, flat, size, head), src
    return _infer_kernel(gm, flat, size), flat.args[0]


def _rewrite_pool(
    gm: fx.GraphModule, pool: fx.Node, flat: fx.Node, size: Size | None, head: _Head
) -> Size:
    mean = pool is flat
    if mean:
        out, is_max = (1, 1), False
    else:
        mod = gm.get_submodule(pool.target)
        out = _pair(mod.output_size)  # an int or an (h, w) pair
        is_max = isinstance(mod, nn.AdaptiveMaxPool2d)
    where = _where(gm, pool)
    map_in = _shape(pool.args[0])
    if out != (1, 1):  # VGG / AlexNet: a fixed-size pool, the identity at the training size
        if size is not None and map_in is not None and tuple(map_in[-2:]) != out:
            raise ValueError(
                f"cannot convolutionalize: adaptive pool {where} resizes the {map_in[-2]}x"
                f"{map_in[-1]} map to {out[0]}x{out[1]} at input_size {size}, so it is not the "
                "identity at the training size and cannot be removed"
            )
        pool.replace_all_uses_with(pool.args[0])
        return out
    if size is None:  # per-location (CAM-style) map: mean == logits for an affine head only
        if is_max:
            raise ValueError(
                f"cannot convolutionalize {where} without input_size: a global max pool cannot "
                "be dropped; pass input_size (the training size)"
            )
        if mean:
            flat.replace_all_uses_with(flat.args[0])
        else:
            pool.replace_all_uses_with(pool.args[0])
        head.affine_only[flat] = f"the global pool {where} is dropped"
        return (1, 1)
    if map_in is None:
        raise ValueError(f"cannot convolutionalize: no map size before {where} at {size}")
    window = (int(map_in[-2]), int(map_in[-1]))  # the training map: one window per location
    layer = (nn.MaxPool2d if is_max else nn.AvgPool2d)(window, stride=1)
    if mean:
        name = f"{flat.name}_window_pool"
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(flat):
            new = gm.graph.call_module(name, (flat.args[0],))
        flat.replace_all_uses_with(new)
        _insert_check(gm, new, window, f"window pool replacing {where}")
        return (1, 1)
    _set_module(gm, pool.target, layer)
    _insert_check(gm, pool, window, f"window pool replacing {where}")
    return (1, 1)


def _consumers(gm: fx.GraphModule, node: fx.Node) -> list[nn.Linear]:
    """The Linear layers reading `node` through elementwise layers (the head's first layer)."""
    found: list[nn.Linear] = []
    for user in node.users:
        if user.op == "call_module":
            mod = gm.get_submodule(user.target)
            if isinstance(mod, nn.Linear):
                found.append(mod)
            elif isinstance(mod, _ELEMENTWISE_MODULES):
                found += _consumers(gm, user)
        elif user.op == "call_function" and user.target is F.dropout:
            found += _consumers(gm, user)
    return found


def _infer_kernel(gm: fx.GraphModule, flat: fx.Node, size: Size | None) -> Size:
    """Flatten -> Linear(C*h*w): (h, w) measured at input_size, else inferred as a square."""
    linears = _consumers(gm, flat)
    map_in = _shape(flat.args[0])
    where = _where(gm, flat)
    if not linears or map_in is None or len(map_in) != 4:
        raise ValueError(f"cannot convolutionalize: {where} flattens no map that a Linear reads")
    n, c = linears[0].in_features, int(map_in[1])
    h, w = int(map_in[2]), int(map_in[3])
    if c * h * w == n:
        return (h, w)
    if size is not None:
        raise ValueError(
            f"cannot convolutionalize: at input_size {size} the map flattened by {where} is "
            f"{c}x{h}x{w} = {c * h * w} features, but the Linear after it takes {n}: input_size "
            "is not the size the classifier was trained at"
        )
    k = math.isqrt(n // c) if n % c == 0 else 0
    if k * k * c != n:
        raise ValueError(
            f"cannot convolutionalize: the Linear after {where} takes {n} features of a "
            f"{c}-channel map, and the map size cannot be inferred (not a square); pass "
            "input_size (the training input size)"
        )
    return (k, k)


def _flatten_points(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if _is_flatten(gm, n) or _is_spatial_mean(n)]


def _map_size(gm: fx.GraphModule, node: fx.Node, size: Size) -> Size | None:
    _probe(gm, size)
    got = _shape(node)
    return (int(got[-2]), int(got[-1])) if got is not None and len(got) == 4 else None


def _geometry(gm: fx.GraphModule, node: fx.Node, kernel: Size) -> tuple[int, Size | None]:
    """(total stride, training size) of the trunk up to `node`, from map sizes at three probes.

    map(H) = (H - a) / s + 1 for a trunk of stride s: s from two probes a PROBE apart; the
    training size is the H at which the map is exactly `kernel`, checked by a third probe.
    """
    small, large = _map_size(gm, node, (PROBE, PROBE)), _map_size(gm, node, (2 * PROBE,) * 2)
    if small is None or large is None or large[0] == small[0]:
        raise ValueError(f"cannot convolutionalize: no map size before the head at {PROBE}")
    stride = round(PROBE / (large[0] - small[0]))
    guess = tuple(PROBE - (m - k) * stride for m, k in zip(small, kernel, strict=True))
    ok = min(guess) > 0 and _map_size(gm, node, guess) == kernel
    return stride, ((int(guess[0]), int(guess[1])) if ok else None)


def convolutionalize(
    model: nn.Module, *, input_size: int | tuple[int, int] | None = None
) -> fx.GraphModule:
    """`model` with its Linear head as convolutions: logits at the training size, a map beyond.

    input_size: the training input size (e.g. 224, or 28 for the digits CNN). Needed to turn a
    global pool into a training-size window; otherwise used to check the head's map size.
    Returns an fx.GraphModule with the model's parameter names (a Linear's weight is now the
    4-D weight of the conv at the same name). It shares parameters with `model` (no copy:
    deep-copy first for independent weights). Attributes: `stride`, the class map's step in
    input pixels; `training_size`, the smallest input (where the output is (B, K, 1, 1); None
    for a per-location map); smaller inputs raise.
    """
    size = _pair(input_size) if input_size is not None else None
    gm = _trace(model)
    _probe(gm, size or (PROBE, PROBE))
    flats = _flatten_points(gm)
    if not flats:
        raise ValueError(
            f"cannot convolutionalize {type(model).__name__}: no flatten / global pool before a "
            "Linear head was found (is it already fully convolutional?)"
        )
    head = _Head(gm)
    found = {flat: _flatten_kernel(gm, flat, size, head) for flat in flats}
    for flat, (kernel, _) in found.items():
        head.kernel[flat] = kernel
    for node in list(gm.graph.nodes):
        if node not in head.kernel:
            head.visit(node)  # Linear -> conv, elementwise layers kept, anything else refused
    src, kernel = next(((s, k) for k, s in found.values() if k != (1, 1)), (None, None))
    if src is None:  # a pooled head: the map the pool reads
        kernel, src = (1, 1), next(iter(found.values()))[1]
    stride, training = _geometry(gm, src, kernel)  # trunk unchanged by the rewrite so far
    training = size or training
    for flat in flats:
        flat.replace_all_uses_with(flat.args[0])  # (B, C, h, w) maps flow on into the convs
    if training is not None:
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(x):
            check = gm.graph.call_function(require_size, (x, *training, "the net's input"))
        x.replace_all_uses_with(check)
        check.update_arg(0, x)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    attrs = {"training_size": training, "stride": stride}
    gm.meta["_user_preserved_attributes"] = attrs  # kept by deepcopy / pickling of the net
    for name, value in attrs.items():
        setattr(gm, name, value)
    gm.train(model.training)
    return gm
