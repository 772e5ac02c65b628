"""Token-axis propagation: which axes of every value in a graph hold tokens.

Tokens start at the patch embedding (a conv with stride == kernel: each output position is
one patch) and flow through the graph. Rather than a rule per layout op, every token-
carrying value is shadowed by two id tensors of its shape: `tok` holds the token number of
each element, `oth` a number for its other coordinates (batch, channels). Layout ops are run
on the ids themselves, so window partitions, grids and head splits are derived, not guessed:
an axis along which only `tok` varies is a token axis; one along which both vary mixes tokens
with batch or channels, and such a value can only run densely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import ops
from .ops import node_value, op_kind, op_name, tensor_shape

# Reduction ops whose output keeps the input's shape.
_SHAPE_PRESERVING = {"softmax", "_softmax", "log_softmax", "_log_softmax"}

# Reasons a node cannot run on a token subset although each of its output elements still reads only
# elements of its own token: run densely on a value that changed at some tokens, its result changed at
# those tokens only (`rewrite.changes_at`)
MIXES_AXES = "mixes token axes with batch or channel axes"
REORDERS = "reorders tokens"
SPLITS = "splits or reorders the token axis"
CUTS_WINDOWS = "cuts windows (unfold): gates start after it"
REORDERS_EINSUM = "an einsum reorders the token axes"
GROWS = "concatenates tokens (class / register tokens) or pads the token grid"
SELECTS = "selects a subset of tokens"
# (a value whose tokens got new ids is no such case: NodeInfo.renumbered)
LAYOUT_ONLY_REASONS = frozenset({MIXES_AXES, REORDERS, SPLITS, CUTS_WINDOWS, REORDERS_EINSUM, GROWS, SELECTS})


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one tensor value sit."""

    dims: tuple[int, ...]      # token axes, ascending
    num_tokens: int            # distinct tokens in the value
    clean: bool                # token axes are consecutive and hold nothing but tokens
    stream_major: bool         # axes before the tokens hold the stream (batch) outermost: bufferable
    order: torch.Tensor = field(compare=False, repr=False)  # one stream's token ids along the run of token axes
    # streams folded into the first token axis, outermost (windows partitioned into the batch axis: axis 0
    # of [B * windows, h, w, C] holds stream b's windows at b * windows...): the run holds `folded` copies
    # of the stream's tokens, and a sparse value carries folded * k positions there
    folded: int = 1

    @property
    def padding(self) -> int:
        """Positions along the run of the tokens that hold constant padding."""
        return int(((self.order >= _PADDING) & (self.order < _EXTRA)).sum())

    @property
    def extra(self) -> tuple[int, ...]:
        """Positions along the run of the tokens that came from no patch (class / register tokens)."""
        return tuple(int(p) for p in torch.nonzero(self.order >= _EXTRA).flatten())


@dataclass
class NodeInfo:
    """What the analysis knows about one node."""

    kind: str
    layout: TokenLayout | None = None          # None: the value carries no tokens
    outputs: list[TokenLayout | None] | None = None  # per output of a multi-output node
    opaque: bool = False                       # carries tokens in a layout that could not be followed
    tokenwise: bool = False                    # may run on a subset of tokens
    macs: int = 0
    reason: str | None = None                  # why a token-carrying node cannot run on a token subset
    per_token_args: dict[int, tuple[int, ...]] = field(default_factory=dict)  # constant arg -> its token axes
    renumbered: bool = False                   # its tokens got new ids (a new token space)
    # attention: the token id of each query row (flattened [*batch, n] of q) of the first stream, where
    # every row holds one token and the streams' rows follow each other alike (`rewrite.RowGatedAttention`)
    query_rows: torch.Tensor | None = None

    @property
    def carries_tokens(self) -> bool:
        return self.layout is not None or self.opaque or bool(self.outputs and any(self.outputs))


