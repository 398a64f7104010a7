"""MAVEN on MA-AC: one z per episode and sub-environment (redrawn at episode ends, stored in the replay,
fresh for evaluation), the discriminator's MI loss and the EZ agent's REINFORCE loss on hand-computed
cases, actor and critics reading z and checkpoints with the carried z (its learning run is in
test_learning.py)."""

import dataclasses
import math

import pytest
import torch

import vimarl
import vimarl.algos.maven  # registers "maven" (the lead adds it to vimarl/algos/__init__.py)
from vimarl.algos.maven import EPISODE_Z, MAVEN
from vimarl.algos.vm3ac import MAAC
from vimarl.train import act, fill_replay

G = "agents"
APART = torch.zeros(2, 2)  # two_agents_meet: no displacement, the agents stay 2 apart
MEET = torch.tensor([[0.9, 0.0], [-0.9, 0.0]])  # both step 0.9 towards the other: 0.2 < 0.25, they meet


def constant_logits(net, logits):
    """An MLP (vimarl.nn.mlp) whose output is `logits` whatever its input."""
    layers = [m for m in net if hasattr(m, "weight")]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()
        layers[-1].bias.copy_(torch.tensor(logits))


def policy_inputs(algo):
    """Every policy input [o^i, onehot(z)] seen by act()."""
    seen = []
    algo.policy[G].net.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    return seen


def counting_draws(algo):
    """draw_z returns n * B + b on its n-th call (n from 0, b the row): every draw differs from every earlier
    one. `act` draws once at the first step, `observe` once per step (keeping the rows whose episode ended)."""
    calls = []

    def draw(x0):
        calls.append(x0.shape[0])
        return (len(calls) - 1) * x0.shape[0] + torch.arange(x0.shape[0])
    algo.draw_z = draw
    return calls


def test_z_is_held_for_an_episode_and_redrawn_where_that_sub_environment_ends():
    env = vimarl.make_env("two_agents_meet", 2, episode_length=50)
    algo = vimarl.make_algo("maven", env, noise_dim=64)
    counting_draws(algo)
    seen = policy_inputs(algo)
    step = env.reset(seed=0)
    played, stored, done = [], [], []
    # env 0 meets on the third step (its episode ends), env 1 never does.
    for t in range(5):
        act(algo, step, explore=True)
        played.append(algo.episode_z.clone())
        action = {G: torch.stack([MEET if t == 2 else APART, APART])}
        next_step = env.step(action)
        algo.observe(step, action, next_step)
        stored.append(algo.replay_values(action)[EPISODE_Z][G].clone())
        done.append(next_step.done.clone())
        step = next_step
    assert [d.tolist() for d in done] == [[False, False]] * 2 + [[True, False]] + [[False, False]] * 2
    assert [z.tolist() for z in played] == [[0, 1], [0, 1], [0, 1], [6, 1], [6, 1]]
    # The replay gets the z each step was taken with, also on the step that ended an episode.
    assert torch.equal(torch.stack(stored), torch.stack(played))
    for inputs, z in zip(seen, played):  # every agent's policy reads onehot(its episode's z)
        one_hot = torch.nn.functional.one_hot(z, 64).float()
        assert torch.equal(inputs[..., 2:], one_hot.unsqueeze(1).expand(-1, 2, -1))


def test_warm_up_steps_get_a_z_without_act():
    env = vimarl.make_env("two_agents_meet", 3)
    algo = vimarl.make_algo("maven", env)
    step = env.reset(seed=0)
    action = {G: torch.zeros(3, 2, 2)}
    algo.observe(step, action, env.step(action))
    z = algo.replay_values(action)[EPISODE_Z][G]
    assert z.shape == (3,) and z.dtype == torch.int64
    assert torch.equal(z, algo.episode_z)


def test_z_policy_draws_from_the_first_observation():
    env = vimarl.make_env("two_agents_meet", 200)
    algo = vimarl.make_algo("maven", env, noise_dim=3)
    constant_logits(algo.z_policy, [0.0, math.log(3.0), -30.0])  # pi_z = (1/4, 3/4, ~0)
    torch.manual_seed(0)
    z = algo.current_z({G: env.reset(seed=0).groups[G].obs})
    counts = torch.bincount(z, minlength=3)
    assert counts[2] == 0 and 120 <= counts[1] <= 180
    uniform = vimarl.make_algo("maven", env, noise_dim=3, z_policy="uniform")
    constant_logits(uniform.z_policy, [0.0, 0.0, 30.0])  # unused: z ~ U{0, 1, 2}
    counts = torch.bincount(uniform.current_z({G: env.reset(seed=0).groups[G].obs}), minlength=3)
    assert counts.min() >= 40


