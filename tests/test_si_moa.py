"""SI-MOA (Jaques et al. 2019 on MA-AC, 002 baseline): the Monte Carlo influence against closed forms,
the MOA likelihood, the shaped reward r = alpha e + beta c in MA-AC's Q target and checkpoints (its
learning run is in test_learning.py)."""

import math

import pytest
import torch
from helpers import collect_batch, set_constant
from torch import nn

import vimarl
import vimarl.algos.si_moa  # registers si_moa (the lead adds it to vimarl/algos/__init__.py)
from vimarl.algos.si_moa import SIMOA, SIMOAConfig
from vimarl.buffer import Transition
from vimarl.envs.base import Box, Discrete, GroupSpec
from vimarl.train import act

G = "agents"


def tiny(n: int = 3, **config) -> SIMOA:
    spec = {G: GroupSpec(n_agents=n, obs_dim=1, action_space=Box(-1.0, 1.0, 1))}
    return SIMOA(spec, 0, SIMOAConfig(hidden_dim=8, **config))


class LinearGaussianMOA(nn.Module):
    """mean_ij = W[i, j] a^i + U sum_{k != i} a^k + C[j], std s: agent i's row reads a^i from its own
    segment of the joint action, as `ModelOfOtherAgents` does."""

    def __init__(self, w, u, c, s):
        super().__init__()
        self.w, self.u = torch.tensor(w, dtype=torch.float64), u
        self.c, self.log_s = torch.tensor(c, dtype=torch.float64), math.log(s)

    def forward(self, obs, joint):
        n = self.w.shape[0]
        rows = joint.unflatten(-1, (n, 1)).squeeze(-1)                  # [..., N (row i), N (agent k)]
        own = rows.diagonal(dim1=-2, dim2=-1)                            # a^i as row i holds it
        others = rows.sum(-1) - own
        mean = self.w * own.unsqueeze(-1) + (self.u * others).unsqueeze(-1) + self.c   # [..., N, N]
        mean = mean.unsqueeze(-1)
        return mean, torch.full_like(mean, self.log_s)


def gaussian_kl(mu_p, var_p, mu_q, var_q):
    return 0.5 * math.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / (2 * var_q) - 0.5


def test_counterfactual_rows_replace_only_the_own_action():
    algo = tiny()
    actions = torch.tensor([[[0.1], [0.2], [0.3]]], dtype=torch.float64)
    cf = torch.tensor([[[[-0.5], [-0.6], [-0.7]]]], dtype=torch.float64)  # K = 1
    rows = algo.counterfactual_rows(actions, cf)
    assert rows.tolist() == [[[[-0.5, 0.2, 0.3], [0.1, -0.6, 0.3], [0.1, 0.2, -0.7]]]]
    assert algo.joint_rows(actions).tolist() == [[[0.1, 0.2, 0.3]] * 3]


def test_an_moa_blind_to_the_own_action_gives_zero_influence():
    """The real MOA network with the first-layer weights of row i's own action zeroed: every
    counterfactual component equals the conditional, so the estimate is 0 whatever the samples."""
    torch.manual_seed(0)
    algo = tiny(n=3)
    first = algo.moa.net.net[0].weight                                 # [N, O + N A, hidden]
    obs = torch.randn(5, 3, 1)
    actions = torch.rand(5, 3, 1) * 2 - 1
    cf = torch.rand(16, 5, 3, 1) * 2 - 1
    assert algo.influence(obs, actions, cf).abs().max() > 1e-2        # untouched, a^i matters
    with torch.no_grad():
        for i in range(3):
            first[i, 1 + i] = 0.0                                     # obs_dim 1, then a^0, a^1, a^2
    assert algo.influence(obs, actions, cf).abs().max().item() < 1e-5


