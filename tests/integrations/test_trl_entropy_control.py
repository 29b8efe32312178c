"""FusedGRPOTrainer's entropy control (``fusedrl_entropy_control`` and friends): the trainer's loss equals
policy_loss with the mapped config and the per-token inputs built from TRL's batch (STEER, BAPO, RL-PLUS, SSPO
segments, the EPO corridor with the trainer's EntropyHistory), the methods' metrics reach TRL's store, and bad
settings fail at construction. Uses tests/integrations/test_trl_parity.py's tiny trainer."""

from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

from test_trl_parity import B, K, _batch, _configure, _llama, _reward, _tokenizer  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl.control import EntropyHistory  # noqa: E402
from fusedrl.integrations import trl as fr_trl  # noqa: E402
from fusedrl.integrations.trl import entropy as fr_entropy  # noqa: E402

BOUNDARY = [3, 17, 101]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """test_trl_parity's tiny TRL GRPOTrainer (the same construction)."""
    import datasets
    import trl

    args = trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=B,
                          num_generations=B, max_completion_length=K + 2, report_to=[], use_cpu=True, bf16=False,
                          save_strategy="no", disable_dropout=True)  # fmt: skip
    tr = trl.GRPOTrainer(model=_llama(), reward_funcs=_reward, args=args, processing_class=_tokenizer(),
                         train_dataset=datasets.Dataset.from_dict({"prompt": ["a", "b"] * B}))  # fmt: skip
    tr.model.train()
    return tr


CASES = {
    "steer": dict(loss_mode="steer", clip_ratio_c=3.0),
    "steer_current_exp": dict(loss_mode="steer", steer_entropy="current", steer_weighting="exp"),
    "bapo": dict(loss_mode="bapo", bapo_ratio_lower_start=0.6, bapo_ratio_lower_max=0.8, bapo_ratio_upper_max=2.0),
    "rl_plus": dict(loss_mode="rl_plus", rl_plus_clip_on_policy=True),
    "segment": dict(importance_sampling_level="segment"),
    "corridor": dict(entropy_corridor=(0.5, 1.5), entropy_corridor_coeff=0.05),
}


def _attach(tr, overrides, history=None):
    tr._fusedrl_entropy_control = fr_entropy.check_entropy_control(overrides)
    tr._fusedrl_segment_boundary_ids = BOUNDARY
    tr._fusedrl_entropy_history = history


def _detach(tr):
    for k in ("_fusedrl_entropy_control", "_fusedrl_segment_boundary_ids", "_fusedrl_entropy_history"):
        setattr(tr, k, None)


def _direct(tr, inputs, cfg, side):
    """The same loss by hand: the model's logits, torch log-probs / entropies, policy_loss (bnpo, GA = 1)."""
    prompt, comp = inputs["prompt_ids"], inputs["completion_ids"]
    ids = torch.cat([prompt, comp], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = tr.model(input_ids=ids, attention_mask=am).logits[:, prompt.shape[1] - 1 : -1].float()
    lsm = logits.log_softmax(-1)
    logp = lsm.gather(-1, comp[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    mask = inputs["completion_mask"]
    side = {k: (v(ent) if callable(v) else v) for k, v in side.items()}
    loss, metrics = fusedrl.policy_loss(logp, inputs["old_per_token_logps"], inputs["advantages"], mask, entropy=ent,
                                        config=cfg, **side)  # fmt: skip
    return loss, metrics


@pytest.mark.parametrize("name", sorted(CASES))
def test_trainer_loss_is_policy_loss_with_the_batch_inputs(trainer, name):
    tr = trainer
    _configure(tr, loss_type="bnpo", current_gradient_accumulation_steps=1, epsilon_high=0.28)
    inputs = _batch(tr, seed=61, spread=0.3)
    if name in ("steer", "steer_current_exp"):
        inputs["old_per_token_logps"] = None  # on-policy: the old entropy is the current one
    if name == "rl_plus":
        inputs["external_mask"] = torch.tensor([1, 0, 0, 0, 0, 1])  # per row: whole external completions
    history = EntropyHistory() if name == "corridor" else None
    _attach(tr, CASES[name], history)
    try:
        cfg, _ = fr_trl.loss._trainer_config(tr, batch_size=inputs["completion_ids"].shape[0], num_items=None)
        tr.model.zero_grad(set_to_none=True)
        tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        loss = fr_trl.fused_grpo_loss(tr, tr.model, inputs, backend="torch")
        loss.backward()
        got = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        logged = dict(tr._metrics["train"])
        tr.model.zero_grad(set_to_none=True)
        old = inputs["old_per_token_logps"]
        side = {}
        if name == "steer":
            side["old_entropy"] = lambda ent: ent.detach()
        if name == "rl_plus":
            side["external_mask"] = inputs["external_mask"][:, None].expand(-1, K)
        if name == "segment":
            side["segment_ids"] = fusedrl.segment_ids_from_tokens(
                inputs["completion_ids"], inputs["completion_mask"], BOUNDARY
            )
        if name == "corridor":
            side["entropy_reference"] = history.reference(torch.zeros(6, dtype=torch.long))[:, None].expand(-1, K)
        if old is None:  # TRL's on-policy old log-probs: the current ones, detached
            want, metrics = _direct_on_policy(tr, inputs, cfg, side)
        else:
            want, metrics = _direct(tr, inputs, cfg, side)
        want.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), atol=2e-5, rtol=1e-4)
        for n, p in tr.model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, atol=2e-5, rtol=1e-3, msg=n)
        for k in fr_entropy.MODE_METRICS.get(cfg.loss_mode, ()) + (
            fr_entropy.CORRIDOR_METRICS if cfg.entropy_corridor else ()
        ):
            assert logged[k][0] == pytest.approx(metrics[k].item(), rel=1e-4, abs=1e-5), k
    finally:
        _detach(tr)


