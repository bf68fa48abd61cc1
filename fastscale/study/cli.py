"""`fastscale study`: argument parsing and the run itself, with one-line errors for bad input."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time

from .tasks import TASKS, StudyError

DEPENDENCIES = {"matplotlib": "matplotlib", "tqdm": "tqdm"}  # module -> pip name; sklearn: digits only


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_list(kind: type, kinds: str, what: str, requirement: str):
    """An argparse type: comma-separated values of ``kind``, each finite and > 0."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kinds}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what}")
        bad = [v for v in values if not 0 < v < float("inf")]
        if bad:
            raise argparse.ArgumentTypeError(f"{requirement}, got {bad[0]}")
        return values
    return parse


_positive_ints = _positive_list(int, "integers", "batch size", "batch sizes must be > 0")
_factors = _positive_list(float, "numbers", "number", "factors must be finite numbers > 0")


def _positive_floats(text: str) -> list[float]:
    return sorted(set(_factors(text)))


def _number(kind: type, valid, requirement: str):
    """An argparse type: ``kind(text)`` that must satisfy ``valid``, else ``requirement`` is said."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "> 0")
_factor = _number(float, lambda v: 1 < v < float("inf"), "a number > 1")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
_momentum = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
_seed = _number(int, lambda v: 0 <= v < 2**40, "an integer in [0, 2**40)")



def _parts(text: str) -> list[str]:
    from .run import PARTS

    parts = [p for p in text.replace(" ", "").split(",") if p]
    for p in parts:
        if p not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {p!r} (choose from {', '.join(PARTS)})")
    return parts


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (choose cpu, cuda or cuda:N)")
    return text


def _rules(text: str) -> list[str]:
    from .run import RULES

    rules = [r for r in text.replace(" ", "").split(",") if r]
    for r in rules:
        if r not in RULES:
            raise argparse.ArgumentTypeError(f"unknown scaling rule {r!r} (choose from {', '.join(RULES)})")
    if not rules:
        raise argparse.ArgumentTypeError("expected at least one scaling rule")
    return list(dict.fromkeys(rules))  # in order, without repeats


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    from .parallel import default_jobs

    p = subparsers.add_parser(
        "study",
        help="measure the critical batch size, compare it with the online estimate, compare lr scaling rules",
        description="Measure the critical batch size of real tasks by branching a reference run at several points of "
        "training and continuing each branch at a ladder of batch sizes (lr tuned per batch size); compare it with "
        "the optimizer's online B_simple estimate; and train every batch size from scratch under each lr scaling "
        "rule (none, linear, sqrt, noise). Writes report.md (the recommendation first), results.json and plots.",
    )
    p.add_argument("--task", "--dataset", dest="task", choices=[*TASKS, "all"], default="all",
                   help="digits (small CNN on scikit-learn's digits), lstsq (least squares, known noise scales), "
                   "charlm (character-level transformer on the Python Language Reference shipped with CPython), "
                   "or all (default)")
    p.add_argument("--model", choices=["cnn", "mlp"], default=None, help="model for the digits task (default cnn)")
    p.add_argument("--skip", type=_parts, default=[], metavar="PART",
                   help="leave out a part: critical (the branching measurement), rules (the from-scratch comparison) "
                   "or adaptive (the adaptive batch-size arm, compared with the rules part)")
    g = p.add_argument_group("the critical batch size (branching)")
    g.add_argument("--branch-batch-sizes", type=_positive_ints, default=None,
                   help="the ladder each branch continues at; the smallest is the reference (task default, e.g. "
                   "8,16,...,512)")
    g.add_argument("--branch-points", type=_positive_ints, default=None,
                   help="examples into the reference run at which to branch (task default: early, middle, late)")
    g.add_argument("--branch-examples", type=_positive_int, default=None,
                   help="examples the smallest-batch branches train; their loss there is the target (task default)")
    g.add_argument("--lr-factors", type=_positive_floats, default=None,
                   help="lr grid per batch size, as factors of the linear-scaling guess (default 0.5,0.71,1,1.41; "
                   "quick 0.5,1,2)")
    g.add_argument("--seeds", type=_positive_int, default=None, help="repeated seeds per batch size and lr (3; quick 2)")
    g.add_argument("--crit-factor", type=_factor, default=2.0,
                   help="B passes while its examples to target are within this factor of the smallest batch's (2)")
    g.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap replicates for intervals (1000)")
    g = p.add_argument_group("scaling rules from scratch")
    g.add_argument("--batch-sizes", type=_positive_ints, default=None,
                   help="comma-separated ladder (task default: 8·k for k=1..7 and powers of two up to 1024)")
    g.add_argument("--rules", type=_rules, default=None, help="comma-separated subset of none,linear,sqrt,noise")
    g.add_argument("--target-loss", type=_positive_float, default=None, help="held-out loss to reach (task default)")
    g.add_argument("--max-examples", type=_positive_int, default=None, help="examples per run (task default)")
    g.add_argument("--min-steps", type=_positive_int, default=None, help="steps per run at least (60; quick 20)")
    g.add_argument("--warmup-examples", type=_positive_int, default=None,
                   help="warmup length in examples (task default: digits 512, lstsq 128)")
    g = p.add_argument_group("the adaptive arm (fastscale.AdaptiveBatchSize, from the smallest to the largest batch "
                             "of the rules ladder)")
    g.add_argument("--adaptive-factor", type=_positive_float, default=2.0,
                   help="c in B = clamp(c · B_simple, B_min, B_max) (2)")
    g.add_argument("--adaptive-check-every", type=_positive_int, default=5,
                   help="steps between reads of the estimate (5)")
    g.add_argument("--adaptive-max-growth", type=_factor, default=4.0, help="largest factor of one increase (4)")
    g.add_argument("--adaptive-rule", choices=["none", "linear", "sqrt", "noise"], default="linear",
                   help="the optimizer's lr rule in the adaptive run (linear)")
    g.add_argument("--adaptive-rewarmup-steps", type=_number(int, lambda v: v >= 0, ">= 0"), default=3,
                   help="steps of lr re-warmup after each increase (3)")
    g = p.add_argument_group("training")
    g.add_argument("--base-batch-size", type=_positive_int, default=8, help="batch size the base lr is for (8)")
    g.add_argument("--lr", type=_positive_float, default=None, help="base learning rate at the base batch size (task default)")
    g.add_argument("--momentum", type=_momentum, default=None, help="SGD momentum (task default)")
    g.add_argument("--micro-batches", type=_positive_int, default=2,
                   help="micro-batches per step for the noise-scale estimate (2)")
    g.add_argument("--noise-source", choices=["micro", "per-example"], default="micro",
                   help="small-batch gradients for B_simple: micro-batches (default) or per-example norms")
    g.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    g.add_argument("--impl", choices=["auto", "torch", "native"], default="auto",
                   help="fastscale kernels: auto (compiled where built), torch (pure torch), native")
    g.add_argument("--jobs", type=_positive_int, default=None,
                   help=f"worker processes, one run each at a time (default: the CPUs available, at most 8, here "
                   f"{default_jobs('cpu')}; 1 with --device cuda); results do not depend on it")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads per worker (1: the models are tiny; more threads only add overhead)")
    g.add_argument("--seed", type=_seed, default=0, help="seed: same seed, same results.json")
    p.add_argument("--out", default="fastscale-study",
                   help="report folder (default ./fastscale-study); replaced whole at the end of the run")
    p.add_argument("--quick", action="store_true", help="a short ladder, fewer seeds and lrs (under a minute)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_study_command)
    return p


def _check_dependencies(tasks: list[str]) -> None:
    needed = dict(DEPENDENCIES)
    if "digits" in tasks:
        needed["sklearn"] = "scikit-learn"
    for module, package in needed.items():
        try:
            __import__(module)
        except ImportError:
            raise StudyError(
                f"fastscale study needs {package}: pip install 'fastscale[study]' (or: pip install {package})"
            ) from None


def _ops_description(impl: str, device: str) -> str:
    if impl == "torch":
        return "pure torch (--impl torch)"
    from fastscale import _extension

    compiled = _extension.native_device_types()
    dev = device.split(":")[0]
    return f"compiled {dev} kernels" if dev in compiled else f"pure torch ({_extension.unavailable_reason(dev)})"


def _check_ops(impl: str, device: str) -> None:
    """Say once, here, whether the compiled kernels run (workers would each say it again)."""
    if impl == "torch":
        return
    from fastscale import ops

    try:
        ops.check_native(device.split(":")[0], required=impl == "native")
    except RuntimeError as exc:
        raise StudyError(f"--impl native: {exc}") from None


def run_study_command(args) -> int:
    import torch

    from .parallel import Runner, default_jobs
    from .report import check_out, recommendation_line, verdict_line, write_report
    from .run import PARTS, RULES, StudyConfig, check_config, count_runs, run_task

    tasks = list(TASKS) if args.task == "all" else [args.task]
    _check_dependencies(tasks)
    cfg = StudyConfig(
        tasks=tasks,
        model=args.model,
        parts=[p for p in PARTS if p not in args.skip],
        batch_sizes=args.batch_sizes,
        rules=args.rules or list(RULES),
        base_batch_size=args.base_batch_size,
        lr=args.lr,
        momentum=args.momentum,
        target_loss=args.target_loss,
        max_examples=args.max_examples,
        min_steps=args.min_steps or (20 if args.quick else 60),
        warmup_examples=args.warmup_examples,
        micro_batches=args.micro_batches,
        noise_source=args.noise_source,
        branch_batch_sizes=args.branch_batch_sizes,
        branch_points=args.branch_points,
        branch_examples=args.branch_examples,
        lr_factors=args.lr_factors,
        seeds=args.seeds,
        crit_factor=args.crit_factor,
        bootstrap=args.bootstrap,
        adaptive_factor=args.adaptive_factor,
        adaptive_check_every=args.adaptive_check_every,
        adaptive_max_growth=args.adaptive_max_growth,
        adaptive_rule=args.adaptive_rule,
        adaptive_rewarmup_steps=args.adaptive_rewarmup_steps,
        device=args.device,
        seed=args.seed,
        quick=args.quick,
        impl=args.impl,
    )
    check_config(cfg)
    out = check_out(args.out)
    torch.set_num_threads(args.threads)
    _check_ops(cfg.impl, cfg.device)
    jobs = args.jobs or default_jobs(cfg.device)
    from tqdm import tqdm

    start = time.perf_counter()
    show = not args.no_progress and sys.stderr.isatty()
    results = {
        "command": "fastscale " + " ".join(shlex.quote(a) for a in args.argv),
        "config": {k: v for k, v in vars(cfg).items()},
        "environment": {
            "torch": torch.__version__,
            "device": cfg.device,
            "threads": args.threads,
            "jobs": jobs,
            "ops": _ops_description(cfg.impl, cfg.device),
        },
        "tasks": {},
    }
    # shutil falls back to 80×24 where a pty reports a size of 0×0, on which tqdm draws nothing.
    size = shutil.get_terminal_size()
    with tqdm(total=count_runs(cfg), desc="fastscale study", unit="run", disable=not show, file=sys.stderr,
              ncols=size.columns, nrows=size.lines) as bar, Runner(jobs, args.threads, bar) as runner:
        for name in tasks:
            results["tasks"][name] = run_task(name, cfg, runner)
        bar.update(bar.total - bar.n) if bar.total and bar.n < bar.total else None  # ladders that ended early
    written = write_report(results, out, time.perf_counter() - start)
    print(f"fastscale study: wrote {len(written)} files to {out}/ (report.md, results.json, plots) "
          f"in {time.perf_counter() - start:.1f} s")
    for name, res in results["tasks"].items():
        print("  " + recommendation_line(name, res).replace("**", ""))
        print("    " + verdict_line(name, res))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineParser(prog="fastscale", description="fastscale command-line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    add_study_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.argv = argv
    _one_line_warnings()
    try:
        return args.handler(args)
    except StudyError as exc:
        print(f"fastscale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastscale {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warnings() -> None:
    """Warnings (e.g. fastscale falling back to pure torch) as one line each, not two."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show
