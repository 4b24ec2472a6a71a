"""The ``asvit`` command: ``search``, ``scale``, ``train``, ``pipeline``, ``bench``, ``info``.

Every subcommand works under ``torchrun --nproc-per-node N asvit ...`` (DDP training, search
evaluations spread over ranks); rank 0 writes files and holds the run directory's lock
(``runlock``: a second run into the same ``--out`` exits 2 naming the holder's PID). Invalid
options exit with status 2 and one line saying why, before any work (every numeric option has a
finite range); so do damaged run-directory files. A non-finite training loss exits 1; a training
run stopped by SIGTERM / SIGINT (Ctrl-C) checkpoints and exits 143 / 130 (rerun the same command
to continue).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import runpy
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

__all__ = ["main", "build_parser"]

EXIT_USAGE, EXIT_FAILED, EXIT_SIGTERM, EXIT_SIGINT = 2, 1, 143, 130
LOG_NAME, AUTO_LOG = "asvit.log", "<run directory>"
BENCHES = ("elastic", "attention", "ntk", "models", "search", "kendall", "progressive")
ARCHS = ("asvit", "vit", "vitas", "vitas-tiny")
SCHEDULES = ("none", "retokenize", "autoprog", "autoprog-manual", "vitas")
EMA_AT_SWITCH_HELP = ("what the EMA copies do at a re-tokenization switch: keep averaging, reseed from the model, "
                      "or restart (reseed and warm up again); default: the preset's")


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- arguments
#
# Types that check ranges while parsing: a bad value is refused before any work starts.

def _int(low: int, high: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}" + (f" and <= {high}" if high else "")
                                             + f", got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _float(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    lo, hi = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not (math.isfinite(v) and inside):
            raise argparse.ArgumentTypeError(f"expected a finite number in {lo}{low:g}, {high:g}{hi}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def _out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("the run directory must not be empty (it would be the current directory)")
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{p} exists and is not a directory")
    return p


def _member(text: str) -> str:
    if text not in ("largest", "smallest"):
        try:
            int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'largest', 'smallest' or an integer index, "
                                             f"got {text!r}") from None
    return text


POSITIVE, COUNT, SEED = _int(1), _int(0), _int(0, 2**63 - 1)
POSITIVE_FLOAT = _float(0.0, low_open=True)


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, metavar="DIR",
                   help="ImageFolder (train/<class>/*, val/<class>/*) or CIFAR-10/100 python directory; "
                        "default: the bundled digits (32x32, 10 classes)")


def _add_output_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """-v / -q / --log-file / --progress-interval: accepted before and after the subcommand (a
    subcommand's copy has no default, so it never overwrites what was given before it)."""
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("output") if not top else p
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="DEBUG logs on stderr (each NTK call's path, each candidate's indicators)")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="no progress and no INFO logs")
    g.add_argument("--log-file", nargs="?", const=AUTO_LOG, default=d(None), metavar="PATH",
                   help=f"write the full DEBUG log to PATH (default: OUT/{LOG_NAME}, in the run directory)")
    g.add_argument("--progress-interval", type=_float(0.0), default=d(None), metavar="SECONDS",
                   help="when stderr is not a terminal: seconds between two progress lines (default "
                        "$ASVIT_PROGRESS_INTERVAL or 30)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=SEED, default=0)
    _add_output_options(p, top=False)


def _add_train_options(p: argparse.ArgumentParser, *, defaults_from_preset: bool) -> None:
    d = None if defaults_from_preset else argparse.SUPPRESS
    g = p.add_argument_group("training (default: the preset's)" if defaults_from_preset else "training")
    g.add_argument("--epochs", type=POSITIVE, default=d)
    g.add_argument("--batch-size", type=POSITIVE, default=d, help="per process")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=d)
    g.add_argument("--min-lr", type=_float(0.0), default=d, help="must not exceed --lr")
    g.add_argument("--weight-decay", type=_float(0.0), default=d)
    g.add_argument("--warmup-epochs", type=_float(0.0), default=d)
    g.add_argument("--label-smoothing", type=_float(0.0, 1.0), default=d)
    g.add_argument("--clip-grad", type=POSITIVE_FLOAT, default=d)
    g.add_argument("--drop-path", type=_float(0.0, 0.99), default=d)
    g.add_argument("--ema-decays", type=_float(0.0, 1.0, high_open=True), nargs="*", default=d)
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=d)
    g.add_argument("--workers", type=COUNT, default=d, dest="num_workers")
    g.add_argument("--eval-batches", type=POSITIVE, default=d)
    g.add_argument("--checkpoint-every", type=COUNT, default=d, help="also checkpoint every N steps")
    g.add_argument("--tensorboard", action="store_true", default=d)


