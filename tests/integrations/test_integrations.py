"""Trainer integrations: Hugging Face models, TRL's GRPOTrainer, verl.

Everything runs on CPU with tiny randomly initialised models built from configs (no downloads).
``transformers`` is needed for the model tests; TRL / verl tests are skipped when they are missing.
"""

import copy
import subprocess
import sys
import types

import pytest
import torch

import fusedrl
from fusedrl.integrations import hf
from fusedrl.integrations import trl as fr_trl
from fusedrl.integrations import verl as fr_verl

V = 257


def _transformers():
    return pytest.importorskip("transformers")


def llama(tie: bool, seed: int = 0, eos_bias: float = 0.0):
    tf = _transformers()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=V - 1,
        pad_token_id=V - 1,
    )
    m = tf.LlamaForCausalLM(cfg)
    if eos_bias:  # make EOS likely so sampled completions have different lengths
        with torch.no_grad():
            h = m.model(torch.randint(0, V - 1, (16, 12))).last_hidden_state.reshape(-1, 32).mean(0)
            m.lm_head.weight[V - 1] = eos_bias * h / h.norm()
    return m


def gemma2(softcap: float = 0.3, seed: int = 0):
    tf = _transformers()
    if not hasattr(tf, "Gemma2Config"):
        pytest.skip("transformers without Gemma-2")
    torch.manual_seed(seed)
    cfg = tf.Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
        final_logit_softcapping=softcap,
    )
    return tf.Gemma2ForCausalLM(cfg)


