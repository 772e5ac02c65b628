"""The `torch.compile` backend: `torch.compile(model, backend="eventful", options={"budget": 0.5})`.

The name resolves without importing eventful_fx first: pyproject.toml declares `eventful`
in the `torch_dynamo_backends` entry-point group, which Dynamo reads the first time it
meets a name it does not know. `options` go to `eventful_fx.compile` (budget included).

Dynamo hands the backend a graph of torch-level calls with the parameters as inputs; the
backend wraps it into an EventfulModule, which re-captures it with `torch.export` (so one
analysis serves every entry point) and owns the state, and hands that module to Inductor
(`torch.compile(..., mode=mode)`; the plan's shapes are static, so it compiles once for the
flush and once for the incremental frames of each budget). `options={"inductor": False}`
runs the eventful graph eagerly instead: no compile time. `eventful_fx.backend(budget=0.5)`
returns a backend with other options; `eventful_fx.reset()` starts a new video in every
module the backends built.
"""
from __future__ import annotations

import weakref

import torch
from torch._dynamo import register_backend
from torch._dynamo.backends import registry

from .api import EventfulModule

_modules: "weakref.WeakSet[EventfulModule]" = weakref.WeakSet()


def backend(budget: float = 0.25, *, inductor: bool = True, mode: str | None = None, **options):
    """A torch.compile backend running the captured graph eventfully with these options, compiled by
    Inductor in `mode` (None, "reduce-overhead", "max-autotune", ...) unless `inductor=False`."""
    if not isinstance(inductor, bool):
        raise ValueError(f"inductor must be True or False, got {inductor!r}")
    if not inductor and mode is not None:
        raise ValueError(f"mode={mode!r} is Inductor's; it has no meaning with inductor=False")

    def compile_graph(gm: torch.fx.GraphModule, example_inputs):
        gm.eval()  # a fresh GraphModule says "training"; Dynamo traced the model in its own mode
        emodel = EventfulModule(gm, budget, **options)
        emodel.seed_from_outputs = True  # a graph after a graph break reads tokens an earlier graph returned
        _modules.add(emodel)
        if not inductor:
            return emodel
        compiled = torch.compile(emodel, mode=mode, dynamic=False)  # top-k shapes are static: no symbolic k
        # a plain function, not the OptimizedModule: Dynamo unwraps a module it is handed back to the eager one
        return lambda *args: compiled(*args)
    return compile_graph


def reset(streams=None) -> None:
    """Next frame is a dense flush for every module built by an eventful torch.compile backend."""
    for emodel in list(_modules):
        emodel.reset(streams)


def compiled_modules() -> list[EventfulModule]:
    """The EventfulModules built by eventful backends so far (for their stats, budget and plan)."""
    return list(_modules)


def eventful(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The backend named "eventful": `torch.compile(model, backend="eventful", mode=..., options={"budget": 0.5, ...})`;
    `mode` is Inductor's, for the eventful graph."""
    options = dict(options or {})
    return backend(options.pop("budget", 0.25), mode=mode, **options)(gm, example_inputs)


# Dynamo registers the entry point itself when it loads this module through it (and would refuse
# a second registration of the name); an import by the user registers it here
if registry._BACKENDS.get("eventful") is None and "eventful" not in registry._COMPILER_FNS:
    register_backend(name="eventful")(eventful)