def build_parser() -> argparse.ArgumentParser:
    from asvit_kernels.pipeline.presets import PRESETS
    from asvit_kernels.train.retokenize import EMA_AT_SWITCH
    parser = _Parser(prog="asvit", description="Search, scale and train Vision Transformers (asvit-kernels).")
    _add_output_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="build info and the devices; with --op, which backend a call gets and why")
    p.add_argument("--json", action="store_true")
    p.add_argument("--op", default=None, help="varlen_attention, per_sample_grad_gram, elastic_linear or "
                   "elastic_layer_norm: print the dispatch of one call of it")
    p.add_argument("--dtype", default="float32", help="fp32|fp16|bf16|fp64 (or float32, ...) of the call")
    p.add_argument("--head-dim", type=POSITIVE, default=None, help="attention head dim of the call")
    p.add_argument("--features", default="", help="comma list of attention features: window,softcap,alibi,dropout")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when --arch is given or a GPU "
                   "is here, else cpu)")
    p.add_argument("--arch", type=POSITIVE, default=None, help="a CUDA compute capability such as 70, 80, 90: "
                   "describe that GPU (availability on this machine is then not checked)")
    _add_output_options(p, top=False)

    p = sub.add_parser("search", help="As-ViT topology search (REINFORCE on kappa and L^E)")
    _add_data(p)
    p.add_argument("--out", required=True, type=_out_dir)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--steps", type=POSITIVE, default=None)
    p.add_argument("--repeats", type=POSITIVE, default=None)
    _add_common(p)

    p = sub.add_parser("scale", help="grow a searched topology into a family (As-ViT scaling)")
    _add_data(p)
    p.add_argument("--out", required=True, type=_out_dir)
    p.add_argument("--genotype", required=True, help="the seed topology, e.g. '8,2,3|4,1,2|4,1,4|4,1,6|32'")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--param-limit", type=POSITIVE_FLOAT, nargs=2, metavar=("STOP", "DROP"), default=None)
    p.add_argument("--repeats", type=POSITIVE, default=None)
    _add_common(p)

    p = sub.add_parser("train", help="train one model with a schedule (re-tokenization, AutoProg, ViTAS)")
    _add_data(p)
    p.add_argument("--out", required=True, type=_out_dir)
    p.add_argument("--arch", choices=ARCHS, default="asvit")
    p.add_argument("--genotype", default="8,2,3,2|4,1,2,2|4,1,4,3|4,1,6,2|32,32",
                   help="As-ViT genotype (--arch asvit)")
    p.add_argument("--embed-dim", type=POSITIVE, default=192, help="--arch vit")
    p.add_argument("--depth", type=POSITIVE, default=12, help="--arch vit")
    p.add_argument("--heads", type=POSITIVE, default=3, help="--arch vit")
    p.add_argument("--patch-size", type=POSITIVE, default=4, help="--arch vit")
    p.add_argument("--vitas-scale", type=POSITIVE_FLOAT, default=1.0,
                   help="--arch vitas: width scale of the ViTAS space")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="default: retokenize for asvit, autoprog for vit, vitas for vitas archs")
    p.add_argument("--retokenize", default="paper", help="'paper', 'none' or 'FRACTION:STRIDE[:DILATION],...'")
    p.add_argument("--ema-at-switch", choices=EMA_AT_SWITCH, default=None, help=EMA_AT_SWITCH_HELP)
    p.add_argument("--autoprog-stages", type=POSITIVE, default=4)
    p.add_argument("--flops-range", type=POSITIVE_FLOAT, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="--schedule vitas: the sub-network FLOPs window p_identity is calibrated to")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="training defaults")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    _add_train_options(p, defaults_from_preset=True)
    _add_common(p)

    p = sub.add_parser("pipeline", help="search -> scale -> train -> report.md (resumable)")
    _add_data(p)
    p.add_argument("--out", required=True, type=_out_dir, help="run directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--search-steps", type=POSITIVE, default=None)
    p.add_argument("--repeats", type=POSITIVE, default=None)
    p.add_argument("--param-limit", type=POSITIVE_FLOAT, nargs=2, metavar=("STOP", "DROP"), default=None)
    p.add_argument("--member", type=_member, default=None,
                   help="family member to train: largest | smallest | index (checked against the family "
                        "once scaling has found it; changing it later keeps the search and scaling results)")
    p.add_argument("--retokenize", default=None)
    p.add_argument("--ema-at-switch", choices=EMA_AT_SWITCH, default=None, help=EMA_AT_SWITCH_HELP)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (stages, steps, epochs) and its time estimated from a few timed steps, "
                        "then exit without writing anything")
    _add_train_options(p, defaults_from_preset=True)
    _add_common(p)

    p = sub.add_parser("bench", help="run a benchmark script of the source tree's bench/ directory")
    p.add_argument("name", choices=BENCHES)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (e.g. --device cuda)")
    _add_output_options(p, top=False)
    return parser


