"""VM3-AC (002): the MI lower bound of Eq. 50 and its gradient, the shared latent z, execution with
z = 0 or a shared seed, the MA-AC baseline, and one update on a continuous particle task."""

import math

import pytest
import torch
from helpers import collect_batch, set_constant

import vimarl
from vimarl.algos.vm3ac import MAAC, VM3AC, VM3ACConfig
from vimarl.config import resolve
from vimarl.envs.base import Box, GroupSpec
from vimarl.train import act

N, SIGMA, BETA = 3, 0.7, 0.3
SPEC = {"agents": GroupSpec(n_agents=N, obs_dim=1, action_space=Box(-1.0, 1.0, 1))}
# Hand-set q network of agent i: mu_i(given, o^i, o^j, j) = given + 0.5 o^j + 0.25 j - 0.3 o^i + C_i.
C = [0.1, -0.2, 0.4]


def mu(i, j, given, obs):
    return given + 0.5 * obs[j] + 0.25 * j - 0.3 * obs[i] + C[i]


def log_normal(x, mean):
    return -0.5 * ((x - mean) / SIGMA) ** 2 - math.log(SIGMA) - 0.5 * math.log(2 * math.pi)


def hand_set_q(algo: VM3AC):
    """Layer 1: units (given, o^j, j, o^i) + 10 (ReLU stays linear); layer 2: identity; layer 3 the weights above."""
    algo.variational.double()
    layers = [m for m in algo.variational.mu.net if hasattr(m, "weight")]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()
        # q input: [given (1), o^i (1), o^j (1), onehot(j) (3)]
        w1 = layers[0].weight
        w1[:, 0, 0] = 1.0
        w1[:, 2, 1] = 1.0
        w1[:, 3:6, 2] = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
        w1[:, 1, 3] = 1.0
        layers[0].bias[:] = 10.0
        layers[1].weight[:, range(4), range(4)] = 1.0
        weights = torch.tensor([1.0, 0.5, 0.25, -0.3], dtype=torch.float64)
        layers[2].weight[:, :, 0] = weights
        layers[2].bias[:, 0] = torch.tensor(C, dtype=torch.float64) - 10.0 * weights.sum()


def tiny(**config) -> VM3AC:
    return VM3AC(SPEC, 0, VM3ACConfig(hidden_dim=4, beta=BETA, q_sigma=SIGMA, **config))


def test_mi_bound_matches_hand_computed_gaussians():
    algo = tiny()
    hand_set_q(algo)
    obs = torch.tensor([[[0.2], [-0.5], [0.9]]], dtype=torch.float64)
    actions = torch.tensor([[[0.3], [-0.6], [0.8]]], dtype=torch.float64)
    got = algo.mi_bound({"agents": obs}, actions)
    o, a = obs.flatten().tolist(), actions.flatten().tolist()
    for i in range(N):
        pairs = sum(log_normal(a[i], mu(i, j, a[j], o))      # (a) log q_xi^i(a^i | a^j, o^i, o^j)
                    + log_normal(a[j], mu(i, j, a[i], o))    # (b) log q_xi^i(a^j | a^i, o^i, o^j)
                    for j in range(N) if j != i)
        assert got[0, i].item() == pytest.approx(BETA / N * pairs, abs=1e-6)


def test_departed_agents_leave_the_mi_pairs():
    algo = tiny()
    hand_set_q(algo)
    obs = torch.tensor([[[0.2], [-0.5], [0.9]]], dtype=torch.float64)
    actions = torch.tensor([[[0.3], [-0.6], [0.8]]], dtype=torch.float64)
    got = algo.mi_bound({"agents": obs}, actions, present=torch.tensor([[True, False, True]]))
    o, a = obs.flatten().tolist(), actions.flatten().tolist()
    for i in (0, 2):
        j = 2 - i
        pair = log_normal(a[i], mu(i, j, a[j], o)) + log_normal(a[j], mu(i, j, a[i], o))
        assert got[0, i].item() == pytest.approx(BETA / N * pair, abs=1e-6)


def test_mi_bound_gradient_flows_through_term_b_and_own_action_only():
    algo = tiny()
    hand_set_q(algo)
    obs = torch.tensor([[[0.2], [-0.5], [0.9]]], dtype=torch.float64)
    actions = torch.tensor([[[0.3], [-0.6], [0.8]]], dtype=torch.float64, requires_grad=True)
    algo.mi_bound({"agents": obs}, actions)[0, 0].backward()
    o, a = obs.flatten().tolist(), actions.detach().flatten().tolist()
    # d/da^0 of (b): sum_j (a^j - mu_0j) / sigma^2 * dmu/dgiven (= 1); term (a) and a^j carry nothing.
    expected = BETA / N * sum((a[j] - mu(0, j, a[0], o)) / SIGMA**2 for j in (1, 2))
    assert actions.grad[0, 0, 0].item() == pytest.approx(expected, abs=1e-9)
    assert actions.grad[0, 1:].abs().max().item() == 0.0


