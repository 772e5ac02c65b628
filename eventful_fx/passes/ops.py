"""The op-kind table: the one place that says how each op treats tokens.

Graphs come in several spellings — `torch.export` (aten overloads such as
`aten.linear.default`), Dynamo (`torch._C._nn.linear`, `operator.add`, `call_method`
"reshape") and `fx.symbolic_trace` — and all map to one canonical op name, then to a kind.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

# Kinds. Token-wise kinds can run on a subset of tokens; layout kinds move axes around;
# the others mix or drop tokens and bound the gated regions.
LINEAR = "linear"            # acts on the channel axis only (F.linear, x @ W)
NORM = "norm"                # normalises over channel axes
ELEMENTWISE = "elementwise"  # per element, with broadcast constants
REDUCE = "reduce"            # reduction over a dim: token-wise unless the dim is a token axis
RESHAPE = "reshape"          # splits / merges axes
PERMUTE = "permute"          # moves axes
EXPAND = "expand"            # broadcasts size-1 axes
UNFOLD = "unfold"            # sliding (or non-overlapping) windows along an axis: a layout op that never runs sparse
INDEX = "index"              # unbind / select / split / slice along one dim
GETITEM = "getitem"          # picks an output of a multi-output node (or indexes a tensor)
CAT = "cat"                  # concatenation: of tokens (class/register tokens) or of channels
ATTENTION = "attention"      # fused scaled-dot-product attention
MATMUL = "matmul"            # x @ W (linear) or q @ k^T / attn @ v (explicit attention)
EINSUM = "einsum"            # token-wise when the token subscripts pass through; mixes when two token values contract
CONV = "conv"                # a stride == kernel conv on the image is the patch embedding
POOL = "pool"                # spatial pooling: reduces tokens
NOOP = "noop"                # asserts and shape queries: no data
CREATE = "create"            # tensor factories: no token input
UNKNOWN = "unknown"

_TABLE: dict[str, str] = {}


def _register(kind: str, *names: str) -> None:
    for name in names:
        _TABLE[name] = kind


_register(LINEAR, "linear")
_register(NORM, "layer_norm", "rms_norm", "group_norm_channels_last")
_register(
    ELEMENTWISE,
    "add", "iadd", "sub", "rsub", "mul", "imul", "div", "true_divide", "truediv", "floordiv", "neg", "pow",
    "sqrt", "rsqrt", "exp", "log", "erf", "abs", "clamp", "clamp_min", "clamp_max", "gelu", "relu", "relu_",
    "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "mish", "softplus",
    "leaky_relu", "elu", "quick_gelu", "dropout", "dropout_", "feature_dropout", "alpha_dropout", "clone",
    "contiguous", "alias", "detach", "to", "_to_copy", "type_as", "float", "half", "bfloat16", "type",
    "lerp", "addcmul", "masked_fill", "where", "square", "reciprocal", "identity",
)
_register(REDUCE, "mean", "sum", "amax", "amin", "var", "std", "softmax", "_softmax", "log_softmax",
          "_log_softmax", "norm", "linalg_vector_norm", "logsumexp", "max", "min", "argmax")
_register(RESHAPE, "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
          "reshape_as")
_register(PERMUTE, "permute", "transpose", "t", "movedim", "swapaxes", "swapdims")
_register(EXPAND, "expand", "expand_as", "broadcast_to")
_register(UNFOLD, "unfold")
_register(INDEX, "unbind", "select", "split", "split_with_sizes", "chunk", "slice", "narrow", "tensor_split", "pad",
          "constant_pad_nd")
_register(GETITEM, "getitem")
_register(CAT, "cat", "concat", "concatenate")
_register(ATTENTION, "scaled_dot_product_attention")
_register(MATMUL, "matmul", "mm", "bmm")
_register(EINSUM, "einsum")
_register(CONV, "conv2d", "convolution", "_convolution", "conv1d", "conv3d")
_register(POOL, "adaptive_avg_pool2d", "adaptive_avg_pool1d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d",
          "avg_pool1d", "max_pool1d")
_register(NOOP, "_assert_tensor_metadata", "sym_size", "size", "dim", "_assert_scalar", "sym_constrain_range_for_size",
          "_guards_fn", "assert_", "_assert")
_register(CREATE, "arange", "zeros", "ones", "full", "empty", "scalar_tensor", "tensor", "zeros_like", "ones_like",
          "linspace", "randn", "rand")

# Spellings of the same op: in-place variants, operator dunders, synonyms.
_ALIASES = {"iadd": "add", "imul": "mul", "relu_": "relu", "silu_": "silu", "dropout_": "dropout",
                    "truediv": "div", "true_divide": "div", "concat": "cat", "concatenate": "cat",
                    "swapaxes": "transpose", "swapdims": "transpose"}


def op_name(node: fx.Node) -> str | None:
    """The canonical name of what a call node computes, whatever the graph's spelling."""
    target = node.target
    if node.op == "call_method":
        name = target
    elif node.op == "call_module":
        name = str(target).rsplit(".", 1)[-1]
    elif node.op != "call_function":
        return None
    elif isinstance(target, torch._ops.OpOverload):
        name = target._opname
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::")[-1]
    elif target is operator.getitem:
        name = "getitem"
    else:
        name = getattr(target, "__name__", str(target))
    if name.startswith("__") and name.endswith("__"):  # operator dunders from Dynamo: __add__ -> add
        name = name.strip("_")
    return _ALIASES.get(name, name)


def op_kind(node: fx.Node) -> str | None:
    name = op_name(node)
    if name is None:
        return None
    if name == "matmul" or name == "mm":
        return MATMUL
    return _TABLE.get(name, UNKNOWN)


def node_value(node: fx.Node):
    """The example value fx recorded for a node (export: "val"; Dynamo: "example_value")."""
    meta = node.meta
    for key in ("val", "example_value"):
        if key in meta:
            return meta[key]
    tm = meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return None


def tensor_shape(node) -> tuple[int, ...] | None:
    value = node_value(node) if isinstance(node, fx.Node) else node
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def source_line(node: fx.Node) -> str:
    """The innermost `File ..., line ...` of the node's stack trace, for reports."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File")
             and "/torch/nn/" not in line and "/torch/_" not in line]  # the model's own code, not torch's
    return lines[-1] if lines else ""
