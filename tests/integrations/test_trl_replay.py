"""Sampling replay in FusedGRPOTrainer (TRL #6789 / #7269): completions sampled with ``top_p=0.8`` from the
model itself, vLLM's processed log-probs (log_softmax over the kept set) written out as the sampler returns
them. With replay TRL's importance ratio ``exp(old - sampling)`` is 1 (both on the kept set); without it, its
mean is the mean kept mass. The trainer's scoring and its loss use one support (the batch's masks, or the
recomputed truncation), so the policy ratio at unchanged weights is 1 as well."""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from test_trl_parity import _llama, _reward, _tokenizer  # noqa: E402

from fusedrl.integrations import trl as fr_trl  # noqa: E402
from fusedrl.replay import check_truncation, keep_mask  # noqa: E402

B, P, K, TOP_P = 6, 5, 8, 0.8


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    args = trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=B,
                          num_generations=B, max_completion_length=K, report_to=[], use_cpu=True, bf16=False,
                          save_strategy="no", disable_dropout=True, top_p=TOP_P, temperature=0.9)  # fmt: skip
    cls = fr_trl.make_fused_grpo_trainer_class()
    tr = cls(model=_llama(), reward_funcs=_reward, args=args, processing_class=_tokenizer(),
             train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"] * B}),
             fusedrl_sampling_replay=True)  # fmt: skip
    tr.model.eval()
    return tr


def _rollout(model, temperature, seed=0):
    """Completions sampled token by token with top-p; vLLM's processed log-probs and kept ids of each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (B, P), generator=g)
    lps, kept = [], []
    with torch.no_grad():
        for _ in range(K):
            z = model(ids).logits[:, -1].double() / temperature
            keep = keep_mask(z, check_truncation(None, TOP_P, None, (B,), z.device, True))
            lsm = torch.log_softmax(z.masked_fill(~keep, -math.inf), -1)
            nxt = torch.multinomial(lsm.exp(), 1, generator=g)
            lps.append(lsm.gather(1, nxt))
            kept.append(torch.where(keep, torch.arange(z.shape[1]), -1).sort(-1, descending=True).values)
            ids = torch.cat([ids, nxt], 1)
    width = max(int((k >= 0).sum(-1).max()) for k in kept)
    mask = torch.stack([k[:, :width] for k in kept], 1)  # [B, K, width], -1 fill
    return ids, torch.cat(lps, 1).float(), mask


def _old(tr, ids):
    with torch.no_grad():
        return tr._get_per_token_logps_and_entropies(tr.model, ids, torch.ones_like(ids), K)[0]


def test_importance_ratio_on_the_kept_set(trainer):
    ids, sampling, mask = _rollout(trainer.model, trainer.temperature)
    ratio = torch.exp(_old(trainer, ids) - sampling)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
    trainer._fusedrl_sampling_replay = False
    try:
        full = torch.exp(_old(trainer, ids) - sampling)
    finally:
        trainer._fusedrl_sampling_replay = True
    assert full.max() <= 1 + 1e-5 and full.mean() < 0.97  # the kept mass, well below 1 at top_p = 0.8
    with torch.no_grad():
        z = trainer.model(ids).logits[:, P - 1 : -1].double() / trainer.temperature
        keep = keep_mask(z.reshape(-1, z.shape[-1]), check_truncation(None, TOP_P, None, (B * K,), z.device, True))
        mass = (torch.softmax(z.reshape(-1, z.shape[-1]), -1) * keep).sum(-1)
    torch.testing.assert_close(full.mean().double(), mass.mean(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", ["masks", "recomputed"])
def test_loss_and_scoring_share_the_support(trainer, source):
    """At unchanged weights the policy ratio is 1: the loss's log-probs equal the scored old log-probs."""
    ids, sampling, mask = _rollout(trainer.model, trainer.temperature, seed=1)
    old = _old(trainer, ids)
    inputs = dict(prompt_ids=ids[:, :P], prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=ids[:, P:],
                  completion_mask=torch.ones(B, K, dtype=torch.long), advantages=torch.randn(B),
                  old_per_token_logps=old, sampling_per_token_logps=sampling)  # fmt: skip
    if source == "masks":
        inputs["sampling_mask"] = mask
    trainer.loss_type, trainer.beta = "dapo", 0.0
    with_old = fr_trl.fused_grpo_loss(trainer, trainer.model, inputs)
    inputs.pop("old_per_token_logps")  # TRL's one-iteration form: old = the current log-probs, detached
    without = fr_trl.fused_grpo_loss(trainer, trainer.model, inputs)
    torch.testing.assert_close(with_old, without, atol=1e-6, rtol=1e-6)