# Token ids of class / register tokens (concatenated, not from a patch) start here.
_EXTRA = 1e9
# Token ids of constant padding (a grid padded to a multiple of a window) sit below them: such a position
# holds the same value on every frame, so, unlike a class token, no gate needs to update it.
_PADDING = 5e8
_PAD_ID = -2.0  # the id a pad gives its new positions, before they are numbered
# Other-ids carry the stream (batch index) in their high part: other = stream * _STREAM + rest.
_STREAM = float(2**26)


def constant_pad(node: fx.Node) -> bool:
    """A pad with a constant value: its new positions hold no token (other modes copy tokens into them)."""
    if op_name(node) == "constant_pad_nd":
        return True
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    return op_name(node) == "pad" and mode == "constant"


def _ids(shape: tuple[int, ...], dims: tuple[int, ...], token: bool) -> torch.Tensor:
    """float64 ids over `shape`: the flat index over `dims` (token=True) or over the other axes."""
    picked = [d for d in range(len(shape)) if (d in dims) == token]
    sizes = [shape[d] for d in picked]
    ids = torch.arange(math.prod(sizes), dtype=torch.float64).reshape(sizes)
    view = [shape[d] if d in picked else 1 for d in range(len(shape))]
    return ids.reshape(view).expand(shape).contiguous()


def _other_ids(shape: tuple[int, ...], dims: tuple[int, ...], streams: torch.Tensor | None = None) -> torch.Tensor:
    """Other-ids of a value whose axis 0 is the batch (or whose streams are given)."""
    rest = _ids(shape, tuple(dims) + (0,), token=False) if streams is None else _ids(shape, dims, token=False)
    if streams is None:
        streams = _ids(shape, (0,), token=True) if 0 not in dims else torch.zeros(shape, dtype=torch.float64)
    return streams * _STREAM + rest


def _layout(tok: torch.Tensor, oth: torch.Tensor) -> TokenLayout | None:
    dims, mixed, folded = [], False, 1
    padded = bool((tok < 0).any())
    for d in range(tok.ndim):
        n = tok.shape[d]
        if n <= 1:
            continue
        later, earlier = tok.narrow(d, 1, n - 1), tok.narrow(d, 0, n - 1)
        steps = later != earlier
        if not bool(steps.any()):
            continue
        other_steps = oth.narrow(d, 1, n - 1) != oth.narrow(d, 0, n - 1)
        if padded:  # padding (token id -2) has no channel ids of its own: leave it out of the mixing test
            other_steps &= (later >= 0) & (earlier >= 0)
        if bool(other_steps.any()):
            if not dims and not padded:
                folded = _folded_streams(tok, oth, d)
            mixed |= folded == 1
        dims.append(d)
    if not dims:
        return None
    consecutive = dims == list(range(dims[0], dims[-1] + 1))
    first = tok[tuple(slice(None) if d in dims else 0 for d in range(tok.ndim))].reshape(-1)
    num_tokens = math.prod(tok.shape[d] for d in dims) // folded
    # a token subset is carried as [prefix, k, suffix]: streams must be the outer part of the prefix
    streams = torch.floor(oth[tuple(slice(None) if d < dims[0] else 0 for d in range(tok.ndim))] / _STREAM)
    suffix_streams = torch.floor(oth[tuple(0 if d < dims[0] else slice(None) for d in range(tok.ndim))] / _STREAM)
    stream_major = folded > 1 or (bool((streams.reshape(-1).diff() >= 0).all())
                                  and bool((suffix_streams == suffix_streams.reshape(-1)[0]).all()))
    return TokenLayout(tuple(dims), num_tokens, consecutive and not mixed, stream_major, first[:num_tokens], folded)