def test_evaluation_draws_fresh_z_and_training_keeps_its_own():
    env = vimarl.make_env("two_agents_meet", 4)
    algo = vimarl.make_algo("maven", env, noise_dim=5)
    constant_logits(algo.z_policy, [-30.0, -30.0, -30.0, 30.0, -30.0])  # the learned pi_z picks z = 3
    step = env.reset(seed=0)
    act(algo, step, explore=True)
    training = algo.episode_z.clone()
    with algo.execution():
        assert algo.episode_z is None  # evaluation starts its own episodes
        act(algo, step, explore=False)
        assert algo.episode_z.tolist() == [3, 3, 3, 3]
    assert torch.equal(algo.episode_z, training)
    assert algo.evaluation_modes() == {"z_uniform": "uniform"}  # MAVEN's test_uniform runs
    torch.manual_seed(0)
    with algo.execution("uniform"):
        drawn = torch.cat([algo.draw_z(torch.zeros(50, 4)) for _ in range(4)])
    assert len(drawn.unique()) == 5
    assert not algo.uniform_z and torch.equal(algo.episode_z, training)
    assert vimarl.make_algo("maven", env, z_policy="uniform").evaluation_modes() == {}


def test_finished_episodes_are_filed_with_their_first_observation_z_and_return():
    env = vimarl.make_env("two_agents_meet", 2, episode_length=2)
    algo = vimarl.make_algo("maven", env, z_buffer_size=3)
    counting_draws(algo)
    step = env.reset(seed=0)
    first = step.groups[G].obs.flatten(1).clone()
    rewards = torch.zeros(2)
    for t in range(3):  # env 0: apart, meets (return -2 + -0.2); env 1: apart, apart (cut, -4); env 0 again
        action = {G: torch.stack([MEET if t == 1 else APART, APART])}
        next_step = env.step(action)
        if t < 2:
            rewards += next_step.groups[G].reward.mean(-1)
        algo.observe(step, action, next_step)
        step = next_step
    assert algo.z_memory_count.item() == 2
    assert torch.equal(algo.z_memory_x0[:2], first)
    assert algo.z_memory_z[:2].tolist() == [0, 1]
    assert torch.allclose(algo.z_memory_return[:2], rewards)
    assert rewards.tolist() == pytest.approx([-2.2, -4.0], abs=1e-5)
    for t in range(3, 9):  # every 2 steps both episodes end (t = 3, 5, 7): the FIFO of 3 wraps around
        action = {G: torch.zeros(2, 2, 2)}
        next_step = env.step(action)
        algo.observe(step, action, next_step)
        step = next_step
    assert algo.z_memory_count.item() == 8
    # The episodes after an end at step t got draw t + 1, [2 (t + 1), 2 (t + 1) + 1]. Filed in order
    # (env 0 first) into slots 2, 0 (t = 3), 1, 2 (t = 5), 0, 1 (t = 7): the newest three remain.
    assert algo.z_memory_z[:3].tolist() == [12, 13, 9]


def test_mi_loss_is_the_discriminators_cross_entropy_on_the_true_z():
    env = vimarl.make_env("two_agents_meet", 2)
    algo = vimarl.make_algo("maven", env, noise_dim=3, mi_weight=0.5)
    constant_logits(algo.discriminator, [1.0, 2.0, 0.0])
    x, actions = torch.randn(2, 4), torch.randn(2, 2, 2)
    log_z = math.log(math.e + math.e**2 + 1.0)
    expected = 0.5 * ((log_z - 2.0) + (log_z - 0.0))  # z = 1 and z = 2
    assert algo.mi_loss(x, actions, torch.tensor([1, 2])).item() == pytest.approx(expected, abs=1e-6)
    # The actor loss is MA-AC's plus lambda_MI times it, on the z stored with the batch.
    codec, buffer = fill_replay(env, algo, 4)
    batch = codec.decode(buffer.sample(6))
    z = algo.stored_z(batch)
    extended = dataclasses.replace(batch, obs=algo.with_z(batch.obs, z), next_obs=algo.with_z(batch.next_obs, z))
    actions = torch.randn(6, 2, 2)
    log_pi, mi = torch.zeros(6, 2), torch.zeros(6, 2)
    ma_ac = MAAC.actor_loss(algo, extended, actions, log_pi, mi)
    cross_entropy = torch.nn.functional.cross_entropy(torch.tensor([[1.0, 2.0, 0.0]]).expand(6, -1), z)
    got = algo.actor_loss(extended, actions, log_pi, mi)
    assert got.item() == pytest.approx(ma_ac.item() + 0.5 * cross_entropy.item(), abs=1e-5)


def test_mi_gradient_reaches_the_discriminator_and_every_agents_action():
    env = vimarl.make_env("two_agents_meet", 2)
    algo = vimarl.make_algo("maven", env)
    actions = torch.randn(3, 2, 2, requires_grad=True)
    algo.mi_loss(torch.randn(3, 4), actions, torch.tensor([0, 5, 9])).backward()
    assert (actions.grad.abs().sum(-1) > 0).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.discriminator.parameters())


def test_z_policy_loss_is_reinforce_on_episode_returns_with_the_entropy_term():
    env = vimarl.make_env("two_agents_meet", 2)
    algo = vimarl.make_algo("maven", env, noise_dim=3, z_entropy_weight=0.1)
    constant_logits(algo.z_policy, [0.0, math.log(2.0), math.log(5.0)])  # pi_z = (1/8, 2/8, 5/8)
    z, returns = torch.tensor([0, 2, 2]), torch.tensor([1.5, -2.0, 4.0])
    log_p = [math.log(1 / 8), math.log(5 / 8), math.log(5 / 8)]
    expected = -sum(lp * r for lp, r in zip(log_p, returns.tolist())) + 0.1 * sum(log_p)
    assert algo.z_policy_loss(torch.randn(3, 4), z, returns).item() == pytest.approx(expected, abs=1e-5)