def rollout_batch(B=4, P=5, K=7, seed=0):
    """Left-padded prompts + right-padded completions, TRL / verl layout."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V - 1, (B, P), generator=g)
    comp = torch.randint(0, V - 1, (B, K), generator=g)
    p_len = torch.tensor([P, P - 2, P - 1, 1][:B])
    c_len = torch.tensor([K, 3, K - 1, 1][:B])
    p_mask = (torch.arange(P)[None] >= (P - p_len)[:, None]).long()
    c_mask = (torch.arange(K)[None] < c_len[:, None]).long()
    prompt = torch.where(p_mask.bool(), prompt, torch.full_like(prompt, V - 1))
    comp = torch.where(c_mask.bool(), comp, torch.full_like(comp, V - 1))
    input_ids = torch.cat([prompt, comp], 1)
    attention_mask = torch.cat([p_mask, c_mask], 1)
    adv = torch.randn(B, generator=g)
    return input_ids, attention_mask, c_mask.float(), adv


def eager_logp_entropy(model, input_ids, attention_mask, K, temperature):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -K - 1 : -1].float() / temperature
    lsm = logits.log_softmax(-1)
    logp = lsm.gather(-1, input_ids[:, -K:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


def eager_grpo_loss(logp, ent, old, adv, mask, ref, *, low=0.2, high=0.28, c=3.0, beta=0.04, ent_coef=0.01):
    """verl-style vanilla PPO clip + dual clip, seq-mean-token-mean, k3 KL, entropy bonus (written out)."""
    A = adv[:, None]
    r = torch.exp((logp - old).clamp(-20, 20))
    lc = torch.maximum(-A * r, -A * r.clamp(1 - low, 1 + high))
    pg = torch.where(A < 0, torch.minimum(lc, -A * c), lc)
    d = ref - logp
    kl = torch.exp(d) - d - 1

    def agg(x):
        per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        nonempty = (mask.sum(-1) > 0).float()
        return (per_seq * nonempty).sum() / nonempty.sum()

    return agg(pg) - ent_coef * agg(ent) + beta * agg(kl)


# --------------------------------------------------------------------------------------------------
# Hugging Face models
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_scoring_matches_model_logits(tie):
    m = llama(tie)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie
    ids, am, rmask, _ = rollout_batch()
    K = rmask.shape[1]
    with torch.no_grad():
        lp, ent = hf.hf_logprob_entropy(m, ids, am, response_mask=rmask, temperature=0.7)
        rlp, rent = eager_logp_entropy(m, ids, am, K, 0.7)
    keep = rmask.bool()
    torch.testing.assert_close(lp[keep], rlp[keep], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent[keep], rent[keep], atol=2e-5, rtol=1e-5)
    assert (lp[~keep] == 0).all() and (ent[~keep] == 0).all()
    # default K = L - 1: every next token
    with torch.no_grad():
        lp_all, _ = hf.hf_logprob_entropy(m, ids, am, return_entropy=False, temperature=0.7)
    assert lp_all.shape == (ids.shape[0], ids.shape[1] - 1)
    torch.testing.assert_close(lp_all[:, -K:][keep], rlp[keep], atol=2e-5, rtol=1e-5)


def test_hf_scoring_saves_nothing_under_no_grad():
    m = llama(False)
    ids, am, rmask, _ = rollout_batch()
    with torch.no_grad():
        lp, ent = hf.hf_logprob_entropy(m, ids, am, response_mask=rmask)
    assert lp.grad_fn is None and ent.grad_fn is None and lp.dtype == torch.float32


@pytest.mark.parametrize("tie,opt", [(True, "sgd"), (False, "adamw")], ids=["tied-sgd", "untied-adamw"])
def test_grpo_steps_match_eager(tie, opt):
    """A few GRPO optimisation steps on one rollout batch: fusedrl vs model logits + eager loss."""
    T, steps = 0.9, 3
    m_fused, m_eager = llama(tie), llama(tie)
    m_ref = copy.deepcopy(m_eager).eval()
    ids, am, rmask, adv = rollout_batch()
    with torch.no_grad():
        old, _ = hf.hf_logprob_entropy(m_fused, ids, am, response_mask=rmask, temperature=T)
        ref, _ = hf.hf_logprob_entropy(m_ref, ids, am, response_mask=rmask, temperature=T)
        old_e, _ = eager_logp_entropy(m_eager, ids, am, rmask.shape[1], T)
    keep = rmask.bool()
    torch.testing.assert_close(old[keep], old_e[keep], atol=2e-5, rtol=1e-5)
    old = old.detach()
    # perturb old so ratios are off 1 and some tokens clip
    old = old + 0.15 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    cfg = fusedrl.PolicyLossConfig(
        loss_mode="vanilla",
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        loss_agg_mode="seq-mean-token-mean",
        entropy_coeff=0.01,
        kl_loss_coef=0.04,
        kl_loss_type="low_var_kl",
    )

    def make_opt(model):
        if opt == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.5)
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    o_f, o_e = make_opt(m_fused), make_opt(m_eager)
    for step in range(steps):
        loss_f, metrics = hf.hf_fused_policy_loss(
            m_fused, ids, am, rmask, old, adv, ref, temperature=T, config=cfg, backend="torch"
        )
        o_f.zero_grad()
        loss_f.backward()
        logp_e, ent_e = eager_logp_entropy(m_eager, ids, am, rmask.shape[1], T)
        loss_e = eager_grpo_loss(logp_e, ent_e, old, adv, rmask, ref)
        o_e.zero_grad()
        loss_e.backward()
        torch.testing.assert_close(loss_f.detach(), loss_e.detach(), atol=1e-5, rtol=1e-5)
        for (n, pf), (_, pe) in zip(m_fused.named_parameters(), m_eager.named_parameters()):
            torch.testing.assert_close(pf.grad, pe.grad, atol=2e-5, rtol=1e-4, msg=f"grad of {n} at step {step}")
        o_f.step()
        o_e.step()
        assert metrics["pg_clipfrac"].dim() == 0 and torch.isfinite(metrics["entropy"])
    moved = 0.0
    for (n, pf), (_, pe), p0 in zip(m_fused.named_parameters(), m_eager.named_parameters(), m_ref.parameters()):
        torch.testing.assert_close(pf, pe, atol=1e-5, rtol=1e-4, msg=f"parameter {n}")
        moved = max(moved, (pf - p0).abs().max().item())
    assert moved > 1e-4  # the steps did something


def test_gemma2_softcap_and_tied_head():
    """Final-logit softcapping comes from the config; scoring and gradients match the model's own logits."""
    m = gemma2(softcap=0.3)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    head = hf.lm_head_params(m)
    assert head.softcap == pytest.approx(0.3)
    ids, am, rmask, adv = rollout_batch(seed=1)
    K = rmask.shape[1]
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        lp, ent = hf.hf_logprob_entropy(m, ids, am, response_mask=rmask, temperature=0.8)
        rlp, rent = eager_logp_entropy(m, ids, am, K, 0.8)
    keep = rmask.bool()
    torch.testing.assert_close(lp[keep], rlp[keep], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent[keep], rent[keep], atol=2e-5, rtol=1e-5)
    old = (rlp + 0.1).detach()
    cfg = fusedrl.PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01, kl_loss_coef=0.04)
    loss_f, _ = hf.hf_fused_policy_loss(m, ids, am, rmask, old, adv, rlp.detach(), temperature=0.8, config=cfg)
    loss_f.backward()
    logp_e, ent_e = eager_logp_entropy(m2, ids, am, K, 0.8)
    loss_e = eager_grpo_loss(logp_e, ent_e, old, adv, rmask, rlp.detach(), high=0.2)
    loss_e.backward()
    torch.testing.assert_close(loss_f, loss_e, atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-4, msg=n)


