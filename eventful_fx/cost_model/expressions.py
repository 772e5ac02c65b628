"""MACs and state memory of an eventful graph as sympy expressions of N (tokens) and each gate's k.

`build_cost_model(gm, infos, regions, sites, batch, structure)` walks the analysed graph the
way the rewrite pass would build it for `structure` (which regions are gated, each attention
site's mode), without building anything: it decides, node by node, whether a value is
carried sparse (and on which gate's tokens) or full, where a buffer restores a full value,
and what each node, gate, buffer and attention mode costs on an incremental frame. The
formulas are those the runtime ops count (`matmul_macs`, `overhead_macs`, `state_bytes`):

- a node of a gated region: its dense MACs · k / N (token-wise ops scale with the tokens);
- a gate: B·N·C scoring + 2·B·C·k gather and reference write-back (C = channels per token);
  a gate reading a buffer scores only the k_u tokens written into it: B·k_u·C instead of B·N·C;
- a gate with neighbour reuse (`passes/neighbours.py`): B·N·(3C + 32·M) for scoring, its M
  candidates on 32 channels, the full-channel check and the moves;
- a buffer: k·C written (and N·C converted, when it keeps its state in another dtype; N·C
  moved, counted on every frame, when its gate reuses neighbours);
- query-gated attention: B·H·k·N·(d + dv), plus the gathered rows of a mask;
- incremental attention: B·H·k·(N·(2d + 3dv) + 3N + 2d + 3dv + 2);
- dense attention (and every other node outside a gated region): its dense MACs,
  as an expression of N where its tokens are the gates' tokens (attention: N²).

Channel sizes enter as the integers the weights fix; token counts as symbols (`N`, or
`N_<count>` when a graph has several token spaces) with their values in `values`; each
gate's k as the symbol `k_<gate>`. Memory: a gate holds its input (B·N·C) and a distance
per token (B·N, float32 or wider; in front of query-gated attention also the context motion
each token missed, float32), a buffer its full value, incremental attention Q, K, V,
exp(QKᵀ) (N² per head), U = E·V, row sums and stabilisers; all in bytes of the value's dtype
(gates and buffers: of the state dtype, if one is set). Nothing here reads a tensor's values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy
import torch
import torch.fx as fx

from ..passes import ops
from ..passes.ops import node_value, op_kind, tensor_shape
from ..passes.regions import AttentionSite, Region
from ..passes.rewrite import QUERY_MODES, changed_tokens, follow_changes, gateable_sdpa_args, joinable, row_gated_args, \
    runs_incremental
from ..passes.tokens import NodeInfo, constant_pad
from ..runtime.attention import ROW_CHUNK
from ..runtime.gate import SKETCH_DIM, score_dtype

_MIXED = "<mixed>"  # changes from the input frame or a token-mixing node: anywhere
_MIXING = (ops.ATTENTION, "attention_matmul", "token_reduce", "token_cat", "token_select", ops.CONV, ops.POOL)


@dataclass
class Gate:
    """A gate the rewrite would create, and everything that runs on its k tokens."""

    name: str
    num_tokens: int
    channels: int                  # per token and stream (heads folded in)
    batch: int
    always: tuple[int, ...]        # class / register tokens: updated whenever anything changed
    regions: list[str] = field(default_factory=list)   # regions that run on this gate's tokens
    sites: list[str] = field(default_factory=list)     # converted attention sites reading its tokens
    dense_macs: int = 0            # MACs of its regions' nodes when they run densely
    const: Fraction = Fraction(0)  # MACs per incremental frame: const + per_k * k
    per_k: Fraction = Fraction(0)
    state_bytes: int = 0           # its reference, its buffers, its incremental attention caches
    behind: str | None = None      # the one gate all changes of its input come through (see `cascade`)
    padding: int = 0               # positions that hold constant padding: never change, so never worth a token

    @property
    def selectable(self) -> int:
        """Tokens that can change: what a plan's fraction k/N counts (k beyond it would recompute padding)."""
        return self.num_tokens - self.padding

    @property
    def min_k(self) -> int:
        return min(self.selectable, max(1, len(self.always)))

    def macs(self, k: float) -> float:
        return float(self.const + self.per_k * k)


