"""The analysis report: what of a model can run eventfully, what stays dense, and why.

This module owns `analyze(model, example_input) -> Report` and the `Report` itself. It
captures the model (passes.capture), runs the token analysis (passes.tokens) and the region
and attention-site search (passes.regions), and only *summarises* their results: it makes no
decision of its own about which node is token-wise. `analyze_graph(gm)` does the same for a
graph obtained elsewhere (a Dynamo graph from a `torch.compile` backend, for instance).

Units are multiply-accumulates (MACs) for one frame of the example input's batch.
A node's MACs are *convertible* when the node sits in a gated region that holds MACs, or is
an attention site with no blocking reason whose queries are produced inside a gated region.
Everything else runs densely; the report gives each dense MAC-bearing or token-mixing node
a reason and its source line.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from .cost_model.planner import Planner
from .passes import ops
from .passes.canonicalize import FuseExplicitAttention
from .passes.capture import capture
from .passes.ops import node_value, op_kind, op_name, source_line, tensor_shape
from .passes.regions import find_regions, region_macs
from .passes.tokens import NodeInfo, TokenAnalysis

# Statuses of a row.
CONVERTIBLE = "convertible"  # runs on a token subset (gated region) or as an eventful attention site
DENSE = "dense"              # runs densely, cheaply and harmlessly (residual joins, layout ops outside regions)
BLOCKER = "blocker"          # MAC-bearing or token-mixing and stays dense: the report says why
INFO = "info"                # changes the token set without MACs (class-token pick / concat, token subsets)

_INFO_KINDS = ("token_reduce", "token_cat", "token_select")


@dataclass
class Row:
    """One call node that has MACs or carries tokens."""

    name: str
    op: str
    kind: str
    token_axes: list[int] | None   # None: no single token layout (no tokens, opaque, or several outputs)
    tokens: int | None
    macs: int
    convertible: bool
    where: str | None              # gated region or attention site the node belongs to
    status: str                    # convertible | dense | blocker | info
    reason: str | None
    source: str
    module: str = ""               # qualified name of the innermost module that ran the node ("blocks.0.attn.qkv")


@dataclass
class RegionSummary:
    name: str
    root: str
    nodes: int
    macs: int
    tokens: int | None


@dataclass
class AttentionSummary:
    name: str
    node: str
    heads: int
    tokens: int | None
    macs: int
    convertible: bool
    fused: bool                    # fused SDPA (True) or an explicit q @ k^T -> softmax -> @ v (False)
    reason: str | None
    source: str


@dataclass
class PlanSummary:
    """The solver's plan for one budget: what compile() would build, with its predicted cost."""

    budget: float
    attention: str
    predicted_macs: int            # per incremental frame, gate and buffer overhead included
    dense_macs: int
    state_bytes: int               # gates' references, buffers, incremental attention caches
    gates: dict[str, list[int]]    # gate -> [k, N]
    sites: dict[str, str]          # attention site -> the mode it runs in (absent: dense)

    @property
    def fraction(self) -> float:
        return self.predicted_macs / self.dense_macs if self.dense_macs else 1.0