def test_logit_scale_from_config():
    ns = types.SimpleNamespace
    assert hf.heads._logit_scale_from_config(ns(logit_scale=0.0625)) == 0.0625
    assert hf.heads._logit_scale_from_config(ns(logits_scaling=8.0, model_type="granite")) == 0.125
    assert hf.heads._logit_scale_from_config(ns()) == 1.0
    m = llama(False)
    ids, am, rmask, _ = rollout_batch()
    with torch.no_grad():
        lp, _ = hf.hf_logprob_entropy(m, ids, am, response_mask=rmask, logit_scale=0.5, temperature=1.0)
        rlp, _ = eager_logp_entropy(m, ids, am, rmask.shape[1], 2.0)  # scale 0.5 == temperature 2
    keep = rmask.bool()
    torch.testing.assert_close(lp[keep], rlp[keep], atol=2e-5, rtol=1e-5)


class _DDPLike(torch.nn.Module):
    """Stands in for DDP / FSDP: the inner model lives in ``.module``; every call goes through forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_wrapped_model_is_called_through_its_wrapper():
    m = llama(False)
    wrapped = _DDPLike(m)
    assert hf.unwrap_model(wrapped) is m
    ids, am, rmask, adv = rollout_batch()
    with torch.no_grad():
        lp_w, _ = hf.hf_logprob_entropy(wrapped, ids, am, response_mask=rmask)
        lp, _ = hf.hf_logprob_entropy(m, ids, am, response_mask=rmask)
    assert wrapped.calls == 1
    torch.testing.assert_close(lp_w, lp)
    loss, _ = hf.hf_fused_policy_loss(wrapped, ids, am, rmask, lp, adv)
    loss.backward()
    assert wrapped.calls == 2 and m.lm_head.weight.grad is not None
    # the ordinary forward (generation, logits) is untouched
    out = wrapped(input_ids=ids, attention_mask=am)
    assert out.logits.shape == (*ids.shape, V)


def test_patched_forward_survives_deepcopy():
    """A copy of a model that fusedrl has hooked (e.g. a reference model) runs its own forward."""
    m = llama(False)
    ids, am, rmask, _ = rollout_batch()
    with torch.no_grad():
        hf.hf_logprob_entropy(_DDPLike(m), ids, am, response_mask=rmask)  # installs the hook-in
        c = copy.deepcopy(m)
        for p in c.parameters():
            p.add_(0.05)
        assert not torch.allclose(c(input_ids=ids).logits, m(input_ids=ids).logits)
        torch.testing.assert_close(hf.last_hidden_state(_DDPLike(c), ids), c.model(ids).last_hidden_state)


def test_response_alignment_errors():
    m = llama(False)
    ids, am, rmask, adv = rollout_batch()
    full = torch.ones_like(ids)
    with pytest.raises(ValueError, match="trailing tokens"):
        hf.hf_logprob_entropy(m, ids, am, response_mask=full)


# --------------------------------------------------------------------------------------------------
# TRL mapping (no TRL needed): fusedrl config vs TRL's loss formulas written out
# --------------------------------------------------------------------------------------------------
def trl_reference_loss(
    logp,
    old,
    adv,
    mask,
    loss_type,
    level="token",
    eps_low=0.2,
    eps_high=0.28,
    delta=None,
    max_len=None,
    num_items=None,
    tau=(1.0, 1.05),
):
    """TRL 1.16's policy term written out (GRPOTrainer._compute_loss, no KL / masks)."""
    A = adv[:, None]
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    c1 = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_tok = -torch.clamp(c1, max=eps_high).detach() * A * logp
    elif loss_type == "sapo":
        t = torch.where(A > 0, tau[0], tau[1])
        per_tok = -torch.sigmoid(t * (c1 - 1)) * 4 / t * A
    else:
        c2 = c1.clamp(1 - eps_low, 1 + eps_high)
        if delta is not None:
            c1 = c1.clamp(max=delta)
        per_tok = -torch.minimum(c1 * A, c2 * A)
    per_tok = per_tok.expand_as(logp)
    if loss_type in ("grpo", "sapo"):
        return ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_tok * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_tok * mask).sum() / (per_tok.size(0) * max_len)
    if loss_type == "luspo":
        return (per_tok * mask).sum(-1).mean()
    return (per_tok * mask).sum() / num_items


