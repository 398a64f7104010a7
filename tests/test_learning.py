"""Learning tests: the papers' toy games and a small scenario to a stated return, fixed seeds."""

import pytest
from helpers import UniformPolicy

import vimarl
from vimarl.logging import read_metrics
from vimarl.train import FINAL_EVAL_SEED, evaluate

SEEDS = (0, 1, 2)


def eval_returns(tmp_path, algo, env, seed, **overrides):
    out = tmp_path / f"{algo}-{seed}"
    vimarl.train(algo, env, out=str(out), seed=seed, progress=False, tensorboard=False, **overrides)
    return [row["eval_return_mean"] for row in read_metrics(out / "metrics.csv")]


@pytest.mark.learning
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("inference", ["mean_field", "loopy_bp"])
def test_vpp_solves_the_3x3_grid_game(tmp_path, inference, seed, report):
    """000 App. G.1, Fig. 7: VPP reaches the optimum 0; random play scores -6."""
    value = eval_returns(tmp_path, "vpp", "grid_coordination", seed, algo_config={"inference": inference})[-1]
    report(f"grid_coordination 3x3, 2000 env steps: vpp {inference} seed {seed}: sampled eval return {value:.3f}")
    assert value >= -0.5


@pytest.mark.learning
@pytest.mark.parametrize("seed", SEEDS)
def test_isac_on_the_3x3_grid_game(tmp_path, seed, report):
    """The paper reports the independent policy stays random (-6). Not reproduced: with shared
    weights and the constant state ISAC's agents have one policy and agree trivially, and even
    with agent ids in the observation (seed 0 recorded) the exact per-agent gradient of J_pi
    drives independent agents to a common action (see docs/vpp.md)."""
    shared = eval_returns(tmp_path, "isac", "grid_coordination", seed)[-1]
    line = f"grid_coordination 3x3, 2000 env steps: isac seed {seed}: {shared:.3f} (shared weights)"
    if seed == 0:
        with_ids = eval_returns(tmp_path / "ids", "isac", "grid_coordination", seed, env_config={"agent_ids": True})
        line += f", {with_ids[-1]:.3f} (agent ids)"
    report(line)
    assert shared >= -0.5


# coop_nav N = 6 at a budget of about a minute on one CPU thread: 10k env steps, one update of
# batch 64 every 4 env steps, lr 0.003 (the paper's 0.01 does not learn at this budget).
COOP_NAV_BUDGET = dict(total_steps=10_000, warmup_steps=1000, update_every=4, batch_size=64,
                       eval_every=5000, eval_episodes=20)


def uniform_return(env_name: str, episodes: int = 100) -> float:
    """The return of uniformly random actions on the trainer's final evaluation episodes (the first
    group's, as the trainer's eval_return_mean in the last row of metrics.csv)."""
    env = vimarl.make_env(env_name, episodes)
    returns = evaluate(UniformPolicy(env.groups), env, seed=FINAL_EVAL_SEED)
    return float(next(iter(returns.values())).mean())


@pytest.mark.learning
def test_vpp_beats_random_on_coop_nav_n6(tmp_path, report):
    random_return = uniform_return("coop_nav_n6")
    vpp = eval_returns(tmp_path, "vpp", "coop_nav_n6", 0, algo_config={"lr": 0.003}, **COOP_NAV_BUDGET)
    report(f"coop_nav_n6, 10k env steps, seed 0, deterministic eval over 20 episodes: vpp {vpp[-1]:.1f}, "
           f"uniform random {random_return:.1f}")
    assert vpp[-1] >= random_return + 40


