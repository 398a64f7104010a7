"""Real city maps on both traffic backends: the batched model (`traffic_<city>`) against SUMO
(`sumo_<city>`, the same CityFlow roadnet and recorded flows converted), fixed-time and
max-pressure control, one hour of traffic (360 decisions of 10 s), average travel time.

    python benchmarks/traffic_city_crosscheck.py                     # Hangzhou 4 x 4, one hour
    python benchmarks/traffic_city_crosscheck.py --city jinan_3x4 --decisions 100

The batched model runs `--envs` sub-environments (they differ only in which queued vehicles
leave first, `route_model=vehicle`) and reports their mean; SUMO runs one simulation (its
drivers are deterministic, sigma 0). Needs the CityFlow data (docs/traffic.md, "Real city maps")
and, for the SUMO rows, `pip install -e ".[sumo]"`. Prints one table; times nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch

import vimarl
from vimarl.envs.traffic import FixedTimePolicy, MaxPressurePolicy
from vimarl.envs.traffic.cities import CITIES
from vimarl.train import evaluate

POLICIES = {"fixed_time": FixedTimePolicy, "max_pressure": MaxPressurePolicy}


def run(env_name: str, policy: str, decisions: int, envs: int, seed: int, **overrides) -> dict[str, float]:
    env = vimarl.make_env(env_name, envs, seed=seed, episode_length=decisions, **overrides)
    try:
        metrics: dict = {}
        evaluate(POLICIES[policy](env.groups), env, seed=seed, metrics=metrics)
        return {k: float(v.double().mean()) for k, v in metrics.items()}
    finally:
        if hasattr(env, "close"):
            env.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--city", default="hangzhou_4x4", choices=sorted(CITIES))
    parser.add_argument("--decisions", type=int, default=360, help="decisions of 10 s (360 = one hour)")
    parser.add_argument("--envs", type=int, default=4, help="batched sub-environments (their mean is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--saturation-flow", type=float, default=None, help="batched model's saturation_flow")
    parser.add_argument("--sumo-tau", type=float, default=0.0,
                        help="SUMO vTypes' tau (env.flow_tau); 0: the flows' headwayTime (2 s)")
    parser.add_argument("--route-model", default="vehicle", choices=("vehicle", "turns"),
                        help="batched model's env.route_model")
    parser.add_argument("--no-sumo", action="store_true", help="the batched model only")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    extra = {"route_model": args.route_model}
    if args.saturation_flow is not None:
        extra["saturation_flow"] = args.saturation_flow
    rows = []
    for policy in POLICIES:
        batched = run(f"traffic_{args.city}", policy, args.decisions, args.envs, args.seed, **extra)
        sumo = (run(f"sumo_{args.city}", policy, args.decisions, 1, args.seed, flow_tau=args.sumo_tau)
                if importlib.util.find_spec("libsumo") is not None and not args.no_sumo else None)
        rows.append((policy, batched, sumo))
    print(f"{args.city}, {args.decisions} decisions x 10 s, seed {args.seed}; batched: mean of {args.envs} "
          f"sub-environments, route_model {args.route_model}"
          f"{'' if args.saturation_flow is None else f', saturation_flow {args.saturation_flow}'}; SUMO tau "
          f"{args.sumo_tau or 'from the flows (headwayTime)'}")
    print(f"{'policy':<14}{'batched ATT (s)':>16}{'SUMO ATT (s)':>14}{'SUMO - batched':>16}"
          f"{'exited b / S':>16}{'in network b / S':>18}{'teleports':>11}")
    for policy, b, s in rows:
        if s is None:
            print(f"{policy:<14}{b['average_travel_time']:>16.1f}{'-':>14}")
            continue
        gap = s["average_travel_time"] / b["average_travel_time"] - 1
        print(f"{policy:<14}{b['average_travel_time']:>16.1f}{s['average_travel_time']:>14.1f}{gap:>+16.1%}"
              f"{b['vehicles_exited']:>8.0f} / {s['vehicles_exited']:<6.0f}"
              f"{b['vehicles_in_network']:>9.0f} / {s['vehicles_in_network']:<7.0f}{s['teleports']:>9.0f}")
    if args.json:
        print(json.dumps({"city": args.city, "decisions": args.decisions,
                          "rows": [{"policy": p, "batched": b, "sumo": s} for p, b, s in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