@pytest.mark.parametrize(
    "loss_type,level,extra",
    [
        ("grpo", "token", {}),
        ("bnpo", "token", {}),
        ("dr_grpo", "token", {}),
        ("dapo", "token", {}),
        ("grpo", "sequence", {}),
        ("dapo", "sequence", {}),
        ("dapo", "token", {"delta": 1.5}),
        ("dapo", "token", {"delta": 1.1}),
        ("grpo", "sequence", {"delta": 1.2}),
        ("cispo", "token", {"eps_high": 1.1}),
        ("cispo", "token", {"eps_high": 0.2}),
        ("cispo", "sequence", {"eps_high": 2.0}),
        ("sapo", "token", {}),
        ("sapo", "sequence", {}),
        ("luspo", "sequence", {}),
        ("luspo", "token", {"delta": 1.3}),
    ],
)
def test_trl_loss_type_mapping(loss_type, level, extra):
    """grpo_policy_loss_config + fusedrl.policy_loss == TRL's policy term (the direct API, no TRL needed)."""
    g = torch.Generator().manual_seed(11)
    B, K = 5, 6
    mask = (torch.rand(B, K, generator=g) > 0.3).float()
    mask[1] = 0.0  # an empty completion (TRL keeps it in grpo's mean)
    logp0 = -torch.rand(B, K, generator=g) * 3
    old = logp0 + 0.3 * torch.randn(B, K, generator=g)
    adv = torch.randn(B, generator=g)
    eps_high = extra.get("eps_high", 0.28)
    num_items = torch.tensor(37.0)
    cfg, norms = fr_trl.grpo_policy_loss_config(
        loss_type,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        importance_sampling_level=level,
        delta=extra.get("delta"),
        batch_size=B,
        max_completion_length=K + 2,
        num_items=num_items,
    )
    a = logp0.clone().requires_grad_()
    b = logp0.clone().requires_grad_()
    loss, _ = fusedrl.policy_loss(a, old, adv, mask, config=cfg, **norms)
    ref = trl_reference_loss(
        b,
        old,
        adv,
        mask,
        loss_type,
        level,
        eps_high=eps_high,
        delta=extra.get("delta"),
        max_len=K + 2,
        num_items=num_items,
    )
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_trl_mapping_rejects_unmapped():
    with pytest.raises(NotImplementedError, match="loss_type='no_such_loss'"):
        fr_trl.grpo_policy_loss_config("no_such_loss")
    with pytest.raises(ValueError, match="vespo"):  # the trainer computes TRL's KL itself; the direct API cannot
        fr_trl.grpo_policy_loss_config("vespo", importance_sampling_level="sequence", beta=0.1)
    # what used to fall back is mapped now
    for lt in fr_trl.TRL_LOSS_TYPES:
        fr_trl.grpo_policy_loss_config(
            lt,
            batch_size=4,
            max_completion_length=8,
            top_entropy_quantile=0.2,
            off_policy_mask_threshold=0.5,
            vllm_importance_sampling_mode="token_mask",
        )
    cfg, _ = fr_trl.grpo_policy_loss_config("cispo")  # TRL's default epsilon_high (= epsilon = 0.2) caps at 0.2
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high) == (1.0, pytest.approx(-0.8))


class _FakeAccelerator:
    num_processes = 1

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def _fake_trainer(model, **kw):
    from collections import defaultdict

    args = types.SimpleNamespace(
        use_bias_correction_kl=kw.pop("bias_corr", True),
        delta=None,
        steps_per_generation=2,
        gradient_accumulation_steps=2,
        entropy_coef=kw.pop("entropy_coef", 0.0),
    )
    t = types.SimpleNamespace(
        model=model,
        args=args,
        accelerator=_FakeAccelerator(),
        loss_type="grpo",
        importance_sampling_level="token",
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=0.28,
        temperature=0.9,
        max_completion_length=7,
        current_gradient_accumulation_steps=2,
        top_entropy_quantile=1.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    for k, v in kw.items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("dr_grpo", "token")])