def _folded_streams(tok: torch.Tensor, oth: torch.Tensor, d: int) -> int:
    """How many streams axis d holds outermost, each with the same tokens in the same order; 1 if it mixes
    tokens with anything else. (A window partition moves windows into the batch axis: [B * windows, ...].)"""
    if float(oth.amax()) < _STREAM:  # one stream (the common case: no pass over the whole value)
        return 1
    streams = torch.floor(oth / _STREAM)
    along_d = streams[tuple(slice(None) if a == d else slice(0, 1) for a in range(tok.ndim))]
    count, n = len(torch.unique(along_d)), tok.shape[d]
    if count < 2 or n % count or not bool((streams == along_d).all()):
        return 1
    rest = oth - streams * _STREAM
    s, t, r = (x.unflatten(d, (count, n // count)) for x in (along_d, tok, rest))
    outer, inner = (lambda x: x.narrow(d, 0, 1)), (lambda x: x.narrow(d + 1, 0, 1))
    ok = bool((s == inner(s)).all()) \
        and bool((s.narrow(d, 1, count - 1) > s.narrow(d, 0, count - 1)).all()) \
        and bool((t == outer(t)).all()) and bool((r == inner(r)).all())  # (rest may hold the batch index)
    return count if ok else 1


def _same_tokens(layout: TokenLayout, inputs: list) -> bool:
    """The value holds exactly the tokens of its (single) token-carrying input."""
    return len(inputs) == 1 and inputs[0] is not None and layout.num_tokens == inputs[0].num_tokens and \
        bool(torch.equal(torch.sort(layout.order).values, torch.sort(inputs[0].order).values))


def _cat_dim(node: fx.Node, ndim: int) -> int:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % ndim


def _dims_arg(node: fx.Node, position: int, ndim: int) -> list[int] | None:
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else None)
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % ndim for d in dims]


class TokenAnalysis:
    """Annotates every node of a graph with a NodeInfo; `infos[node]` after `run()`.

    `seeds` {input position: (tok, oth)}: inputs that already carry tokens, numbered by the graph that
    made them (`output_ids` of its analysis): a graph Dynamo cut after the patch embedding."""

    def __init__(self, gm: fx.GraphModule, seeds: dict[int, tuple] | None = None):
        self.gm = gm
        self.seeds = dict(seeds or {})
        self.infos: dict[fx.Node, NodeInfo] = {}
        self.output_ids: list[tuple | None] = []  # (tok, oth) of each tensor the graph returns, None: no tokens
        self._ids: dict[fx.Node, tuple] = {}  # node -> (tok, oth), or lists of them per output
        # values computed from the tokens that no longer carry them (token-mixing MLP outputs, pooled
        # features): they change every frame at every position, and a gate never sees them change
        self._mixed: set[fx.Node] = set()

    def run(self) -> dict[fx.Node, NodeInfo]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny id-tensor ops: a thread pool only adds waiting
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict[fx.Node, NodeInfo]:
        remaining_users = {n: len(n.users) for n in self.gm.graph.nodes}
        placeholders = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                seed = self.seeds.get(placeholders)
                placeholders += 1
                if seed is not None and tuple(seed[0].shape) == tensor_shape(node):
                    self.infos[node] = NodeInfo("placeholder", layout=self._set(node, *seed))
                    continue
            if node.op == "output":
                self.output_ids = [self._ids.get(a) for a in _tensor_leaves(node.args[0])]
            self.infos[node] = info = self._visit(node)
            if not info.carries_tokens and any(self.infos[a].carries_tokens or a in self._mixed
                                               for a in node.all_input_nodes):
                self._mixed.add(node)
            for a in node.all_input_nodes:  # free id tensors nobody needs any more
                remaining_users[a] -= 1
                if remaining_users[a] == 0:
                    self._ids.pop(a, None)
        return self.infos

    # -- helpers ----------------------------------------------------------------------
    def _token_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.infos[a].carries_tokens]

    def _set(self, node: fx.Node, tok, oth) -> TokenLayout | None:
        self._ids[node] = (tok, oth)
        return _layout(tok, oth)

    def _run_ids(self, node: fx.Node, which: int):
        """Run the node's own op on id tensors (which=0: token ids, 1: other ids)."""
        def sub(a):
            if isinstance(a, fx.Node):
                ids = self._ids.get(a)
                if ids is not None:
                    return ids[which]
                value = node_value(a)
                if isinstance(value, torch.Tensor):  # a tensor with no tokens: no token id
                    if which == 1 and op_kind(node) == ops.CAT:  # a class token: same channel ids as the patches
                        return _other_ids(tuple(value.shape), (_cat_dim(node, value.ndim),))
                    return torch.full(value.shape, -1.0, dtype=torch.float64)
                return value
            return a
        args = fx.node.map_aggregate(node.args, sub)
        kwargs = dict(fx.node.map_aggregate(node.kwargs, sub))
        if constant_pad(node):  # padded positions are no token: id -2 (a class token is born -1)
            args, kwargs = args[:2], {"value": _PAD_ID} if op_name(node) == "pad" else {}
            if op_name(node) == "constant_pad_nd":
                args = (*args, _PAD_ID)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    # -- the visitor ------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> NodeInfo:
        if node.op in ("placeholder", "get_attr", "output"):
            return NodeInfo(node.op)
        kind = op_kind(node)
        token_args = self._token_args(node)
        macs = self._macs(node, kind)
        if node.op == "call_module":
            return self._lost(ops.UNKNOWN, f"module {node.target} was kept whole by the tracer", macs) if token_args \
                else NodeInfo(ops.UNKNOWN, macs=macs)
        if not token_args:
            if kind == ops.CONV:
                return self._patch_embedding(node, macs)
            return NodeInfo(kind or ops.UNKNOWN, macs=macs)
        tracked = [a for a in token_args if a in self._ids]
        out_shape = tensor_shape(node)
        if kind in (ops.RESHAPE, ops.PERMUTE, ops.EXPAND, ops.INDEX, ops.CAT, ops.UNFOLD) or (
            kind == ops.GETITEM and not isinstance(node_value(node.args[0]), (list, tuple))
        ):
            if len(tracked) < len(token_args):
                return self._lost(kind, "an input's token layout is unknown")
            return self._layout_op(node, kind, token_args)
        if kind == ops.GETITEM:
            if not tracked:
                return self._lost(kind, "an input's token layout is unknown")
            tok, oth = self._ids[node.args[0]]
            layout = self._set(node, tok[node.args[1]], oth[node.args[1]])
            return NodeInfo(kind, layout=layout, tokenwise=self.infos[node.args[0]].tokenwise)
        if kind == ops.ATTENTION:
            return self._attention(node, out_shape, macs)
        if kind == ops.EINSUM:
            return self._einsum(node, out_shape, macs)
        if not tracked:
            return self._lost(kind, "an input's token layout is unknown", macs)
        if out_shape is None:
            return self._lost(kind, f"{op_name(node)} returns no single tensor")
        if kind in (ops.ELEMENTWISE, ops.NORM, ops.LINEAR) or (kind == ops.REDUCE and op_name(node) in _SHAPE_PRESERVING):
            return self._tokenwise(node, kind, token_args, out_shape, macs)
        if kind == ops.REDUCE:
            return self._reduce(node, token_args[0], out_shape, macs)
        if kind == ops.MATMUL:
            return self._matmul(node, token_args, out_shape, macs)
        if kind == ops.POOL and math.prod(out_shape[2:]) == 1:
            return NodeInfo("token_reduce", macs=macs, reason="pools over tokens")
        if kind == ops.NOOP:
            return NodeInfo(kind)
        reasons = {ops.POOL: "pooling merges neighbouring tokens",
                   ops.CONV: "a convolution over token axes mixes neighbouring tokens"}
        return self._lost(kind, reasons.get(kind, f"'{op_name(node)}' is not in the op-kind table"), macs)

    def _lost(self, kind: str, reason: str, macs: int = 0) -> NodeInfo:
        """A token-carrying value whose token layout cannot be followed."""
        return NodeInfo(kind, opaque=True, reason=reason, macs=macs)

    def _patch_embedding(self, node: fx.Node, macs: int) -> NodeInfo:
        weight = tensor_shape(node.args[1])
        stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
        out = tensor_shape(node)
        stride = [stride] * (len(weight) - 2) if isinstance(stride, int) else list(stride)
        if out is None or list(weight[2:]) != stride:
            return NodeInfo(ops.CONV, macs=macs)
        spatial = tuple(range(2, len(out)))
        layout = self._set(node, _ids(out, spatial, True), _other_ids(out, spatial))
        return NodeInfo("patch_embed", layout=layout, macs=macs)

    def _layout_op(self, node, kind, token_args) -> NodeInfo:
        in_layouts = [self.infos[a].layout for a in token_args]
        tok, oth = self._run_ids(node, 0), self._run_ids(node, 1)
        inputs_clean = all(x is not None and x.clean for x in in_layouts)
        if isinstance(tok, (list, tuple)):
            self._ids[node] = (tok, oth)
            outs = [_layout(t, o) for t, o in zip(tok, oth)]
            ok = inputs_clean and all(o is None or (o.clean and _same_tokens(o, in_layouts)
                                                     and torch.equal(o.order, in_layouts[0].order)) for o in outs)
            return NodeInfo(kind, outputs=outs, tokenwise=ok, reason=None if ok else SPLITS)
        layout = self._set(node, tok, oth)
        if layout is None:
            return NodeInfo("token_reduce", reason="picks single tokens (a class token)")
        if kind == ops.UNFOLD:  # windows cut from the token grid: a gate after them reads the windows' order
            return NodeInfo(kind, layout=layout, reason=CUTS_WINDOWS)
        if _same_tokens(layout, in_layouts):
            ok = inputs_clean and layout.clean and torch.equal(layout.order, in_layouts[0].order)
            reason = None if ok else MIXES_AXES if not layout.clean else REORDERS
            return NodeInfo(kind, layout=layout, tokenwise=ok, reason=reason)
        # a new token space (class tokens concatenated, a grid padded, a subset picked): number it afresh
        grows = layout.num_tokens > max((x.num_tokens for x in in_layouts if x), default=0)
        renumbered = layout.clean
        if renumbered:
            # padding has no stream of its own: it belongs to the stream of its token run
            streams = torch.floor(oth / _STREAM)
            if layout.folded == 1:
                streams = streams.masked_fill(tok == _PAD_ID, -math.inf).amax(dim=layout.dims, keepdim=True) \
                    .expand(tok.shape)
            fresh = _ids(tuple(tok.shape), layout.dims, True) % layout.num_tokens
            extra, padding = (tok == -1) | (tok >= _EXTRA), (tok == _PAD_ID) | ((tok >= _PADDING) & (tok < _EXTRA))
            layout = self._set(node, torch.where(extra, fresh + _EXTRA, torch.where(padding, fresh + _PADDING, fresh)),
                               _other_ids(tuple(tok.shape), layout.dims, streams))
        kind, reason = ("token_cat", GROWS) if grows else ("token_select", SELECTS)
        return NodeInfo(kind, layout=layout, reason=reason, renumbered=renumbered)

    def _tokenwise(self, node, kind, token_args, out_shape, macs) -> NodeInfo:
        r = len(out_shape)
        layouts = [self.infos[a].layout for a in token_args]
        aligned = {tuple(d + r - len(tensor_shape(a)) for d in x.dims) if x else None for a, x in zip(token_args, layouts)}
        source = next(a for a in token_args if a in self._ids)
        if tensor_shape(source) == tuple(out_shape):  # same shape: same ids and layout, nothing to recompute
            self._ids[node] = tuple(t.contiguous() for t in self._ids[source])
            layout = self.infos[source].layout
        else:
            layout = self._set(node, *self._broadcast_ids(source, out_shape))
        if len(aligned) != 1 or None in aligned:
            return NodeInfo(kind, layout=layout, macs=macs, reason="operands have different token layouts")
        dims = aligned.pop()
        reason = None
        if kind == ops.NORM:
            normalized = len(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else 1
            if dims[-1] >= r - normalized:
                reason = "normalises over the token axis"
        if kind == ops.LINEAR and dims[-1] == r - 1:
            reason = "a linear layer over the token axis mixes tokens (token-mixing MLP)"
        if kind == ops.REDUCE and any(d in dims for d in _dims_arg(node, 1, r) or []):
            reason = "softmax over the token axis mixes tokens"
        if reason is None and not (layout and layout.clean and all(x.clean for x in layouts)):
            reason = MIXES_AXES
        if reason is None and any(a in self._mixed for a in node.all_input_nodes):
            reason = "reads a value mixed from all tokens (token-mixing MLP, pooling): a gate cannot see it change"
        per_token = {}
        for i, a in enumerate(node.args if kind == ops.ELEMENTWISE else ()):
            shape = tensor_shape(a) if isinstance(a, fx.Node) and a not in token_args else None
            if shape is not None:
                const_dims = tuple(d - (r - len(shape)) for d in dims if d - (r - len(shape)) >= 0)
                if any(shape[d] > 1 for d in const_dims):
                    per_token[i] = const_dims
        if reason is None and per_token and layout.folded > 1:
            reason = "a per-token constant on tokens whose axis also holds the streams"
        return NodeInfo(kind, layout=layout, tokenwise=reason is None, macs=macs, reason=reason, per_token_args=per_token)

    def _broadcast_ids(self, source: fx.Node, out_shape):
        tok, oth = self._ids[source]
        if tok.shape[-1] != out_shape[-1] and tok.ndim == len(out_shape):  # a linear changed the channel axis
            tok = tok[..., :1].expand(out_shape)
            streams = torch.floor(oth[..., :1] / _STREAM).expand(out_shape)
            layout = _layout(tok, streams)
            token_dims = layout.dims if layout is not None else ()
            oth = _other_ids(tuple(out_shape), token_dims, streams)
        while tok.ndim < len(out_shape):
            tok, oth = tok.unsqueeze(0), oth.unsqueeze(0)
        return tok.expand(out_shape).contiguous(), oth.expand(out_shape).contiguous()

    def _reduce(self, node, source, out_shape, macs) -> NodeInfo:
        info = self.infos[source]
        r = len(tensor_shape(source))
        dims = _dims_arg(node, 1, r)
        if info.layout is None or dims is None or any(d in info.layout.dims for d in dims):
            return NodeInfo("token_reduce", macs=macs, reason="reduces over tokens")
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else False)
        tok, oth = self._ids[source]
        layout = self._set(node, tok.amax(dim=dims, keepdim=keepdim), oth.amax(dim=dims, keepdim=keepdim))
        ok = layout is not None and layout.clean and info.layout.clean
        return NodeInfo(ops.REDUCE, layout=layout, tokenwise=ok, macs=macs,
                        reason=None if ok else MIXES_AXES)

    def _matmul(self, node, token_args, out_shape, macs) -> NodeInfo:
        a, b = node.args[0], node.args[1]
        if token_args == [a] and len(tensor_shape(b)) == 2:  # x @ W: a linear on the channel axis
            return self._tokenwise(node, ops.LINEAR, token_args, out_shape, macs)
        if a in self._ids:
            self._ids[node] = self._broadcast_ids(a, out_shape)
        return NodeInfo("attention_matmul", layout=_layout(*self._ids[node]) if node in self._ids else None,
                        opaque=node not in self._ids, macs=macs,
                        reason="a product of two token-carrying values mixes tokens (explicit attention)")

    def _einsum(self, node, out_shape, macs) -> NodeInfo:
        """einsum with one token-carrying operand whose token subscripts reach the output: token-wise.

        The other operands are constants (weights, tables); one indexed by a token subscript
        holds a row per token (a relative-position table) and is gathered with the gate's
        indices (`per_token_args`: operand position -> its token axes). Two token-carrying
        operands contracted together are attention written as einsum."""
        parsed = parse_einsum(node)
        if parsed is None:
            return self._lost(ops.EINSUM, "an einsum without an explicit output ('->'), with '...' or a "
                              "repeated subscript", macs)
        terms, out, operands = parsed
        carriers = [i for i, a in enumerate(operands) if isinstance(a, fx.Node) and self.infos[a].carries_tokens]
        if len(carriers) != 1:
            return NodeInfo("attention_matmul", opaque=True, macs=macs,
                            reason="an einsum of two token-carrying values mixes tokens (explicit attention)")
        position = carriers[0]
        source, term = operands[position], terms[position]
        layout = self.infos[source].layout
        if source not in self._ids or layout is None:
            return self._lost(ops.EINSUM, "an input's token layout is unknown", macs)
        labels = [term[d] for d in layout.dims]
        if any(label not in out for label in labels):
            return NodeInfo("token_reduce", macs=macs, reason="an einsum sums over the token axis")
        tok, oth = self._ids[source]
        kept = [label for label in term if label in out]
        index = tuple(slice(None) if label in out else 0 for label in term)  # ids are constant along contracted axes
        tok, streams = tok[index], torch.floor(oth / _STREAM)[index]
        order = [kept.index(label) for label in out if label in kept]
        view = [tok.shape[kept.index(label)] if label in kept else 1 for label in out]
        tok = tok.permute(order).reshape(view).expand(out_shape).contiguous()
        streams = streams.permute(order).reshape(view).expand(out_shape)
        dims = tuple(out.index(label) for label in labels)
        layout_out = self._set(node, tok, _other_ids(tuple(out_shape), dims, streams))
        per_token, reason = {}, None
        for i, (a, t) in enumerate(zip(operands, terms)):
            if i != position and isinstance(a, fx.Node):
                axes = tuple(d for d, label in enumerate(t) if label in labels)
                if axes:
                    per_token[i] = axes
                if a in self._mixed:
                    reason = "reads a value mixed from all tokens (token-mixing MLP, pooling): a gate cannot see it change"
                if any(label in term[:layout.dims[0]] for label in t):
                    reason = "an einsum operand shares the batch subscripts of the tokens"
                if axes and axes != tuple(range(axes[0], axes[0] + len(axes))):
                    reason = "an einsum table indexed by token subscripts on axes that are not adjacent"
        if "".join(label for label in out if label in labels) != "".join(labels):
            reason = REORDERS_EINSUM
        if per_token and out[:out.index(labels[0])] != term[:layout.dims[0]]:
            reason = "an einsum with a per-token table changes the axes before the tokens"
        if per_token and layout.folded > 1:
            reason = "a per-token table on tokens whose axis also holds the streams"
        if reason is None and not (layout.clean and layout_out is not None and layout_out.clean):
            reason = MIXES_AXES
        return NodeInfo(ops.EINSUM, layout=layout_out, tokenwise=reason is None, macs=macs, reason=reason,
                        per_token_args=per_token)

    def _attention(self, node, out_shape, macs) -> NodeInfo:
        q, k, v = node.args[:3]
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        if q not in self._ids:
            return self._lost(ops.ATTENTION, "the queries' token layout is unknown", macs)
        layout = self._set(node, *self._broadcast_ids(q, out_shape))
        layouts = [self.infos[x].layout for x in (q, k, v)]
        reason = None
        if any(x is None or not x.clean for x in layouts):
            reason = "q, k or v mixes tokens with other axes (for example window partitions)"
        elif any(x.dims != (len(tensor_shape(a)) - 2,) or x.folded > 1 for a, x in zip((q, k, v), layouts)):
            reason = "tokens are not on axis -2 of q, k, v"
        elif isinstance(mask, fx.Node) and self.infos[mask].carries_tokens and not _rows_follow(
                self.infos[mask].layout, tensor_shape(mask), layouts[0]):
            reason = "the attention bias depends on the tokens' values, not row by row on the queries'"
        query_rows = _query_rows(*self._ids[q])
        if reason is not None and query_rows is not None:
            reason += "; attention='query_windows' row-gates it"
        return NodeInfo(ops.ATTENTION, layout=layout, macs=macs, reason=reason, query_rows=query_rows)

    # -- multiply-accumulates -------------------------------------------------------------
    def _macs(self, node: fx.Node, kind: str | None) -> int:
        out = tensor_shape(node)
        name = op_name(node)
        if out is None:
            return 0
        numel = math.prod(out)
        if kind == ops.LINEAR:
            return numel * tensor_shape(node.args[1])[-1]
        if kind == ops.MATMUL or name == "bmm":
            return numel * tensor_shape(node.args[0])[-1]
        if kind == ops.CONV:
            w = tensor_shape(node.args[1])
            return numel * math.prod(w[1:])
        if kind == ops.ATTENTION:
            q, k, v = (tensor_shape(a) for a in node.args[:3])
            return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
        if name == "einsum":
            return _einsum_macs(node.args[0], [tensor_shape(a) for a in node.args[1:]] if not isinstance(node.args[1], (list, tuple)) else [tensor_shape(a) for a in node.args[1]])
        return 0