def policy_inputs(algo: VM3AC):
    """Record every policy's input [o^i, z] during act()."""
    seen = {}
    for g in algo.groups:
        algo.policy[g].net.register_forward_pre_hook(lambda _, args, g=g: seen.setdefault(g, []).append(args[0]))
    return seen


def test_z_is_shared_by_all_agents_of_a_step_and_fresh_each_step():
    env = vimarl.make_env("treasure_n4", 2)
    algo = vimarl.make_algo("vm3ac", env, latent_dim=10)
    seen = policy_inputs(algo)
    step = env.reset(seed=0)
    for _ in range(2):
        step = env.step(act(algo, step, explore=True))
    zs = {g: [x[..., -10:] for x in inputs] for g, inputs in seen.items()}  # per group, per step: [B, N_g, d]
    for t in range(2):
        first = zs["collectors"][t][:, :1]
        for g in zs:  # every agent of every group sees its sub-environment's z
            assert torch.equal(zs[g][t], first.expand_as(zs[g][t]))
        assert not torch.allclose(first[0], first[1])  # sub-environments draw their own z
    assert not torch.allclose(zs["collectors"][0], zs["collectors"][1])  # a new z every step


def test_shared_seed_execution_reproduces_actions_across_instances():
    env = vimarl.make_env("pp_capture_n2", 2)
    a = vimarl.make_algo("vm3ac", env, z_mode="shared_seed", z_seed=7)
    b = vimarl.make_algo("vm3ac", env, z_mode="shared_seed", z_seed=7)
    b.load_state_dict(a.state_dict())
    step = env.reset(seed=0)

    def rollout(algo, rng_seed):
        torch.manual_seed(rng_seed)  # the global RNG plays no part in shared-seed execution
        return [act(algo, step, explore=False)["predators"] for _ in range(3)]

    first, second = rollout(a, 0), rollout(b, 1)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], first[1])  # the generator advances: a new z every step
    a.reset_latent()  # restarting the sequence replays it
    assert torch.equal(rollout(a, 2)[0], first[0])


def test_agents_drawing_z_alone_from_the_shared_seed_act_as_the_joint_policy():
    """Sec. 5: each agent holds its own generator with the distributed seed and draws z_t itself;
    with no communication the joint action equals the centralised one for the same z sequence."""
    env = vimarl.make_env("pp_capture_n3", 2)
    algo = vimarl.make_algo("vm3ac", env, z_mode="shared_seed", z_seed=11)
    steps = [env.reset(seed=0)]
    for _ in range(2):
        steps.append(env.step(act(algo, steps[-1], explore=True)))
    with algo.execution():  # deployment restarts the generator
        joint = [act(algo, step, explore=False)["predators"] for step in steps]
    policy = algo.policy["predators"]
    for i in range(3):
        own_generator = torch.Generator().manual_seed(11)
        for t, step in enumerate(steps):
            z = torch.randn((2, 8), generator=own_generator)
            alone = policy(algo.with_latent(step.groups["predators"].obs, z)).mode()[:, i]
            assert torch.equal(alone, joint[t][:, i])


def test_execution_modes_switch_z_and_restore_the_configured_one():
    env = vimarl.make_env("pp_capture_n2", 2)
    algo = vimarl.make_algo("vm3ac", env, z_seed=3)
    assert algo.evaluation_modes() == {"z_mean": "mean", "z_shared_seed": "shared_seed"}
    with algo.execution("shared_seed"):
        drawn = algo.latent(2, explore=False)
    assert torch.equal(drawn, torch.randn((2, 8), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(algo.latent(2, explore=False), torch.zeros(2, 8))  # back to z = E[z]
    assert vimarl.make_algo("ma_ac", env).evaluation_modes() == {}


def test_checkpoint_keeps_the_shared_generator_position():
    env = vimarl.make_env("pp_capture_n2", 2)
    a = vimarl.make_algo("vm3ac", env, z_mode="shared_seed")
    a.latent(2, explore=False)
    b = vimarl.make_algo("vm3ac", env, z_mode="shared_seed")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.latent(2, explore=False), b.latent(2, explore=False))


def test_trainer_logs_both_z_modes(tmp_path):
    run = vimarl.train("vm3ac", "pp_capture_n2", out=str(tmp_path), total_steps=40, num_envs=2,
                       warmup_steps=20, update_every=10, gradient_steps=1, batch_size=8, eval_every=20,
                       eval_episodes=2, buffer_size=1000, progress=False, tensorboard=False,
                       env_config={"episode_length": 10})
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"eval_return_mean/z_mean", "eval_return_mean/z_shared_seed"} <= set(header)
    first = dict(zip(header, rows[-1].split(",")))
    assert first["eval_return_mean/z_mean"] == first["eval_return_mean"]  # z_mode="mean" is the default


def test_mean_execution_plays_z_zero():
    env = vimarl.make_env("pp_capture_n2", 2)
    algo = vimarl.make_algo("vm3ac", env)
    step = env.reset(seed=0)
    obs = step.groups["predators"].obs
    expected = algo.policy["predators"](algo.with_latent(obs, torch.zeros(2, 8))).mode()
    assert torch.equal(act(algo, step, explore=False)["predators"], expected)
    assert torch.equal(act(algo, step, explore=False)["predators"], expected)