def test_fused_grpo_loss_hook_matches_trl_formula(loss_type, level):
    """The TRL hook on a stand-in trainer (no TRL needed): KL with bias correction, entropy bonus, /GA."""
    m1, m2 = llama(False), llama(False)
    ids, am, rmask, adv = rollout_batch()
    P, K = ids.shape[1] - rmask.shape[1], rmask.shape[1]
    with torch.no_grad():
        old, _ = eager_logp_entropy(m2, ids, am, K, 0.9)
        old = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5))
        ref = old - 0.1
    inputs = dict(
        prompt_ids=ids[:, :P],
        prompt_mask=am[:, :P],
        completion_ids=ids[:, P:],
        completion_mask=am[:, P:],
        advantages=adv,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=rmask.sum() * 2,
    )
    m1.train()
    tr = _fake_trainer(m1, loss_type=loss_type, importance_sampling_level=level, entropy_coef=0.02)
    loss = fr_trl.fused_grpo_loss(tr, m1, inputs, backend="torch")
    loss.backward()

    logp, ent = eager_logp_entropy(m2, ids, am, K, 0.9)
    mask = rmask
    log_w = logp - old
    if level == "sequence":
        log_w = ((log_w * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    d = ref - logp
    kl = (torch.exp(d) - d - 1) * torch.exp(log_w)
    n_items = rmask.sum() * 2 / 1 * 2 / 2  # num_items / processes * GA / steps_per_generation
    pg = trl_reference_loss(logp, old, adv, mask, loss_type, level, max_len=7, num_items=n_items)
    m = mask
    if loss_type == "grpo":
        agg_kl = ((kl * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        agg_kl = (kl * m).sum() / (m.size(0) * 7)
    else:
        agg_kl = (kl * m).sum() / n_items
    ref_loss = pg + 0.04 * agg_kl
    if loss_type != "dapo":
        ref_loss = ref_loss / 2
    ref_loss = ref_loss - 0.02 * (ent * m).sum() / m.sum() / 2
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-4, msg=n)
    logged = tr._metrics["train"]
    assert {"entropy", "kl", "clip_ratio/region_mean", "policy_loss"} <= set(logged)
    ent_mean = ((ent * m).sum() / m.sum()).item()
    assert logged["entropy"][0] == pytest.approx(ent_mean, rel=1e-5)


def test_fused_grpo_loss_reports_unsupported():
    m = llama(False)
    tr = _fake_trainer(m, loss_type="no_such_loss")
    with pytest.raises(fr_trl.FusedRLUnsupported, match="no_such_loss"):
        fr_trl.fused_grpo_loss(tr, m, {})
    tr = _fake_trainer(m)
    with pytest.raises(fr_trl.FusedRLUnsupported, match="multimodal"):
        fr_trl.fused_grpo_loss(tr, m, {"pixel_values": torch.zeros(1)})
    assert fr_trl.loss.static_unsupported_reason(_fake_trainer(m, loss_type="sapo", top_entropy_quantile=0.2)) is None


class _FakeGRPOBase:
    """Stands in for trl.GRPOTrainer (1.16 attributes) so the mixin's construction logic runs without TRL."""

    def __init__(self, model=None, **kw):
        from collections import defaultdict

        self.model = model
        self.args = types.SimpleNamespace(
            delta=None, use_bias_correction_kl=True, steps_per_generation=1, gradient_accumulation_steps=1
        )
        self.accelerator = _FakeAccelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.loss_type, self.importance_sampling_level, self.beta = "dapo", "token", 0.0
        self.epsilon_low = self.epsilon_high = 0.2
        self.temperature, self.max_completion_length, self.current_gradient_accumulation_steps = 1.0, 7, 1
        self.top_entropy_quantile, self.off_policy_mask_threshold, self.use_vllm = 1.0, None, False
        self.use_adaptive_entropy = False
        self.entropy_coef = kw.get("entropy_coef", 0.0)
        self._entropy_bonus_enabled = self.entropy_coef != 0.0
        self.aux_loss_enabled = kw.get("aux_loss_enabled", False)
        self.trl_calls = []

    def _compute_loss(self, model, inputs):
        self.trl_calls.append((self.entropy_coef, self._entropy_bonus_enabled))
        return torch.zeros(())


def test_trl_entropy_coeff_with_fallback_checked_at_construction():
    """fusedrl_entropy_coeff plus a setting that needs TRL's own loss: a warning when the trainer is built
    (not a crash at the first step), and TRL's loss receives the coefficient through entropy_coef."""
    cls = fr_trl.make_fused_grpo_trainer_class(_FakeGRPOBase)
    with pytest.warns(UserWarning) as rec:
        tr = cls(model=llama(False), fusedrl_entropy_coeff=0.05, aux_loss_enabled=True)
    msgs = [str(w.message) for w in rec if "fusedrl" in str(w.message)]
    assert len(msgs) == 1 and "MoE load-balancing auxiliary loss" in msgs[0], msgs
    assert "is not covered" not in msgs[0] and "not mapped" not in msgs[0]  # the old garbled text
    assert (tr.entropy_coef, tr._entropy_bonus_enabled) == (0.05, True)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")  # warned once already: the step itself is silent
        tr._compute_loss(tr.model, {})
    assert tr.trl_calls == [(0.05, True)]
    with pytest.raises(fr_trl.FusedRLUnsupported, match="auxiliary loss"):
        cls(model=llama(False), fusedrl_entropy_coeff=0.05, aux_loss_enabled=True, fusedrl_fallback="error")
    with pytest.raises(ValueError, match="fusedrl_entropy_coeff"):
        cls(model=llama(False), fusedrl_entropy_coeff=float("nan"))


def test_trl_fallback_warning_text():
    tr = _fake_trainer(llama(False), loss_type="no_such_loss")
    with pytest.raises(fr_trl.FusedRLUnsupported) as e:
        fr_trl.fused_grpo_loss(tr, tr.model, {})
    assert e.value.reason == "loss_type='no_such_loss'"
    cls = fr_trl.make_fused_grpo_trainer_class(_FakeGRPOBase)
    with pytest.warns(
        UserWarning,
        match=r"^fusedrl: the fused loss does not cover loss_type='no_such_loss'; "
        r"TRL's own loss is used",
    ):
        t = cls(model=llama(False))
        t.loss_type = "no_such_loss"
        t._compute_loss(t.model, {})


def test_integrations_import_without_frameworks():
    code = (
        "import sys; sys.modules['trl'] = None; sys.modules['verl'] = None; sys.modules['transformers'] = None\n"
        "import fusedrl.integrations.trl as t, fusedrl.integrations.verl as v, fusedrl.integrations.hf as h\n"
        "assert hasattr(t, 'FusedGRPOMixin') and hasattr(v, 'FusedLinearForPPO')\n"
        "try:\n    t.FusedGRPOTrainer\nexcept ImportError:\n    print('ok')\n"
    )
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------------------------------
# TRL GRPOTrainer end to end (optional)
# --------------------------------------------------------------------------------------------------
def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = V - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", padding_side="left")


def _reward(completions, **kwargs):
    return [(sum(c.encode()) % 7) / 7 for c in completions]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    _transformers()
    path = tmp_path_factory.mktemp("tiny_llama")
    llama(False, eos_bias=2.5).save_pretrained(str(path))
    return str(path)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("dr_grpo", {}),
        ("grpo", {"importance_sampling_level": "sequence", "entropy_coef": 0.05}),
    ],
    ids=["dr_grpo", "grpo-sequence-entropy"],
)
def test_trl_grpo_trainer_matches_trl(tmp_path, tiny_model_dir, monkeypatch, loss_type, extra):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    calls = {"grad": 0, "no_grad": 0}
    real = hf.hf_logprob_entropy

    def spy(*a, **k):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return real(*a, **k)

    def run(cls, **kw):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        ds = datasets.Dataset.from_dict({"prompt": ["hello", "abc", "xyz q", "rl!"] * 4})
        args = GRPOConfig(
            output_dir=str(tmp_path / cls.__name__),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            max_steps=4,
            learning_rate=3e-3,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            seed=0,
            num_iterations=2,
            loss_type=loss_type,
            beta=0.04,
            save_strategy="no",
            disable_dropout=True,
            bf16=False,
            **extra,
        )  # bf16 autocast: TRL runs its head in bf16
        tr = cls(
            model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=_byte_tokenizer(), **kw
        )
        tr.train()
        return tr, [h for h in tr.state.log_history if "loss" in h], dict(model.named_parameters())

    _, hist_trl, p_trl = run(GRPOTrainer)
    monkeypatch.setattr(hf, "hf_logprob_entropy", spy)
    tr, hist_fused, p_fused = run(fr_trl.FusedGRPOTrainer, fusedrl_backend="torch", fusedrl_fallback="error")
    assert isinstance(tr, GRPOTrainer)
    assert calls["grad"] == 4 and calls["no_grad"] >= 2  # the loss and the old/ref scoring ran on fusedrl
    assert len(hist_trl) == len(hist_fused) == 4
    assert any(abs(h["loss"]) > 1e-4 for h in hist_trl)
    for a, b in zip(hist_trl, hist_fused):
        for key in ("loss", "entropy", "kl", "clip_ratio/region_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
        assert b.get("completions/mean_length") == a.get("completions/mean_length")
    for n in p_trl:
        torch.testing.assert_close(p_fused[n], p_trl[n], atol=2e-5, rtol=1e-4, msg=n)


# --------------------------------------------------------------------------------------------------
# verl (optional)
# --------------------------------------------------------------------------------------------------
def test_verl_config_mapping_without_verl():
    cfg = {
        "clip_ratio": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 10.0,
        "loss_agg_mode": "seq-mean-token-mean",
        "policy_loss": {"loss_mode": "fusedrl_vanilla"},
        "global_batch_info": {
            "dp_size": 4,
            "batch_num_tokens": 400,
            "global_batch_size": 32,
            "loss_scale_factor": None,
        },
    }
    pc, norms = fr_verl.policy_loss_config_from_verl(cfg)
    assert (pc.loss_mode, pc.clip_ratio_low, pc.clip_ratio_high, pc.clip_ratio_c) == ("vanilla", 0.2, 0.28, 10.0)
    assert pc.loss_agg_mode == "seq-mean-token-mean" and pc.ppo_kl_coef == 0.1
    assert norms == {"global_num_tokens": 100.0, "global_num_seqs": 8.0}
    # dppo: clip_ratio_c is the ratio truncation, verl's default 20 where the config has none
    pc, _ = fr_verl.policy_loss_config_from_verl({"policy_loss": {"loss_mode": "dppo_tv"}})
    assert pc.clip_ratio_c == 20.0
    with pytest.raises(ValueError, match="dro_beta"):
        fr_verl.policy_loss_config_from_verl({"policy_loss": {"loss_mode": "dro"}})
    pc, _ = fr_verl.policy_loss_config_from_verl(
        {"policy_loss": {"loss_mode": "sapo"}, "tau_neg": 2.0, "loss_agg_mode": "token-mean"}
    )
    assert (pc.loss_agg_mode, pc.tau_pos, pc.tau_neg) == ("seq-mean-token-mean", 1.0, 2.0)


def test_verl_ppo_kl_coef_null_means_one():
    """verl reads ``policy_loss.ppo_kl_coef: null`` as 1.0 (its loss: ``x if x is not None else 1.0``); an
    absent field is verl's dataclass default 0.1."""
    base = {"loss_agg_mode": "token-mean"}
    pc, _ = fr_verl.policy_loss_config_from_verl({**base, "policy_loss": {"loss_mode": "kl_cov", "ppo_kl_coef": None}})
    assert pc.ppo_kl_coef == 1.0
    pc, _ = fr_verl.policy_loss_config_from_verl({**base, "policy_loss": {"loss_mode": "kl_cov"}})
    assert pc.ppo_kl_coef == 0.1
    pc, _ = fr_verl.policy_loss_config_from_verl({**base, "policy_loss": {"loss_mode": "kl_cov", "ppo_kl_coef": 0.3}})
    assert pc.ppo_kl_coef == 0.3
    fn = fr_verl.make_verl_policy_loss("kl_cov")
    g = torch.Generator().manual_seed(0)
    lp, old, adv = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    cfg = {**base, "policy_loss": {"loss_mode": "kl_cov", "ppo_kl_coef": None, "kl_cov_ratio": 0.2}}
    loss, _ = fn(old, lp, adv, mask, "token-mean", cfg)
    ref, _ = fusedrl.policy_loss(
        lp, old, adv, mask, config=fusedrl.PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.2, ppo_kl_coef=1.0)
    )
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize(
    "agg,needs",
    [
        ("token-mean", "batch_num_tokens"),
        ("seq-mean-token-mean", "global_batch_size"),
        ("seq-mean-token-sum-norm", "global_batch_size"),
    ],
)
def test_verl_dp_without_global_counts_raises(agg, needs):
    """As verl's agg_loss: dp_size > 1 without the global count raises instead of normalising locally."""
    cfg = {"loss_agg_mode": agg, "policy_loss": {"loss_mode": "vanilla"}, "global_batch_info": {"dp_size": 2}}
    with pytest.raises(ValueError, match=needs):
        fr_verl.policy_loss_config_from_verl(cfg)
    fn = fr_verl.make_verl_policy_loss("vanilla")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=needs):
        fn(x, x, x, torch.ones(2, 3), agg, cfg)
    # dp_size 1 (or the counts given) normalise locally / globally as verl does
    cfg["global_batch_info"] = {"dp_size": 1}
    fr_verl.policy_loss_config_from_verl(cfg)
    cfg["global_batch_info"] = {"dp_size": 2, "batch_num_tokens": 10, "global_batch_size": 4}
    fr_verl.policy_loss_config_from_verl(cfg)


