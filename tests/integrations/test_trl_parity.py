"""FusedGRPOTrainer's loss against TRL 1.16's own, for every ``GRPOConfig`` option that shapes the loss.

TRL's trainer is too slow to train once per setting on CPU (a few seconds per step with generation), so most
tests build one tiny ``GRPOTrainer`` (local Llama from a config, no download) and compare, on identical
batches, TRL's ``GRPOTrainer._compute_loss`` with :func:`fusedrl.integrations.trl.fused_grpo_loss`: loss,
every parameter gradient (lm_head included) and the logged metrics. One test trains two steps end to end with
both trainers. Skipped without TRL / transformers / datasets.
"""

import math
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from fusedrl.integrations import trl as fr_trl  # noqa: E402
from fusedrl.integrations.trl import loss as fr_trl_loss  # noqa: E402

V, B, P, K = 257, 6, 5, 7
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=V - 1,
        pad_token_id=V - 1,
    )
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the entropies (a fresh head is near uniform): the 80/20 threshold stays clear
        m.lm_head.weight.mul_(25.0)
    return m


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = V - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", padding_side="left"
    )


def _reward(completions, **kwargs):
    return [(sum(c.encode()) % 7) / 7 for c in completions]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """One plain TRL GRPOTrainer; each test sets the loss-shaping attributes it needs."""
    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=K + 2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_dropout=True,
    )
    tr = trl.GRPOTrainer(
        model=_llama(),
        reward_funcs=_reward,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"] * B}),
        processing_class=_tokenizer(),
    )
    tr.model.train()
    return tr


_DEFAULTS = dict(
    loss_type="dapo",
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    importance_sampling_level="token",
    top_entropy_quantile=1.0,
    off_policy_mask_threshold=None,
    use_vllm=False,
    vllm_importance_sampling_correction=False,
    vllm_importance_sampling_mode="sequence_mask",
    vllm_importance_sampling_clip_min=None,
    vllm_importance_sampling_clip_max=3.0,
    entropy_coef=0.0,
    _entropy_bonus_enabled=False,
    use_adaptive_entropy=False,
    current_gradient_accumulation_steps=2,
)
_ARG_DEFAULTS = dict(
    delta=None,
    use_bias_correction_kl=True,
    steps_per_generation=4,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    entropy_target=0.2,
    entropy_coef_delta=0.005,
    entropy_coef_min=0.0,
    entropy_coef_max=1.0,
)


def _configure(tr, **kw):
    for k, v in _DEFAULTS.items():
        setattr(tr, k, kw.pop(k, v))
    for k, v in _ARG_DEFAULTS.items():
        setattr(tr.args, k, kw.pop(k, v))
    assert not kw, kw
    tr._entropy_bonus_enabled = tr.entropy_coef != 0.0 or tr.use_adaptive_entropy
    tr._last_world_entropy = float("inf")
    tr._entropy_window_stats = None