@dataclass
class Report:
    model: str
    input_shapes: list[list[int]]
    dense_macs: int
    convertible_macs: int
    rows: list[Row] = field(default_factory=list)
    regions: list[RegionSummary] = field(default_factory=list)
    attention_sites: list[AttentionSummary] = field(default_factory=list)
    linear_count: int = 0
    convertible_linear_count: int = 0
    attention_count: int = 0
    convertible_attention_count: int = 0
    macs_expression: str = ""        # MACs of an incremental frame, one k for every gate: a·k + b·k·N + c(N)
    token_symbols: dict[str, int] = field(default_factory=dict)  # N -> its value
    plan: PlanSummary | None = None   # for the budget given to analyze()
    token_mixing_count: int = 0       # linear layers over the token axis (MLP-Mixer): lossy for every later gate
    graph: fx.GraphModule | None = field(default=None, repr=False, compare=False)  # the analysed graph

    @property
    def convertible_fraction(self) -> float:
        return self.convertible_macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def blockers(self) -> list[Row]:
        return [r for r in self.rows if r.status == BLOCKER]

    @property
    def info(self) -> list[Row]:
        return [r for r in self.rows if r.status == INFO]

    # -- output -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "input_shapes": self.input_shapes,
            "dense_macs": self.dense_macs,
            "convertible_macs": self.convertible_macs,
            "convertible_fraction": self.convertible_fraction,
            "linear_count": self.linear_count,
            "convertible_linear_count": self.convertible_linear_count,
            "attention_count": self.attention_count,
            "convertible_attention_count": self.convertible_attention_count,
            "blockers": [asdict(r) for r in self.blockers],
            "info": [asdict(r) for r in self.info],
            "regions": [asdict(r) for r in self.regions],
            "attention_sites": [asdict(a) for a in self.attention_sites],
            "token_mixing_count": self.token_mixing_count,
            "macs_expression": self.macs_expression,
            "token_symbols": self.token_symbols,
            "plan": asdict(self.plan) if self.plan else None,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def _summary_lines(self) -> list[str]:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        return [
            f"model: {self.model}   input: {shapes}",
            f"dense: {self.dense_macs / 1e9:.3f} GMACs per frame   convertible: {self.convertible_macs / 1e9:.3f} GMACs "
            f"({100 * self.convertible_fraction:.1f}%)",
            f"linear layers: {self.linear_count} found, {self.convertible_linear_count} convertible   "
            f"attention: {self.attention_count} found, {self.convertible_attention_count} convertible   "
            f"gated regions: {len(self.regions)}",
        ] + ([f"cost model (one k for every gate, {_symbols(self.token_symbols)}): MACs(k) = {self.macs_expression}"]
             if self.macs_expression and self.token_symbols else
             ["no gated region: nothing runs on a token subset (see the blockers)"] if not self.regions else []) + \
            ([f"token mixing: {self.token_mixing_count} layers mix all tokens (token-mixing MLP): every token moves on "
              "every frame after them, so gates after them lose more accuracy per budget than after attention"]
             if self.token_mixing_count else []) + ([_plan_line(self.plan)] if self.plan else [])

    def __str__(self) -> str:
        lines = ["eventful_fx analysis", *self._summary_lines(), ""]
        groups = _grouped(self.blockers)
        lines.append(f"blockers (stay dense): {len(self.blockers)} nodes" if groups else "blockers: none")
        if groups:
            lines += _table(["MACs", "nodes", "ops", "module", "reason", "source"],
                            [[_fmt_macs(g["macs"]), str(g["count"]), g["ops"], g["modules"], g["reason"],
                              _short_source(g["source"])] for g in groups])
        info = _grouped(self.info)
        if info:
            lines += ["", "token-set changes (info):"]
            lines += _table(["nodes", "ops", "what", "source"],
                            [[str(g["count"]), g["ops"], g["reason"], _short_source(g["source"])] for g in info])
        if self.attention_sites:
            lines += ["", "attention sites:"]
            lines += _table(["site", "heads", "tokens", "MACs", "convertible", "reason"],
                            [[a.name, str(a.heads), str(a.tokens), _fmt_macs(a.macs), "yes" if a.convertible else "no",
                              a.reason or ""] for a in self.attention_sites])
        if self.regions:
            lines += ["", "gated regions:"]
            lines += _table(["region", "nodes", "tokens", "MACs"],
                            [[r.name, str(r.nodes), str(r.tokens), _fmt_macs(r.macs)] for r in self.regions])
        if self.plan:
            lines += ["", f"plan for budget {self.plan.budget}:"]
            lines += _table(["gate", "k", "N"], [[g, str(k), str(n)] for g, (k, n) in self.plan.gates.items()])
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"# eventful_fx analysis: {self.model}", ""] + [f"- {line}" for line in self._summary_lines()] + [""]

        def md(headers, rows):
            cells = lambda r: "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"  # noqa: E731
            return [cells(headers), "|" + "---|" * len(headers)] + [cells(r) for r in rows] + [""]

        out += ["## Blockers", ""]
        groups = _grouped(self.blockers)
        out += md(["MACs", "nodes", "ops", "module", "reason", "source"],
                  [[_fmt_macs(g["macs"]), g["count"], g["ops"], f"`{g['modules']}`" if g["modules"] else "", g["reason"],
                    f"`{_short_source(g['source'])}`"] for g in groups]) if groups else ["None.", ""]
        info = _grouped(self.info)
        if info:
            out += ["## Token-set changes", ""]
            out += md(["nodes", "ops", "what", "source"],
                      [[g["count"], g["ops"], g["reason"], f"`{_short_source(g['source'])}`"] for g in info])
        out += ["## Attention sites", ""]
        out += md(["site", "heads", "tokens", "MACs", "convertible", "reason"],
                  [[a.name, a.heads, a.tokens, _fmt_macs(a.macs), "yes" if a.convertible else "no", a.reason or ""]
                   for a in self.attention_sites]) if self.attention_sites else ["None.", ""]
        out += ["## Gated regions", ""]
        out += md(["region", "nodes", "tokens", "MACs"],
                  [[r.name, r.nodes, r.tokens, _fmt_macs(r.macs)] for r in self.regions]) if self.regions else ["None.", ""]
        if self.plan:
            out += [f"## Plan for budget {self.plan.budget}", ""]
            out += md(["gate", "k", "N"], [[g, k, n] for g, (k, n) in self.plan.gates.items()])
        return "\n".join(out)