# ----------------------------------------------------------------------------- commands

def _check_ranges(args: argparse.Namespace) -> None:
    """The checks that involve two values (single values are checked while parsing), before the
    run directory is created or locked."""
    if args.command in ("train", "pipeline"):  # TrainConfig checks e.g. min_lr <= lr, with the preset's values
        from asvit_kernels.pipeline import run
        run.train_config(_preset(args), seed=args.seed, **_train_overrides(args))
    for name, (lo_name, hi_name) in (("param_limit", ("STOP", "DROP")), ("flops_range", ("LOW", "HIGH"))):
        pair = getattr(args, name, None)
        if pair is not None and pair[0] > pair[1]:
            raise UsageError(f"--{name.replace('_', '-')}: {lo_name} ({pair[0]:g}) must not exceed "
                             f"{hi_name} ({pair[1]:g})")


def _exit_status(train_summary: Mapping[str, Any]) -> int:
    if train_summary["status"] != "interrupted":
        return 0
    return EXIT_SIGINT if train_summary.get("signal") == "SIGINT" else EXIT_SIGTERM


@contextlib.contextmanager
def _run_dir_lock(args: argparse.Namespace) -> Iterator[None]:
    """Hold ``--out``'s lock for the command (rank 0 only: RANK is set by torchrun)."""
    out = getattr(args, "out", None)
    if out is None or os.environ.get("RANK", "0") != "0" or getattr(args, "dry_run", False):  # dry run: no files
        yield
        return
    from asvit_kernels import runlock
    try:
        with runlock.hold(out):
            yield
    except runlock.RunDirectoryLocked as e:
        raise UsageError(f"asvit: error: {e}") from None


def _preset(args, **extra):
    from asvit_kernels.pipeline.presets import preset
    changes = {"search_steps": getattr(args, "steps", None) or getattr(args, "search_steps", None),
               "repeats": getattr(args, "repeats", None), "member": getattr(args, "member", None),
               "retokenize": getattr(args, "retokenize", None), "ema_at_switch": getattr(args, "ema_at_switch", None)}
    if getattr(args, "param_limit", None) is not None:
        changes["param_limit"] = tuple(args.param_limit)
    return preset(args.preset).with_(**changes, **extra)


def _train_overrides(args) -> dict[str, Any]:
    keys = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "clip_grad",
            "drop_path", "amp", "num_workers", "eval_batches", "checkpoint_every", "tensorboard")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "ema_decays", None) is not None:
        out["ema_decays"] = tuple(args.ema_decays)
    if args.quiet:
        out["progress"] = False
    return out


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64", "half": "float16"}