def _query_rows(tok: torch.Tensor, oth: torch.Tensor) -> torch.Tensor | None:
    """Token id of each query row of q [*batch, n, d] of the first stream, where each row holds one token
    (windows and heads may share SDPA's batch axes) and every stream's rows repeat the first stream's ids."""
    rows = tok[..., 0]
    if tok.ndim < 2 or not bool((tok == rows.unsqueeze(-1)).all()):
        return None
    rows, streams = rows.reshape(-1), torch.floor(oth[..., 0] / _STREAM).reshape(-1)
    if bool((rows < 0).any()):
        return None
    count = len(torch.unique(streams))
    if rows.numel() % count:
        return None
    per_stream = rows.view(count, -1)
    ok = bool((streams.view(count, -1) == torch.unique(streams).view(count, 1)).all()) and \
        bool((per_stream == per_stream[:1]).all())
    return per_stream[0].clone() if ok else None


def _tensor_leaves(value) -> list[fx.Node]:
    """The tensor-valued nodes of a graph's output structure, in the order pytree flattens what it returns."""
    leaves = []
    fx.node.map_aggregate(value, lambda a: leaves.append(a) if isinstance(a, fx.Node) and isinstance(
        node_value(a), torch.Tensor) else None)
    return leaves


def _rows_follow(mask: TokenLayout | None, shape, queries: TokenLayout) -> bool:
    """A bias whose token axis is its row axis, in the queries' token order: row i depends only on query i
    (SAM's decomposed relative position), so it can be computed for the selected queries alone."""
    return mask is not None and mask.clean and mask.dims == (len(shape) - 2,) and \
        mask.num_tokens == queries.num_tokens and bool(torch.equal(mask.order, queries.order))


def parse_einsum(node: fx.Node):
    """(input terms, output term, operands) of an einsum node with an explicit output, else None."""
    equation = node.args[0].replace(" ", "")
    operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else list(node.args[1:])
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != len(operands) or any(len(set(t)) != len(t) for t in terms):
        return None
    return terms, out, operands


def _einsum_macs(equation: str, shapes: list) -> int:
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for letters, shape in zip(inputs, shapes):
        if shape is None or "." in letters:
            return 0
        sizes.update(zip(letters, shape))
    return math.prod(sizes.values()) if len(inputs) > 1 else 0