def test_replay_options_checked(tmp_path):
    cls = fr_trl.make_fused_grpo_trainer_class()
    with pytest.raises(ValueError, match="fusedrl_sampling_replay"):
        cls(model=_llama(), reward_funcs=_reward, args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True),
            fusedrl_sampling_replay="yes")  # fmt: skip
    with pytest.raises(ValueError, match="fusedrl_entropy_support"):
        cls(model=_llama(), reward_funcs=_reward, args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True),
            fusedrl_entropy_support="mass")  # fmt: skip


def test_hf_fused_loss_on_kept_sets(trainer):
    """hf_fused_policy_loss(sampling_mask=) equals policy_loss over hf_logprob_entropy(sampling_mask=)."""
    import fusedrl
    from fusedrl.integrations import hf

    model = trainer.model
    ids, _, mask = _rollout(model, 1.0, seed=2)
    am = torch.ones_like(ids)
    resp = torch.ones(B, K, dtype=torch.long)
    old, adv = -torch.rand(B, K) - 0.5, torch.randn(B)
    cfg = fusedrl.PolicyLossConfig(entropy_coeff=0.01)
    lp, ent = hf.hf_logprob_entropy(model, ids, am, response_mask=resp, sampling_mask=mask, entropy_support="kept")
    want, _ = fusedrl.policy_loss(lp, old, adv, resp, entropy=ent, config=cfg)
    got, metrics = hf.hf_fused_policy_loss(model, ids, am, resp, old, adv, config=cfg, sampling_mask=mask,
                                           entropy_support="kept")  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(metrics["replay_frac"]) == 1.0


def test_rollout_masks_reach_scoring_and_loss(tmp_path, monkeypatch):
    """A ``rollout_func`` returning vLLM's kept sets (``"sampling_mask"``: per completion, per token, the ids):
    with no truncation in ``GRPOConfig`` (nothing to recompute), TRL's old log-probs are scored on those sets
    (importance ratio to the sampler's log-probs = 1) and the batch carries them to the loss."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    box = {}

    def rollout(prompts, tr):
        ids, sampling, mask = _rollout(tr.model, tr.temperature, seed=4)
        box["sampling"] = sampling
        n = len(prompts)
        sets = [[[i for i in mask[b, t].tolist() if i >= 0] for t in range(K)] for b in range(n)]
        return dict(prompt_ids=ids[:n, :P].tolist(), completion_ids=ids[:n, P:].tolist(),
                    logprobs=sampling[:n].tolist(), sampling_mask=sets)  # fmt: skip

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=B, num_generations=B,
                          max_completion_length=K, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                          disable_dropout=True, temperature=0.9, num_iterations=2)  # fmt: skip
    cls = fr_trl.make_fused_grpo_trainer_class()
    tr = cls(model=_llama(), reward_funcs=_reward, args=args, processing_class=_tokenizer(), rollout_func=rollout,
             train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"] * B}))  # fmt: skip
    tr.model.eval()
    out = tr._generate_and_score_completions([{"prompt": "a"}] * B)
    assert out["sampling_mask"].shape[:2] == (B, K)
    ratio = torch.exp(out["old_per_token_logps"] - box["sampling"])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
    loss = fr_trl.fused_grpo_loss(tr, tr.model, out)
    out_full = dict(out)
    out_full.pop("sampling_mask")
    assert not torch.allclose(loss, fr_trl.fused_grpo_loss(tr, tr.model, out_full))
    tr._fusedrl_sampling_replay = False  # off: the full vocabulary, the kept mass in the ratio
    off = tr._generate_and_score_completions([{"prompt": "a"}] * B)
    assert float(torch.exp(off["old_per_token_logps"] - box["sampling"]).mean()) < 0.97