def test_linear_gaussian_influence_matches_the_closed_form_kl():
    """With mean_ij = W_ij a^i + ... and a~^i ~ N(m_i, sd_i^2), the K -> inf marginal is
    N(W_ij m_i + ..., s^2 + W_ij^2 sd_i^2), so c^i = sum_{j != i} KL(N(W_ij a^i + ..., s^2) || that)."""
    torch.manual_seed(0)
    w = [[0.0, 1.5, -0.8], [0.6, 0.0, 1.0], [-1.2, 0.4, 0.0]]
    s, u, c = 0.5, 0.3, [0.1, -0.2, 0.05]
    algo = tiny(n=3, kl_samples=1000)
    algo.moa = LinearGaussianMOA(w, u, c, s)
    a, m, sd = [0.4, -0.7, 0.2], [0.0, 0.3, -0.2], [0.5, 0.3, 0.6]
    actions = torch.tensor(a, dtype=torch.float64).view(1, 3, 1)
    obs = torch.zeros(1, 3, 1, dtype=torch.float64)
    # 12 estimates of K = 500 counterfactuals and M = 1000 draws each: standard errors 0.01-0.024 (measured)
    got = sum(algo.influence(obs, actions, (torch.tensor(m, dtype=torch.float64) + torch.tensor(sd, dtype=torch.float64)
                                            * torch.randn(500, 1, 3, dtype=torch.float64)).unsqueeze(-1))[0]
              for _ in range(12)) / 12
    for i in range(3):
        expected = sum(gaussian_kl(w[i][j] * a[i], s**2, w[i][j] * m[i], s**2 + w[i][j] ** 2 * sd[i] ** 2)
                       for j in range(3) if j != i)
        assert got[i].item() == pytest.approx(expected, rel=0.05, abs=0.04)
    assert got.min() > 0.1  # the values compared are not trivially small


def test_influence_sums_over_the_pairs_given_and_is_clipped():
    torch.manual_seed(0)
    algo = tiny(n=3, kl_samples=200, influence_clip=0.5)
    algo.moa = LinearGaussianMOA([[0.0, 2.0, 2.0], [2.0, 0.0, 2.0], [2.0, 2.0, 0.0]], 0.0, [0.0] * 3, 0.1)
    actions = torch.tensor([0.9, -0.9, 0.9], dtype=torch.float64).view(1, 3, 1)
    cf = (0.1 * torch.randn(100, 1, 3, 1, dtype=torch.float64))
    assert algo.influence(torch.zeros(1, 3, 1, dtype=torch.float64), actions, cf).tolist() == [[0.5, 0.5, 0.5]]
    none = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert algo.influence(torch.zeros(1, 3, 1, dtype=torch.float64), actions, cf, pairs=none).tolist() == [[0.0] * 3]


def transition(reward, terminated, actions, next_obs=None) -> Transition:
    b, n = len(reward), len(reward[0])
    obs = torch.zeros(b, n, 1)
    return Transition(obs={G: obs}, graph={G: None}, action_mask={G: None}, state=None,
                      action={G: torch.tensor(actions).view(b, n, 1)}, reward={G: torch.tensor(reward)},
                      next_obs={G: obs if next_obs is None else next_obs}, next_graph={G: None},
                      next_action_mask={G: None}, next_state=None, terminated=torch.tensor(terminated))


def test_moa_loss_is_the_gaussian_nll_of_the_next_actions_over_continuing_pairs():
    algo = tiny(n=2)
    w, u, c, s = [[0.0, 0.7], [-0.4, 0.0]], 0.2, [0.1, -0.3], 0.8
    algo.moa = LinearGaussianMOA(w, u, c, s)
    batch = transition([[0.0, 0.0], [0.0, 0.0]], [0.0, 1.0], [[0.5, -0.2], [0.3, 0.1]])
    pairs = algo.influence_pairs(batch)
    assert pairs.tolist() == [[[False, True], [True, False]], [[False, False], [False, False]]]  # row 1 terminal
    a = [0.5, -0.2]
    nxt = [[0.25, -0.6], [0.0, 0.0]]
    got = algo.moa_loss(torch.zeros(2, 2, 1, dtype=torch.float64), torch.tensor([a, [0.3, 0.1]]).unsqueeze(-1).double(),
                        torch.tensor(nxt, dtype=torch.float64).unsqueeze(-1), pairs)

    def nll(x, mean):
        return 0.5 * ((x - mean) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)

    # pair (0, 1): agent 0 predicts a'^1; pair (1, 0): agent 1 predicts a'^0
    mean_01 = w[0][1] * a[0] + u * a[1] + c[1]
    mean_10 = w[1][0] * a[1] + u * a[0] + c[0]
    expected = (nll(nxt[0][1], mean_01) + nll(nxt[0][0], mean_10)) / 2
    assert got.item() == pytest.approx(expected, abs=1e-9)


