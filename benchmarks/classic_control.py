"""tether's PPO core against CleanRL's published benchmark, on gymnasium environments.

    .venv/bin/pip install "gymnasium[mujoco]==1.4.0"      # benchmark-only, never a tether dependency
    .venv/bin/python benchmarks/classic_control.py [--env CartPole-v1 Hopper-v4] [--seeds 1 2 3]

A small actor-critic MLP (64x64 tanh, orthogonal init) is trained with tether.algo's own functions,
the ones the LLM trainer calls: `gae`, `masked_whiten`, `clipped_policy_loss`, `clipped_value_loss`,
`entropy_loss`, and (discrete actions) `logprobs_from_logits` / `entropy_from_logits`. Settings
are CleanRL's defaults: `ppo.py` for CartPole (4 envs x 128 steps, 4 minibatches, 4 epochs,
lr 2.5e-4, entropy 0.01), `ppo_continuous_action.py` for MuJoCo (1 env x 2048 steps,
32 minibatches, 10 epochs, lr 3e-4, observation and reward normalisation); both anneal the
learning rate linearly, gamma 0.99, lambda 0.95, clip 0.2 (policy and value), value coefficient
0.5, max grad norm 0.5, Adam eps 1e-5, advantages whitened per minibatch. As in CleanRL, an
episode cut by the time limit counts as ended (no bootstrap), and a rollout cut mid-episode
bootstraps with the critic's value of the next observation.

Printed per environment and seed: the mean return of the last 100 finished episodes at the end
of training, and CleanRL's published figure beside it (its benchmark: 3 seeds, mean +- std).
This doubles as the example of tether.algo used as a plain library.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tether.algo import clipped_policy_loss, clipped_value_loss, entropy_loss, gae, masked_whiten
from tether.algo.logprobs import entropy_from_logits, logprobs_from_logits


@dataclass(frozen=True)
class Settings:
    total_steps: int
    num_envs: int
    num_steps: int
    learning_rate: float
    num_minibatches: int
    epochs: int
    ent_coef: float
    continuous: bool
    cleanrl: str  # CleanRL's published mean +- std episodic return at total_steps
    target: float  # what this benchmark must reach (mean over seeds)


CLASSIC = dict(total_steps=500_000, num_envs=4, num_steps=128, learning_rate=2.5e-4, num_minibatches=4, epochs=4,
               ent_coef=0.01, continuous=False)
MUJOCO = dict(total_steps=1_000_000, num_envs=1, num_steps=2048, learning_rate=3e-4, num_minibatches=32, epochs=10,
              ent_coef=0.0, continuous=True)
ENVIRONMENTS = {
    "CartPole-v1": Settings(**CLASSIC, cleanrl="490 +- 6 (ppo.py, 500k steps)", target=475.0),
    "Hopper-v5": Settings(**MUJOCO, cleanrl="2383 +- 272 (ppo_continuous_action.py, Hopper-v4, 1M steps)",
                          target=2000.0),
    "Hopper-v4": Settings(**MUJOCO, cleanrl="2383 +- 272 (ppo_continuous_action.py, 1M steps)", target=2000.0),
}
GAMMA, LAM, CLIP, VF_COEF, MAX_GRAD_NORM = 0.99, 0.95, 0.2, 0.5, 0.5


def layer(inputs: int, outputs: int, std: float = math.sqrt(2)) -> nn.Linear:
    linear = nn.Linear(inputs, outputs)
    nn.init.orthogonal_(linear.weight, std)
    nn.init.constant_(linear.bias, 0.0)
    return linear


class Agent(nn.Module):
    """CleanRL's: separate 64x64 tanh actor and critic; a state-independent log-std for continuous actions."""

    def __init__(self, observations: int, actions: int, continuous: bool):
        super().__init__()
        self.continuous = continuous
        self.critic = nn.Sequential(layer(observations, 64), nn.Tanh(), layer(64, 64), nn.Tanh(), layer(64, 1, 1.0))
        self.actor = nn.Sequential(layer(observations, 64), nn.Tanh(), layer(64, 64), nn.Tanh(),
                                   layer(64, actions, 0.01))
        if continuous:
            self.log_std = nn.Parameter(torch.zeros(1, actions))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.actor(obs)
        if self.continuous:
            return torch.normal(out, self.log_std.exp().expand_as(out))
        return torch.multinomial(out.softmax(-1), 1).squeeze(-1)

    def logprob_entropy(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) log pi(a|s) and entropy; discrete actions go through tether's token log-prob functions."""
        out = self.actor(obs)
        if self.continuous:
            dist = torch.distributions.Normal(out, self.log_std.exp().expand_as(out))
            return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)
        logits = out.unsqueeze(0)  # (1, N, A): one "sequence" of N steps
        return logprobs_from_logits(logits, actions.unsqueeze(0))[0], entropy_from_logits(logits)[0]


