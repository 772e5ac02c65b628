"""Rewrite: an analysed graph and a plan -> a graph of gated regions, buffers and attention modes.

Each value of a gated region is carried *sparse*: the region's layout with its run of token
axes collapsed into one axis of k selected tokens (position j of stream b is token idx[b, j]).
Token-wise ops run on that form unchanged; layout ops get their shape and dim arguments
re-expressed for the collapsed run; per-token constants are gathered with the gate's idx.
Wherever a region's value is read by a dense node, a buffer scatters it back to full.
"""
from __future__ import annotations

import math
import operator
import string
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..runtime import IncrementalAttention, QueryGatedAttention, RowGatedAttention, TokenBuffer, TokenGate, \
    gather_tokens
from ..runtime.gate import gather_table
from ..runtime.linear import SparseLinear
from ..runtime.policy import Policy
from . import ops
from .ops import op_kind, op_name, tensor_shape
from .regions import AttentionSite, Region
from .tokens import LAYOUT_ONLY_REASONS, NodeInfo, TokenLayout, parse_einsum

ATTENTION_MODES = ("dense", "query", "incremental", "query_windows")
# "query_windows": "query", and windowed attention row-gated too (`RowGatedAttention`). Not the default: on
# SAM-B at 1024 (8 windowed blocks) it raised the all-token error at 0.25 from 10.7% to 12.3% on the built-in
# clip, where on a 4-block SAM at 320 px it lowered it by 7-15% on four clips (benchmarks/RESULTS.md)
QUERY_MODES = ("query", "query_windows")


@dataclass
class Plan:
    """What the rewrite builds: a policy per gated region (absent: dense), a mode per attention site."""

    gates: dict[str, Policy]
    attention: dict[str, str]


class RegionGate(TokenGate):
    """A token gate reading a region's root in its own layout (token run `t0:t1` of `shape`)."""

    def __init__(self, policy: Policy, shape: tuple[int, ...], t0: int, t1: int, batch: int, always=(),
                 state_dtype: torch.dtype | None = None, neighbours: torch.Tensor | None = None, folded: int = 1):
        super().__init__(policy, always, state_dtype, neighbours)
        self.shape, self.t0, self.t1, self.batch, self.folded = shape, t0, t1, batch, folded
        self.num_tokens = math.prod(shape[t0:t1]) // folded  # `TokenLayout.folded`: streams on the run's first axis
        self.per_stream = math.prod(shape[:t0]) * folded // batch  # prefix rows of one stream (1 unless heads)
        self.channels = math.prod(shape[t1:])
        self.last_k = self.num_tokens

    def forward(self, x: torch.Tensor, changed: torch.Tensor | None = None):
        per_stream, channels = self.per_stream, self.channels
        rows = x.reshape(self.batch, per_stream, self.num_tokens, channels)
        rows = rows[:, 0] if per_stream == 1 else rows.movedim(2, 1).reshape(self.batch, self.num_tokens, -1)
        idx, selected = super().forward(rows, changed)
        k = idx.shape[1]
        self.last_k = k
        if per_stream > 1:
            selected = selected.reshape(self.batch, k, per_stream, channels).movedim(1, 2)
        return idx, selected.reshape(*self.shape[: self.t0], self.folded * k, *self.shape[self.t1:]), self.moves