def test_z_policy_steps_only_once_episodes_are_filed():
    env = vimarl.make_env("two_agents_meet", 2, episode_length=2)
    algo = vimarl.make_algo("maven", env)
    before = [p.detach().clone() for p in algo.z_policy.parameters()]
    assert algo.z_policy_step().item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, algo.z_policy.parameters()))
    fill_replay(env, algo, 2)  # both episodes end
    algo.z_policy_step()
    assert all(not torch.equal(a, b) for a, b in zip(before, algo.z_policy.parameters()))


def test_actor_and_critics_read_z():
    env = vimarl.make_env("pp_capture_n2", 2)
    algo = vimarl.make_algo("maven", env, noise_dim=4)
    spec = env.groups["predators"]
    x_width = spec.n_agents * (spec.obs_dim + 4)
    assert algo.policy["predators"].net.net[0].weight.shape[1] == spec.obs_dim + 4
    assert algo.v.net[0].weight.shape[1] == x_width  # V^i(x, z): z once per agent in x
    obs = {"predators": env.reset(seed=0).groups["predators"].obs}
    first, second = algo.with_z(obs, torch.tensor([0, 0])), algo.with_z(obs, torch.tensor([3, 3]))
    mode = [algo.policy["predators"](o["predators"]).mode() for o in (first, second)]
    assert not torch.allclose(mode[0], mode[1])  # pi^i(a | o^i, z)
    values = [algo.values(o) for o in (first, second)]
    assert not torch.allclose(values[0], values[1])  # V^i(x, z)
    inputs = [vimarl.nn.centralized.joint_input([o["predators"]], mode[0]) for o in (first, second)]
    q = [algo.critics.values(i)[0] for i in inputs]
    assert not torch.allclose(q[0], q[1])  # Q^i(x, z, a)
    # act() plays the policy of the episode's z.
    algo.episode_z = torch.tensor([3, 3])
    assert torch.equal(algo.act(obs, {"predators": None}, explore=False)["predators"], mode[1])


def test_one_update_moves_every_network_on_the_stored_z():
    torch.manual_seed(0)
    env = vimarl.make_env("pp_capture_n2", 2, episode_length=3)
    algo = vimarl.make_algo("maven", env)
    codec, buffer = fill_replay(env, algo, 6)
    batch = codec.decode(buffer.sample(8))
    modules = {"policy": algo.policy, "q": algo.critics.q, "v": algo.v, "discriminator": algo.discriminator,
               "z_policy": algo.z_policy, "target_v": algo.target_v}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in modules.items()}
    metrics = algo.update(batch)
    assert {"loss_v", "loss_q", "loss_policy", "loss_mi", "loss_z_policy"} <= set(metrics)
    assert all(math.isfinite(v.item()) for v in metrics.values())
    for name, module in modules.items():
        for old, new in zip(before[name], module.parameters()):
            assert not torch.equal(old, new), name
    # loss_mi is the cross-entropy on the batch's stored z (the discriminator read x and a without z).
    assert metrics["loss_mi"].item() == pytest.approx(math.log(16), abs=0.5)


def test_checkpoint_round_trip_keeps_networks_fifo_and_carried_z(tmp_path):
    env = vimarl.make_env("two_agents_meet", 3, episode_length=4)
    a = vimarl.make_algo("maven", env)
    codec, buffer = fill_replay(env, a, 9)
    a.update(codec.decode(buffer.sample(8)))
    torch.save(a.state_dict(), tmp_path / "algo.pt")
    b = vimarl.make_algo("maven", env)
    b.load_state_dict(torch.load(tmp_path / "algo.pt", weights_only=True))
    for key in ("episode_z", "episode_x0", "episode_return", "acted_z"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert torch.equal(a.z_memory_z, b.z_memory_z) and a.z_memory_count.item() == b.z_memory_count.item() == 6
    step = env.reset(seed=1)
    assert torch.equal(act(a, step, explore=False)[G], act(b, step, explore=False)[G])
    batch = codec.decode(buffer.sample(8))
    losses = []
    for algo in (a, b):
        torch.manual_seed(3)
        losses.append({k: v.item() for k, v in algo.update(batch).items()})
    assert losses[0] == losses[1]


def test_bad_settings_are_refused():
    env = vimarl.make_env("two_agents_meet", 2)
    with pytest.raises(vimarl.errors.VimarlError, match="latent_dim"):
        vimarl.make_algo("maven", env, latent_dim=4)
    with pytest.raises(vimarl.errors.VimarlError, match="z_batch_size"):
        vimarl.make_algo("maven", env, z_batch_size=0)
    assert isinstance(vimarl.make_algo("maven", env, z_policy="uniform", z_batch_size=0), MAVEN)
