"""MAMD (paper 004, Sec. 5.1): the q-log, the mirror-descent KL term of Eq. 10 against an old policy
refreshed every md_delay updates, the epsilon -> infinity limit (MAAC), updates on real envs, checkpoints."""

import math

import pytest
import torch
from torch import Tensor

import vimarl
from vimarl.algos.maac import AttentionSAC, AttentionSACConfig
from vimarl.algos.mamd import (MirrorDescentAttentionSAC, MirrorDescentConfig, categorical_divergence,
                               probability_log, tsallis_log)
from vimarl.buffer import Transition
from vimarl.config import resolve
from vimarl.envs.base import Discrete, GroupSpec
from vimarl.errors import VimarlError
from vimarl.train import fill_replay

from helpers import assert_same_state, random_discrete_transition

N, OBS, A = 3, 2, 3
SPEC = {"agents": GroupSpec(n_agents=N, obs_dim=OBS, action_space=Discrete(A))}
SMALL = dict(critic_hidden_dim=8, attend_heads=2, policy_hidden_dim=4)


def tiny(**config) -> MirrorDescentAttentionSAC:
    return MirrorDescentAttentionSAC(SPEC, 0, MirrorDescentConfig(**SMALL, **config))


def batch_of(b: int) -> Transition:
    return random_discrete_transition(b, N, OBS, A)


def moved_away_with_maac_twin(**config):
    """An algorithm whose policy has left its old copy (two updates), a MAAC with the same weights, the batch."""
    torch.manual_seed(0)
    algo = tiny(tsallis_q=1.0, md_delay=100, **config)
    batch = batch_of(64)
    algo.update(batch)
    algo.update(batch)
    maac = AttentionSAC(SPEC, 0, AttentionSACConfig(**SMALL))
    maac.load_state_dict({k: v for k, v in algo.state_dict().items() if not k.startswith(("old_policy", "md_"))})
    return algo, maac, batch


def old_equals_current(algo) -> bool:
    old, current = algo.old_policy.state_dict(), algo.policy.state_dict()
    return all(torch.equal(old[k], current[k]) for k in current)


def test_tsallis_log_is_the_log_at_q_one_and_the_formula_elsewhere():
    x = torch.tensor([0.25, 1.0, 4.0])
    assert torch.equal(tsallis_log(x.log(), 1.0), x.log())
    # (x^(1-q) - 1) / (1 - q): q = 0.5 -> 2 (sqrt x - 1); q = 2 -> 1 - 1/x; q = 0 -> x - 1.
    assert torch.allclose(tsallis_log(x.log(), 0.5), torch.tensor([-1.0, 0.0, 2.0]))
    assert torch.allclose(tsallis_log(x.log(), 2.0), torch.tensor([-3.0, 0.0, 0.75]))
    assert torch.allclose(tsallis_log(x.log(), 0.0), torch.tensor([-0.75, 0.0, 3.0]))
    # The algorithm's field is MDPO's tsallis_q, exponent q = 2 - tsallis_q (Table 1: 0.2 -> 1.8).
    assert tiny().q_exponent == pytest.approx(1.8) and tiny(tsallis_q=1.0).q_exponent == 1.0


def test_categorical_divergence_is_the_exact_kl_over_valid_actions():
    p = torch.tensor([0.5, 0.5, 0.0])
    p_old = torch.tensor([0.25, 0.75, 0.0])
    valid = torch.tensor([True, True, False])
    log_p = p.log().requires_grad_()
    kl = categorical_divergence(log_p, p_old.log(), valid)
    assert torch.allclose(kl, torch.tensor(0.5 * math.log(2) + 0.5 * math.log(2 / 3)))
    kl.backward()
    assert torch.isfinite(log_p.grad).all()  # the masked action (log 0 - log 0) leaks no nan
    assert torch.allclose(categorical_divergence(p_old.log(), p_old.log(), valid, q=1.8), torch.tensor(0.0))