class RegionBuffer(TokenBuffer):
    """A token buffer holding a region value in its own layout: writes the k fresh tokens, returns the full value."""

    def __init__(self, shape: tuple[int, ...], t0: int, t1: int, state_dtype: torch.dtype | None = None,
                 neighbour_reuse: bool = False, folded: int = 1):
        super().__init__(math.prod(shape[t0:t1]) // folded, state_dtype, neighbour_reuse)
        self.shape, self.t0, self.folded = shape, t0, folded
        self.rows, self.channels = math.prod(shape[:t0]) * folded, math.prod(shape[t1:])

    def forward(self, fresh: torch.Tensor, idx: torch.Tensor, moves=None) -> torch.Tensor:
        k = fresh.shape[self.t0] // self.folded
        return super().forward(fresh.reshape(self.rows, k, self.channels), idx, moves).view(self.shape)


def _collapse_dim(d: int, layout: TokenLayout, ndim: int) -> int:
    """Index of input axis d once the token run is collapsed to one axis."""
    d %= ndim
    t0, t1 = layout.dims[0], layout.dims[-1]
    return d if d <= t0 else (t0 if d <= t1 else d - (t1 - t0))


def _collapsed_shape(shape: tuple[int, ...], layout: TokenLayout, k) -> list:
    """The shape with the token run replaced by k (a graph node: -1 is ambiguous when k is 0)."""
    t0, t1 = layout.dims[0], layout.dims[-1] + 1
    return [*shape[:t0], k, *shape[t1:]]


def _permutation(node: fx.Node, in_shape: tuple[int, ...]) -> list[int]:
    """The axis permutation a permute-like node applies, found by running it on distinct sizes."""
    probe = torch.empty(*range(2, 2 + len(in_shape)), device="meta")
    args = [probe if a is node.args[0] else a for a in node.args]
    out = getattr(probe, node.target)(*args[1:], **node.kwargs) if node.op == "call_method" else node.target(*args, **node.kwargs)
    return [s - 2 for s in out.shape]


_DIM_POSITION = {"unbind": 1, "select": 1, "slice": 1, "narrow": 1, "split": 2, "split_with_sizes": 2, "chunk": 2,
                 "tensor_split": 2, "cat": 1, "softmax": 1, "_softmax": 1, "log_softmax": 1, "_log_softmax": 1,
                 "mean": 1, "sum": 1, "amax": 1, "amin": 1, "var": 1, "std": 1, "norm": 2, "linalg_vector_norm": 2}


# the model's own checks on values (an `assert x.max().item() < ...` traced as a runtime assert): kept, on the
# eventful values, so a frame the dense model would refuse is refused here too
_USER_CHECKS = ("_assert_scalar", "_assert_async")


class EventfulRewrite:
    """The pass: `call(gm)` returns the eventful GraphModule; its modules hold all state."""

    def __init__(self, infos: dict[fx.Node, NodeInfo], regions: list[Region], sites: list[AttentionSite],
                 plan: Plan, batch: int, linear_kernel: str = "auto", state_dtype: torch.dtype | None = None):
        self.infos, self.plan, self.batch = infos, plan, batch
        self.linear_kernel, self.state_dtype = linear_kernel, state_dtype
        self.regions = [r for r in regions if r.name in plan.gates]
        self.member_of = {n: r for r in self.regions for n in r.nodes}
        self.sites = {s.node: s for s in sites}

    def call(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.graph = fx.Graph()
        self.modules: dict[str, torch.nn.Module] = {}
        self.env: dict[fx.Node, fx.Node] = {}       # old node -> new node holding its full value
        self.sparse: dict[fx.Node, tuple] = {}      # old node -> (new data node, idx node, layout)
        self.region_macs: dict[str, int] = {}       # region name -> MACs of the region when dense
        self.dense_macs_static = 0
        self.region_of_idx: dict[fx.Node, str] = {}
        self.moves_of_idx: dict[fx.Node, fx.Node] = {}  # idx of a gate with neighbour reuse -> its moves
        self.k_nodes: dict[fx.Node, fx.Node] = {}
        self.joined: set[fx.Node] = set()
        self.changed_at: dict[fx.Node, tuple] = {}  # old node read in full -> (idx, ids) where it changed
        self.static: set[fx.Node] = set()             # values the same on every frame (weights, tables)
        self.gm = gm
        for node in gm.graph.nodes:
            self._visit(node)
        self.graph._codegen = gm.graph._codegen  # keep the model's input and output structure
        for name, module in self.modules.items():  # GraphModule copies what the graph reads from its root
            gm.add_module(name, module)
        try:
            out = fx.GraphModule(gm, self.graph, class_name="EventfulGraph")
        finally:
            for name in self.modules:
                delattr(gm, name)
        out.region_macs = self.region_macs
        out.dense_macs_static = self.dense_macs_static
        return out

    # -- values ---------------------------------------------------------------------------
    def full(self, node: fx.Node) -> fx.Node:
        if node in self.env:
            return self.env[node]
        data, idx, layout = self.sparse[node]
        name = f"buf_{node.name}"
        shape = tensor_shape(node)
        moves = self.moves_of_idx.get(idx)
        self.modules[name] = RegionBuffer(shape, layout.dims[0], layout.dims[-1] + 1, self.state_dtype,
                                          neighbour_reuse=moves is not None, folded=layout.folded)
        self.env[node] = self.graph.call_module(name, (data, idx) if moves is None else (data, idx, moves))
        if moves is None and layout is not None:
            self.changed_at[node] = (idx, layout.order)
        return self.env[node]

    def _map_full(self, args):
        return fx.node.map_arg(args, self.full)

    # -- the visitor ----------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            self.env[node] = self.graph.node_copy(node)
            if node.op == "get_attr":
                self.static.add(node)
            return
        if not node.users and (op_kind(node) == ops.NOOP or node.op == "call_module") and \
                op_name(node) not in _USER_CHECKS:
            return  # export's input guards and metadata asserts: the eventful module checks its inputs itself
        if node.op == "output":
            outputs = fx.node.map_arg(node.args[0], lambda n: self.graph.call_method("clone", (self.full(n),))
                                      if isinstance(tensor_shape(n), tuple) else self.full(n))
            self.graph.output(outputs)
            return
        if node in self.sites and self._attention(node):
            return
        region = self.member_of.get(node)
        if region is not None:
            self._sparse_node(node, region)
            return
        idx = joinable(node, self.infos, lambda a: self.sparse[a][1:] if a in self.sparse else None)
        if idx is not None:  # one buffer for the result instead of one per operand, and a k-token op
            new = self.graph.node_copy(node, lambda a: self.sparse[a][0])
            new.meta = {}
            self.sparse[node] = (new, idx, self.infos[node].layout)
            self.joined.add(node)  # a region rooted here still gets its gate, reading the one buffer
            gate_name = self.region_of_idx[idx]
            self.region_macs[gate_name] = self.region_macs.get(gate_name, 0) + self.infos[node].macs
            return
        self.dense_macs_static += self.infos[node].macs
        new = self.graph.node_copy(node, self.full)
        self.env[node] = new
        follow_changes(node, self.infos, self.changed_at, self.static)

    def _region_input(self, region: Region) -> tuple[fx.Node, fx.Node, TokenLayout]:
        """The gated form of the region's root: from a gate, or inherited (query-gated attention output)."""
        root = region.root
        if root in self.sparse and root not in self.joined:
            return self.sparse[root]
        layout = self.infos[root].layout
        name = region.name
        shape = tensor_shape(root)
        self.modules[name] = RegionGate(self.plan.gates[name], shape, layout.dims[0], layout.dims[-1] + 1,
                                        self.batch, always=layout.extra, state_dtype=self.state_dtype,
                                        neighbours=region.neighbours, folded=layout.folded)
        self.modules[name].grid, self.modules[name].grid_index = region.grid, region.grid_index
        # a root restored by a buffer, or computed from one token by token, differs from the last frame only
        # at the tokens written into it (unless its gate moves rows: then anywhere)
        full = self.full(root)
        changed = changed_tokens(root, layout, self.changed_at)
        out = self.graph.call_module(name, (full,) if changed is None else (full, changed))
        idx = self.graph.call_function(operator.getitem, (out, 0))
        data = self.graph.call_function(operator.getitem, (out, 1))
        if region.neighbours is not None:
            self.moves_of_idx[idx] = self.graph.call_function(operator.getitem, (out, 2))
        self.region_of_idx[idx] = name
        self.sparse[root] = (data, idx, layout)
        self.joined.discard(root)
        return self.sparse[root]

    def _sparse_node(self, node: fx.Node, region: Region) -> None:
        _, idx, _ = self._region_input(region)
        gate_name = self.region_of_idx[idx]  # a region after query-gated attention runs on its queries' tokens
        self.region_macs[gate_name] = self.region_macs.get(gate_name, 0) + self.infos[node].macs
        info = self.infos[node]
        kind = info.kind
        name = op_name(node)
        src = next(a for a in node.all_input_nodes if a in self.sparse)
        src_layout = self.sparse[src][2]
        in_shape = tensor_shape(src)

        def arg(a):
            if isinstance(a, fx.Node):
                if a in self.sparse:
                    return self.sparse[a][0]
                return self._constant(a, node, idx)
            return a

        args = list(fx.node.map_aggregate(node.args, lambda a: arg(a) if isinstance(a, fx.Node) else a))
        kwargs = dict(fx.node.map_aggregate(node.kwargs, lambda a: arg(a) if isinstance(a, fx.Node) else a))
        out_layout = info.layout
        if kind == ops.RESHAPE:
            new = self.graph.call_function(torch.reshape, (args[0], _collapsed_shape(
                tensor_shape(node), out_layout, self._k(idx, out_layout.folded))))
        elif kind == ops.EXPAND:
            new = self.graph.call_method("expand", (args[0], *_collapsed_shape(
                tensor_shape(node), out_layout, self._k(idx, out_layout.folded))))
        elif kind == ops.PERMUTE:
            perm = _permutation(node, in_shape)
            kept = [o for o in range(len(perm)) if o not in out_layout.dims[1:]]
            new_perm = [_collapse_dim(perm[o], src_layout, len(in_shape)) for o in kept]
            new = self.graph.call_method("permute", (args[0], new_perm))
        elif name in ("pad", "constant_pad_nd"):
            # pad pairs run from the last axis backwards: suffix axes, then the token run (one axis now), then prefix
            pad, suffix, run = list(args[1]), len(in_shape) - src_layout.dims[-1] - 1, len(src_layout.dims)
            pad = pad[: 2 * suffix] + ([0, 0] if len(pad) > 2 * suffix else []) + pad[2 * (suffix + run):]
            new = self.graph.call_function(node.target, (args[0], pad, *args[2:]), kwargs)
        elif kind == ops.EINSUM:
            new = self._sparse_einsum(node, idx)
        elif name == "linear" and node.op == "call_function" and len(args) >= 2:
            module = f"linear_{node.name}"
            self.modules[module] = SparseLinear(self.linear_kernel)
            new = self.graph.call_module(module, tuple(args), kwargs)
        else:
            position = _DIM_POSITION.get(name)  # self is args[0] for methods too
            if position is not None:
                if "dim" in kwargs and isinstance(kwargs["dim"], (int, list, tuple)):
                    kwargs["dim"] = _remap_dims(kwargs["dim"], src_layout, len(in_shape))
                elif len(args) > position and isinstance(args[position], (int, list, tuple)) and not (
                        name in ("split", "split_with_sizes", "chunk", "tensor_split") and position == 1):
                    args[position] = _remap_dims(args[position], src_layout, len(in_shape))
            if node.op == "call_method":
                new = self.graph.call_method(node.target, tuple(args), kwargs)
            else:
                new = self.graph.call_function(node.target, tuple(args), kwargs)
        new.meta = {}
        if info.outputs is not None:  # unbind / split: getitem nodes pick their layouts
            self.sparse[node] = (new, idx, None)
            return
        if kind == ops.GETITEM:
            parent_layout = self.infos[node.args[0]].outputs[node.args[1]]
            self.sparse[node] = (new, idx, parent_layout)
            return
        self.sparse[node] = (new, idx, out_layout)

    def _sparse_einsum(self, node: fx.Node, idx: fx.Node) -> fx.Node:
        """The einsum on the k selected tokens: the token run's subscripts become one, and a table indexed
        by token subscripts is gathered per selected token (then a stream subscript joins the equation)."""
        terms, out, operands = parse_einsum(node)
        info = self.infos[node]
        pos = next(i for i, a in enumerate(operands) if isinstance(a, fx.Node) and a in self.sparse)
        source = operands[pos]
        data, _, layout = self.sparse[source]
        term, shape = terms[pos], tensor_shape(source)
        t0, t1 = layout.dims[0], layout.dims[-1] + 1
        run, run_sizes = term[t0:t1], list(shape[t0:t1])
        free = iter(c for c in string.ascii_letters if c not in node.args[0])
        token = next(free)
        new_terms, new_out = list(terms), out.replace(run, token)
        new_terms[pos] = term[:t0] + token + term[t1:]
        values: list = [None] * len(operands)
        k = self._k(idx)
        if info.per_token_args:  # per-stream table rows: split the axes before the tokens into (stream, rest)
            stream, rest = next(free), next(free)
            data = self.graph.call_function(torch.reshape, (data, [self.batch, math.prod(shape[:t0]) // self.batch,
                                                                   k, *shape[t1:]]))
            new_terms[pos] = stream + rest + token + term[t1:]
            new_out = stream + rest + new_out[t0:]
        values[pos] = data
        for i, (operand, t) in enumerate(zip(operands, terms)):
            if i == pos:
                continue
            value = self.full(operand) if isinstance(operand, fx.Node) else operand
            axes = info.per_token_args.get(i)
            if axes:
                positions = [run.index(t[a]) for a in axes]
                value = self.graph.call_function(gather_table, (value, list(axes), positions, idx, run_sizes))
                new_terms[i] = t[:axes[0]] + stream + token + t[axes[-1] + 1:]
            values[i] = value
        new = self.graph.call_function(torch.einsum, (",".join(new_terms) + "->" + new_out, *values))
        if info.per_token_args:
            out_shape, o0 = tensor_shape(node), out.index(run[0])
            new = self.graph.call_function(torch.reshape, (new, [*out_shape[:o0], k, *out_shape[o0 + len(run):]]))
        return new

    def _k(self, idx: fx.Node, folded: int = 1) -> fx.Node:
        """The region's token count on this frame, as a graph value (times the streams a layout folds in)."""
        if idx not in self.k_nodes:
            self.k_nodes[idx] = self.graph.call_method("size", (idx, 1))
        if folded == 1:
            return self.k_nodes[idx]
        if (idx, folded) not in self.k_nodes:
            self.k_nodes[(idx, folded)] = self.graph.call_function(operator.mul, (self.k_nodes[idx], folded))
        return self.k_nodes[(idx, folded)]

    def _constant(self, a: fx.Node, user: fx.Node, idx: fx.Node) -> fx.Node:
        """A non-token operand of a sparse node: gathered if it holds one value per token."""
        full = self.full(a)
        info = self.infos[user]
        position = next((i for i, x in enumerate(user.args) if x is a), None)
        token_dims = info.per_token_args.get(position)
        shape = tensor_shape(a)
        out_layout = info.layout
        if shape is None or out_layout is None:
            return full
        out_rank = len(tensor_shape(user))
        offset = out_rank - len(shape)
        run = [d - offset for d in out_layout.dims]
        if run[0] < 0:  # the constant does not reach the token axes: broadcasting is unchanged
            return full
        collapsed = [*shape[: run[0]], math.prod(shape[run[0]: run[-1] + 1]), *shape[run[-1] + 1:]]
        value = self.graph.call_function(torch.reshape, (full, collapsed)) if len(run) > 1 else full
        if token_dims:
            if run[0] == 0:  # no batch axis before the tokens: add one so streams can index it
                value = self.graph.call_method("unsqueeze", (value, 0))
                return self.graph.call_method("squeeze", (
                    self.graph.call_function(gather_tokens, (value, idx, 1)), 0)) if self.batch == 1 else \
                    self.graph.call_function(gather_tokens, (value, idx, 1))
            return self.graph.call_function(gather_tokens, (value, idx, run[0]))
        return value

    # -- attention ------------------------------------------------------------------------
    def _attention(self, node: fx.Node) -> bool:
        site = self.sites[node]
        mode = self.plan.attention.get(site.name, "dense")
        q, k, v = site.q, site.k, site.v
        args = gateable_sdpa_args(site, mode, self.sparse)
        if args is None:
            return self._row_gated_attention(site, mode)
        attn_mask, scale = args
        q_data, idx, q_layout = self.sparse[q]
        rows_selected = isinstance(attn_mask, fx.Node) and attn_mask in self.sparse and self.sparse[attn_mask][1] is idx
        mask = self.sparse[attn_mask][0] if rows_selected else \
            self.full(attn_mask) if isinstance(attn_mask, fx.Node) else attn_mask
        name = site.name
        if runs_incremental(site, mode, lambda a: self.sparse[a][1] if a in self.sparse else None):
            self.modules[name] = IncrementalAttention(tensor_shape(k)[-2])
            self.env[node] = self.graph.call_module(name, (q_data, self.sparse[k][0], self.sparse[v][0], idx, mask, scale))
        else:
            self.modules[name] = QueryGatedAttention()
            self.modules[self.region_of_idx[idx]].refresh_stalest = True  # the queries it skips keep old contexts
            out = self.graph.call_module(name, (q_data, self.full(k), self.full(v), idx, mask, scale),
                                         {"mask_rows_selected": rows_selected})
            self.sparse[node] = (out, idx, self.infos[node].layout)
        return True

    def _row_gated_attention(self, site: AttentionSite, mode: str) -> bool:
        args = row_gated_args(site, mode, self.changed_at)
        if args is None:
            return False
        idx, ids, rows_of, attn_mask, scale = args
        self.modules[site.name] = RowGatedAttention(rows_of, math.prod(tensor_shape(site.q)[:-1]), self.state_dtype)
        self.modules[self.region_of_idx[idx]].refresh_stalest = True  # the queries it skips keep old contexts
        mask = self.full(attn_mask) if isinstance(attn_mask, fx.Node) else attn_mask
        self.env[site.node] = self.graph.call_module(site.name, (self.full(site.q), self.full(site.k),
                                                                 self.full(site.v), idx, mask, scale))
        self.changed_at[site.node] = (idx, ids)
        return True


# kinds whose output elements read other tokens' elements (or whose tokens cannot be followed)
_TOKEN_MIXING_KINDS = frozenset({ops.ATTENTION, "attention_matmul", "token_reduce", ops.CONV, ops.POOL, ops.UNKNOWN,
                                 "patch_embed"})


def follow_changes(node: fx.Node, infos: dict[fx.Node, NodeInfo], changed_at: dict, static: set) -> None:
    """Record where a node run densely changed since the last frame (`changed_at[node] = (token set, ids)`).

    It changed at one gate's tokens when its token-carrying operands all changed at those tokens,
    its other operands are the same on every frame (then it joins `static`), and each of its output
    elements reads elements of its own token only: a layout op, or a token-wise op on tokens whose
    axes mix with the batch (window partitions). `ids` number the gate's positions, as the analysis
    numbers tokens, so an attention site maps its query rows to them (`row_gated_args`).
    """
    info = infos[node]
    if node.op not in ("call_function", "call_method"):
        return
    token_inputs = [a for a in node.all_input_nodes if infos[a].carries_tokens]
    if not info.carries_tokens:
        if not token_inputs and all(a in static for a in node.all_input_nodes):
            static.add(node)
        return
    if info.opaque or info.renumbered or info.kind in _TOKEN_MIXING_KINDS or \
            (info.reason is not None and info.reason not in LAYOUT_ONLY_REASONS):
        return
    if any(a not in static for a in node.all_input_nodes if a not in token_inputs):
        return
    changes = {changed_at[a][0]: changed_at[a] for a in token_inputs if a in changed_at}
    if len(changes) == 1 and all(a in changed_at for a in token_inputs):
        changed_at[node] = changes.popitem()[1]


def changed_tokens(root: fx.Node, layout: TokenLayout, changed_at: dict):
    """The token set where a gate's root changed, when numbered as the gate numbers its positions; else None."""
    changed = changed_at.get(root)
    if changed is None or layout is None or not torch.equal(changed[1], layout.order):
        return None
    return changed[0]


def rows_of_tokens(ids: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor | None:
    """[N, R]: the query rows holding the token of each gate position (ids [N]), when each token has
    R rows (one per head) and every row is some position's token; else None."""
    n, total = len(ids), len(query_rows)
    if total % n:
        return None
    by_id = torch.argsort(query_rows, stable=True)
    grouped = query_rows[by_id].view(n, total // n)
    positions = torch.argsort(ids, stable=True)
    if not bool((grouped == grouped[:, :1]).all()) or not torch.equal(ids[positions], grouped[:, 0]):
        return None
    rows_of = torch.empty(n, total // n, dtype=torch.long)
    rows_of[positions] = by_id.view(n, -1)
    return rows_of


def row_gated_args(site: AttentionSite, mode: str, changed_at: dict) -> tuple | None:
    """(token set, ids, rows_of, attn_mask, scale) of a site whose queries are not carried sparse but
    changed, run densely, at one gate's tokens (windowed attention): it runs `RowGatedAttention`."""
    if mode != "query_windows" or site.query_rows is None or site.q not in changed_at:
        return None
    attn_mask, dropout, is_causal, scale = _sdpa_options(site.node)
    if is_causal or dropout:
        return None
    token_set, ids = changed_at[site.q]
    rows_of = rows_of_tokens(ids, site.query_rows)
    return None if rows_of is None else (token_set, ids, rows_of, attn_mask, scale)


def _sdpa_options(node: fx.Node) -> tuple:
    """(attn_mask, dropout_p, is_causal, scale) of an SDPA node, positional or keyword."""
    def arg(position, name, default):
        return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
    return arg(3, "attn_mask", None), arg(4, "dropout_p", 0.0), arg(5, "is_causal", False), node.kwargs.get("scale")


def runs_incremental(site: AttentionSite, mode: str, token_set_of) -> bool:
    """Whether a gated site runs incremental attention: asked for, and its keys and values are carried
    sparse on its queries' tokens (otherwise it runs query-gated). `token_set_of(a)`: a's token set, or None."""
    queries = token_set_of(site.q)
    # a bias computed from the queries (carried on their tokens) exists for the selected rows only,
    # while incremental attention needs its columns at every row: such sites run query-gated
    return mode == "incremental" and len(tensor_shape(site.q)) == 4 and \
        (site.mask is None or token_set_of(site.mask) is None) and \
        all(token_set_of(a) is not None and token_set_of(a) == queries for a in (site.k, site.v))


def joinable(node: fx.Node, infos: dict[fx.Node, NodeInfo], sparse_of):
    """The token set an elementwise node outside the regions can run on, sparse, else None.

    Such a node joins values of different regions (a residual add of a block's input and its
    attention output); when every operand is carried sparse on the same gate's tokens, in
    the node's own layout, the buffers of the operands would all be written at the same
    tokens on every frame, so one buffer of the result holds the same values. `sparse_of(a)`
    is (token set, layout) for a sparse value, else None.
    """
    info = infos[node]
    if info.kind != ops.ELEMENTWISE or not info.tokenwise or info.layout is None or node.kwargs:
        return None
    shape = tensor_shape(node)
    token_set = None
    for a in node.args:
        if isinstance(a, fx.Node):
            carried = sparse_of(a)
            if carried is None or carried[1] != info.layout or tensor_shape(a) != shape \
                    or not torch.equal(carried[1].order, info.layout.order):
                return None
            if token_set is not None and carried[0] is not token_set and carried[0] != token_set:
                return None
            token_set = carried[0]
        elif not isinstance(a, (int, float, bool)):
            return None
    return token_set


def gateable_sdpa_args(site: AttentionSite, mode: str, sparse) -> tuple | None:
    """(attn_mask, scale) of an attention site a gated mode can run (its queries are in `sparse`); else None."""
    q = site.q
    if mode == "dense" or site.reason is not None or q not in sparse:
        return None
    attn_mask, dropout, is_causal, scale = _sdpa_options(site.node)
    if is_causal or dropout or len(tensor_shape(q)) < 3:
        return None
    return attn_mask, scale


def _remap_dims(dims, layout: TokenLayout, ndim: int):
    if isinstance(dims, int):
        return _collapse_dim(dims, layout, ndim) if dims >= 0 or dims < -(ndim - layout.dims[-1] - 1) else dims
    return [_remap_dims(d, layout, ndim) for d in dims]