def make_env(env_id: str, settings: Settings, seed: int):
    import gymnasium as gym

    env = gym.make(env_id)
    env = gym.wrappers.RecordEpisodeStatistics(env)  # the raw return, before the normalising wrappers
    if settings.continuous:  # ppo_continuous_action.py's wrappers
        env = gym.wrappers.ClipAction(env)
        env = gym.wrappers.NormalizeObservation(env)
        env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10, 10), env.observation_space)
        env = gym.wrappers.NormalizeReward(env, gamma=GAMMA)
        env = gym.wrappers.TransformReward(env, lambda reward: float(np.clip(reward, -10, 10)))
    env.action_space.seed(seed)
    return env


def segments(dones: np.ndarray) -> list[tuple[int, int, int]]:
    """(env, start, end) runs of steps within one episode: dones[t, e] ends a run after step t."""
    runs = []
    for env in range(dones.shape[1]):
        start = 0
        for t in range(dones.shape[0]):
            if dones[t, env] or t == dones.shape[0] - 1:
                runs.append((env, start, t + 1))
                start = t + 1
    return runs


def advantages_by_episode(rewards, values, dones, next_values):
    """GAE with tether's `gae`, one row per episode piece (its value after the last step is 0): a
    piece the rollout cut mid-episode gets gamma * V(next observation) added to its last reward,
    which makes its last delta r + gamma V(s') - V(s) exactly as in CleanRL. Returns the flat step
    order the rows were laid out in, and the (advantages, returns) in that order."""
    runs = segments(dones)
    width = max(end - start for _, start, end in runs)
    r = torch.zeros(len(runs), width)
    v = torch.zeros(len(runs), width)
    mask = torch.zeros(len(runs), width, dtype=torch.bool)
    order = []
    for row, (env, start, end) in enumerate(runs):
        n = end - start
        r[row, :n], v[row, :n], mask[row, :n] = rewards[start:end, env], values[start:end, env], True
        if not dones[end - 1, env]:
            r[row, n - 1] += GAMMA * next_values[env]
        order += [(t, env) for t in range(start, end)]
    adv, ret = gae(r, v, mask, GAMMA, LAM)
    return order, adv[mask], ret[mask]


def train(env_id: str, seed: int, settings: Settings, log_every: int) -> float:
    torch.manual_seed(seed)
    np.random.seed(seed)
    envs = [make_env(env_id, settings, seed + i) for i in range(settings.num_envs)]
    obs_dim = envs[0].observation_space.shape[0]
    space = envs[0].action_space
    act_dim = space.shape[0] if settings.continuous else space.n
    agent = Agent(obs_dim, act_dim, settings.continuous)
    optimizer = torch.optim.Adam(agent.parameters(), lr=settings.learning_rate, eps=1e-5)
    obs = torch.tensor(np.array([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]), dtype=torch.float32)
    batch = settings.num_envs * settings.num_steps
    updates = settings.total_steps // batch
    returns: deque[float] = deque(maxlen=100)
    started, steps = time.perf_counter(), 0
    for update in range(1, updates + 1):
        for group in optimizer.param_groups:  # linear annealing to 0, as CleanRL
            group["lr"] = (1.0 - (update - 1.0) / updates) * settings.learning_rate
        shape = (settings.num_steps, settings.num_envs)
        buf_obs = torch.zeros(*shape, obs_dim)
        buf_act = torch.zeros(*shape, act_dim) if settings.continuous else torch.zeros(shape, dtype=torch.long)
        buf_logp, buf_val, buf_rew = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        dones = np.zeros(shape, dtype=bool)
        for t in range(settings.num_steps):
            with torch.no_grad():
                action = agent.act(obs)
                logp, _ = agent.logprob_entropy(obs, action)
                buf_val[t] = agent.value(obs)
            buf_obs[t], buf_act[t], buf_logp[t] = obs, action, logp
            next_obs = []
            for i, env in enumerate(envs):
                a = action[i].numpy() if settings.continuous else int(action[i])
                o, reward, terminated, truncated, info = env.step(a)
                buf_rew[t, i] = float(reward)
                if terminated or truncated:  # an ended episode (CleanRL: truncation too); reset at once
                    dones[t, i] = True
                    returns.append(float(info["episode"]["r"]))
                    o, _ = env.reset()
                next_obs.append(o)
            obs = torch.tensor(np.array(next_obs), dtype=torch.float32)
        steps += batch
        with torch.no_grad():
            next_values = agent.value(obs)
        order, advantages, value_targets = advantages_by_episode(buf_rew, buf_val, dones, next_values)
        t_idx = torch.tensor([t for t, _ in order])
        e_idx = torch.tensor([e for _, e in order])
        b_obs, b_act, b_logp, b_val = (x[t_idx, e_idx] for x in (buf_obs, buf_act, buf_logp, buf_val))
        optimise(agent, optimizer, settings, b_obs, b_act, b_logp, b_val, advantages, value_targets)
        if log_every and update % log_every == 0:
            mean = sum(returns) / len(returns) if returns else float("nan")
            print(f"  {env_id} seed {seed}: {steps:>8} steps, mean return (last {len(returns)}) {mean:8.1f}, "
                  f"{time.perf_counter() - started:6.0f} s", flush=True)
    return sum(returns) / max(len(returns), 1)


