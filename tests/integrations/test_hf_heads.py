"""Hugging Face heads as each model computes them.

For every architecture that builds tiny from a config (no downloads), fusedrl's log-probs and entropies
(:func:`fusedrl.integrations.hf.hf_logprob_entropy`) and their gradients (w.r.t. the body's last hidden state, the
output projection and any learned head scale) equal the model's own ``log_softmax(logits)``. Heads fusedrl cannot
reproduce raise :class:`~fusedrl.integrations.hf.UnsupportedHeadError`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fusedrl.integrations import hf  # noqa: E402

V = 96
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
_MOE = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_INKLING = dict(
    _MOE,
    n_shared_experts=1,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=8,
    layer_types=["hybrid_sliding", "hybrid"],
    mlp_layer_types=["dense", "sparse"],
)
# multi-head latent attention (DeepSeek-V2/V3 style)
_MLA = dict(
    _MOE,
    num_key_value_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
)
F32, F64 = torch.float32, torch.float64
# model_type -> (config overrides, dtype). fp64 where every kernel of the model runs in it (tight tolerances); the
# head-specific settings make each head's special operation matter (scales far from 1, softcaps that bite).
ARCHS = {
    # plain heads (bias or not, tied or not)
    "llama": ({}, F64),
    "mistral": ({}, F64),
    "mixtral": (_MOE, F32),
    "qwen2": ({}, F64),
    "qwen2_moe": (dict(_MOE, shared_expert_intermediate_size=32), F32),
    "qwen3": ({}, F64),
    "qwen3_moe": (_MOE, F32),
    "gemma": ({}, F64),
    "gpt2": ({}, F64),
    "gpt_neox": ({}, F64),
    "gpt_bigcode": ({}, F64),
    "gpt_oss": (_MOE, F32),
    "bloom": ({}, F64),
    "opt": ({}, F64),
    "olmo2": ({}, F64),
    "olmoe": (_MOE, F32),
    "phi": ({}, F64),  # lm_head bias
    "phi3": (dict(pad_token_id=0), F64),
    "starcoder2": ({}, F64),
    "stablelm": ({}, F64),
    "llama4_text": ({}, F64),  # body in .model although base_model_prefix says otherwise
    "exaone4": ({}, F64),
    "smollm3": (dict(pad_token_id=0), F64),
    "glm4": (dict(pad_token_id=0), F64),
    "mamba": ({}, F32),  # logits in fp32 whatever the model dtype
    "ergo": (_MOE, F32),  # its lm_head computes h @ W.T in fp32
    "apertus": ({}, F64),
    "apertus1p5_text": ({}, F64),
    "arcee": ({}, F64),
    "aria_text": (_MOE, F32),
    "bamba": (dict(mamba_n_heads=4, mamba_d_head=16), F32),
    "bert-generation": ({}, F64),
    "biogpt": ({}, F64),
    "bitnet": ({}, F64),
    "codegen": (dict(rotary_dim=8), F64),
    "cpmant": ({}, F64),
    "ctrl": ({}, F64),
    "cwm": ({}, F64),
    "deepseek_v2": (_MLA, F32),
    "deepseek_v3": (_MLA, F32),
    "diffllama": ({}, F64),
    "doge": ({}, F64),
    "ernie4_5": ({}, F64),
    "ernie4_5_moe": (_MOE, F32),
    "exaone": ({}, F64),
    "exaone_moe": (_MOE, F32),
    "falcon_mamba": ({}, F32),
    "flex_olmo": (dict(_MOE, pad_token_id=0), F32),
    "flint": ({}, F64),
    "fuyu": ({}, F64),
    "gemma4_text": ({}, F64),
    "gemma4_unified_text": ({}, F64),
    "git": ({}, F64),
    "glm": (dict(pad_token_id=0), F64),
    "glm4_moe": (_MOE, F32),
    "glm4_moe_lite": (_MLA, F32),
    "gpt-sw3": ({}, F64),
    "gpt_neox_japanese": ({}, F64),
    "gptj": (dict(rotary_dim=8), F64),
    "helium": ({}, F64),
    "hrm_text": ({}, F64),
    "hunyuan_v1_dense": ({}, F64),
    "hunyuan_v1_moe": (_MOE, F32),
    "hy_v3": (_MOE, F32),
    "hy_v4": (dict(_MOE, pad_token_id=0), F32),
    "internlm3": ({}, F64),
    "iquestcoder": ({}, F64),
    "jais2": ({}, F64),
    "jamba": (_MOE, F32),
    "jetmoe": (_MOE, F64),
    "kolibri1": (_MOE, F32),
    "laguna": (_MOE, F32),
    "lara_mini": (_MOE, F32),
    "lfm2": ({}, F64),
    "lfm3": (dict(pad_token_id=0), F64),
    "longcat_flash": (_MLA, F32),
    "mamba2": (dict(num_heads=4, head_dim=16, n_groups=1, expand=2), F32),
    "mellum": (_MOE, F32),
    "mimo_v2_flash": (_MOE, F32),
    "minicpm5_moe": (_MOE, F32),
    "minimax": (_MOE, F32),
    "minimax_m2": (_MOE, F32),
    "ministral": ({}, F64),
    "ministral3": ({}, F64),
    "moshi": ({}, F64),
    "nemotron": ({}, F64),
    "nemotron_h": (_MOE, F32),
    "olmo": ({}, F64),
    "olmo3": ({}, F64),
    "olmo_hybrid": (dict(pad_token_id=0), F32),
    "openai-gpt": ({}, F64),
    "param2moe": (_MOE, F32),
    "persimmon": ({}, F64),
    "phimoe": (_MOE, F32),
    "qwen3_next": (_MOE, F32),
    "sarvam_moe": (_MOE, F32),
    "seed_oss": ({}, F64),
    "solar_open": (_MOE, F32),
    "trocr": ({}, F64),
    "xglm": ({}, F32),
    "xlm": ({}, F64),
    "youtu": (dict(_MLA, num_experts=None), F64),
    # logit scales
    "cohere": (dict(logit_scale=0.3), F64),
    "cohere2": (dict(logit_scale=0.3), F64),
    "cohere2_moe": (dict(_MOE, logit_scale=0.3), F32),
    "granite": (dict(logits_scaling=4.0), F64),
    "granitemoe": (dict(_MOE, logits_scaling=4.0), F32),
    "granitemoe_swa": (dict(_MOE, logits_scaling=4.0), F32),
    "granitemoeshared": (dict(_MOE, logits_scaling=4.0, shared_intermediate_size=32), F32),
    "granite_swa": (dict(logits_scaling=4.0), F64),
    "hyperclovax": (dict(logits_scaling=0.25), F64),  # multiplies
    "minicpm3": (
        dict(
            num_key_value_heads=4,
            dim_model_base=8,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
        ),
        F64,
    ),
    "falcon_h1": (
        dict(
            lm_head_multiplier=0.3,
            mamba_d_ssm=32,
            mamba_n_heads=4,
            mamba_d_head=8,
            mamba_d_state=8,
            mamba_chunk_size=8,
        ),
        F64,
    ),
    "mpt": (dict(logit_scale=0.5, d_model=32, n_heads=4, n_layers=2), F64),  # MPT never applies its logit_scale
    "inkling_text": (dict(_INKLING, logits_mup_width_multiplier=3.0, unpadded_vocab_size=90), F32),
    "dory": (
        dict(num_hidden_layers=4, n_input_layers=1, n_recurrent_layers=2, n_output_layers=1, n_recurrent_loops=2),
        F32,
    ),  # learned per-vocabulary logit scale, applied in fp32
    # softcaps
    "gemma2": (dict(final_logit_softcapping=2.0), F64),
    "gemma3_text": (dict(final_logit_softcapping=2.0), F64),
    "vaultgemma": (dict(final_logit_softcapping=2.0), F64),
    "nanochat": (dict(final_logit_softcapping=2.0), F64),
    "beam": (dict(final_logit_softcapping=2.0), F32),  # softcaps the logits in fp32
    "inkling2_text": (dict(_INKLING, unpadded_vocab_size=90, final_logit_softcapping=2.0), F32),
    "inkling2_loop_text": (dict(_INKLING, unpadded_vocab_size=90, final_logit_softcapping=2.0), F32),
    "recurrent_gemma": (
        dict(logits_soft_cap=2.0, lru_width=32, block_types=["recurrent", "attention"], attention_window_size=16),
        F64,
    ),
    "xlstm": (
        dict(
            output_logit_soft_cap=2.0,
            hidden_size=64,
            embedding_dim=64,
            num_heads=4,
            chunk_size=12,
            qk_dim_factor=1.0,
            mode="train",  # the inference kernels write in place (no backward)
        ),
        F32,
    ),
    # head layers before the projection
    "modernbert-decoder": (dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=2, cls_token_id=1), F64),
    "electra": (dict(embedding_size=32, is_decoder=True), F64),
    "clvp_decoder": (dict(n_inner=64, _model="ClvpForCausalLM"), F64),  # not an AutoModelForCausalLM
}
TOL = {F64: dict(atol=1e-9, rtol=1e-7), F32: dict(atol=5e-5, rtol=2e-4)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # models of width 32 gain nothing from intra-op threads, and busy-waiting threads slow a loaded machine down
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _transformers():
    return pytest.importorskip("transformers")


def build(model_type: str, seed: int = 0, **overrides):
    tf = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {tf.__version__} has no {model_type}")
    extra, dtype = ARCHS[model_type]
    kw = dict(SMALL, **extra, **overrides)
    model_class = kw.pop("_model", None)
    cfg = tf.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    if model_class is None:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    else:
        model = getattr(tf, model_class)(cfg)
    model = model.to(dtype).eval()
    head = hf.get_lm_head(model)
    with torch.no_grad():  # logits of a few units: softcaps and scales change the distribution visibly
        head.weight.normal_(0, 0.5)
        if isinstance(getattr(head, "logit_scale", None), torch.nn.Parameter):
            head.logit_scale.uniform_(0.005, 0.05)
    return model


def _inputs(B=2, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 88, (B, L), generator=g)


def _capture(model):
    """Keep the outputs of the input embeddings and of the body in every forward with grad enabled (the head
    check's forwards run under no_grad). Some models call a part of their body directly (OPT's decoder), so the body
    may be seen in fusedrl's forward only; the embeddings are seen in both."""
    seen = {"embeddings": [], "body": []}

    def keep(name):
        def hook(module, args, out):
            if torch.is_grad_enabled():
                seen[name].append(hf.forward.hidden_of(out))

        return hook

    inner = hf.unwrap_model(model)
    handles = [
        inner.get_input_embeddings().register_forward_hook(keep("embeddings")),
        hf.forward._body(inner).register_forward_hook(keep("body")),
    ]
    return seen, handles


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_logprob_entropy_and_grads_match_model_logits(model_type):
    model = build(model_type)
    dtype = ARCHS[model_type][1]
    ids = _inputs()
    K = 6
    g = torch.Generator().manual_seed(2)
    c_lp, c_ent = torch.randn(2, K, generator=g, dtype=dtype), torch.randn(2, K, generator=g, dtype=dtype)
    seen, handles = _capture(model)
    try:
        # the model's own head
        logits = model(input_ids=ids, use_cache=False).logits[:, -K - 1 : -1].to(dtype)
        lsm = logits.log_softmax(-1)
        lp_ref = lsm.gather(-1, ids[:, -K:, None]).squeeze(-1)
        ent_ref = -(lsm.exp() * lsm).sum(-1)
        # fusedrl (the first call also checks the head against the model's logits)
        lp, ent = hf.hf_logprob_entropy(model, ids, logits_to_keep=K)
    finally:
        for h in handles:
            h.remove()
    tol = TOL[dtype]
    torch.testing.assert_close(lp.to(dtype), lp_ref, **tol)
    torch.testing.assert_close(ent.to(dtype), ent_ref, **tol)
    # gradients: d/d(embeddings) carries dx through the whole body; d/d(body output) is dx itself
    assert len(seen["embeddings"]) == 2
    wrt = {"dx through the body": seen["embeddings"]}
    if len(seen["body"]) == 2:
        wrt["dx"] = seen["body"]
    head = hf.get_lm_head(model)
    for name in ("weight", "bias", "logit_scale"):  # logit_scale: Dory's learned per-vocabulary scale
        p = getattr(head, name, None)
        if isinstance(p, torch.nn.Parameter):
            wrt[f"head {name}"] = [p, p]
    ref = torch.autograd.grad((lp_ref * c_lp + ent_ref * c_ent).sum(), [v[0] for v in wrt.values()])
    got = torch.autograd.grad((lp.to(dtype) * c_lp + ent.to(dtype) * c_ent).sum(), [v[1] for v in wrt.values()])
    for name, a, b in zip(wrt, got, ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{model_type} grad of {name}: {m}")
    assert hf.unwrap_model(model) in hf.check._HEAD_CHECKED


def test_head_fields_read_from_config():
    ink = hf.lm_head_params(build("inkling_text"))
    assert ink.logit_scale == pytest.approx(1 / 3.0) and ink.vocab_size == 90 and ink.weight.shape[0] == 90
    assert hf.lm_head_params(build("recurrent_gemma")).softcap == pytest.approx(2.0)
    assert hf.lm_head_params(build("xlstm")).softcap == pytest.approx(2.0)
    assert hf.lm_head_params(build("mpt")).logit_scale == 1.0
    dory = hf.lm_head_params(build("dory"))
    assert dory.row_scale is not None and dory.row_scale.shape == (V,) and dory.row_scale.requires_grad
    ink2 = hf.lm_head_params(build("inkling2_text"))  # its head already has unpadded_vocab_size rows
    assert ink2.vocab_size == 90 and ink2.softcap == pytest.approx(2.0) and ink2.logit_scale == 1.0


@pytest.mark.parametrize("model_type", ["inkling_text", "dory", "electra"])
def test_fused_policy_loss_matches_model_logits(model_type):
    """The loss path (hf_fused_policy_loss) folds the same head: loss and every parameter gradient."""
    import copy

    import fusedrl

    model = build(model_type)
    twin = copy.deepcopy(model)
    dtype = ARCHS[model_type][1]
    ids = _inputs(B=3, L=10)
    K = 5
    mask = torch.ones(3, K)
    mask[1, 3:] = 0
    adv = torch.tensor([1.0, -0.5, 0.3])
    with torch.no_grad():
        old, _ = hf.hf_logprob_entropy(model, ids, response_mask=mask)
    old = old + 0.05
    cfg = fusedrl.PolicyLossConfig(loss_agg_mode="token-mean", entropy_coeff=0.01)
    loss, _ = hf.hf_fused_policy_loss(model, ids, None, mask, old, adv, config=cfg, backend="torch")
    loss.backward()
    # eager: the twin's own logits, the same loss written out
    lsm = twin(input_ids=ids).logits[:, -K - 1 : -1].to(dtype).log_softmax(-1)
    lp = lsm.gather(-1, ids[:, -K:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    ratio = torch.exp(lp - old.to(dtype))
    A = adv[:, None].to(dtype)
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2))
    pg = torch.where(A < 0, torch.minimum(pg, -A * 3.0), pg)
    m = mask.to(dtype)
    ref = ((pg - 0.01 * ent) * m).sum() / m.sum()
    ref.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.to(dtype), ref, **tol)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


