"""Hugging Face ``transformers`` causal LMs: fused RL losses and scoring without the logits.

The model's body (``model.base_model``: embeddings, decoder layers, final norm) runs as usual; its
last hidden state goes with ``lm_head.weight`` (tied or untied), the head's bias, the model's logit
scale, final-logit softcap, padded-vocabulary slice and per-vocabulary scale (:func:`lm_head_params`) and
the rollout temperature into :mod:`fusedrl`, so the ``[batch, seq, vocab]`` logits are never made.

The head is the model's own: on the first call for a model, :func:`hf_logprob_entropy` and
:func:`hf_fused_policy_loss` compare it with the model's own logits on a few positions
(:func:`check_lm_head`). A model whose head fusedrl does not reproduce raises :class:`UnsupportedHeadError`
rather than train on wrong log-probs.

Alignment (the convention of TRL and verl): the scored tokens are the last ``K`` tokens of
``input_ids`` (the completion / response), and every per-token tensor (``response_mask``,
``old_logp``, ``ref_logp``, per-token ``advantages``, the returned ``logp`` / ``entropy``) is
``[B, K]`` and aligned with ``input_ids[:, -K:]``. The hidden state at position ``t`` predicts
``input_ids[:, t + 1]``, so the head sees ``hidden[:, L-K-1 : L-1]``. ``K`` defaults to
``response_mask.shape[1]`` (or ``L - 1``: every next token, when scoring without a mask).

The model is always called through ``model(...)`` (and through any wrapper: DDP, FSDP1/FSDP2,
DeepSpeed, accelerate, PEFT), so gradient synchronisation and parameter gathering keep working: the
first call installs a small hook-in on the inner Hugging Face model's ``forward``
(``model(..., fusedrl_hidden_only=True)`` returns the body's output, the head check runs inside that
call; every other call is the original forward, so ``generate`` and ordinary logits are unchanged).

Only ``torch`` is imported here; ``transformers`` itself is never imported (duck typing).
"""

from .api import hf_fused_policy_loss, hf_logprob_entropy
from .check import check_lm_head
from .forward import head_logprob_entropy, last_hidden_state, response_hidden_and_targets
from .heads import LMHead, UnsupportedHeadError, get_lm_head, lm_head_params, unwrap_model

__all__ = [
    "LMHead",
    "UnsupportedHeadError",
    "check_lm_head",
    "unwrap_model",
    "get_lm_head",
    "lm_head_params",
    "last_hidden_state",
    "response_hidden_and_targets",
    "head_logprob_entropy",
    "hf_logprob_entropy",
    "hf_fused_policy_loss",
]