def _direct_on_policy(tr, inputs, cfg, side):
    prompt, comp = inputs["prompt_ids"], inputs["completion_ids"]
    ids = torch.cat([prompt, comp], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = tr.model(input_ids=ids, attention_mask=am).logits[:, prompt.shape[1] - 1 : -1].float()
    lsm = logits.log_softmax(-1)
    logp = lsm.gather(-1, comp[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    side = {k: (v(ent) if callable(v) else v) for k, v in side.items()}
    return fusedrl.policy_loss(logp, logp.detach(), inputs["advantages"], inputs["completion_mask"], entropy=ent,
                               config=cfg, **side)  # fmt: skip


def test_corridor_history_follows_the_training_batches(trainer):
    tr = trainer
    _configure(tr, loss_type="bnpo", current_gradient_accumulation_steps=1)
    hist = EntropyHistory()
    _attach(tr, CASES["corridor"], hist)
    try:
        for seed in (1, 2):
            fr_trl.fused_grpo_loss(tr, tr.model, _batch(tr, seed=seed), backend="torch")
        assert hist.steps == 2 and set(hist.means) == {0}
    finally:
        _detach(tr)


def test_settings_errors(trainer):
    with pytest.raises(ValueError, match="unknown or TRL-owned keys"):
        fr_entropy.check_entropy_control({"clip_ratio_low": 0.1})
    with pytest.raises(ValueError, match="loss_mode"):
        fr_entropy.check_entropy_control({"loss_mode": "vanilla"})
    with pytest.raises(ValueError, match="importance_sampling_level"):
        fr_entropy.check_entropy_control({"importance_sampling_level": "sequence"})
    with pytest.raises(ValueError, match="steer_weighting"):
        fr_entropy.check_entropy_control({"steer_weighting": "cubic"})
    with pytest.raises(ValueError, match="unknown or TRL-owned keys"):  # before TRL builds anything
        fr_trl.FusedGRPOTrainer(fusedrl_entropy_control={"beta": 0.1})
    with pytest.raises(TypeError, match="fusedrl_entropy_history"):
        fr_trl.FusedGRPOTrainer(fusedrl_entropy_history=object())
    tr = trainer
    _configure(tr, loss_type="cispo")
    _attach(tr, {"loss_mode": "bapo"})
    try:
        with pytest.raises(ValueError, match="loss_type"):
            fr_trl.loss._trainer_config(tr, batch_size=6, num_items=None)
        _configure(tr, loss_type="grpo")
        _attach(tr, {"loss_mode": "rl_plus"})
        with pytest.raises(ValueError, match="external_mask"):
            fr_trl.fused_grpo_loss(tr, tr.model, _batch(tr, seed=1), backend="torch")
        _attach(tr, {"importance_sampling_level": "segment"})
        tr._fusedrl_segment_boundary_ids = None
        with pytest.raises(ValueError, match="fusedrl_segment_boundary_ids"):
            fr_trl.fused_grpo_loss(tr, tr.model, _batch(tr, seed=1), backend="torch")
        _attach(tr, {"loss_mode": "steer"})
        with pytest.raises(ValueError, match="old_per_token_entropy"):  # off-policy batch without old entropies
            fr_trl.fused_grpo_loss(tr, tr.model, _batch(tr, seed=1), backend="torch")
    finally:
        _detach(tr)