def optimise(agent, optimizer, settings: Settings, obs, actions, old_logp, old_values, advantages, targets) -> None:
    size = obs.shape[0]
    minibatch = size // settings.num_minibatches
    for _ in range(settings.epochs):
        order = torch.randperm(size)
        for start in range(0, size, minibatch):
            mb = order[start : start + minibatch]
            logp, entropy = agent.logprob_entropy(obs[mb], actions[mb])
            values = agent.value(obs[mb])
            row = lambda x: x.unsqueeze(0)  # noqa: E731 - one (1, M) "sequence" per minibatch
            mask = torch.ones(1, len(mb), dtype=torch.bool)
            adv = masked_whiten(row(advantages[mb]), mask)
            pg_loss, _ = clipped_policy_loss(row(logp), row(old_logp[mb]), adv, mask, CLIP)
            v_loss, _ = clipped_value_loss(row(values), row(old_values[mb]), row(targets[mb]), mask, CLIP)
            ent_loss, _ = entropy_loss(row(entropy), mask)
            # tether's value loss carries the 1/2 already (as CleanRL's v_loss)
            loss = pg_loss + settings.ent_coef * ent_loss + VF_COEF * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), MAX_GRAD_NORM)
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", nargs="+", default=["CartPole-v1", "Hopper-v4"], choices=sorted(ENVIRONMENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=None, help="override the total steps (a quick try)")
    parser.add_argument("--log-every", type=int, default=50, help="updates between progress lines (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = []
    for env_id in args.env:
        settings = ENVIRONMENTS[env_id]
        if args.steps:
            settings = Settings(**{**settings.__dict__, "total_steps": args.steps})
        finals = []
        for seed in args.seeds:
            started = time.perf_counter()
            final = train(env_id, seed, settings, args.log_every)
            finals.append(final)
            table.append((env_id, seed, final, time.perf_counter() - started, settings))
            print(f"{env_id} seed {seed}: final mean return {final:.1f} (CleanRL {settings.cleanrl}) "
                  f"in {time.perf_counter() - started:.0f} s", flush=True)
        mean = sum(finals) / len(finals)
        std = (sum((f - mean) ** 2 for f in finals) / len(finals)) ** 0.5
        verdict = "meets" if mean >= settings.target else "misses"
        print(f"{env_id}: {mean:.1f} +- {std:.1f} over seeds {args.seeds} at {settings.total_steps} steps; CleanRL "
              f"{settings.cleanrl}; target >= {settings.target:g}: {verdict}\n", flush=True)
    print("| environment | seed | steps | final mean return (last 100 episodes) | CleanRL | seconds |")
    print("|---|---|---|---|---|---|")
    for env_id, seed, final, seconds, settings in table:
        print(f"| {env_id} | {seed} | {settings.total_steps} | {final:.1f} | {settings.cleanrl} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
