"""Every metric tether logs: its name, what it means and what healthy looks like.

docs/metrics.md is rendered from this table (`python -m tether.metrics > docs/metrics.md`);
a test keeps the two identical and checks that a PPO update logs exactly these names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    healthy: str
    only_with: tuple[str, ...] = ()  # the options that must all be set for it to be logged ("a or b": either); () = always
    logged_when: str = ""  # the rows it appears on when not every row, e.g. "the last row"
    critic: bool = False  # logged only when a critic is trained (advantage_estimator=gae, the default)


_EVAL_ROWS = "update 0, every `eval_every` updates and the last"
_EVAL_STEPS = "eval_every step / the end"

PPO_METRICS: tuple[Metric, ...] = (
    Metric("reward/score", "Mean sequence score from the reward model or function, after missing-EOS penalty, "
           "before clipping/normalisation and KL shaping.",
           "Rises over training. A steep rise together with falling `response/distinct_2` or exploding `kl/mean` "
           "is reward hacking, not progress."),
    Metric("reward/score_std", "Standard deviation of the scores in the batch.",
           "Non-zero. Collapsing to 0 means every response scores the same: nothing left to learn."),
    Metric("reward/kl_penalty", "Mean over responses of the summed per-token KL penalty −β·KL_t added to the reward.",
           "Small next to `reward/score`; grows in magnitude as the policy drifts from the reference."),
    Metric("reward/total", "Mean over responses of the summed shaped reward (processed score + KL penalty): "
           "what PPO actually maximises.", "Rises."),
    Metric("kl/mean", "Mean over responses of the summed per-token KL estimate to the reference, in nats "
           "(the estimator chosen by `kl_estimator`, k1 by default).",
           "Starts at 0, grows slowly. Typical RLHF runs stay below ~10 nats per response; tens of nats is drift "
           "into gibberish or a single mode."),
    Metric("kl/per_token", "The same KL as a mean per token: each response's summed KL divided by its length, "
           "then averaged over responses (the figure verl and OpenRLHF log and feed their KL controllers).",
           "`kl/mean` divided by about the response length. `kl_target` is compared with `kl/mean` (per response), "
           "not with this."),
    Metric("kl/coef", "The KL coefficient β used for this update (changes only with `adaptive_kl`).",
           "Constant for fixed KL; with adaptive KL it rises when `kl/mean` is above `kl_target`."),
    Metric("policy/loss", "Clipped surrogate loss (PPO eq. 7), averaged over optimizer steps.",
           "Noisy around 0 (advantages are whitened); a trend is not meaningful by itself."),
    Metric("policy/approx_kl", "KL between the policy before and after this update's steps (k3 estimator on the "
           "sampled tokens, averaged over minibatches). 0 on the first minibatch of every update.",
           "Around 0.001–0.05. Much larger means steps are too big: lower `learning_rate` or `clip_eps`."),
    Metric("policy/clipfrac", "Fraction of response tokens whose ratio fell outside the clip range and was cut.",
           "0.0–0.2. Near 0 with a flat reward: steps too small. Above ~0.3: steps too large."),
    Metric("policy/entropy", "Mean per-token entropy of the policy on its own responses (nats).",
           "Declines slowly. A collapse toward 0 means the policy is repeating itself."),
    Metric("policy/ratio_mean", "Mean probability ratio π_new/π_old over response tokens.", "Close to 1.0."),
    Metric("policy/ratio_max", "Largest probability ratio on any response token in the update.",
           "A few units at most. Hundreds mean a token's probability exploded: unstable training."),
    Metric("policy/grad_norm", "Policy gradient norm before clipping, averaged over optimizer steps.",
           "Stable; spikes precede instability. Consistently above `max_grad_norm` means clipping is always on."),
    Metric("policy/first_minibatch_approx_kl", "`policy/approx_kl` of the update's first minibatch alone.",
           "0 (to rounding): the first minibatch sees exactly the policy that sampled the batch. Anything else is "
           "a setup bug (docs/doctor.md, logprob_mismatch)."),
    Metric("policy/first_minibatch_ratio_mean", "`policy/ratio_mean` of the update's first minibatch alone.",
           "1 (to rounding), for the same reason."),
    Metric("policy/lr", "Policy learning rate after this update.", "Follows the configured schedule."),
    Metric("value/loss", "Clipped value loss ½·max((V−R)², (V_clip−R)²), averaged over optimizer steps.",
           "Falls early, then tracks the reward's noise.", critic=True),
    Metric("value/clipfrac", "Fraction of tokens where the clipped value branch was chosen.", "Below ~0.3.", critic=True),
    Metric("value/explained_variance", "1 − Var(returns − values)/Var(returns) of the rollout's values.",
           "Rises toward 1 as the critic learns; negative means the critic is worse than a constant.", critic=True),
    Metric("value/mean", "Mean value prediction over response tokens at rollout time.",
           "Tracks `reward/total`.", critic=True),
    Metric("value/grad_norm", "Critic gradient norm before clipping, averaged over optimizer steps.", "Stable.", critic=True),
    Metric("value/lr", "Critic learning rate after this update.", "Follows the configured schedule.", critic=True),
    Metric("ptx/loss", "PPO-ptx pretraining LM loss (nats per token), 0 when PPO-ptx is off.",
           "Stays near its starting value. Rising means the policy is forgetting: raise `ptx_coef`."),
    Metric("returns/mean", "Mean return over response tokens: GAE's returns; the response's summed shaped reward "
           "(grpo, dr_grpo, rloo); the returns-to-go (reinforce_pp).", "Tracks `reward/total`."),
    Metric("advantages/mean", "Mean advantage before whitening (GAE, REINFORCE++); the group estimators' advantages "
           "are not whitened.", "Near 0 once the critic is trained; about 0 for the group estimators."),
    Metric("batch/prompts", "Prompts in this update's batch (`batch_size`, over all ranks).", "Equal to `batch_size`."),
    Metric("batch/responses", "Responses trained on: prompts × `samples_per_prompt`.",
           "Equal to `batch_size` × `samples_per_prompt`."),
    Metric("reward/overlong_penalty", "Mean DAPO overlong penalty added to the training score (0 up to "
           "`max_new_tokens` − `overlong_buffer`, down to −`overlong_penalty` at the limit); not in `reward/score`.",
           "Near 0; growing means responses run into the length limit.", ("overlong_buffer",)),
    Metric("reward/<name>", "Each summed reward function's own mean score, unweighted (`reward/score` is their "
           "sum weighted by `reward_weights`); <name> is the function's name.",
           "The parts you want to rise do; one part rising while another falls is the policy trading one "
           "rule for another.", ("reward_fns",)),
    Metric("sampling/uniform_groups", "Prompt groups whose `samples_per_prompt` scores were all equal (zero "
           "group advantage), over every sampling round of this update.", "Low. Most groups uniform: prompts too "
           "easy or too hard for the policy, or a reward that rarely changes.", ("dynamic_sampling",)),
    Metric("sampling/extra_rounds", "Sampling rounds beyond the first to refill the batch with informative groups.",
           "0–1; many rounds cost generation time.", ("dynamic_sampling",)),
    Metric("sampling/kept_uniform_groups", "Uniform groups still in the batch because the refill rounds ran out.",
           "0; raise `dynamic_sampling_max_rounds` or change the prompts.", ("dynamic_sampling",)),
    Metric("response/length", "Mean response length in tokens (EOS included).",
           "Stable or slowly changing. Steady growth to `max_new_tokens` with a falling EOS rate is a known "
           "collapse (Secrets of RLHF)."),
    Metric("response/eos_rate", "Fraction of responses that ended with EOS or a stop string.",
           "High (close to its starting value). A drop means responses run into the length limit."),
    Metric("response/distinct_1", "Distinct tokens / total tokens over the batch's responses (Li et al. 2016).",
           "Close to its starting value; falls with a shrinking vocabulary."),
    Metric("response/distinct_2", "Distinct bigrams / total bigrams over the batch's responses (Li et al. 2016).",
           "Close to its starting value. A fall means repetition (\"thanks thanks thanks\")."),
    Metric("response/repeated_3gram_rate", "Within each response, the share of its token 3-grams that already "
           "occurred earlier in the same response; averaged over responses.",
           "Close to its starting value (near 0 for short responses). Rising toward 1 is a response repeating "
           "itself; with a rising score, reward hacking (docs/doctor.md)."),
    Metric("response/ref_perplexity", "The reference model's perplexity on the policy's responses: exp of its mean "
           "negative log-prob per response token, at the sampling temperature.",
           "Rises slowly as the policy leaves the reference. A jump is gibberish; a fall while responses grow "
           "longer is the collapse of Secrets of RLHF (both are reward_hacking evidence in docs/doctor.md)."),
    Metric("ppo/optimizer_steps", "Optimizer steps taken this update (ppo_epochs × num_minibatches unless stopped "
           "early by `target_kl_stop`).", "Equal to ppo_epochs × num_minibatches."),
    Metric("ppo/early_stopped", "1 when `target_kl_stop` cut the update short, else 0.", "Mostly 0."),
    Metric("ppo/skipped_updates", "Updates skipped so far because a score, log-prob, value, loss or gradient was "
           "not finite (nothing non-finite reaches the weights; the reason is in doctor.jsonl). A skipped update "
           "logs only this metric.", "0. After `max_skipped_updates` in a row the run stops with a checkpoint."),
    Metric("time/rollout_s", "Seconds spent sampling and scoring.", "Stable."),
    Metric("time/generate_s", "Seconds of the rollout spent sampling responses.", "Most of the rollout."),
    Metric("time/score_s", "Seconds of the rollout spent on policy/reference log-probs, values and scores.",
           "Stable; small with placement=shared_base and lora_layers, where the frozen blocks run once."),
    Metric("time/train_s", "Seconds spent in PPO epochs.", "Stable."),
    Metric("time/update_s", "Seconds for the whole update.", "Stable."),
    Metric("gold/score", "Mean score of the same rollout responses under the gold scorer, which PPO never "
           "optimises directly.", "Rises with `reward/score`. Proxy rising while gold falls is reward-model "
           "over-optimisation (Gao et al. 2022): stop earlier or raise `kl_coef`.", ("gold_reward_fn",)),
    Metric("gold/score_std", "Standard deviation of the gold scores over the rollout's responses.", "What tells a "
           "falling gold score from noise: the doctor's reward_model_exploited rule needs a fall of "
           "`exploit_gold_noise_z` standard errors.", ("gold_reward_fn",)),
    Metric("generation/logprob_gap", "Mean absolute difference between engine and trainer log-probs of the sampled tokens: what the generation "
           "engine reported against the trainer's own forward (which PPO uses).", "Near 0 (bf16 engines: ~1e-2). A "
           "growing gap means the engine samples from another policy than the one trained (stale weights, other "
           "precision or sampling settings), a known cause of collapse.", ("generation_backend=vllm",)),
    Metric("generation/truncation_gap", "Mean over the sampled response tokens of log q(a) − log π(a): how far the "
           "distribution the built-in sampler draws from (after top_k, top_p, and EOS held back before "
           "min_new_tokens) is from the policy's softmax(logits / T), under which PPO scores them (as verl and "
           "OpenRLHF do). −log of the policy's probability mass the sampler keeps.",
           "0 without truncation; small (< 0.05 nats) keeps the updates nearly on-policy. Large: the doctor's "
           "truncated_sampling rule.", ("top_k or top_p or min_new_tokens",)),
    Metric("generation/logprob_gap_max", "Largest absolute engine − trainer log-prob difference over the batch's tokens.",
           "Small; single large values point at one token where the two disagree.", ("generation_backend=vllm",)),
    Metric("eval/score", "Mean proxy score on the fixed held-out prompts (logged at update 0, every "
           "`eval_every` updates and at the end).", "Rises.", ("eval_prompts",), _EVAL_ROWS),
    Metric("eval/gold", "Mean gold score on the fixed held-out prompts.", "Rises; the honest measure of progress.",
           ("eval_prompts", "gold_reward_fn"), _EVAL_ROWS),
    Metric("eval/kl", "Mean summed KL (k1) to the reference per held-out response.",
           "Grows slowly; the x axis of the over-optimisation plot.", ("eval_prompts",), _EVAL_ROWS),
    Metric("eval/distinct_2", "Distinct-2 of the held-out responses.", "Close to its update-0 value.",
           ("eval_prompts",), _EVAL_ROWS),
    Metric("eval/length", "Mean held-out response length in tokens.", "Stable.", ("eval_prompts",), _EVAL_ROWS),
)

PPO_METRIC_NAMES: frozenset[str] = frozenset(m.name for m in PPO_METRICS)
ALWAYS_LOGGED: frozenset[str] = frozenset(m.name for m in PPO_METRICS if not m.only_with)
CRITIC_METRICS: frozenset[str] = frozenset(m.name for m in PPO_METRICS if m.critic)


SFT_METRICS: tuple[Metric, ...] = (
    Metric("train/loss", "Causal LM loss of this optimizer step's blocks, nats per predicted token (the same "
           "loss as PPO-ptx).", "Falls quickly, then slowly. A rise after warmup means the learning rate is too high."),
    Metric("train/grad_norm", "Gradient norm before clipping.",
           "Stable after the first steps; spikes precede loss spikes."),
    Metric("train/lr", "Learning rate after this step.", "Follows warmup then the configured schedule."),
    Metric("eval/loss", "Held-out LM loss over every eval block, nats per token.",
           "Falls with `train/loss`; a widening gap to it is overfitting.", logged_when=_EVAL_STEPS),
    Metric("eval/perplexity", "exp(`eval/loss`).", "Falls; the figure reported as the SFT model's quality.",
           logged_when=_EVAL_STEPS),
    Metric("train/steps", "Optimizer steps taken (fewer than max_steps when max_seconds ran out).",
           "Equal to max_steps unless a compute budget was set.", logged_when="the last row"),
    Metric("time/train_s", "Seconds spent training.", "Within the budget you set.", logged_when="the last row"),
)

REWARD_METRICS: tuple[Metric, ...] = (
    Metric("train/loss", "Bradley-Terry loss −log σ(r_chosen − r_rejected) of this step's pairs.",
           "Falls from log 2 ≈ 0.693. Near 0 on train while `eval/loss` rises is overfitting: fewer epochs."),
    Metric("train/accuracy", "Share of this step's pairs where the chosen response scores higher (ties count "
           "as wrong).", "Rises above 0.5."),
    Metric("train/margin", "Mean r_chosen − r_rejected over this step's pairs.", "Grows, then levels off."),
    Metric("train/grad_norm", "Gradient norm before clipping.", "Stable."),
    Metric("train/lr", "Learning rate used by this step.", "Follows the configured schedule."),
    Metric("train/epoch", "Passes over the training pairs so far.", "Reaches `epochs` at the end."),
    Metric("eval/loss", "Bradley-Terry loss on the held-out pairs.", "Falls, then flattens; rising is overfitting.",
           logged_when=_EVAL_STEPS),
    Metric("eval/accuracy", "Held-out pairwise accuracy: the reward model's quality figure.",
           "Well above 0.5; 0.65–0.75 is typical for human preference data.", logged_when=_EVAL_STEPS),
    Metric("eval/margin", "Mean held-out r_chosen − r_rejected.", "Positive.", logged_when=_EVAL_STEPS),
    Metric("eval/score_mean", "Mean score over held-out chosen and rejected responses.",
           "Anything: only differences matter (normalisation fixes the scale afterwards).",
           logged_when=_EVAL_STEPS),
    Metric("eval/score_std", "Standard deviation of those scores.", "Non-zero.", logged_when=_EVAL_STEPS),
)

SFT_METRIC_NAMES: frozenset[str] = frozenset(m.name for m in SFT_METRICS)
REWARD_METRIC_NAMES: frozenset[str] = frozenset(m.name for m in REWARD_METRICS)


def render_markdown() -> str:
    lines = [
        "# Metrics",
        "",
        "Every metric tether logs, in the run directory's `metrics.jsonl` (one JSON object per line, with",
        "`update` — the PPO update, or the optimizer step for `tether sft` and `tether reward` — and the",
        "metrics below) and, for `tether ppo`, in any TensorBoard / Weights & Biases sink.",
        "This file is generated from `tether/metrics.py`.",
    ]
    sections = (("`tether ppo`: one row per update", PPO_METRICS),
                ("`tether sft`: one row per optimizer step", SFT_METRICS),
                ("`tether reward`: one row per optimizer step", REWARD_METRICS))
    for title, table in sections:
        lines += ["", f"## {title}", "", "| metric | what it means | what healthy looks like | logged when |",
                  "| --- | --- | --- | --- |"]
        for m in table:
            when = _when(m)
            lines.append(f"| `{m.name}` | {m.meaning} | {m.healthy} | {when} |")
    lines += ["", "`tether reward` writes its normalisation statistics (`normalize/mean_before`, `normalize/std_before`,",
              "`normalize/mean_after`, `normalize/std_after`, `normalize/samples`) to `summary.json`, not to",
              "`metrics.jsonl`, whose rows are optimizer steps."]
    return "\n".join(lines) + "\n"


def _when(m: Metric) -> str:
    parts = []
    if m.only_with:
        verb = " are set" if len(m.only_with) > 1 else " is set"
        parts.append(" and ".join(" or ".join(f"`{x}`" for x in o.split(" or ")) for o in m.only_with) + verb)
    if m.critic:
        parts.append("with a critic (`advantage_estimator=gae`)")
    if m.logged_when:
        parts.append(m.logged_when)
    return "; ".join(parts) or "always"


if __name__ == "__main__":
    print(render_markdown(), end="")