def cmd_info_op(args) -> int:
    """``asvit info --op``: the backend one call gets, and why each other backend was not chosen."""
    import torch

    from asvit_kernels import backends, capabilities
    name = _DTYPES.get(args.dtype, args.dtype)
    if name not in ("float32", "float16", "bfloat16", "float64"):
        raise UsageError(f"asvit info: --dtype must be fp32, fp16, bf16 or fp64, got {args.dtype!r}")
    if args.op not in capabilities.TABLE:
        raise UsageError(f"asvit info: --op must be one of {', '.join(capabilities.TABLE)}, got {args.op!r}")
    features = tuple(f for f in args.features.split(",") if f)
    if bad := sorted(set(features) - set(capabilities.ATTENTION_FEATURES)):
        raise UsageError(f"asvit info: --features: unknown {', '.join(bad)}; choose from {','.join(capabilities.ATTENTION_FEATURES)}")
    device = torch.device(args.device or ("cuda" if args.arch or torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, name)
    verdicts = backends.explain(args.op, device, dtype, arch=args.arch, head_dim=args.head_dim,
                                features=features, check_available=args.arch is None)
    if args.json:
        print(json.dumps([v._asdict() for v in verdicts], indent=1))
        return 0
    where = f"sm_{args.arch} (described, not detected)" if args.arch else device.type
    print(f"{args.op}, {name}" + (f", head dim {args.head_dim}" if args.head_dim else "")
          + (f", features {','.join(features)}" if features else "") + f", on {where}:")
    for v in verdicts:
        tc = "tensor cores" if v.tensor_cores else ("no tensor cores" if device.type == "cuda" else "")
        state = "CHOSEN" if v.chosen else f"not chosen: {v.reason}"
        print(f"  {v.backend:12s} {tc:16s} {state}")
    if device.type == "cuda" and not verdicts[0].tensor_cores:
        print("  no backend does this call on tensor cores here")
    return 0


def cmd_info(args) -> int:
    import torch

    import asvit_kernels
    if args.op is not None:
        return cmd_info_op(args)
    info = asvit_kernels.build_info()
    info["torch"] = torch.__version__
    info["devices"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                       if torch.cuda.is_available() else ["cpu"])
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        for k, v in info.items():
            print(f"{k:32s} {v}")
    return 0


def cmd_search(args) -> int:
    from asvit_kernels.pipeline import run
    from asvit_kernels.train.data import open_dataset
    preset = _preset(args)
    result = run.run_search(args.out, open_dataset(args.data, seed=args.seed), preset, seed=args.seed,
                            progress=False if args.quiet else None)
    print(result["genotype"])
    return 0


def cmd_scale(args) -> int:
    from asvit_kernels.models.genotype import Genotype
    from asvit_kernels.pipeline import run
    from asvit_kernels.train.data import open_dataset
    Genotype.parse(args.genotype)  # ValueError naming the field
    result = run.run_scale(args.out, open_dataset(args.data, seed=args.seed), _preset(args), args.genotype,
                           seed=args.seed, progress=False if args.quiet else None)
    for a in result["family"]:
        print(f"{a['genotype']}\t{a['params'] / 1e6:.2f}M params\tkappa {a['kappa']:.4g}\tL^E {a['length_distortion']:.4g}")
    return 0


def _train_model_and_strategy(args, data):
    """(model, strategy) for ``asvit train``'s --arch / --schedule combination."""
    import torch

    from asvit_kernels.models.asvit import AsViT
    from asvit_kernels.models.elastic_vit import ElasticViT
    from asvit_kernels.models.genotype import Genotype
    from asvit_kernels.models.subnet import SubnetSpace
    from asvit_kernels.models.vit import ViT
    from asvit_kernels.train.strategy import Strategy
    default = {"asvit": "retokenize", "vit": "autoprog", "vitas": "vitas", "vitas-tiny": "vitas"}[args.arch]
    schedule = args.schedule or default
    allowed = {"asvit": ("retokenize", "none"), "vit": ("autoprog", "autoprog-manual", "none"),
               "vitas": ("vitas",), "vitas-tiny": ("vitas",)}[args.arch]
    if schedule not in allowed:
        raise UsageError(f"--schedule {schedule} does not apply to --arch {args.arch} (use one of {', '.join(allowed)})")
    size = data.image_size
    torch.manual_seed(args.seed)  # the same initial weights on every rank and on resume
    if args.arch == "asvit":
        g = Genotype.parse(args.genotype)
        model = AsViT.from_genotype(g, num_classes=data.num_classes, img_size=size)
        if schedule == "none":
            return model, Strategy()
        from asvit_kernels.train.retokenize import Retokenize, parse_stages
        return model, Retokenize(parse_stages(args.retokenize, g.kernels[0], size),
                                 ema_at_switch=_preset(args).ema_at_switch)
    if args.arch == "vit":
        if size % args.patch_size:
            raise UsageError(f"--patch-size {args.patch_size} must divide the image size {size}")
        if schedule == "none":
            return ViT(img_size=size, patch_size=args.patch_size, num_classes=data.num_classes,
                       embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads), Strategy()
        from asvit_kernels.train.autoprog import AutoProg, elastic_vit_for_autoprog
        model = elastic_vit_for_autoprog(img_size=size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                                         depth=args.depth, num_heads=args.heads, num_classes=data.num_classes)
        multiple = args.patch_size * max(1, round(size / 7 / args.patch_size))  # ~1/7 of the size, patch-aligned
        return model, AutoProg(max_size=size, max_depth=args.depth, stages=args.autoprog_stages,
                               search=schedule == "autoprog", size_multiple=multiple)
    from asvit_kernels.train.vitas import SupernetTraining
    space = SubnetSpace.tiny() if args.arch == "vitas-tiny" else SubnetSpace.vitas(args.vitas_scale)
    model = ElasticViT(space, img_size=size, num_classes=data.num_classes, sharing="cyclic", private_qk=True)
    rng = tuple(args.flops_range) if args.flops_range else None
    return model, SupernetTraining(flops_range=rng)


def cmd_train(args) -> int:
    from asvit_kernels.pipeline import run
    from asvit_kernels.search import distributed
    from asvit_kernels.train.data import open_dataset
    from asvit_kernels.train.trainer import Trainer
    config = run.train_config(_preset(args), seed=args.seed, **_train_overrides(args))
    distributed.init_from_env()
    try:
        data = open_dataset(args.data, seed=args.seed)
        model, strategy = _train_model_and_strategy(args, data)
        summary = Trainer(model, data, config, strategy=strategy, run_dir=args.out).fit(resume=not args.no_resume)
        if distributed.is_main():
            print(json.dumps({k: v for k, v in summary.items() if k != "epochs"}, default=str))
    finally:
        distributed.shutdown()
    return _exit_status(summary)


def cmd_pipeline(args) -> int:
    from asvit_kernels.pipeline import run
    if args.dry_run:
        from asvit_kernels.pipeline.plan import plan_pipeline, plan_text
        from asvit_kernels.train.data import open_dataset
        preset = _preset(args)
        config = run.train_config(preset, seed=args.seed, **_train_overrides(args))
        print(plan_text(plan_pipeline(preset, open_dataset(args.data, seed=args.seed), config, seed=args.seed)))
        return 0
    from asvit_kernels.search import distributed
    distributed.init_from_env()
    try:
        results = run.run_pipeline(args.out, _preset(args), data_path=args.data, seed=args.seed,
                                   train_overrides=_train_overrides(args),
                                   command="asvit " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                                   progress=False if args.quiet else None)
    finally:
        distributed.shutdown()
    train = results["train"]
    if train["status"] != "finished":
        return _exit_status(train)
    if distributed.is_main():
        print(f"{args.out / 'report.md'}: {train['genotype']} top-1 {train['final_acc']:.2f}% "
              f"(chance {train['chance_acc']:.1f}%)")
    return 0


def cmd_bench(args) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.name}.py"
    if not script.exists():
        raise UsageError(f"bench scripts ship with the source tree, not the wheel: {script} not found "
                         f"(clone the repository and pip install -e .)")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