def _trl_is_ratio(tr, old, sampling, mask):
    """TRL 1.16's vLLM importance-sampling ratio (GRPOTrainer._generate_and_score_completions), written out."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if tr.vllm_importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    lo, hi = tr.vllm_importance_sampling_clip_min, tr.vllm_importance_sampling_clip_max
    if tr.vllm_importance_sampling_mode.endswith("truncate"):
        return ratio.clamp(min=lo, max=hi)
    bad = (ratio < (-math.inf if lo is None else lo)) | (ratio > (math.inf if hi is None else hi))
    return ratio.masked_fill(bad, 0.0)


def _batch(tr, seed=0, spread=0.3, far=False):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V - 1, (B, P), generator=g)
    comp = torch.randint(0, V - 1, (B, K), generator=g)
    p_len = torch.tensor([P, P - 2, P - 1, 1, P, 2])
    c_len = torch.tensor([K, 3, K - 1, 1, 0, K])  # row 4: an empty completion
    p_mask = (torch.arange(P)[None] >= (P - p_len)[:, None]).long()
    c_mask = (torch.arange(K)[None] < c_len[:, None]).long()
    prompt = torch.where(p_mask.bool(), prompt, torch.full_like(prompt, V - 1))
    comp = torch.where(c_mask.bool(), comp, torch.full_like(comp, V - 1))
    with torch.no_grad():
        logits = (
            tr.model(input_ids=torch.cat([prompt, comp], 1), attention_mask=torch.cat([p_mask, c_mask], 1))
            .logits[:, P - 1 : -1]
            .float()
        )
        cur = logits.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)
    old = cur + spread * torch.randn(B, K, generator=g)
    sampling = old + spread * torch.randn(B, K, generator=g)
    if far:  # |log ratio| = 30 where both sides agree (fusedrl clamps log-ratios at 20, TRL does not)
        old[0, 1] = cur[0, 1] + 30.0  # ratio e^-30 (TRL) vs e^-20: both ~0
        sampling[5, 2] = old[5, 2] - 30.0  # IS ratio e^30: truncated at the cap either way
        sampling[3, 0] = old[3, 0] + 30.0  # IS ratio ~0
    adv = torch.randn(B, generator=g)
    adv[1] = -abs(adv[1]) - 0.5
    inputs = dict(
        prompt_ids=prompt,
        prompt_mask=p_mask,
        completion_ids=comp,
        completion_mask=c_mask,
        advantages=adv,
        old_per_token_logps=old,
        ref_per_token_logps=cur - 0.2 * torch.rand(B, K, generator=g),
        sampling_per_token_logps=sampling,
        num_items_in_batch=c_mask.sum() * 3,
    )
    if tr.use_vllm and tr.vllm_importance_sampling_correction:
        inputs["importance_sampling_ratio"] = _trl_is_ratio(tr, old, sampling, c_mask)
    return inputs


def _run(tr, fn, inputs):
    tr.model.zero_grad(set_to_none=True)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    state = (tr.entropy_coef, tr._last_world_entropy)
    loss = fn(inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in tr._metrics["train"].items()}
    after = (tr.entropy_coef, tr._last_world_entropy)
    tr.entropy_coef, tr._last_world_entropy = state
    tr._entropy_window_stats = None
    return loss.detach(), grads, metrics, after


def _check(tr, inputs, msg="", atol=1e-5):
    ref = _run(tr, lambda x: type(tr)._compute_loss(tr, tr.model, x), inputs)
    got = _run(tr, lambda x: fr_trl.fused_grpo_loss(tr, tr.model, x, backend="torch"), inputs)
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=1e-5, msg=f"loss {msg}")
    assert set(got[1]) == set(ref[1]), msg
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], atol=atol, rtol=1e-4, msg=f"grad {n} {msg}")
    assert "lm_head.weight" in ref[1]
    assert set(got[2]) == set(ref[2]), f"metric names {msg}: {set(got[2]) ^ set(ref[2])}"
    for k, v in ref[2].items():
        assert got[2][k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), f"metric {k} {msg}"
    assert got[3] == pytest.approx(ref[3]), f"adaptive entropy state {msg}"
    return ref


# --------------------------------------------------------------------------------------------------
# every loss type, with and without the 80/20 entropy mask, IS correction, OPSM
# --------------------------------------------------------------------------------------------------
VARIANTS = ["plain", "entropy80-20", "is-token_truncate", "is-sequence_mask", "opsm", "all"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_type_matches_trl(trainer, loss_type, variant):
    kw = dict(loss_type=loss_type, beta=0.04, epsilon_high=0.28 if loss_type != "cispo" else 4.0)
    if loss_type == "luspo":
        kw["importance_sampling_level"] = "sequence"
    if variant in ("entropy80-20", "all"):
        kw["top_entropy_quantile"] = 0.2
    if variant.startswith("is-") or variant == "all":
        mode = variant[3:] if variant.startswith("is-") else "token_mask"
        if loss_type == "vespo" and mode.startswith("sequence"):
            mode = "token_" + mode.split("_")[1]  # TRL: vespo takes token-level IS only
        kw.update(
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            vllm_importance_sampling_mode=mode,
            vllm_importance_sampling_clip_min=0.5 if variant == "all" else None,
        )
    if variant in ("opsm", "all"):
        kw["off_policy_mask_threshold"] = 0.05
    if variant == "all":
        kw.update(entropy_coef=0.03)
    _configure(trainer, **kw)
    seed = 10 * LOSS_TYPES.index(loss_type) + VARIANTS.index(variant)
    _check(trainer, _batch(trainer, seed=seed), f"{loss_type} {variant}")


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("caps", [(None, 3.0), (0.5, 2.0), (0.8, None)], ids=["max", "min-max", "min"])
def test_vllm_importance_sampling_modes(trainer, mode, caps):
    _configure(
        trainer,
        loss_type="grpo",
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=caps[0],
        vllm_importance_sampling_clip_max=caps[1],
    )
    _check(trainer, _batch(trainer, seed=3, spread=0.4), f"{mode} {caps}")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "sapo", "cispo", "vespo"])
def test_sequence_level_and_delta(trainer, loss_type):
    """importance_sampling_level='sequence' with INTELLECT-2's delta, the 80/20 mask and the k3 bias correction."""
    for delta in (None, 1.5, 1.1):
        _configure(
            trainer,
            loss_type=loss_type,
            importance_sampling_level="sequence",
            beta=0.04,
            delta=delta,
            epsilon_high=0.28 if loss_type != "cispo" else 1.2,
            top_entropy_quantile=0.5,
        )
        _check(trainer, _batch(trainer, seed=5, spread=0.2), f"{loss_type} sequence delta={delta}")


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_direct_api_rollout_correction_is_trl_ratio(trainer, mode):
    """grpo_policy_loss_config(vllm_importance_sampling_mode=...) + policy_loss(rollout_logp=vLLM's log-probs)
    recomputes TRL's importance-sampling ratio: same loss and gradient as TRL's precomputed ratio."""
    import fusedrl

    _configure(
        trainer,
        loss_type="dapo",
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=0.6,
        vllm_importance_sampling_clip_max=1.8,
    )
    x = _batch(trainer, seed=23, spread=0.4)
    mask, n = x["completion_mask"], torch.tensor(31.0)
    g = torch.Generator().manual_seed(1)
    logp0 = x["old_per_token_logps"] + 0.2 * torch.randn(x["old_per_token_logps"].shape, generator=g)
    kw = dict(batch_size=B, num_items=n, vllm_importance_sampling_clip_min=0.6, vllm_importance_sampling_clip_max=1.8)
    cfg, norms = fr_trl.grpo_policy_loss_config("dapo", vllm_importance_sampling_mode=mode, **kw)
    plain, _ = fr_trl.grpo_policy_loss_config("dapo", **kw)
    a, b = logp0.clone().requires_grad_(), logp0.clone().requires_grad_()
    la, _ = fusedrl.policy_loss(
        a,
        x["old_per_token_logps"],
        x["advantages"],
        mask,
        config=cfg,
        rollout_logp=x["sampling_per_token_logps"],
        **norms,
    )
    lb, _ = fusedrl.policy_loss(
        b,
        x["old_per_token_logps"],
        x["advantages"],
        mask,
        config=plain,
        rollout_is_weights=x["importance_sampling_ratio"].expand(mask.shape),
        **norms,
    )
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
def test_delta_two_sided_clip(trainer, loss_type):
    """delta below and above 1 + epsilon_high (TRL clamps the unclipped ratio at delta for every sign of A)."""
    for delta in (1.1, 1.28, 2.0):
        _configure(trainer, loss_type=loss_type, delta=delta, epsilon_high=0.28)
        _check(trainer, _batch(trainer, seed=7, spread=0.5), f"{loss_type} delta={delta}")