# -- building the report -----------------------------------------------------------------

def analyze(model: torch.nn.Module, example_input, *, name: str | None = None, budget: float | None = None,
            attention: str = "query", memory_cap_bytes: int | None = None) -> Report:
    """Capture `model` on `example_input` (a tensor or a tuple of them) and report what can run eventfully.

    With a `budget`, the report also holds the plan compile() would make for it (same `attention`
    and `memory_cap_bytes` options): each gate's k, the predicted MACs and state memory.
    """
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    gm = FuseExplicitAttention().call(capture(model, tuple(inputs)))
    shapes = [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    return analyze_graph(gm, name=name or type(model).__name__, input_shapes=shapes, budget=budget,
                         attention=attention, memory_cap_bytes=memory_cap_bytes)


# Torch-level calls that hide token-wise layers and attention inside one node (Dynamo keeps
# F.multi_head_attention_forward whole); torch.export traces through them.
_FUSED_CALLS = ("multi_head_attention_forward",)


def expand_fused_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """Re-capture a graph with torch.export when it holds fused calls; its inputs only lend their shapes."""
    if not any(op_name(n) in _FUSED_CALLS for n in gm.graph.nodes):
        return gm
    inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = node_value(node)
            inputs.append(torch.randn(value.shape, dtype=value.dtype) if value.is_floating_point()
                          else torch.zeros(value.shape, dtype=value.dtype))
    return capture(gm, tuple(inputs))


def analyze_graph(gm: fx.GraphModule, *, name: str = "graph", input_shapes: list | None = None,
                  budget: float | None = None, attention: str = "query", memory_cap_bytes: int | None = None) -> Report:
    """The report of an already captured graph (torch.export, fx or Dynamo) whose nodes carry values."""
    gm = expand_fused_calls(gm)
    infos = TokenAnalysis(gm).run()
    regions, sites = find_regions(gm, infos)
    mode = attention  # `attention` names the site summaries below
    planner = Planner(gm, infos, regions, sites, _batch(infos, gm), attention=mode, memory_cap_bytes=memory_cap_bytes)
    cost = planner.model(planner.candidates, planner.modes(mode))

    member_of = {n: r for r in regions for n in r.nodes}
    macs_of_region = {r.name: region_macs(r, infos) for r in regions}
    site_of = {s.node: s for s in sites}
    site_ok = {s.node: s.name in cost.converted_sites for s in sites}
    after_tokens = _after_tokens(gm, infos)

    rows, linear_count, convertible_linears = [], 0, 0
    attention_count, explicit = 0, []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        info = infos[node]
        if node.op == "call_function" and op_kind(node) == ops.ATTENTION:
            attention_count += 1
        if info.kind == "attention_matmul" and _follows_softmax(node.args[0], infos):
            attention_count += 1
            explicit.append(node)
        if _is_linear(node, info):
            linear_count += 1
        if not (info.macs or info.carries_tokens):
            continue
        region = member_of.get(node)
        if node in site_of:
            where, convertible = site_of[node].name, site_ok[node]
        else:
            where = region.name if region else None
            convertible = bool(region and macs_of_region[region.name] > 0)
        reason = None if convertible else _dense_reason(node, info, infos, region, site_of, after_tokens)
        if convertible:
            status = CONVERTIBLE
        elif info.kind in _INFO_KINDS and not info.macs:
            status = INFO
        elif info.macs or info.reason or info.opaque:
            status = BLOCKER
        else:
            status = DENSE
        if _is_linear(node, info):
            convertible_linears += convertible
        layout = info.layout
        rows.append(Row(node.name, op_name(node) or str(node.target), info.kind,
                        list(layout.dims) if layout else None, layout.num_tokens if layout else None,
                        int(info.macs), convertible, where, status, reason, source_line(node), _module(node)))

    region_summaries = [RegionSummary(r.name, r.root.name, len(r.nodes), macs_of_region[r.name],
                                      infos[r.root].layout.num_tokens if infos[r.root].layout else None)
                        for r in regions]
    attention = [AttentionSummary(s.name, s.node.name, s.heads, _tokens(infos[s.q]), int(infos[s.node].macs),
                                  site_ok[s.node], True,
                                  None if site_ok[s.node] else s.reason or _NOT_IN_REGION, source_line(s.node))
                 for s in sites]
    attention += [AttentionSummary(f"attn_{n.name}", n.name, 0, _tokens(infos[n]), int(infos[n].macs), False, False,
                                   infos[n].reason, source_line(n)) for n in explicit]
    convertible_macs = sum(m for m in macs_of_region.values() if m > 0) + \
        sum(int(infos[s.node].macs) for s in sites if site_ok[s.node])
    return Report(
        model=name,
        input_shapes=[list(s) for s in (input_shapes or [])],
        dense_macs=int(sum(i.macs for i in infos.values())),
        convertible_macs=int(convertible_macs),
        rows=rows,
        regions=region_summaries,
        attention_sites=attention,
        linear_count=linear_count,
        convertible_linear_count=int(convertible_linears),
        attention_count=attention_count,
        convertible_attention_count=sum(site_ok.values()),
        token_mixing_count=sum(1 for i in infos.values() if i.reason and "token-mixing MLP)" in i.reason),
        macs_expression=str(cost.uniform_expr()),
        token_symbols={str(sym): n for n, sym in cost.symbols.items()},
        plan=_plan_summary(planner, budget, mode) if budget is not None else None,
        graph=gm,
    )


def _batch(infos, gm: fx.GraphModule) -> int:
    """Streams in the graph: the batch of the patch embedding (what the rewrite uses)."""
    for node, info in infos.items():
        if info.kind == "patch_embed":
            return tensor_shape(node)[0]
    shapes = [tensor_shape(n) for n in gm.graph.nodes if n.op == "placeholder"]
    return next((s[0] for s in shapes if s), 1)


def _plan_summary(planner: Planner, budget: float, attention: str) -> PlanSummary:
    d = planner.plan(budget)
    return PlanSummary(budget, attention, int(round(d.predicted_macs)), d.model.dense_macs, d.state_bytes,
                       {g: [k, d.model.gates[g].num_tokens] for g, k in d.ks.items()}, dict(d.model.converted_sites))


def _symbols(symbols: dict[str, int]) -> str:
    return ", ".join(f"{s} = {n}" for s, n in symbols.items())


def _plan_line(plan: PlanSummary) -> str:
    return (f"plan for budget {plan.budget} ({plan.attention} attention): {plan.predicted_macs / 1e9:.3f} GMACs per "
            f"incremental frame ({100 * plan.fraction:.1f}% of dense), {len(plan.gates)} gates, "
            f"state {plan.state_bytes / 2**20:.1f} MiB")


_NOT_IN_REGION = "its queries are not computed inside a gated region"


def _module(node: fx.Node) -> str:
    """The innermost module of the node (torch.export and Dynamo record `nn_module_stack`)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self__.", "")


def _tokens(info: NodeInfo) -> int | None:
    return info.layout.num_tokens if info.layout else None


def _is_linear(node: fx.Node, info: NodeInfo) -> bool:
    """A linear layer: F.linear / aten.linear, or a matmul the token analysis read as x @ W."""
    return node.op == "call_function" and (op_name(node) == "linear" or info.kind == ops.LINEAR)


def _follows_softmax(node, infos, depth: int = 8) -> bool:
    """The attention weights of an explicit `softmax(q @ k^T) @ v`: a softmax a few cheap ops upstream."""
    while isinstance(node, fx.Node) and depth > 0:
        if op_name(node) in ("softmax", "_softmax"):
            return True
        if infos[node].macs or not node.all_input_nodes:
            return False
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node.all_input_nodes[0]
        depth -= 1
    return False


def _after_tokens(gm: fx.GraphModule, infos) -> set[fx.Node]:
    """Nodes computed from a token-carrying value (downstream of the patch embedding)."""
    after: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if any(infos[a].carries_tokens or a in after for a in node.all_input_nodes):
            after.add(node)
    return after


def _dense_reason(node, info: NodeInfo, infos, region, site_of, after_tokens) -> str | None:
    """Why a node runs densely: the token analysis' reason, or one derived from where the node sits."""
    if node in site_of:
        return site_of[node].reason or _NOT_IN_REGION
    if info.reason:
        return info.reason
    if info.opaque:
        return "its token layout could not be followed"
    if info.kind == "patch_embed":
        return "patch embedding: it makes the tokens, gates start after it"
    if not info.carries_tokens:
        if node in after_tokens:
            return "carries no tokens: runs after the tokens were reduced (class token, pooling) or mixed"
        if info.kind == ops.CONV:
            return "a convolution that is no patch embedding (stride != kernel) runs before the tokens exist"
        if not any(i.carries_tokens for i in infos.values()):
            return "carries no tokens: the model has no patch embedding (a conv with stride = kernel), so no tokens"
        return "carries no tokens: runs before the patch embedding"
    if region is not None:
        return "its gated region holds no MACs: not worth a gate"
    if info.tokenwise:
        token_inputs = [a for a in node.all_input_nodes if infos[a].carries_tokens]
        if len(token_inputs) > 1:
            return "joins values of several gated regions (residual add): runs densely, cheaply"
        return "token-wise, but its input's token layout is not a clean token axis"
    return None


# -- formatting ---------------------------------------------------------------------------

def _fmt_macs(macs: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.2f}{unit}"
    return str(macs)


_SOURCE = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)(?:, in (?P<fn>\S+))?')


def _short_source(source: str) -> str:
    """`File ".../site-packages/timm/models/vit.py", line 12, in forward` -> `timm/models/vit.py:12 forward`."""
    m = _SOURCE.search(source or "")
    if not m:
        return source or ""
    path = m["path"]
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = "/".join(path.split("/")[-2:])
    return f"{path}:{m['line']}" + (f" {m['fn']}" if m["fn"] else "")


def _grouped(rows: list[Row]) -> list[dict]:
    """Rows with the same reason and source line, merged (a 12-block model repeats each blocker 12 times)."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault((r.reason, r.source), {"reason": r.reason or "", "source": r.source, "count": 0,
                                                     "macs": 0, "ops": [], "modules": []})
        g["count"] += 1
        if r.module and r.module not in g["modules"]:
            g["modules"].append(r.module)
        g["macs"] += r.macs
        if r.op not in g["ops"]:
            g["ops"].append(r.op)
    out = sorted(groups.values(), key=lambda g: -g["macs"])
    for g in out:
        g["ops"] = ",".join(g["ops"])
        mods = g["modules"]
        g["modules"] = "" if not mods else mods[0] if len(mods) == 1 else f"{mods[0]} (+{len(mods) - 1})"
    return out


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