# --------------------------------------------------------------------------------------------------
# heads fusedrl does not reproduce raise
# --------------------------------------------------------------------------------------------------
def _llama(**kw):
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**dict(SMALL, **kw))
    return tf.LlamaForCausalLM(cfg).eval()


def test_logit_transform_the_config_does_not_name_raises():
    """A model whose forward changes its logits in a way no config field says (as remote code may): the check
    against the model's own logits raises, naming the class; check_head=False or an explicit head skip it."""
    tf = _transformers()

    class HalvedLogitsLM(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    model = HalvedLogitsLM(tf.LlamaConfig(**SMALL)).eval()
    ids = _inputs()
    with pytest.raises(hf.UnsupportedHeadError, match="HalvedLogitsLM.*differ by up to"):
        hf.hf_logprob_entropy(model, ids)
    with pytest.raises(hf.UnsupportedHeadError, match="HalvedLogitsLM"):
        hf.hf_fused_policy_loss(model, ids, None, torch.ones(2, 4), torch.zeros(2, 4), torch.ones(2))
    assert model not in hf.check._HEAD_CHECKED
    with torch.no_grad():
        lp_unchecked, _ = hf.hf_logprob_entropy(model, ids, check_head=False)
        lp, _ = hf.hf_logprob_entropy(model, ids, logit_scale=0.5)  # the caller states the head
        lsm = model(input_ids=ids).logits[:, :-1].log_softmax(-1)
    torch.testing.assert_close(lp, lsm.gather(-1, ids[:, 1:, None]).squeeze(-1), atol=2e-5, rtol=1e-5)
    assert not torch.allclose(lp_unchecked, lp)


def test_custom_output_layer_raises():
    class DoubledHead(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _llama()
    model.lm_head = DoubledHead(32, V, bias=False)
    with pytest.raises(hf.UnsupportedHeadError, match="LlamaForCausalLM: its output layer is a .*DoubledHead"):
        hf.lm_head_params(model)
    with pytest.raises(hf.UnsupportedHeadError, match="DoubledHead"):
        hf.hf_logprob_entropy(model, _inputs(), check_head=False)  # structural: no check needed


def test_encoder_style_prediction_head_raises():
    """BERT-style causal LMs run a transform (dense, act, norm) inside their prediction head before the decoder."""
    tf = _transformers()
    torch.manual_seed(0)
    model = tf.BertLMHeadModel(tf.BertConfig(**dict(SMALL, is_decoder=True))).eval()
    with pytest.raises(hf.UnsupportedHeadError, match=r"BertLMHeadModel.*\.cls\.predictions\.decoder"):
        hf.hf_logprob_entropy(model, _inputs())


def test_chameleon_image_token_mask_raises():
    tf = _transformers()
    cls = getattr(tf, "ChameleonForConditionalGeneration", None)
    if cls is None:
        pytest.skip("transformers without Chameleon")
    # refused from the class alone: the mask makes no config-visible difference to check
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    with pytest.raises(hf.UnsupportedHeadError, match="ChameleonForConditionalGeneration.*image-token"):
        hf.lm_head_params(model)


def test_lora_on_lm_head_raises():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_alpha=8))
    with pytest.raises(hf.UnsupportedHeadError, match="LlamaForCausalLM: its output layer .*target_modules"):
        hf.hf_logprob_entropy(pm, _inputs())