@pytest.mark.parametrize("eps_high", [0.2, 0.9, 1.0, 5.0])
def test_cispo_any_epsilon_high(trainer, eps_high):
    """TRL's cispo bounds the ratio at epsilon_high itself; its default (epsilon_high = epsilon = 0.2) included."""
    _configure(trainer, loss_type="cispo", epsilon_high=eps_high)
    _check(trainer, _batch(trainer, seed=9, spread=0.5), f"eps_high={eps_high}")


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_bias_correction(trainer, bias_correction, level):
    _configure(
        trainer, loss_type="bnpo", beta=0.1, use_bias_correction_kl=bias_correction, importance_sampling_level=level
    )
    _check(trainer, _batch(trainer, seed=11), f"bias_correction={bias_correction} {level}")


def test_sapo_and_vespo_parameters(trainer):
    _configure(trainer, loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=2.0, entropy_coef=0.01)
    _check(trainer, _batch(trainer, seed=13, spread=0.6), "sapo temperatures")
    _configure(trainer, loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=4.0)
    _check(trainer, _batch(trainer, seed=13, spread=0.6), "vespo parameters")


def test_adaptive_entropy_control(trainer):
    """use_adaptive_entropy: the bonus gate and the coefficient update follow TRL's controller."""
    for target in (0.0, 50.0):  # never / always below target
        _configure(trainer, loss_type="dapo", entropy_coef=0.02, use_adaptive_entropy=True, entropy_target=target)
        trainer._last_world_entropy = 0.1  # the gate reads the previous step's entropy
        _check(trainer, _batch(trainer, seed=17), f"adaptive target={target}")


