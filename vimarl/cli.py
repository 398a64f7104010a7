"""The `vimarl` command: train | eval | summary | list | plot | sweep | report. Errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vimarl.errors import TrainingInterrupted, VimarlError

USAGE_TRAIN = "vimarl train ALGO ENV [key=value ...] | vimarl train --resume RUN_DIR [key=value ...]"


def _die_with_parent() -> None:
    """A `vimarl train` that a sweep started (VIMARL_PARENT_PID set to the sweep's pid) asks Linux
    for SIGTERM when the sweep dies, even by SIGKILL: the trainer then checkpoints and stops, and
    no orphan keeps writing into a cell that `vimarl sweep --resume` starts again."""
    parent = os.environ.get("VIMARL_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if str(os.getppid()) != parent:  # the sweep died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _train(args: argparse.Namespace) -> None:
    from vimarl.train import train_from_cli

    _die_with_parent()

    positional = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if args.resume:
        if positional:
            raise VimarlError(f"--resume reads the algorithm and env from the run; drop {positional}")
        algo = env = None
    elif len(positional) != 2:
        raise VimarlError(f"train needs ALGO and ENV before the overrides: {USAGE_TRAIN}")
    else:
        algo, env = positional
    run_dir = train_from_cli(algo, env, overrides, args.resume, args.preset)
    print(f"run written to {run_dir}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> None:
    from vimarl.envs.registry import make_env
    from vimarl.checkpoint import load_trained
    from vimarl.train import FINAL_EVAL_SEED, evaluate
    from vimarl.video import write_gif

    if args.episodes < 1:
        raise VimarlError(f"--episodes must be at least 1, got {args.episodes}")
    if args.policy:
        return _eval_policy(args)
    run, algo, content = load_trained(args.run_dir, args.device)
    seed = FINAL_EVAL_SEED if args.seed is None else args.seed  # the trainer's final evaluation episodes
    env = make_env(run.env, args.episodes, seed, args.device, config=run.env_config)
    deterministic = run.train.eval_deterministic if args.sample is None else not args.sample
    metrics: dict = {}
    returns = evaluate(algo, env, seed, deterministic, metrics=metrics)
    main = next(iter(returns.values())).double()
    result = {"run": str(args.run_dir), "algo": run.algo, "env": run.env,
              "env_steps": content["counters"]["env_steps"], "episodes": args.episodes,
              "deterministic": deterministic,
              "return_mean": main.mean().item(), "return_std": main.std(unbiased=False).item(),
              **{k: v.double().mean().item() for k, v in metrics.items()}}
    if len(returns) > 1:
        result["return_by_group"] = {g: r.double().mean().item() for g, r in returns.items()}
    modes = algo.evaluation_modes()  # e.g. VM3-AC's z = 0 and shared-seed executions
    if modes:
        result["return_mean_by_mode"] = {
            label: next(iter(evaluate(algo, env, seed, deterministic, mode=mode).values())).double().mean().item()
            for label, mode in modes.items()}
    if args.gif:
        frames: list = []
        evaluate(algo, make_env(run.env, 1, seed, args.device, config=run.env_config), seed,
                 deterministic, frames)
        result["gif"] = str(write_gif(frames, Path(args.gif), fps=args.fps))
    print(json.dumps(result))


def _eval_policy(args: argparse.Namespace) -> None:
    """`vimarl eval --policy NAME ENV`: a scripted controller (vimarl.envs.controllers) or uniform
    random actions on ENV's evaluation episodes; the default seed is that of every run's final
    evaluation, so the numbers compare with `vimarl eval` of a trained run. Prints the return and
    the env's metrics (e.g. average travel time)."""
    from vimarl.algos.base import UniformPolicy
    from vimarl.envs.controllers import scripted_policy
    from vimarl.envs.registry import make_env
    from vimarl.train import FINAL_EVAL_SEED, evaluate
    from vimarl.video import write_gif

    seed = FINAL_EVAL_SEED if args.seed is None else args.seed
    env = make_env(args.run_dir, args.episodes, seed, args.device)
    policy = (UniformPolicy(env.groups, seed) if args.policy == "uniform"
              else scripted_policy(args.policy, env))
    metrics: dict = {}
    returns = evaluate(policy, env, seed, metrics=metrics)
    main = next(iter(returns.values())).double()
    result = {"policy": args.policy, "env": args.run_dir, "episodes": args.episodes, "seed": seed,
              "return_mean": main.mean().item(), "return_std": main.std(unbiased=False).item(),
              **{k: v.double().mean().item() for k, v in metrics.items()}}
    if args.gif:
        frames: list = []
        evaluate(policy, make_env(args.run_dir, 1, seed, args.device), seed, frames=frames)
        result["gif"] = str(write_gif(frames, Path(args.gif), fps=args.fps))
    print(json.dumps(result))


REFERENCE_LABELS = {"uniform": "uniform random"}
"""How `vimarl summary` names a reference policy (otherwise by its SCRIPTED_POLICIES name)."""


def summary_line(summary: dict) -> str:
    """One line from a run's summary.json: the final evaluation's return, the reference policies'
    returns on the same episodes and, with an oracle, the share of the way from random to it."""
    line = (f"{summary['algo']} on {summary['env']} after {summary['env_steps']:,} env steps: final return "
            f"{summary['eval_return_mean']:.1f} +- {summary['eval_return_std']:.1f} "
            f"({summary['eval_episodes']} episodes)")
    references = summary.get("reference_returns") or {}
    if references:
        line += "; on the same episodes " + ", ".join(f"{REFERENCE_LABELS.get(name, name)} {value:.1f}"
                                                      for name, value in references.items())
    if "oracle_fraction" in summary:
        line += f"; the run covers {100 * summary['oracle_fraction']:.0f}% of the way from uniform random to oracle"
    return line


def _summary(args: argparse.Namespace) -> None:
    path = Path(args.run_dir) / "summary.json"
    if not path.is_file():
        raise VimarlError(f"{path} does not exist; pass the out= directory of a finished vimarl train run")
    try:
        summary = json.loads(path.read_text())
        print(summary_line(summary))
    except (ValueError, KeyError, TypeError) as error:
        raise VimarlError(f"{path} is not a vimarl run summary ({type(error).__name__}: {error})") from None


def _list(args: argparse.Namespace) -> None:
    from vimarl.algos import ALGORITHMS
    from vimarl.envs.registry import ENVIRONMENTS

    print("algorithms:")
    for name, cls in sorted(ALGORITHMS.items()):
        print(f"  {name:<18} [{cls.capabilities.describe()}] {cls.description}")
    print("environments:")
    for name, entry in sorted(ENVIRONMENTS.items()):
        needs = f" (needs vimarl[{entry.requires}])" if entry.requires else ""
        print(f"  {name:<18} {entry.description}{needs}")


def _plot(args: argparse.Namespace) -> None:
    from vimarl.plots import plot_matrix, plot_runs

    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            raise VimarlError(f"{run_dir} is not a directory; pass OUT directories of vimarl train runs")
    if args.matrix:
        out = plot_matrix(Path(args.run_dirs[0]), Path(args.out), args.matrix, args.title)
    else:
        out = plot_runs([Path(d) for d in args.run_dirs], Path(args.out), args.metric, args.x, args.title)
    print(f"plot written to {out}", file=sys.stderr)


def _sweep(args: argparse.Namespace) -> None:
    from vimarl.sweep import sweep

    if args.workers < 1 or args.retries < 0:
        raise VimarlError(f"--workers must be at least 1 and --retries at least 0, got {args.workers} and {args.retries}")
    if args.configs:
        from vimarl.report import resolved_config_lines
        print("\n".join(resolved_config_lines(args.experiment, args.scale)))
        return
    command = "vimarl " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["sweep"] else ""
    sweep_dir = sweep(args.experiment, args.scale, args.backend, args.workers, args.resume, args.out,
                      args.seeds, args.only, args.retries, args.ray_address, command)
    print(sweep_dir)


def _report(args: argparse.Namespace) -> None:
    from vimarl.report import report

    print(f"report written to {report(args.sweep_dir, args.out)}", file=sys.stderr)


def _archive(args: argparse.Namespace) -> None:
    from vimarl.sweep import archive, read_ledger

    dest = args.dest or f"docs/results/{read_ledger(args.sweep_dir)['experiment']}/runs"
    print(f"{archive(args.sweep_dir, dest)} finished runs archived in {dest}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other vimarl error
        raise VimarlError(f"{message} (see vimarl {self.prog.split()[-1]} --help)")


def build_parser() -> argparse.ArgumentParser:
    from vimarl.envs.controllers import SCRIPTED_POLICIES

    parser = _Parser(prog="vimarl", description="Cooperative MARL as probabilistic inference.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train an algorithm on an environment", usage=USAGE_TRAIN,
                                description="Overrides: algo.<field>=v, env.<field>=v, and trainer "
                                            "fields (total_steps, num_envs, seed, out, device, ...).")
    train.add_argument("items", nargs="*", help="ALGO ENV, then key=value overrides")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    train.add_argument("--preset", metavar="FILE", help="a YAML file with train/algo/env sections")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="evaluate a trained run deterministically")
    evaluate.add_argument("run_dir", help="a run directory or a checkpoint file (with --policy: an env name)")
    evaluate.add_argument("--episodes", type=int, default=100)
    evaluate.add_argument("--seed", type=int, default=None, help="default: the run's evaluation seed")
    evaluate.add_argument("--sample", action=argparse.BooleanOptionalAction, default=None,
                          help="sample actions (--sample) or take the most probable (--no-sample); "
                               "default: the run's eval_deterministic setting")
    evaluate.add_argument("--gif", metavar="FILE", help="also record one episode as a GIF")
    evaluate.add_argument("--fps", type=int, default=4)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--policy", choices=(*SCRIPTED_POLICIES, "uniform"),
                          help="evaluate a baseline instead of a run: `vimarl eval --policy max_pressure "
                               "traffic_grid_4x4` (fixed_time, max_pressure: traffic signal controllers; oracle: "
                               "coop_nav's agents driven to optimally assigned landmarks, from the true state; "
                               "uniform: random actions, any env)")
    evaluate.set_defaults(handler=_eval)

    summary = commands.add_parser("summary", help="one line from a run's summary.json: its final return beside "
                                  "uniform random actions and the env's scripted controllers (e.g. the oracle)")
    summary.add_argument("run_dir", help="the out= directory of a vimarl train run")
    summary.set_defaults(handler=_summary)

    listing = commands.add_parser("list", help="algorithms and environments with their capabilities")
    listing.set_defaults(handler=_list)

    plot = commands.add_parser("plot", help="mean and std over runs against env steps")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", required=True)
    plot.add_argument("--metric", default="eval_return_mean", help="a column, or a pattern such as 'kl_*'")
    plot.add_argument("--matrix", metavar="PREFIX", help="heatmap of the PREFIX_<i>_<j> columns at the last "
                      "evaluation of the first run (e.g. coord: MAMT's coordination coefficients)")
    plot.add_argument("--x", default="env_steps", help="env_steps, agent_steps or wall_s")
    plot.add_argument("--title", default=None)
    plot.set_defaults(handler=_plot)

    sweep = commands.add_parser("sweep", help="run an experiment suite (a paper figure or table): algorithms x "
                                "envs x seeds, then a summary table and figures (docs/experiments.md)")
    sweep.add_argument("experiment", help="a name under vimarl/configs/experiments (masac_fig2, ...) or a YAML path")
    sweep.add_argument("--scale", default="cpu", choices=["cpu", "paper"],
                       help="cpu: reduced budgets for a small CPU; paper: the paper's budgets (a GPU)")
    sweep.add_argument("--backend", default="local", choices=["local", "ray"],
                       help="local: a pool of --workers processes; ray: Ray tasks (pip install 'vimarl[ray]')")
    sweep.add_argument("--workers", type=int, default=2, help="cells run at once (Ray: num_cpus of a local instance)")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in --out: finished cells are "
                       "skipped, interrupted ones resume from their checkpoints")
    sweep.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/EXPERIMENT-SCALE)")
    sweep.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the scale's seeds")
    sweep.add_argument("--only", metavar="PATTERN", default=None,
                       help="cells whose ENV/LABEL-sSEED matches (shell pattern or substring), e.g. 'spread/*'")
    sweep.add_argument("--retries", type=int, default=1, help="extra attempts for a failed cell (default 1)")
    sweep.add_argument("--ray-address", default=None, help="join a running Ray cluster instead of a local instance")
    sweep.add_argument("--configs", action="store_true", help="print every arm's resolved settings (differing ones "
                       "in bold) and run nothing: check them against the papers before a comparison")
    sweep.set_defaults(handler=_sweep)

    reporting = commands.add_parser("report", help="our numbers next to the paper's claims, with verdicts")
    reporting.add_argument("sweep_dir", help="the --out folder of a vimarl sweep")
    reporting.add_argument("--out", default=None, help="markdown file (default docs/results/<experiment>.md)")
    reporting.set_defaults(handler=_report)

    archiving = commands.add_parser("archive", help="keep a sweep's finished runs (ledger, metrics, configs) in git")
    archiving.add_argument("sweep_dir", help="the --out folder of a vimarl sweep")
    archiving.add_argument("dest", nargs="?", default=None,
                           help="target folder (default docs/results/<experiment>/runs); restore with "
                                "`cp -r DEST runs/sweeps/NAME-SCALE` and `vimarl sweep NAME --resume --out runs/sweeps/NAME-SCALE`")
    archiving.set_defaults(handler=_archive)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        # Options may come between or after the train overrides (`train vpp env --preset cpu
        # seed=1`): argparse stops the positional list at an option, so gather what is left.
        args, leftover = parser.parse_known_args(argv)
        if leftover and (args.command != "train" or any(item.startswith("-") for item in leftover)):
            parser.error(f"unrecognized arguments: {' '.join(leftover)}")
        if leftover:
            args.items += leftover
        args.handler(args)
    except TrainingInterrupted as error:
        print(f"vimarl: {error}", file=sys.stderr)
        return 130
    except VimarlError as error:
        print(f"vimarl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vimarl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