# --------------------------------------------------------------------------------------------------
# the check itself
# --------------------------------------------------------------------------------------------------
def test_check_runs_once_per_model_and_restores_training_mode():
    model = _llama().train()
    model.model.layers[0].eval()  # a mixed state is restored as it was
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    ids = _inputs()
    with torch.no_grad():
        hf.hf_logprob_entropy(model, ids)
        assert len(calls) == 1  # the check's own forward, on a few positions
        hf.hf_logprob_entropy(model, ids)
        hf.hf_fused_policy_loss(model, ids, None, torch.ones(2, 4), torch.zeros(2, 4), torch.ones(2))
    assert len(calls) == 1
    assert model.training and model.model.training and not model.model.layers[0].training
    assert model.model.layers[1].training
    assert hf.check_lm_head(model, ids, num_positions=3, max_rows=1) < 1e-4


def test_check_argument_errors():
    model = _llama()
    ids = _inputs()
    with pytest.raises(ValueError, match="check_head must be a bool"):
        hf.hf_logprob_entropy(model, ids, check_head="yes")
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        hf.check_lm_head(model, ids.float())
    with pytest.raises(ValueError, match="num_positions must be a positive int"):
        hf.check_lm_head(model, ids, num_positions=0)
    with pytest.raises(ValueError, match="logit_scale must be a finite number"):
        hf.lm_head_params(model, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        hf.lm_head_params(model, softcap=-1.0)