# spread (mpe2 simple_spread_v3, N = 3) in well under a minute each on one CPU thread; only budget
# knobs differ from the algorithms' paper defaults (masac: lr 0.01, alpha 0.02 of 003 for this task).
# Seeds 1 and 2 (not run here): masac -58.4 / -63.1, maddpg -56.6; maddpg_s seed 0 -60.6 (on the
# 20 evaluation episodes used before the final evaluation). Scored on the final evaluation's 100
# held-out episodes, seed 0: masac -61.2 against uniform random -81.0 (the margin was 20 on the
# earlier 20 episodes, where masac led by a little more).
SPREAD_CASES = [
    ("masac", dict(total_steps=10_000, warmup_steps=1000, update_every=4, batch_size=64), 15),
    ("maddpg", dict(total_steps=20_000, warmup_steps=1000, update_every=8, batch_size=256), 10),
    ("pic", dict(total_steps=20_000, warmup_steps=1000, update_every=8, batch_size=256), 10),
]


@pytest.mark.learning
@pytest.mark.parametrize("algo, budget, margin", SPREAD_CASES, ids=[case[0] for case in SPREAD_CASES])
def test_centralised_critics_beat_random_on_spread(tmp_path, algo, budget, margin, report):
    random_return = uniform_return("spread")
    returns = eval_returns(tmp_path, algo, "spread", 0, eval_every=5000, eval_episodes=20, **budget)
    report(f"spread N=3, {budget['total_steps']} env steps, seed 0, final deterministic eval over 100 episodes: "
           f"{algo} {returns[-1]:.1f} (curve {[round(r, 1) for r in returns]}), uniform random {random_return:.1f}")
    assert returns[-1] >= random_return + margin


# VM3-AC on predator-prey (N, M, C) = (2, 16, 1) with T = 100 (002 App. F) on one CPU thread:
# 16k env steps, one update of batch 64 every 2 env steps, 2 x 64 units, lr 1e-3 and gamma 0.95
# (Table 1: 2 x 128, lr 3e-4, gamma 0.99, which needed about 20k steps to pass random). Measured
# on 2026-12-04 (Intel Xeon, 2 cores), final evaluation over 100 held-out episodes against uniform
# random 58.4: seeds 0 / 1 / 2 end at 86.4 / 66.2 / 98.8. The former 6k-step budget had passed on
# an AMD EPYC by luck: here seeds 0-3 ended at 49.2 / 41.2 / 60.6 / 45.8, below random.
PP_CAPTURE_BUDGET = dict(total_steps=16000, num_envs=8, warmup_steps=1000, update_every=2, gradient_steps=1,
                         batch_size=64, eval_every=4000, eval_episodes=20)


@pytest.mark.learning
@pytest.mark.parametrize("algo", ["maven", "si_moa"])
def test_ma_ac_baselines_make_the_two_agents_meet(tmp_path, algo, report):
    """MAVEN and SI-MOA on MA-AC (002 Sec. 6) on 002 App. A's toy: random play pays about -537 for
    staying apart, a team that meets about 0."""
    random_return = uniform_return("two_agents_meet")
    returns = eval_returns(tmp_path, algo, "two_agents_meet", 0, total_steps=4000, num_envs=8, warmup_steps=1000,
                           update_every=2, gradient_steps=1, batch_size=64, eval_every=2000, eval_episodes=20,
                           algo_config={"hidden_dim": 64, "lr": 1e-3, "gamma": 0.95})
    report(f"two_agents_meet, 4k env steps, seed 0, deterministic eval, final over 100 episodes: {algo} "
           f"{returns[-1]:.1f} (curve {[round(r, 1) for r in returns]}), uniform random {random_return:.1f}")
    assert returns[-1] >= 0.5 * random_return


@pytest.mark.learning
def test_vm3ac_beats_random_on_pp_capture_n2(tmp_path, report):
    random_return = uniform_return("pp_capture_n2")
    returns = eval_returns(tmp_path, "vm3ac", "pp_capture_n2", 0, algo_config={"hidden_dim": 64, "lr": 1e-3,
                                                                                "gamma": 0.95}, **PP_CAPTURE_BUDGET)
    report(f"pp_capture (2, 16, 1), 16k env steps, seed 0, deterministic eval (z = 0), final over 100 episodes: "
           f"vm3ac {returns[-1]:.1f} (curve {[round(r, 1) for r in returns]}), uniform random {random_return:.1f}")
    assert returns[-1] >= random_return + 5  # the weakest of three seeds cleared it by 7.8