def test_far_off_policy_and_eval_mode(trainer):
    """|log-ratio| = 30 (old and sampling), and eval mode (no accumulation division)."""
    _configure(
        trainer,
        loss_type="dapo",
        beta=0.04,
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode="token_truncate",
        off_policy_mask_threshold=0.1,
    )
    _check(trainer, _batch(trainer, seed=19, far=True), "far")
    trainer.model.eval()
    try:
        _configure(trainer, loss_type="grpo", beta=0.04, top_entropy_quantile=0.3)
        _check(trainer, _batch(trainer, seed=19), "eval")
    finally:
        trainer.model.train()


def test_no_fallback_for_loss_settings(trainer):
    """Every loss-shaping GRPOConfig option is fused: only TRL_FALLBACKS remain."""
    for loss_type in LOSS_TYPES:
        _configure(
            trainer,
            loss_type=loss_type,
            top_entropy_quantile=0.2,
            off_policy_mask_threshold=0.1,
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            use_adaptive_entropy=True,
            vllm_importance_sampling_mode="token_mask" if loss_type == "vespo" else "sequence_truncate",
        )
        assert fr_trl_loss.static_unsupported_reason(trainer) is None, loss_type
    assert len(fr_trl.TRL_FALLBACKS) == 2


# --------------------------------------------------------------------------------------------------
# end to end: two optimiser steps of each trainer
# --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")
def test_trainers_step_alike(tmp_path):
    """TRL's GRPOTrainer and FusedGRPOTrainer trained two steps (sapo, 80/20 mask, OPSM, two iterations per
    generation): same losses, metrics and parameters."""
    path = tmp_path / "model"
    _llama(seed=1).save_pretrained(str(path))

    def run(cls, **kw):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / cls.__name__),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=6,
            max_steps=2,
            learning_rate=3e-3,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            seed=0,
            num_iterations=2,
            loss_type="sapo",
            beta=0.04,
            top_entropy_quantile=0.5,
            off_policy_mask_threshold=0.01,
            entropy_coef=0.02,
            save_strategy="no",
            disable_dropout=True,
            bf16=False,
        )
        tr = cls(
            model=model,
            reward_funcs=_reward,
            args=args,
            processing_class=_tokenizer(),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["hello", "abc", "xyz q", "rl!"] * 2}),
            **kw,
        )
        tr.train()
        return [h for h in tr.state.log_history if "loss" in h], dict(model.named_parameters())

    hist_trl, p_trl = run(trl.GRPOTrainer)
    hist_fused, p_fused = run(fr_trl.FusedGRPOTrainer, fusedrl_backend="torch", fusedrl_fallback="error")
    assert len(hist_trl) == len(hist_fused) == 2
    for a, b in zip(hist_trl, hist_fused):
        for key in ("loss", "entropy", "kl", "policy_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    for n in p_trl:
        torch.testing.assert_close(p_fused[n], p_trl[n], atol=2e-5, rtol=1e-4, msg=n)