def test_ma_ac_is_vm3ac_without_beta_or_latent():
    env = vimarl.make_env("pp_capture_n2", 2)
    algo = vimarl.make_algo("ma_ac", env)
    assert isinstance(algo, MAAC) and isinstance(algo, VM3AC)
    assert algo.config.beta == 0.0 and algo.config.latent_dim == 0
    assert algo.variational is None
    first_layer = algo.policy["predators"].net.net[0]
    assert first_layer.weight.shape[1] == env.groups["predators"].obs_dim  # no z in the policy input
    batch = collect_batch(env, algo)
    assert torch.isfinite(torch.stack(list(algo.update(batch).values()))).all()


@pytest.mark.parametrize("env_name", ["pp_capture_n2", "treasure_n4"])
def test_one_update_moves_every_network_with_finite_losses(env_name):
    torch.manual_seed(0)
    env = vimarl.make_env(env_name, 2)
    algo = vimarl.make_algo("vm3ac", env)
    batch = collect_batch(env, algo)
    groups = {"policy": algo.policy, "q": algo.critics.q, "v": algo.v, "q_xi": algo.variational,
              "target_v": algo.target_v}
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in groups.items()}
    metrics = algo.update(batch)
    assert set(metrics) == {"loss_v", "loss_q", "loss_policy", "mi_bound", "entropy"}
    assert all(math.isfinite(v.item()) for v in metrics.values())
    for name, module in groups.items():
        for old, new in zip(before[name], module.parameters()):
            assert not torch.equal(old, new), name


def test_groups_with_different_action_sizes_are_refused():
    groups = {"a": GroupSpec(2, 3, Box(-1.0, 1.0, 2)), "b": GroupSpec(2, 3, Box(-1.0, 1.0, 3))}
    with pytest.raises(vimarl.errors.VimarlError, match="one action size"):
        VM3AC.check_env("toy", groups, 0)


def test_value_and_q_targets_follow_eq_46_and_48():
    algo = tiny(gamma=0.9)
    set_constant(algo.critics.q[0], [1.0, 2.0, 0.5])
    set_constant(algo.critics.q[1], [1.5, 1.0, 0.7])
    set_constant(algo.target_v, [0.3, -0.4, 0.2])
    set_constant(algo.variational.mu, C)
    g = "agents"
    obs = torch.zeros(2, N, 1)
    actions = torch.tensor([[0.3, -0.6, 0.8], [0.0, 0.5, -0.2]]).unsqueeze(-1)
    log_pi = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, -0.5]])
    reward = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.5, 0.0]])
    batch = vimarl.buffer.Transition(
        obs={g: obs}, graph={g: None}, action_mask={g: None}, state=None, action={g: actions},
        reward={g: reward}, next_obs={g: obs}, next_graph={g: None}, next_action_mask={g: None},
        next_state=None, terminated=torch.tensor([0.0, 1.0]))
    # Eq. 46: min_k Q^{i,k} - beta log pi^i + (beta/N) sum_{j != i} [log q(a^i | a^j) + log q(a^j | a^i)]
    q_min = [1.0, 1.0, 0.5]
    v_hat = algo.v_target(batch, actions, log_pi, algo.mi_bound(batch.obs, actions))
    for b in range(2):
        a = actions[b].flatten().tolist()
        for i in range(N):
            mi = sum(log_normal(a[i], C[i]) + log_normal(a[j], C[i]) for j in range(N) if j != i)
            expected = q_min[i] - BETA * log_pi[b, i].item() + BETA / N * mi
            assert v_hat[b, i].item() == pytest.approx(expected, abs=1e-5)
    # Eq. 47-48: sum over twins of the mean of 1/2 (Q^{i,k} - r^i - gamma (1 - d) Vbar^i(x'))^2
    target = reward + 0.9 * torch.tensor([[1.0], [0.0]]) * torch.tensor([0.3, -0.4, 0.2])
    expected = sum((0.5 * (torch.tensor(twin) - target) ** 2).mean() for twin in ([1.0, 2.0, 0.5], [1.5, 1.0, 0.7]))
    assert algo.q_loss(batch).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("env_name, beta, latent_dim", [
    ("pp_capture_n2", 0.15, 8), ("pp_capture_n3", 0.1, 8), ("pp_capture_n4", 0.2, 8), ("treasure_n4", 0.05, 10),
    ("treasure_n5", 0.05, 10), ("spread_vm3ac", 0.1, 8), ("multiwalker_n3", 0.05, 8), ("multiwalker_n4", 0.1, 8),
])
def test_table_2_presets_apply_per_task(env_name, beta, latent_dim):
    config = resolve("vm3ac", env_name).algo_config
    assert (config.beta, config.latent_dim) == (beta, latent_dim)
    assert resolve("ma_ac", env_name).algo_config.beta == 0.0  # the presets are VM3-AC's only