def test_exact_penalty_has_the_expected_score_gradient_for_every_q():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, requires_grad=True)
    old = torch.randn(4, 5).log_softmax(-1)

    def gradient(log_old: Tensor, q: float, score_gradient: bool) -> Tensor:
        penalty = categorical_divergence(logits.log_softmax(-1), log_old, None, q, score_gradient).sum()
        return torch.autograd.grad(penalty, logits)[0]

    # At the old policy the penalty's gradient vanishes for the q-log too (differentiating the q-log gap would not:
    # that term pulls the policy to determinism).
    at_old = logits.detach().log_softmax(-1)
    assert torch.allclose(gradient(at_old, 1.8, True), torch.zeros(4, 5), atol=1e-7)
    assert gradient(at_old, 1.8, False).abs().max() > 0.1
    # It is the expectation of the sampled estimator's gradient, sum_a pi(a) grad log pi(a) gap(a) ...
    log_p = logits.log_softmax(-1)
    gap = (probability_log(log_p, 1.8) - probability_log(old, 1.8)).detach()
    expected = torch.autograd.grad((log_p.exp().detach() * log_p * gap).sum(), logits)[0]
    assert torch.allclose(gradient(old, 1.8, True), expected, atol=1e-6)
    # ... and at q = 1 the gradient of the KL itself.
    assert torch.allclose(gradient(old, 1.0, True), gradient(old, 1.0, False), atol=1e-6)


def test_kl_term_is_zero_at_the_old_policy_and_positive_after_a_policy_step():
    torch.manual_seed(0)
    algo = tiny(tsallis_q=1.0, md_delay=100)
    batch = batch_of(64)
    first = algo.update(batch)  # measured before the step: the policy is still its copy
    assert all(first[f"kl_{i}"] == 0.0 for i in range(N)) and first["kl"] == 0.0
    second = algo.update(batch)
    assert all(second[f"kl_{i}"] > 0.0 for i in range(N))
    assert second["epsilon_i"] == pytest.approx(1.0 / N)


@pytest.mark.parametrize("estimator", ["exact", "sample"])
def test_at_a_refresh_the_trust_region_does_not_change_the_loss(estimator):
    torch.manual_seed(0)
    algo = tiny(tsallis_q=1.0, kl_estimator=estimator)
    batch = batch_of(64)
    losses = []
    for epsilon_i in (1e-3, 1e12):
        algo.epsilon_i = epsilon_i
        torch.manual_seed(5)
        losses.append(algo.policy_loss(batch)[0])
    assert torch.equal(losses[0], losses[1])


def test_old_policy_is_a_hard_copy_every_md_delay_updates_and_frozen_in_between():
    torch.manual_seed(0)
    algo = tiny(md_delay=3)
    batch = batch_of(32)
    assert old_equals_current(algo)  # Algorithm 1 line 3
    snapshots = []
    for update in range(1, 8):
        algo.update(batch)
        assert algo.md_iteration.item() == update
        assert old_equals_current(algo) == (update % 3 == 0), update
        snapshots.append({k: v.clone() for k, v in algo.old_policy.state_dict().items()})
    for refreshed, later in [(2, 3), (2, 4), (5, 6)]:  # snapshots after updates 3, 4, 5 and 6, 7
        assert all(torch.equal(snapshots[refreshed][k], snapshots[later][k]) for k in snapshots[refreshed])
    assert not all(torch.equal(snapshots[2][k], snapshots[5][k]) for k in snapshots[2])
    assert all(not p.requires_grad for p in algo.old_policy.parameters())


@pytest.mark.parametrize("estimator", ["exact", "sample"])
def test_with_a_huge_trust_region_the_policy_loss_is_maacs(estimator):
    algo, maac, batch = moved_away_with_maac_twin(kl_estimator=estimator, trust_region=1e15)
    torch.manual_seed(5)
    loss, entropy = algo.policy_loss(batch)
    assert algo.last_kl_rows.sum() > 0
    torch.manual_seed(5)
    expected, expected_entropy = maac.policy_loss(batch)
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0) and torch.equal(entropy, expected_entropy)
    # A tight trust region is felt: the same batch and seed give another loss.
    algo.epsilon_i = 1e-4
    torch.manual_seed(5)
    assert not torch.allclose(algo.policy_loss(batch)[0], expected, atol=1e-3)