@dataclass
class Term:
    """One contribution to an incremental frame's MACs (or, for `what == "memory"`, to the state bytes)."""

    what: str           # node | gate | buffer | attention | memory
    name: str           # node or module name
    gate: str | None    # the gate whose k it depends on (None: constant)
    const: Fraction
    per_k: Fraction
    expr: sympy.Expr    # the same, in N, k and the channel sizes


class CostModel:
    """Costs of one structure (gated regions + attention modes) of an analysed graph."""

    def __init__(self, structure_gates: frozenset[str], attention: dict[str, str]):
        self.structure = structure_gates
        self.attention = dict(attention)
        self.gates: dict[str, Gate] = {}
        self.terms: list[Term] = []
        self.memory_terms: list[Term] = []
        self.node_macs: dict[str, sympy.Expr] = {}     # per analysed node, under this structure
        self.dense_node_macs: dict[str, sympy.Expr] = {}  # per analysed node, all dense
        self.symbols: dict[int, sympy.Symbol] = {}     # token count -> N symbol
        self.k: dict[str, sympy.Symbol] = {}           # gate -> k symbol
        self.dense_macs = 0
        self.static = Fraction(0)                      # MACs that depend on no gate
        self.converted_sites: dict[str, str] = {}      # site -> the mode it runs in
        self._fns = None

    # -- values ---------------------------------------------------------------------------
    @property
    def values(self) -> dict[sympy.Symbol, int]:
        return {s: n for n, s in self.symbols.items()}

    def gate_names(self) -> list[str]:
        return list(self.gates)

    def cascade(self) -> dict[str, float]:
        """Per gate: the summed error amplitude, at the output, of a token it skips.

        A stale region's error energy is taken proportional to its MACs per token (its share
        of the model), so its amplitude to the square root. A gate is *behind* gate g when
        every change of its input comes, token for token, through g's regions (no
        token-mixing node, no other gate, no input frame on the way). Behind query-gated
        attention, which leaves the queries it skips as they were, a token g skips has no
        new value for any later gate of the chain to pick: g's regions and those of every
        gate behind it, transitively, stay stale there, and their errors, all from one
        missed change, add up coherently. Only chains through query-gated attention count:
        on samvit (all attention dense), counting its short MLP -> qkv chains too raised the
        clip's error at budget 0.5 from 0.080 (uniform) to 0.087.
        """
        out: dict[str, float] = {}
        for name in reversed(list(self.gates)):
            g = self.gates[name]
            chained = sum(out[h] for h, other in self.gates.items() if other.behind == name and h in out) \
                if any(self.converted_sites.get(s) in QUERY_MODES for s in g.sites) else 0.0
            out[name] = math.sqrt(g.dense_macs / g.num_tokens) + chained
        return {name: out[name] for name in self.gates}

    def predict_macs(self, ks: dict[str, int]) -> float:
        """MACs of an incremental frame with these k (the lambdified total)."""
        macs_fn, _ = self.functions()
        return float(macs_fn(*[ks[g] for g in self.gates]))

    def state_bytes(self) -> int:
        return int(sum(t.const for t in self.memory_terms))

    # -- expressions ----------------------------------------------------------------------
    def macs_expr(self) -> sympy.Expr:
        """MACs of an incremental frame in N and each gate's k."""
        return sympy.Add(*(t.expr for t in self.terms))

    def dense_expr(self) -> sympy.Expr:
        """MACs of a dense frame in N (equals the analysis' dense_macs at `values`)."""
        return sympy.Add(*self.dense_node_macs.values())

    def memory_expr(self) -> sympy.Expr:
        return sympy.Add(*(t.expr for t in self.memory_terms))

    def uniform_expr(self) -> sympy.Expr:
        """The total with one k for every gate: `MACs(k) = a·k + b·k·N + c(N)`."""
        k = sympy.Symbol("k", nonnegative=True)
        return sympy.expand(self.macs_expr().subs({s: k for s in self.k.values()}))

    def functions(self):
        """(macs(k_1..k_G), gradient(k_1..k_G) -> array of G) lambdified with numpy, in gate order."""
        if self._fns is None:
            ks = [self.k[g] for g in self.gates]
            total = self.macs_expr().subs(self.values)
            grad = [sympy.diff(total, k) for k in ks]
            self._fns = (sympy.lambdify(ks, total, "numpy"), sympy.lambdify(ks, grad, "numpy"))
        return self._fns

    def gate_arrays(self):
        """Per gate, in order: (const, per_k, dense MACs, selectable N, min k) as numpy arrays; per_k from the
        lambdified gradient."""
        _, grad = self.functions()
        names = list(self.gates)
        per_k = np.asarray(grad(*[self.gates[g].num_tokens for g in names]), dtype=np.float64).reshape(-1)
        const = np.array([float(self.gates[g].const) for g in names])
        dense = np.array([float(self.gates[g].dense_macs) for g in names])
        n = np.array([self.gates[g].selectable for g in names], dtype=np.int64)
        kmin = np.array([self.gates[g].min_k for g in names], dtype=np.int64)
        return const, per_k, dense, n, kmin