def test_the_critic_target_reads_alpha_e_plus_beta_c():
    algo = tiny(n=3, gamma=0.9, extrinsic_weight=0.5, influence_weight=0.2)
    set_constant(algo.critics.q[0], [1.0, 2.0, 0.5])
    set_constant(algo.critics.q[1], [1.5, 1.0, 0.7])
    set_constant(algo.target_v, [0.3, -0.4, 0.2])
    reward = [[1.0, 0.0, -1.0], [2.0, 0.5, 0.0]]
    batch = transition(reward, [0.0, 1.0], [[0.3, -0.6, 0.8], [0.0, 0.5, -0.2]])
    influence = torch.tensor([[0.4, 1.0, 0.0], [2.0, -0.5, 3.0]])
    shaped = algo.shaped(batch, influence)
    assert torch.allclose(shaped.reward[G], 0.5 * torch.tensor(reward) + 0.2 * influence)
    # Eq. 47-48 on the shaped reward: sum over twins of mean 1/2 (Q^{i,k} - r^i - gamma (1 - d) Vbar^i)^2
    target = 0.5 * torch.tensor(reward) + 0.2 * influence + 0.9 * torch.tensor([[1.0], [0.0]]) * torch.tensor([0.3, -0.4, 0.2])
    expected = sum((0.5 * (torch.tensor(q) - target) ** 2).mean() for q in ([1.0, 2.0, 0.5], [1.5, 1.0, 0.7]))
    assert algo.q_loss(shaped).item() == pytest.approx(expected.item(), abs=1e-6)


def test_update_hands_ma_ac_the_shaped_reward_and_the_influence_it_computed(monkeypatch):
    torch.manual_seed(0)
    algo = tiny(n=3, extrinsic_weight=2.0, influence_weight=0.1)
    influence = torch.tensor([[0.4, 1.0, 0.0], [2.0, -0.5, 3.0]])
    monkeypatch.setattr(algo, "influence", lambda *args: influence)
    seen = []
    q_loss = algo.q_loss
    monkeypatch.setattr(algo, "q_loss", lambda batch: seen.append(batch.reward[G]) or q_loss(batch))
    reward = [[1.0, 0.0, -1.0], [2.0, 0.5, 0.0]]
    metrics = algo.update(transition(reward, [0.0, 0.0], [[0.3, -0.6, 0.8], [0.0, 0.5, -0.2]]))
    assert torch.allclose(seen[0], 2.0 * torch.tensor(reward) + 0.1 * influence)
    assert metrics["influence"].item() == pytest.approx(influence.mean().item())
    assert {"loss_v", "loss_q", "loss_policy", "loss_moa", "influence"} <= set(metrics)


@pytest.mark.parametrize("env_name", ["pp_capture_n2", "treasure_n4"])
def test_one_update_moves_the_moa_and_ma_ac_networks(env_name):
    torch.manual_seed(0)
    env = vimarl.make_env(env_name, 2)
    algo = vimarl.make_algo("si_moa", env)
    assert algo.config.beta == 0.0 and algo.config.latent_dim == 0 and algo.variational is None  # MA-AC
    batch = collect_batch(env, algo)
    modules = {"policy": algo.policy, "q": algo.critics.q, "v": algo.v, "moa": algo.moa}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in modules.items()}
    metrics = algo.update(batch)
    assert all(math.isfinite(v.item()) for v in metrics.values())
    for name, module in modules.items():
        for old, new in zip(before[name], module.parameters()):
            assert not torch.equal(old, new), name


def test_checkpoint_round_trip_gives_the_same_actions_and_update():
    env = vimarl.make_env("pp_capture_n2", 2)
    torch.manual_seed(0)
    a = vimarl.make_algo("si_moa", env)
    batch = collect_batch(env, a)
    a.update(batch)
    b = vimarl.make_algo("si_moa", env)
    b.load_state_dict(a.state_dict())
    step = env.reset(seed=1)
    assert torch.equal(act(a, step, explore=False)["predators"], act(b, step, explore=False)["predators"])
    torch.manual_seed(5)
    first = a.update(batch)
    torch.manual_seed(5)
    second = b.update(batch)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name


def test_bad_settings_and_mixed_action_kinds_are_refused():
    with pytest.raises(vimarl.errors.VimarlError, match="kl_samples"):
        tiny(kl_samples=0)
    with pytest.raises(vimarl.errors.VimarlError, match="counterfactual_samples"):
        vimarl.make_algo("si_moa", vimarl.make_env("pp_capture_n2", 1), counterfactual_samples=0)
    mixed = {"a": GroupSpec(2, 3, Discrete(2)), "b": GroupSpec(2, 3, Box(-1.0, 1.0, 2))}
    with pytest.raises(vimarl.errors.VimarlError, match="mixes discrete and continuous"):
        SIMOA.check_env("toy", mixed, 0)