def test_verl_token_sum_scales_by_dp():
    """verl's token-sum: masked sum times dp_size."""
    g = torch.Generator().manual_seed(1)
    lp, old, adv = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    fn = fr_verl.make_verl_policy_loss("gpg")
    for dp in (1, 4):
        cfg = {"loss_agg_mode": "token-sum", "policy_loss": {"loss_mode": "gpg"}, "global_batch_info": {"dp_size": dp}}
        loss, metrics = fn(old, lp, adv, mask, "token-sum", cfg)
        torch.testing.assert_close(loss, (-adv * lp * mask).sum() * dp)
        assert metrics == {}  # verl's gpg returns no metrics


def _fake_verl_modules(monkeypatch):
    """A stand-in verl package: the kernel module, the torch FusedLinearForPPO and Megatron's fused forwards
    (which bind linear_cross_entropy at import), enough for patch_verl without verl or Megatron."""

    def kernel_lce(*a, **k):
        return "verl-kernel"

    mods = {}
    for name in (
        "verl",
        "verl.utils",
        "verl.utils.experimental",
        "verl.utils.experimental.torch_functional",
        "verl.utils.kernel",
        "verl.utils.kernel.linear_cross_entropy",
        "verl.models",
        "verl.models.mcore",
        "verl.models.mcore.model_forward_fused",
        "verl.models.mcore.model_forward_1f1b_overlap",
    ):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["verl.utils.experimental.torch_functional"].FusedLinearForPPO = type("FusedLinearForPPO", (), {})
    mods["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy = kernel_lce
    for name in fr_verl.kernels._LCE_IMPORTERS:
        mods[name].linear_cross_entropy = kernel_lce  # `from ... import linear_cross_entropy` at import
    return mods, kernel_lce


def test_patch_verl_reaches_megatron_forwards(monkeypatch):
    mods, kernel_lce = _fake_verl_modules(monkeypatch)
    done = fr_verl.patch_verl(backend="torch", losses=False)
    try:
        for name in ("verl.utils.kernel.linear_cross_entropy",) + fr_verl.kernels._LCE_IMPORTERS:
            fn = mods[name].linear_cross_entropy
            assert fn is not kernel_lce and f"{name}.linear_cross_entropy" in done
            g = torch.Generator().manual_seed(0)
            h, w = torch.randn(5, 1, 16, generator=g), torch.randn(40, 16, generator=g)
            labels = torch.randint(0, 40, (1, 5), generator=g)  # Megatron: [S, 1, H] hidden, [1, S] labels
            lp, ent = fn(h, w, labels, 0.7, "none", None)
            z = (h.reshape(5, 16) @ w.t()) / 0.7
            torch.testing.assert_close(lp, z.log_softmax(-1).gather(-1, labels.reshape(5, 1)).squeeze(-1))
            assert lp.shape == ent.shape == (5,)  # flat, as verl's kernel
        fr_verl.patch_verl(backend="torch", losses=False)  # idempotent
    finally:
        fr_verl.unpatch_verl()
    for name in ("verl.utils.kernel.linear_cross_entropy",) + fr_verl.kernels._LCE_IMPORTERS:
        assert mods[name].linear_cross_entropy is kernel_lce, name
    assert mods["verl.utils.experimental.torch_functional"].FusedLinearForPPO.__module__ != fr_verl.__name__


def test_patch_verl_megatron_imported_later(monkeypatch):
    """A Megatron forward imported after patch_verl binds fusedrl's function (and unpatch restores it)."""
    mods, kernel_lce = _fake_verl_modules(monkeypatch)
    late = "verl.models.mcore.model_forward_fused"
    monkeypatch.delitem(sys.modules, late)
    fr_verl.patch_verl(backend="torch", losses=False)
    try:
        mod = types.ModuleType(late)
        mod.linear_cross_entropy = sys.modules["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy
        monkeypatch.setitem(sys.modules, late, mod)
        assert getattr(mod.linear_cross_entropy, "_fusedrl", False)
    finally:
        fr_verl.unpatch_verl()
    assert sys.modules[late].linear_cross_entropy is kernel_lce


def test_verl_fused_linear_for_ppo_without_verl():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    labels[0, -1] = -100
    lp, ent = fr_verl.FusedLinearForPPO()(h, w, labels, 0.7)
    z = (h @ w.t()).float() / 0.7
    lsm = z.log_softmax(-1)
    ref = lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    assert lp[0, -1] == 0
    keep = labels >= 0
    torch.testing.assert_close(lp[keep], ref[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(lsm.exp() * lsm).sum(-1), atol=1e-5, rtol=1e-5)
    s_lp, s_ent = fr_verl.linear_cross_entropy(h, w, labels.clamp(min=0), 0.7, "sum")
    assert s_lp.dim() == 0 and s_ent.dim() == 0


def _verl():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


# the registered losses against verl's own: tests/integrations/test_verl_parity.py


def test_verl_patch_routes_fused_kernels():
    _verl()
    import importlib

    tf = importlib.import_module("verl.utils.experimental.torch_functional")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    lp1, e1 = tf.FusedLinearForPPO()(h, w, ids, 0.7)
    (lp1.sum() + 0.3 * e1.float().sum()).backward()
    g1 = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    try:
        fr_verl.patch_verl(backend="torch", losses=False)
        mod = tf.FusedLinearForPPO()
        assert type(mod).__module__.startswith("fusedrl.integrations.verl")
        lp2, e2 = mod(h, w, ids, 0.7)
    finally:
        fr_verl.unpatch_verl()
    assert type(tf.FusedLinearForPPO()).__module__.startswith("verl")
    (lp2.sum() + 0.3 * e2.sum()).backward()
    torch.testing.assert_close(lp2, lp1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e2, e1.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, g1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, g1[1], atol=1e-5, rtol=1e-5)


def test_peft_lora_model():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    m = llama(False)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    assert hf.unwrap_model(pm) is m
    ids, am, rmask, adv = rollout_batch()
    with torch.no_grad():
        lp, _ = hf.hf_logprob_entropy(pm, ids, am, response_mask=rmask)
        rlp, _ = eager_logp_entropy(pm, ids, am, rmask.shape[1], 1.0)
    torch.testing.assert_close(lp[rmask.bool()], rlp[rmask.bool()], atol=2e-5, rtol=1e-5)
    loss, _ = hf.hf_fused_policy_loss(pm, ids, am, rmask, lp + 0.1, adv)
    loss.backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