COMMANDS = {"info": cmd_info, "search": cmd_search, "scale": cmd_scale, "train": cmd_train,
            "pipeline": cmd_pipeline, "bench": cmd_bench}


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """The command's logging (library code only logs; handlers are the command's business):
    asvit_kernels' INFO on stderr (-v: DEBUG, -q: WARNING), through tqdm when bars are shown, and
    with --log-file everything down to DEBUG in a file. Other libraries' loggers stay at WARNING.
    Everything installed here is removed again when the command ends."""
    from asvit_kernels import progress
    console_level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handlers: list[logging.Handler] = []
    console = (progress.TqdmLoggingHandler if progress.mode(False if args.quiet else None) == "bar"
               else logging.StreamHandler)(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handlers.append(console)
    if args.log_file is not None:
        path = Path(args.log_file) if args.log_file != AUTO_LOG else None
        if path is None:
            if getattr(args, "out", None) is None or getattr(args, "dry_run", False):
                raise UsageError(f"asvit {args.command}: --log-file needs a PATH here (no run directory is written)")
            path = args.out / LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path, encoding="utf-8")
        file.setLevel(logging.DEBUG)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file)
    root, ours = logging.getLogger(), logging.getLogger("asvit_kernels")
    saved = ours.level
    ours.setLevel(min(h.level for h in handlers))  # other loggers keep the root's level (WARNING)
    for h in handlers:
        root.addHandler(h)
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")  # other libraries' tqdm bars too, for this command
    progress.set_interval(args.progress_interval)
    try:
        yield
    finally:
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        progress.set_interval(None)
        for h in handlers:
            root.removeHandler(h)
            h.close()
        ours.setLevel(saved)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from asvit_kernels.train.trainer import NonFiniteLossError
    try:
        args = build_parser().parse_args(argv)
        if args.verbose and args.quiet:
            raise UsageError("asvit: -v/--verbose and -q/--quiet exclude each other")
        _check_ranges(args)
        with _run_dir_lock(args), _logging(args):
            return COMMANDS[args.command](args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as e:
        # Library validation errors name the argument or path: the reason, not a traceback
        # (ASVIT_DEBUG=1 shows the traceback).
        if os.environ.get("ASVIT_DEBUG"):
            raise
        print(f"asvit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as e:
        print(f"asvit: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # outside training (search, scaling): their state is saved after every step
        print("asvit: interrupted (Ctrl-C); the run directory holds the last completed step: rerun the same "
              "command to continue", file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