class TableMOA(nn.Module):
    """Categorical MOA: log p(a'^j | a^i = a) = log_softmax(L[i][j][a]) over a'^j, row i reading its own one-hot."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float64)               # [N, N, n (own), n (next)]

    def forward(self, obs, joint):
        n_agents, n = self.logits.shape[0], self.logits.shape[-1]
        rows = joint.unflatten(-1, (n_agents, n))                               # [..., N (row), N (agent), n]
        own = rows.diagonal(dim1=-3, dim2=-2).transpose(-1, -2)                 # [..., N, n]: row i's a^i one-hot
        logits = torch.einsum("...ia,ijab->...ijb", own, self.logits)
        return logits.log_softmax(-1), None


def test_discrete_influence_is_the_exact_kl_to_the_policy_weighted_marginal():
    spec = {G: GroupSpec(n_agents=2, obs_dim=1, action_space=Discrete(3))}
    algo = SIMOA(spec, 0, SIMOAConfig(hidden_dim=8))
    logits = [[[[0.0] * 3] * 3, [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 0.0, 1.5]]],
              [[[0.3, 0.0, 0.0], [0.0, -0.7, 0.2], [1.0, 1.0, -2.0]], [[0.0] * 3] * 3]]
    algo.moa = TableMOA(logits)
    taken = [2, 0]
    pi = [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]
    actions = torch.nn.functional.one_hot(torch.tensor([taken]), 3).double()
    cf, log_w = torch.eye(3, dtype=torch.float64).view(3, 1, 1, 3).expand(3, 1, 2, 3), torch.tensor(pi, dtype=torch.float64).log().T.view(3, 1, 2)
    got = algo.influence(torch.zeros(1, 2, 1, dtype=torch.float64), actions, cf, log_w)[0]

    def softmax(row):
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    for i, j in ((0, 1), (1, 0)):
        p = softmax(logits[i][j][taken[i]])
        marginal = [sum(pi[i][a] * softmax(logits[i][j][a])[b] for a in range(3)) for b in range(3)]
        expected = sum(p[b] * math.log(p[b] / marginal[b]) for b in range(3))
        assert got[i].item() == pytest.approx(expected, abs=1e-9)
    # the counterfactual set: every action, weighted by the policy's probabilities
    obs = {G: torch.randn(4, 2, 1)}
    cf, log_w = algo.counterfactual_actions(obs, {G: None}, 16)
    assert torch.equal(cf[:, 0, 1], torch.eye(3)) and cf.shape == (3, 4, 2, 3)
    assert torch.allclose(log_w.permute(1, 2, 0), algo.policy[G](obs[G]).log_probs)


def test_discrete_moa_loss_is_the_cross_entropy_of_the_next_actions():
    spec = {G: GroupSpec(n_agents=2, obs_dim=1, action_space=Discrete(3))}
    algo = SIMOA(spec, 0, SIMOAConfig(hidden_dim=8))
    logits = [[[[0.0] * 3] * 3, [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 0.0, 1.5]]],
              [[[0.3, 0.0, 0.0], [0.0, -0.7, 0.2], [1.0, 1.0, -2.0]], [[0.0] * 3] * 3]]
    algo.moa = TableMOA(logits)
    actions = torch.nn.functional.one_hot(torch.tensor([[2, 0]]), 3).double()
    got = algo.moa_loss(torch.zeros(1, 2, 1), actions, torch.tensor([[1, 2]]), algo.others.unsqueeze(0))
    # pair (0, 1): agent 0 (a^0 = 2) predicts a'^1 = 2; pair (1, 0): agent 1 (a^1 = 0) predicts a'^0 = 1
    def log_softmax(row, b):
        return row[b] - math.log(sum(math.exp(x) for x in row))

    expected = -(log_softmax(logits[0][1][2], 2) + log_softmax(logits[1][0][0], 1)) / 2
    assert got.item() == pytest.approx(expected, abs=1e-9)


def test_one_update_on_a_discrete_task():
    torch.manual_seed(0)
    env = vimarl.make_env("spread_n2", 4)
    algo = vimarl.make_algo("si_moa", env)
    batch = collect_batch(env, algo)
    before = [p.detach().clone() for p in algo.moa.parameters()]
    metrics = algo.update(batch)
    assert all(math.isfinite(v.item()) for v in metrics.values())
    assert all(not torch.equal(old, new) for old, new in zip(before, algo.moa.parameters()))
    assert metrics["influence"] > 0  # exact KLs are non-negative; a random MOA depends on a^i