def build_cost_model(gm: fx.GraphModule, infos: dict[fx.Node, NodeInfo], regions: list[Region],
                     sites: list[AttentionSite], batch: int, gated: set[str] | frozenset[str],
                     attention: dict[str, str], state_dtype: torch.dtype | None = None) -> CostModel:
    """The cost model of the eventful graph the rewrite builds for (gated regions, attention modes).

    `state_dtype`: the dtype gates and buffers keep their state in (None: each value's own).
    """
    return _Walk(gm, infos, regions, sites, batch, frozenset(gated), attention, state_dtype).run()


class _Walk:
    """Mirrors `EventfulRewrite._visit` on statuses only: sparse (on a gate's tokens) or full."""

    def __init__(self, gm, infos, regions, sites, batch, gated, attention, state_dtype=None):
        self.gm, self.infos, self.batch = gm, infos, batch
        self.state_dtype = state_dtype
        self.state_size = None if state_dtype is None else state_dtype.itemsize
        self.regions = [r for r in regions if r.name in gated]
        self.reusing = {r.name: r.neighbours.shape[1] for r in self.regions if r.neighbours is not None}
        self.member_of = {n: r for r in self.regions for n in r.nodes}
        self.sites = {s.node: s for s in sites}
        self.cm = CostModel(gated, attention)
        self.sparse: dict[fx.Node, tuple[str, object]] = {}  # node -> (gate, layout)
        self.buffered: set[fx.Node] = set()
        self.joined: set[fx.Node] = set()
        self.changed_at: dict[fx.Node, tuple] = {}  # node read in full -> (gate, ids) where it changed
        self.static: set[fx.Node] = set()
        self.sources: dict[fx.Node, frozenset] = {}  # node -> gates (or _MIXED) its changes come from
        self.B = sympy.Integer(batch)
        # token counts of the gates' roots become symbols; the most common one is `N`
        counts: dict[int, int] = {}
        for r in regions:
            layout = infos[r.root].layout
            if layout is not None:
                counts[layout.num_tokens] = counts.get(layout.num_tokens, 0) + 1
        for i, (n, _) in enumerate(sorted(counts.items(), key=lambda c: -c[1])):
            self.cm.symbols[n] = sympy.Symbol("N" if i == 0 else f"N_{n}", positive=True, integer=True)

    # -- helpers ----------------------------------------------------------------------------
    def tokens(self, n: int) -> sympy.Expr:
        return self.cm.symbols.get(n, sympy.Integer(n))

    def dense_expr(self, node: fx.Node) -> sympy.Expr:
        """A node's dense MACs as an expression of N where its tokens are a gate's tokens."""
        info = self.infos[node]
        macs = int(info.macs)
        if not macs:
            return sympy.Integer(0)
        if info.kind == ops.ATTENTION:
            q, k = tensor_shape(node.args[0]), tensor_shape(node.args[1])
            if q[-2] in self.cm.symbols and k[-2] in self.cm.symbols:
                return sympy.Rational(macs, q[-2] * k[-2]) * self.tokens(q[-2]) * self.tokens(k[-2])
            return sympy.Integer(macs)
        layout = info.layout
        if layout is not None and layout.num_tokens in self.cm.symbols:
            return sympy.Rational(macs, layout.num_tokens) * self.tokens(layout.num_tokens)
        return sympy.Integer(macs)

    def add(self, what: str, name: str, gate: str | None, const, per_k, expr) -> None:
        const, per_k = Fraction(const), Fraction(per_k)
        self.cm.terms.append(Term(what, name, gate, const, per_k, expr))
        if gate is None:
            self.cm.static += const
        else:
            g = self.cm.gates[gate]
            g.const += const
            g.per_k += per_k

    def memory(self, name: str, gate: str, elements: int, element_size: int, expr) -> None:
        size = elements * element_size
        self.cm.memory_terms.append(Term("memory", name, gate, Fraction(size), Fraction(0), expr * element_size))
        self.cm.gates[gate].state_bytes += size

    def full(self, node) -> None:
        """The rewrite reads the full value of `node`: a buffer where it is carried sparse."""
        if not isinstance(node, fx.Node) or node not in self.sparse or node in self.buffered:
            return
        self.buffered.add(node)
        gate, layout = self.sparse[node]
        if gate not in self.reusing and layout is not None:
            self.changed_at[node] = (gate, layout.order)
        shape = tensor_shape(node)
        t0 = layout.dims[0]
        n = layout.num_tokens  # one stream's (a layout may fold the streams into its token run)
        per_token = math.prod(shape) // n
        k = self.cm.k[gate]
        self.add("buffer", f"buf_{node.name}", gate, 0, per_token, per_token * k)
        if gate in self.reusing:  # its gate may move rows: counted for every token
            self.add("buffer", f"buf_{node.name}.moves", gate, per_token * n, 0, per_token * self.tokens(n))
        if self.state_dtype is not None and self.state_dtype != _dtype(node):  # returns a converted copy
            self.add("buffer", f"buf_{node.name}.convert", gate, per_token * n, 0, per_token * self.tokens(n))
        if self.state_dtype == torch.int8:  # a float32 scale per token and row (`encode_tokens`)
            rows = math.prod(shape[:t0]) * layout.folded
            self.memory(f"buf_{node.name}.scale", gate, rows * n, 4, rows * self.tokens(n))
        self.memory(f"buf_{node.name}", gate, math.prod(shape), self.state_size or _dtype(node).itemsize,
                    per_token * self.tokens(n))

    def region_input(self, region: Region) -> str:
        root = region.root
        if root in self.sparse and root not in self.joined:  # after query-gated attention: runs on its queries' gate
            gate = self.sparse[root][0]
            if region.name not in self.cm.gates[gate].regions:
                self.cm.gates[gate].regions.append(region.name)
            return gate
        layout = self.infos[root].layout
        shape = tensor_shape(root)
        n = layout.num_tokens
        channels = math.prod(shape) // (self.batch * n)
        name = region.name
        sources = self.sources.get(root, frozenset([_MIXED]))
        behind = next(iter(sources)) if len(sources) == 1 and _MIXED not in sources else None
        self.cm.gates[name] = Gate(name, n, channels, self.batch, tuple(layout.extra), regions=[name], behind=behind,
                                   padding=layout.padding if _padding_is_constant(root, self.infos) else 0)
        k = self.cm.k[name] = sympy.Symbol(f"k_{name}", nonnegative=True, integer=True)
        N, C, B = self.tokens(n), sympy.Integer(channels), self.B
        self.full(root)
        upstream = changed_tokens(root, layout, self.changed_at)
        self.add("gate", name, name, 0, 2 * self.batch * channels, 2 * B * C * k)
        if name in self.reusing:  # neighbour reuse: distances, projections, candidates, check and moves, all N
            per_token = 3 * channels + self.reusing[name] * min(SKETCH_DIM, channels)
            self.add("gate", f"{name}.score", name, self.batch * n * per_token, 0, B * N * per_token)
        elif upstream is None or upstream in self.reusing:  # scores all N tokens
            self.add("gate", f"{name}.score", name, self.batch * n * channels, 0, B * N * C)
        else:  # reads a buffer: scores only the tokens written into it
            self.add("gate", f"{name}.score", upstream, 0, self.batch * channels, B * C * self.cm.k[upstream])
        self.memory(name, name, math.prod(shape), self.state_size or _dtype(root).itemsize, B * N * C)
        if self.state_dtype == torch.int8:
            self.memory(f"{name}.scale", name, self.batch * n, 4, B * N)
        dtype = _dtype(root)
        distances = score_dtype(dtype, self.state_dtype or dtype).itemsize
        self.memory(f"{name}.distance", name, self.batch * n, distances, B * N)
        self.sparse[root] = (name, layout)
        self.joined.discard(root)
        return name

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> CostModel:
        cm = self.cm
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.sources[node] = frozenset([_MIXED]) if node.op == "placeholder" else frozenset()
                if node.op == "get_attr":
                    self.static.add(node)
                continue
            cm.dense_node_macs[node.name] = self.dense_expr(node)
            cm.dense_macs += int(self.infos[node].macs)
            if not node.users and (op_kind(node) == ops.NOOP or node.op == "call_module"):
                continue
            if node.op == "output":
                fx.node.map_arg(node.args[0], self.full)
                continue
            if node in self.sites and self.attention_site(node):
                continue
            region = self.member_of.get(node)
            gate = None if region is not None else joinable(node, self.infos, self.sparse.get)
            if region is not None or gate is not None:
                if gate is not None:
                    self.joined.add(node)
                gate = gate or self.region_input(region)
                macs = int(self.infos[node].macs)
                n = cm.gates[gate].num_tokens
                cm.gates[gate].dense_macs += macs
                expr = sympy.Rational(macs, n) * cm.k[gate]
                cm.node_macs[node.name] = expr
                if macs:
                    self.add("node", node.name, gate, 0, Fraction(macs, n), expr)
                self.sparse[node] = (gate, self.layout_of(node))
                self.sources[node] = frozenset([gate])
                continue
            for a in node.all_input_nodes:
                self.full(a)
            self.sources[node] = frozenset([_MIXED]) if self.infos[node].kind in _MIXING else \
                frozenset().union(*(self.sources.get(a, frozenset()) for a in node.all_input_nodes))
            expr = cm.dense_node_macs[node.name]
            cm.node_macs[node.name] = expr
            if self.infos[node].macs:
                self.add("node", node.name, None, int(self.infos[node].macs), 0, expr)
            follow_changes(node, self.infos, self.changed_at, self.static)
        return cm

    def layout_of(self, node: fx.Node):
        info = self.infos[node]
        if info.outputs is not None:
            return None
        if info.kind == ops.GETITEM and self.infos[node.args[0]].outputs is not None:
            return self.infos[node.args[0]].outputs[node.args[1]]
        return info.layout

    def attention_site(self, node: fx.Node) -> bool:
        site = self.sites[node]
        mode = self.cm.attention.get(site.name, "dense")
        q, k, v = site.q, site.k, site.v
        args = gateable_sdpa_args(site, mode, self.sparse)
        if args is None:
            return self.row_gated_site(site, mode)
        attn_mask = args[0]
        gate = self.sparse[q][0]
        rows_selected = isinstance(attn_mask, fx.Node) and attn_mask in self.sparse and self.sparse[attn_mask][0] == gate
        if not rows_selected:
            self.full(attn_mask)
        k_shape, dv = tensor_shape(k), tensor_shape(v)[-1]
        n, d = k_shape[-2:]
        bh, N, ks = math.prod(k_shape[:-2]), self.tokens(n), self.cm.k[gate]
        g = self.cm.gates[gate]
        g.sites.append(site.name)
        g.dense_macs += int(self.infos[node].macs)
        if runs_incremental(site, mode, lambda a: self.sparse[a][0] if a in self.sparse else None):
            self.cm.converted_sites[site.name] = "incremental"
            per_k = bh * (n * (2 * d + 3 * dv) + 3 * n + 2 * d + 3 * dv + 2)
            expr = bh * ks * (N * (2 * d + 3 * dv) + 3 * N + 2 * d + 3 * dv + 2)
            self.add("attention", site.name, gate, 0, per_k, expr)
            self.memory(site.name, gate, bh * n * (2 * d + 2 * dv + n + 2), _dtype(q).itemsize,
                        bh * N * (2 * d + 2 * dv + N + 2))
            self.cm.node_macs[node.name] = expr
            self.sources[node] = frozenset([_MIXED])  # new keys and values reach every query's output
            return True
        self.cm.converted_sites[site.name] = "query"
        if sum(self.cm.converted_sites.get(s) in QUERY_MODES for s in g.sites) == 1:  # the context each token missed
            self.memory(f"{gate}.missed", gate, g.batch * g.num_tokens, 4, self.B * self.tokens(g.num_tokens))
        self.full(k)
        self.full(v)
        expr = bh * ks * N * (d + dv)
        self.add("attention", site.name, gate, 0, bh * n * (d + dv), expr)
        mask_shape = tensor_shape(attn_mask) if isinstance(attn_mask, fx.Node) and not rows_selected else None
        if mask_shape is not None:  # QueryGatedAttention gathers the mask's query rows
            mask_shape = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
            if mask_shape[-2] == 1:
                self.add("attention", f"{site.name}.mask", None, math.prod(mask_shape), 0, sympy.Integer(math.prod(mask_shape)))
            else:
                per_k = self.batch * mask_shape[1] * mask_shape[3]
                self.add("attention", f"{site.name}.mask", gate, 0, per_k, per_k * ks)
        self.sparse[node] = (gate, self.infos[node].layout)
        self.sources[node] = frozenset([gate])
        self.cm.node_macs[node.name] = expr
        return True


    def row_gated_site(self, site: AttentionSite, mode: str) -> bool:
        """`RowGatedAttention`: each selected token's query rows against their own batch entry's keys."""
        args = row_gated_args(site, mode, self.changed_at)
        if args is None:
            return False
        gate, ids, rows_of, attn_mask, _ = args
        node = site.node
        for a in (site.q, site.k, site.v, attn_mask):
            self.full(a)
        q_shape, (keys, d), dv = tensor_shape(site.q), tensor_shape(site.k)[-2:], tensor_shape(site.v)[-1]
        mask_columns = keys if isinstance(attn_mask, fx.Node) else 0
        # the rows' products with their entries' keys and values, the keys and values each chunk of ROW_CHUNK
        # rows reads, gathers of q, mask and output rows; and half a chunk of padding per batch entry
        row = keys * (d + dv)
        per_k = Fraction(self.batch * rows_of.shape[1]) * (row + Fraction(row, ROW_CHUNK) + d + 2 * dv + mask_columns)
        padding = math.prod(q_shape[:-2]) * ROW_CHUNK // 2 * row
        expr = per_k * self.cm.k[gate] + padding
        g = self.cm.gates[gate]
        g.sites.append(site.name)
        g.dense_macs += int(self.infos[node].macs)
        self.cm.converted_sites[site.name] = "query_windows"
        if sum(self.cm.converted_sites.get(s) in QUERY_MODES for s in g.sites) == 1:  # the context each token missed
            self.memory(f"{gate}.missed", gate, g.batch * g.num_tokens, 4, self.B * self.tokens(g.num_tokens))
        self.add("attention", site.name, gate, padding, per_k, expr)
        rows = math.prod(q_shape[:-1])
        self.memory(site.name, gate, rows * dv, self.state_size or _dtype(node).itemsize, sympy.Integer(rows * dv))
        if self.state_dtype is not None and self.state_dtype != _dtype(node):  # its buffer returns a converted copy
            self.add("buffer", f"{site.name}.convert", gate, rows * dv, 0, sympy.Integer(rows * dv))
        if self.state_dtype == torch.int8:
            self.memory(f"{site.name}.scale", gate, rows, 4, sympy.Integer(rows))
        self.sources[node] = frozenset([gate])
        self.changed_at[node] = (gate, ids)
        self.cm.node_macs[node.name] = expr
        return True


def _dtype(node: fx.Node) -> torch.dtype:
    value = node_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32


_LAYOUT_KINDS = {ops.RESHAPE, ops.PERMUTE, ops.EXPAND, ops.INDEX, ops.GETITEM, ops.NOOP}


def _padding_is_constant(root: fx.Node, infos: dict[fx.Node, NodeInfo]) -> bool:
    """Whether the padded positions of root's value still hold the pad's constant: every op between the pad and
    root is token-wise or only moves values. After attention (or any op that mixes tokens) a padded position
    holds a function of real tokens, which changes from frame to frame (SAM's padded queries)."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        info = infos[node]
        layouts = [info.layout] if info.outputs is None else list(info.outputs)
        if constant_pad(node) or not any(x is not None and x.padding for x in layouts):
            continue  # padding is born here, or this value holds none
        if not (info.tokenwise or info.kind in _LAYOUT_KINDS):
            return False
        stack.extend(a for a in node.all_input_nodes if infos[a].carries_tokens)
    return True
