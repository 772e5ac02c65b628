"""Canonicalize: attention written out by hand becomes one scaled-dot-product-attention node.

Models spell attention many ways; the analysis, the planner and the rewrite know one: SDPA.
`FuseExplicitAttention().call(gm)` finds

    matmul(q, k.transpose(-2, -1)) [* s | / s] [+ bias] -> softmax(-1) [-> dropout(p=0)] -> matmul(., v)

(q possibly scaled before the product, as timm and ViTDet do) and replaces the chain with
`aten.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=s)`, which computes the same
values. A chain is fused only when each of its intermediate values has no other reader (an
attention map returned or stored must stay), so the graph's outputs never change.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .ops import node_value, op_name

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _arg(node: fx.Node, position: int, name: str, default=None):
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)


def _ndim(node) -> int | None:
    value = node_value(node) if isinstance(node, fx.Node) else None
    return value.ndim if isinstance(value, torch.Tensor) else None


def _transposed_key(node) -> fx.Node | None:
    """k when node is k with its last two axes swapped (transpose / swapaxes / permute / mT), else None."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    name, source = op_name(node), node.args[0] if node.args else None
    ndim = _ndim(source)
    if ndim is None or ndim < 2:
        return None
    if name == "transpose":
        dims = sorted(d % ndim for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
        return source if dims == [ndim - 2, ndim - 1] else None
    if name == "permute":
        perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        expected = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return source if [p % ndim for p in perm] == expected else None
    return None


class FuseExplicitAttention:
    """The pass: `call(gm)` returns gm with every explicit attention chain fused into SDPA (in place)."""

    def call(self, gm: fx.GraphModule) -> fx.GraphModule:
        fused = 0
        for node in list(gm.graph.nodes):
            if not node._erased and node.op in ("call_function", "call_method") and op_name(node) == "matmul":
                fused += self._fuse(gm.graph, node)
        if fused:
            gm.recompile()
        return gm

    def _fuse(self, graph: fx.Graph, scores: fx.Node) -> bool:
        if len(scores.args) != 2:
            return False
        q, kt = scores.args
        k = _transposed_key(kt)
        if k is None or not isinstance(q, fx.Node) or _ndim(q) != _ndim(k) or _ndim(q) < 3:
            return False
        chain = [kt, scores]  # erased once fused: dropout is impure, dead-code elimination would keep it
        scale, bias, previous, node = 1.0, None, scores, _only_user(scores)
        if node is not None and op_name(node) in ("mul", "div") and node.args[0] is scores \
                and isinstance(node.args[1], (int, float)):
            scale = float(node.args[1]) if op_name(node) == "mul" else 1.0 / float(node.args[1])
            chain.append(node)
            previous, node = node, _only_user(node)
        if node is not None and op_name(node) == "add" and len(node.args) == 2 and not node.kwargs:
            bias = node.args[1] if node.args[0] is previous else node.args[0]
            if not isinstance(bias, fx.Node) or bias is previous:
                return False
            chain.append(node)
            node = _only_user(node)
        if node is None or op_name(node) not in ("softmax", "_softmax") or node.kwargs.get("dtype") is not None:
            return False
        dim = _arg(node, 1, "dim")
        if not isinstance(dim, int) or dim % _ndim(node) != _ndim(node) - 1:
            return False
        chain.append(node)
        weights, node = node, _only_user(node)
        if node is not None and op_name(node) == "dropout":
            p, train = _arg(node, 1, "p", 0.5), _arg(node, 2, "train", True)
            if p and train:
                return False
            chain.append(node)
            weights, node = node, _only_user(node)
        if node is None or op_name(node) != "matmul" or len(node.args) != 2 or node.args[0] is not weights:
            return False
        v = node.args[1]
        if not isinstance(v, fx.Node) or _ndim(v) != _ndim(q):
            return False
        with graph.inserting_before(node):
            sdpa = graph.call_function(_SDPA, (q, k, v), {"attn_mask": bias, "scale": scale})
        sdpa.meta = dict(node.meta)
        node.replace_all_uses_with(sdpa)
        for dead in reversed([*chain, node]):
            graph.erase_node(dead)
        return True

