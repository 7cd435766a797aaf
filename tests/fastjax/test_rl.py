"""GRPO / GSPO (fastjax.rl): the math against numpy written here, log-probs against a full forward,
KL at the reference, a short run that learns a toy reward and resumes exactly, reward errors.

The model tests share one tiny random QLoRA policy (NF4 decoder linears + LoRA) and one GRPOConfig
shape, so the generator, the log-prob pass and the update compile once for the whole file.
``benchmarks/bench_grpo.py --tiny`` runs the benchmark's own QLoRA GRPO path on CPU (not collected
here: its extra compilations would double this file's time).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import llama

from fastjax import lora as lora_lib
from fastjax import quant, rl
from fastjax.rl_rewards import (
    RewardFunctionError,
    call_reward_func,
    gsm8k_correctness_reward,
    gsm8k_format_reward,
    per_token_objective,
)

# Tolerances (fp32 everywhere in this file): math vs numpy, model log-probs vs a full forward.
TOL = {"math": {"rtol": 1e-5, "atol": 1e-6}, "model": {"rtol": 1e-4, "atol": 1e-5}}

CFG = llama.LlamaConfig(
    vocab_size=32,
    hidden_size=64,  # NF4 blocks are 64 wide: every linear's input dim is a multiple of 64
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    eos_token_id=3,
    max_position_embeddings=256,
)
G, PROMPTS, NEW = 8, 4, 8


def sevens(prompts, completions, completion_ids):
    """Toy reward: the fraction of completion tokens equal to 7."""
    return [float(np.mean(np.asarray(ids) == 7)) for ids in completion_ids]


def _config(tmp_path, **kw) -> rl.GRPOConfig:
    base = {
        "num_generations": G,
        "prompts_per_step": PROMPTS,
        "max_new_tokens": NEW,
        "max_steps": 10,
        "learning_rate": 3e-2,
        "beta": 0.04,
        "remat_policy": "none",
        "output_dir": str(tmp_path),
        "progress_bar": False,
        "plot": False,
        "save_final": False,
        "seed": 0,
    }
    return rl.GRPOConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    """A QLoRA policy: NF4 decoder linears (fastjax.quant), fp32 embeddings/head, LoRA r=4."""
    lora_config = lora_lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")

    @jax.jit  # one compilation instead of one per eager op
    def build(key):
        # std 0.3 (not 0.02): logits large enough that LoRA on the layers can move p(token) far
        params = quant.quantize_params(llama.init_params(CFG, key, std=0.3))
        return params, lora_lib.init_lora(params, lora_config)

    params, lora = build(jax.random.key(0))
    rng = np.random.default_rng(0)
    rows = [
        {"prompt_ids": rng.integers(4, 32, int(rng.integers(3, 9))).tolist(), "row": i}
        for i in range(16)
    ]
    return params, lora, lora_config, rows


# ------------------------------------------------------------------------------ math vs numpy
def _np_advantages(r, g, scale, eps=1e-4):
    r = r.reshape(-1, g)
    a = r - r.mean(1, keepdims=True)
    if scale:
        a = a / (r.std(1, ddof=1, keepdims=True) + eps)
    return a.reshape(-1)


def test_group_advantages_hand_case_and_random():
    # hand: group [1, 0, 0, 0]: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    got = np.asarray(rl.group_advantages(np.array([1.0, 0, 0, 0]), 4, eps=0.0))
    np.testing.assert_allclose(got, [1.5, -0.5, -0.5, -0.5], **TOL["math"])
    equal = np.asarray(rl.group_advantages(np.array([1.0, 0, 0, 0, 2, 2, 2, 2]), 4))
    np.testing.assert_allclose(equal[4:], 0.0, atol=1e-6)  # equal rewards: no signal, no NaN
    rng = np.random.default_rng(1)
    for g, scale in ((3, True), (5, False)):
        r = rng.normal(size=7 * g).astype(np.float32)
        np.testing.assert_allclose(
            np.asarray(rl.group_advantages(r, g, scale=scale)),
            _np_advantages(r.astype(np.float64), g, scale),
            **TOL["math"],
        )


def _np_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, loss_type, level):
    d = logp - old
    if level == "sequence":
        d = np.repeat((d * mask).sum(1, keepdims=True) / mask.sum(1, keepdims=True), d.shape[1], 1)
    ratio = np.exp(d)
    a = adv[:, None]
    per = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_lo, 1 + eps_hi) * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per = per + beta * kl
    if loss_type == "dapo":
        loss = (per * mask).sum() / mask.sum()
    else:
        loss = ((per * mask).sum(1) / mask.sum(1)).mean()
    return loss, (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_matches_numpy(loss_type, level):
    rng = np.random.default_rng(hash((loss_type, level)) % 2**32)
    B, N = 5, 7
    logp = -rng.uniform(0.1, 3.0, (B, N))
    old = logp + rng.normal(0, 0.3, (B, N))  # ratios on both sides of the clip range
    ref = logp + rng.normal(0, 0.5, (B, N))
    adv = rng.normal(size=B)
    lengths = np.array([7, 1, 4, 6, 3])
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float64)
    args = (jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask))
    got, metrics = rl.grpo_loss(
        *args, epsilon=0.2, epsilon_high=0.28, beta=0.05, loss_type=loss_type, level=level
    )
    want, want_kl = _np_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.05, loss_type, level)
    np.testing.assert_allclose(float(got), want, **TOL["math"])
    np.testing.assert_allclose(float(metrics["kl"]), want_kl, **TOL["math"])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_single_update_gradient_is_advantage_times_score(loss_type):
    """mu = 1: old = stop_gradient(logp), ratio 1, d loss/d logp = (-A + beta (1 - e^(ref-logp))) w
    with w = m / sum(m) (dapo) or m / (|y_i| B) (grpo); checked with a random cotangent."""
    rng = np.random.default_rng(2)
    B, N, beta = 4, 6, 0.1
    logp = jnp.asarray(-rng.uniform(0.1, 2.0, (B, N)), jnp.float32)
    ref = logp + jnp.asarray(rng.normal(0, 0.4, (B, N)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=B), jnp.float32)
    mask = jnp.asarray(np.arange(N)[None] < np.array([6, 2, 5, 3])[:, None], jnp.float32)

    def loss(lp):
        return rl.grpo_loss(
            lp, jax.lax.stop_gradient(lp), ref, adv, mask, beta=beta, loss_type=loss_type
        )[0]

    value, vjp = jax.vjp(loss, logp)
    ct = float(rng.normal())
    (grad,) = vjp(jnp.float32(ct))
    m = np.asarray(mask)
    w = m / m.sum() if loss_type == "dapo" else m / m.sum(1, keepdims=True) / B
    lp, rf = np.asarray(logp, np.float64), np.asarray(ref, np.float64)
    want = ct * (-np.asarray(adv)[:, None] + beta * (1 - np.exp(rf - lp))) * w
    np.testing.assert_allclose(np.asarray(grad), want, **TOL["math"])
    kl = np.exp(rf - lp) - (rf - lp) - 1
    np.testing.assert_allclose(
        float(value), float(((-np.asarray(adv)[:, None] + beta * kl) * w).sum()), **TOL["math"]
    )


def test_gspo_sequence_ratio_hand_case():
    # row 0: mean log-ratio over its 2 real tokens = (0.1 + 0.3) / 2 = 0.2 (the masked 5.0 is
    # ignored), rho = e^0.2 = 1.2214 > 1 + eps: with A = +2 the clipped term wins; row 1: the
    # single token has log-ratio -0.05, rho = e^-0.05 = 0.9512 inside the range.
    logp = jnp.array([[0.1, 0.3, 5.0], [-0.05, 0.0, 0.0]], jnp.float32) - 1.0
    old = jnp.full((2, 3), -1.0, jnp.float32)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
    adv = jnp.array([2.0, -1.0], jnp.float32)
    loss, _, clipped = per_token_objective(
        logp, old, None, adv, mask, epsilon=0.1, level="sequence"
    )
    np.testing.assert_allclose(np.asarray(loss[0, :2]), [-1.1 * 2, -1.1 * 2], **TOL["math"])
    np.testing.assert_allclose(float(loss[1, 0]), np.exp(-0.05), **TOL["math"])
    assert bool(clipped[0, 0]) and not bool(clipped[1, 0])
    # unclipped GSPO gradient: d(-rho A)/d logp_t = -A rho / |y| for each real token of the row
    grad = jax.grad(
        lambda lp: per_token_objective(lp, old, None, adv, mask, epsilon=0.1, level="sequence")[0][
            1, 0
        ]
    )(logp)
    np.testing.assert_allclose(np.asarray(grad[1]), [np.exp(-0.05), 0, 0], **TOL["math"])
    np.testing.assert_allclose(np.asarray(grad[0]), 0.0, atol=1e-7)  # clipped row: no gradient


# ------------------------------------------------------------------------------ model
def test_logprobs_of_sampled_tokens_match_full_forward(model, tmp_path):
    params, lora, lora_config, rows = model
    rng = np.random.default_rng(3)
    # a trained-looking adapter (B != 0) so the LoRA path matters
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype), lora)
    trainer = rl.GRPOTrainer(
        params, CFG, rows, [sevens], _config(tmp_path), lora=lora, lora_config=lora_config
    )
    ro = trainer.rollout(0, lora)  # completions sampled by the KV-cache generator
    assert 0 < ro["lengths"].min() and ro["lengths"].min() < NEW  # some rows stopped at EOS
    batch = {
        k: jnp.asarray(v)
        for k, v in rl.build_rollout_batch(
            ro["tokens"], ro["prompt_mask"], ro["completion"], ro["completion_mask"]
        ).items()
    }
    scale = lora_lib.lora_scale(lora_config)
    # the segment bound the trainer gives attention: every rollout row is one contiguous run
    from fastjax.pallas_kernels.attention import segment_offsets

    assert trainer.ops.max_segments == 1
    lens, _ = segment_offsets(batch["segment_ids"], 1)
    np.testing.assert_array_equal(lens[:, 0], np.count_nonzero(batch["segment_ids"], axis=1))

    @jax.jit
    def both(batch):
        ours = [
            rl.completion_logprobs(params, CFG, batch, lora=lora, lora_scale=scale, temperature=t)
            for t in (1.0, 0.7)
        ]
        logits = llama.forward(
            params,
            batch["input_ids"],
            cfg=CFG,
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            lora=lora,
            lora_scale=scale,
        )
        return ours, logits

    (ours, ours_t), logits = both(batch)
    P = ro["tokens"].shape[1]
    pred = np.asarray(logits, np.float64)[:, P - 1 : -1]  # position t predicts token t + 1
    tok = ro["completion"]
    m = ro["completion_mask"].astype(bool)
    for got, t in ((ours, 1.0), (ours_t, 0.7)):
        logsm = jax.nn.log_softmax(pred / t, axis=-1)
        want = np.take_along_axis(np.asarray(logsm), tok[..., None], -1)[..., 0]
        np.testing.assert_allclose(np.asarray(got)[m], want[m], **TOL["model"])
        assert np.all(np.asarray(got)[~m] == 0.0)


def test_grpo_learns_toy_reward_kl_zero_at_start_and_resumes(model, tmp_path):
    params, lora, lora_config, rows = model
    config = _config(tmp_path, save_steps=5, save_total_limit=None)
    result = rl.train_grpo(params, CFG, rows, [sevens], config, lora=lora, lora_config=lora_config)
    rewards = np.array(result.rewards)
    # p(7) starts near chance; 10 updates with lr 3e-2 raise it several-fold (seeded, margins wide)
    first, last = rewards[:3].mean(), rewards[-3:].mean()
    assert last > first + 0.08 and last > 2.5 * first, rewards
    # step 1 trains the fresh adapters (B = 0): policy == reference, so KL is 0
    assert abs(result.history[0]["kl"]) < 1e-6
    assert result.history[-1]["kl"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    for key in (
        "reward",
        "reward_std",
        "rewards/sevens/mean",
        "rewards/sevens/std",
        "kl",
        "completion_length",
        "gen_tokens_per_s",
        "train_tokens_per_s",
        "loss",
    ):
        assert all(np.isfinite(r[key]) for r in records), key

    # resume from the step-5 checkpoint: steps 6..10 are redone exactly
    shutil.rmtree(tmp_path / "checkpoints" / "10")
    resumed = rl.train_grpo(
        params,
        CFG,
        rows,
        [sevens],
        _config(tmp_path, resume=True),
        lora=lora,
        lora_config=lora_config,
    )
    again = [h["reward"] for h in resumed.history]
    np.testing.assert_allclose(again, rewards, **TOL["math"])
    np.testing.assert_allclose(
        [h["loss"] for h in resumed.history[5:]],
        [h["loss"] for h in result.history[5:]],
        **TOL["model"],
    )
    for a, b in zip(jax.tree.leaves(resumed.lora), jax.tree.leaves(result.lora), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL["model"])


def test_reward_errors_name_function_prompt_and_completion(model, tmp_path):
    params, lora, lora_config, rows = model

    def picky(prompts, completions, completion_ids):
        return [1.0 / (7 not in ids) for ids in completion_ids]  # ZeroDivisionError on a 7

    trainer = rl.GRPOTrainer(
        params, CFG, rows, [sevens, picky], _config(tmp_path), lora=lora, lora_config=lora_config
    )
    with pytest.raises(RewardFunctionError) as err:
        trainer.rollout(0, lora)
    msg = str(err.value)
    assert "'picky'" in msg and "ZeroDivisionError" in msg and "dataset row" in msg
    bad = msg.split("completion:\n", 1)[1]
    assert 7 in json.loads(bad)  # the quoted completion (token ids here) is one that has a 7

    texts = ["#### 12", "the answer is 3", "no number here"]

    def as_number(prompts, completions):
        return [float(c.split()[-1]) for c in completions]

    with pytest.raises(
        RewardFunctionError,
        match=r"(?s)'as_number' raised ValueError.*dataset row 9, batch position 2.*"
        r"completion:\nno number here",
    ):
        call_reward_func(as_number, [""] * 3, texts, {}, prompt_index=[4, 4, 9])
    with pytest.raises(RewardFunctionError, match=r"(?s)nan is not a finite.*the answer is 3"):
        call_reward_func(lambda p, c: [1.0, float("nan"), 0.0], [""] * 3, texts, {})
    with pytest.raises(RewardFunctionError, match="returned 2 values for 3"):
        call_reward_func(lambda p, c: [1.0, 0.0], [""] * 3, texts, {})


def test_gsm8k_rewards():
    comps = ["3 + 4 = 7\n#### 7", "The answer is 7.", "I think 8", "#### 1,000"]
    answers = ["... #### 7", "#### 7", "#### 7", "#### 1000"]
    assert gsm8k_correctness_reward(None, comps, answers) == [1.0, 1.0, 0.0, 1.0]
    assert gsm8k_format_reward(None, comps) == [1.0, 0.5, 0.0, 1.0]


def test_dense_lora_base_and_weighted_reward_functions(tmp_path):
    """GRPO on a plain LoRA policy (dense fp32 base, no NF4), with two reward functions weighted
    2 : -1: the logged total is exactly that weighted sum of the per-function means, KL starts at
    0, and the weighted objective still raises the toy reward."""
    lora_config = lora_lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    params = jax.jit(lambda k: llama.init_params(CFG, k, std=0.3))(jax.random.key(1))
    lora = lora_lib.init_lora(params, lora_config)
    rng = np.random.default_rng(1)
    rows = [
        {"prompt_ids": rng.integers(4, 32, int(rng.integers(3, 9))).tolist()} for _ in range(16)
    ]

    def eights(prompts, completions, completion_ids):
        return [float(np.mean(np.asarray(ids) == 8)) for ids in completion_ids]

    config = _config(tmp_path, reward_weights=(2.0, -1.0), max_steps=8)
    result = rl.train_grpo(
        params, CFG, rows, [sevens, eights], config, lora=lora, lora_config=lora_config
    )
    assert abs(result.history[0]["kl"]) < 1e-6
    for h in result.history:
        want = 2.0 * h["rewards/sevens/mean"] - 1.0 * h["rewards/eights/mean"]
        np.testing.assert_allclose(h["reward"], want, **TOL["math"])
    sev = np.array([h["rewards/sevens/mean"] for h in result.history])
    assert sev[-3:].mean() > sev[:3].mean() + 0.05, sev