def test_sample_estimate_adds_the_kl_at_the_sampled_action_to_the_score_weight():
    torch.manual_seed(0)
    algo = tiny(tsallis_q=1.0, kl_estimator="sample", md_delay=100)
    batch = batch_of(64)
    algo.update(batch)
    torch.manual_seed(5)
    loss, _ = algo.policy_loss(batch)
    algo.epsilon_i = 1e15
    torch.manual_seed(5)
    without, _ = algo.policy_loss(batch)
    # Rebuild the added term log pi(a~) (log pi(a~) - log pi_old(a~)) / epsilon_i with the same sample.
    obs = batch.obs["agents"]
    torch.manual_seed(5)
    _, distribution = algo.distribution(algo.policy, obs, None)
    sample = distribution.sample()
    _, old = algo.distribution(algo.old_policy, obs, None)
    log_pi = sample.log_prob.detach()
    added = (log_pi * (log_pi - old.log_prob(sample.action)) * N).mean(0).sum()  # epsilon_i = 1 / N
    assert torch.allclose(loss - without, added, atol=1e-5)


@pytest.mark.parametrize("env_name", ["spread_n2", "rover_tower", "spread3"])
def test_update_on_a_real_env_moves_every_parameter(env_name):
    env = vimarl.make_env(env_name, 4)
    algo = vimarl.make_algo("mamd", env, md_delay=1)  # the old copy refreshes after this update too
    codec, buffer = fill_replay(env, algo, 20, capacity=1000)
    before = {k: v.clone() for k, v in algo.named_parameters()}
    metrics = algo.update(codec.decode(buffer.sample(32)))
    n = algo.n_agents
    assert set(metrics) == {"loss_q", "attention_reg", "loss_policy", "entropy", "kl", "epsilon_i",
                            *(f"kl_{i}" for i in range(n))}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in metrics.values())
    assert metrics["epsilon_i"] == pytest.approx(1.0 / n)
    unmoved = [k for k, v in algo.named_parameters() if torch.equal(v, before[k])]
    assert not unmoved
    assert old_equals_current(algo)


def test_state_dict_round_trip_keeps_the_counter_and_the_old_policy():
    torch.manual_seed(0)
    first = tiny(md_delay=3)
    batch = batch_of(32)
    for _ in range(4):
        first.update(batch)  # refreshed at 3, then moved once
    second = tiny(md_delay=3)
    second.load_state_dict(first.state_dict())
    assert second.md_iteration.item() == 4
    assert all(torch.equal(a, b) for a, b in zip(first.old_policy.state_dict().values(),
                                                 second.old_policy.state_dict().values()))
    assert not old_equals_current(second)
    for _ in range(2):  # both refresh at update 6
        torch.manual_seed(1)
        first.update(batch)
        torch.manual_seed(1)
        second.update(batch)
    assert old_equals_current(first) and old_equals_current(second)
    assert_same_state(first, second)


def test_unconstrained_agents_of_a_hand_assigned_decomposition_follow_maac():
    """MAMD-OP (004 App. F): local_trust_regions = inf for every agent is MAAC; a finite one is felt."""
    algo, maac, batch = moved_away_with_maac_twin(local_trust_regions=(math.inf, math.inf, math.inf))
    torch.manual_seed(5)
    loss, _ = algo.policy_loss(batch)
    torch.manual_seed(5)
    assert torch.allclose(loss, maac.policy_loss(batch)[0], atol=1e-6, rtol=0)
    algo.epsilon_i = torch.tensor([math.inf, 1e-4, math.inf])
    torch.manual_seed(5)
    assert not torch.allclose(algo.policy_loss(batch)[0], loss, atol=1e-3)


@pytest.mark.parametrize("preset, coupling, regions", [
    ("op_sep", "sep", (math.inf,) * 3), ("op_mix", "mix", (0.5, 0.5, math.inf)), ("op_ful", "ful", (1 / 3,) * 3)])
def test_mamd_op_presets_assign_the_trust_regions_by_coupling(preset, coupling, regions):
    run = resolve("mamd", "spread3", preset=preset)
    assert run.env_config.coupling == coupling
    assert run.algo_config.local_trust_regions == pytest.approx(regions)
    algo = vimarl.make_algo("mamd", vimarl.make_env("spread3", 2, coupling=coupling), run.algo_config)
    assert algo.epsilon_i.tolist() == pytest.approx(list(regions))


def test_trust_regions_must_match_the_agents():
    with pytest.raises(VimarlError, match="needs 3 positive values"):
        vimarl.make_algo("mamd", vimarl.make_env("spread3", 2), local_trust_regions=(1.0, 1.0))
    with pytest.raises(VimarlError, match="mamt learns its local trust regions"):
        vimarl.make_algo("mamt", vimarl.make_env("spread3", 2), local_trust_regions=(1.0, 1.0, 1.0))
