"""Scale-out: vocab-parallel (tensor-parallel) lm_head, DDP and FSDP2 with global normalisers.

Every multi-process test spawns CPU Gloo processes (loopback only; FileStore rendezvous in a
fresh temporary directory, a timeout on ``init_process_group``, a wall-clock bound on each launch)
and checks, inside each child, that the distributed result equals the single-process result
computed in that same child from the same seeded data. A child's assertion error travels back to
pytest with its traceback.
"""

import datetime
import os
import tempfile

import torch

if not torch.cuda.is_available():  # before anything imports triton (children inherit the env)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _dist import PG_TIMEOUT_S, finish, init, launch  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import distributed as fdist  # noqa: E402
from fusedrl.backends import availability  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


# process plumbing: tests/_dist.py
_launch, _init = launch, init


def _gather_equal(t: torch.Tensor, what: str) -> None:
    """Every rank holds bitwise the same tensor."""
    outs = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(outs, t.contiguous())
    for r, o in enumerate(outs):
        assert torch.equal(o, t), f"{what} differs between rank {dist.get_rank()} and rank {r}"


def _close(a, b, what, atol, rtol=1e-4):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _splits(v: int, world: int):
    """Uneven contiguous shard sizes (rank order)."""
    if world == 1:
        return [v]
    if world == 2:
        return [v // 2 - 1, v - (v // 2 - 1)]
    base = [3, 6] + [2] * (world - 3)
    return base + [v - sum(base)]


# --------------------------------------------------------------------------------------------------
# tensor parallelism: 2 and 3 ranks vs one process
# --------------------------------------------------------------------------------------------------
V = 13
H = 8
TP_CASES = [
    # lead shape, bias, temperature, softcap, return_entropy, dtype, weight scale (8 = peaked softmax)
    dict(lead=(2, 5), bias=True, temperature=0.7, softcap=None, ent=True, dtype=torch.float32, scale=1.0),
    dict(lead=(7,), bias=False, temperature=1.0, softcap=2.5, ent=True, dtype=torch.float32, scale=8.0),
    dict(lead=(2, 3), bias=True, temperature=1.3, softcap=5.0, ent=False, dtype=torch.float32, scale=1.0),
    dict(lead=(9,), bias=True, temperature=0.9, softcap=3.0, ent=True, dtype=torch.float64, scale=4.0),
    dict(lead=(6,), bias=True, temperature=1.0, softcap=None, ent=True, dtype=torch.bfloat16, scale=1.0),
    dict(lead=(0,), bias=True, temperature=1.0, softcap=None, ent=True, dtype=torch.float32, scale=1.0),
]
TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-10, 1e-9), torch.bfloat16: (3e-2, 3e-2)}


def _case_data(c, world, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*c["lead"], H, generator=g) / H**0.25).to(c["dtype"])
    w = (torch.randn(V, H, generator=g) * c["scale"] / H**0.25).to(c["dtype"])
    b = (torch.randn(V, generator=g) * 0.5).to(c["dtype"]) if c["bias"] else None
    t = torch.randint(0, V, c["lead"], generator=g)
    flat = t.view(-1)
    # targets on every shard boundary (first/last row of each shard)
    edges = []
    for s in torch.tensor(_splits(V, world)).cumsum(0).tolist():
        edges += [s - 1, s % V]
    flat[: min(len(edges), flat.numel())] = torch.tensor(edges[: flat.numel()])
    g_lp = torch.randn(c["lead"], generator=g, dtype=torch.float64)
    g_h = torch.randn(c["lead"], generator=g, dtype=torch.float64)
    return x, w, b, t, g_lp, g_h


def _run(x, w, b, t, c, backend, g_lp, g_h, group=None, **kw):
    xx = x.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    lp, ent = fusedrl.linear_logprob_entropy(
        xx,
        ww,
        t,
        bb,
        temperature=c["temperature"],
        softcap=c["softcap"],
        return_entropy=c["ent"],
        backend=backend,
        process_group=group,
        **kw,
    )
    loss = (lp.double() * g_lp).sum() + ((ent.double() * g_h).sum() if c["ent"] else 0.0)
    loss.backward()
    return lp, ent, xx.grad, ww.grad, (None if bb is None else bb.grad)


class _Count:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **k):
        self.n += 1
        return self.fn(*a, **k)


def _tp_worker(rank, world, init_method, backends):
    _init(rank, world, init_method)
    for backend in backends:
        _tp_backend(rank, world, backend)
    finish()


def _tp_backend(rank, world, backend):
    group = dist.group.WORLD
    sizes = _splits(V, world)
    start = sum(sizes[:rank])
    end = start + sizes[rank]
    assert fdist.global_vocab_size(torch.empty(sizes[rank], H), group) == V
    cases = TP_CASES if backend != "triton" else [c for c in TP_CASES if c["dtype"] == torch.float32]
    for i, c in enumerate(cases):
        tag = f"[{backend} world={world} case={i} {c['dtype']}]"
        atol, rtol = TOL[c["dtype"]]
        x, w, b, t, g_lp, g_h = _case_data(c, world, seed=100 + i)
        # single process, whole vocabulary
        lp1, en1, dx1, dw1, db1 = _run(x, w, b, t, c, backend, g_lp, g_h)
        # vocab-parallel, this rank's shard; count the collectives of one call
        gather = fdist._all_gather = _Count(fdist._all_gather)
        reduce = dist.all_reduce = _Count(dist.all_reduce)
        try:
            lp, en, dx, dw, db = _run(
                x, w[start:end], None if b is None else b[start:end], t, c, backend, g_lp, g_h, group
            )
        finally:
            fdist._all_gather, dist.all_reduce = gather.fn, reduce.fn
        assert gather.n == 1, f"{tag} forward used {gather.n} all_gathers (layout cached: expected 1)"
        assert reduce.n == 1, f"{tag} backward used {reduce.n} all_reduces (expected 1: dx)"
        assert lp.shape == c["lead"] and lp.dtype == lp1.dtype
        _close(lp, lp1, f"{tag} logp", atol, rtol)
        _gather_equal(lp, f"{tag} logp")
        if c["ent"]:
            _close(en, en1, f"{tag} entropy", atol, rtol)
            _gather_equal(en, f"{tag} entropy")
        else:
            assert en is None
        # dx: all-reduced inside the op (default) = gradient of the global loss, on every rank
        _close(dx, dx1, f"{tag} dx", atol, rtol)
        _gather_equal(dx, f"{tag} dx")
        # dW / db: this rank's shard of the full gradient; concatenated over ranks = the full one
        _close(dw, dw1[start:end], f"{tag} dW shard", atol, rtol)
        if b is not None:
            _close(db, db1[start:end], f"{tag} db shard", atol, rtol)
        padded = torch.zeros(max(sizes), H, dtype=dw.dtype)
        padded[: dw.shape[0]] = dw
        shards = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(shards, padded)
        _close(torch.cat([s[:n] for s, n in zip(shards, sizes)]), dw1, f"{tag} dW concatenated", atol, rtol)
        # partial dx (caller reduces, Megatron-style): the sum over ranks is the full dx
        # (backend-independent logic: skipped in the slow triton interpreter)
        if backend != "triton":
            with fdist.partial_dx():
                lpp, _, dxp, dwp, _ = _run(
                    x, w[start:end], None if b is None else b[start:end], t, c, backend, g_lp, g_h, group
                )
            assert torch.equal(lpp, lp) and torch.equal(dwp, dw)
            # the same through the keyword argument of the public op
            _, _, dxk, _, _ = _run(
                x,
                w[start:end],
                None if b is None else b[start:end],
                t,
                c,
                backend,
                g_lp,
                g_h,
                group,
                tp_reduce_dx=False,
            )
            assert torch.equal(dxk, dxp)
            dxs = dxp.clone()
            dist.all_reduce(dxs)
            _close(dxs, dx1, f"{tag} sum of partial dx", atol, rtol)
            if world > 1 and x.numel():
                assert not torch.allclose(dxp.double(), dx1.double(), atol=atol, rtol=rtol), f"{tag} dx not partial"
        # scoring: forward only, same numbers
        with torch.no_grad():
            lps, ens = fusedrl.linear_logprob_entropy(
                x,
                w[start:end],
                t,
                None if b is None else b[start:end],
                temperature=c["temperature"],
                softcap=c["softcap"],
                return_entropy=c["ent"],
                backend=backend,
                process_group=group,
            )
        assert torch.equal(lps, lp) and (ens is None or torch.equal(ens, en))
    if backend == "torch":
        _check_fused_policy_loss(rank, world, group, start, end)
        if world == 2:
            _check_stale_layout(rank, group)


def _check_fused_policy_loss(rank, world, group, start, end):
    """The loss head runs replicated: loss, metrics and gradients equal one process, on every rank."""
    if not hasattr(fusedrl, "fused_policy_loss"):
        return
    c = TP_CASES[0]
    x, w, b, t, _, _ = _case_data(c, world, seed=7)
    g = torch.Generator().manual_seed(8)
    B, T = c["lead"]
    old = torch.randn(B, T, generator=g) * 0.1 - 2.0
    ref = old + torch.randn(B, T, generator=g) * 0.05
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    cfg = fusedrl.PolicyLossConfig(entropy_coeff=0.01, kl_loss_coef=0.1, clip_ratio_high=0.28)
    out = []
    for shard, pg in ((slice(None), None), (slice(start, end), group)):
        xx = x.clone().requires_grad_()
        ww = w[shard].clone().requires_grad_()
        bb = b[shard].clone().requires_grad_()
        loss, metrics = fusedrl.fused_policy_loss(
            xx,
            ww,
            t,
            old,
            adv,
            mask,
            ref_logp=ref,
            bias=bb,
            temperature=c["temperature"],
            config=cfg,
            backend="torch",
            process_group=pg,
        )
        loss.backward()
        out.append((loss.detach(), metrics, xx.grad, ww.grad, bb.grad))
    (l1, m1, dx1, dw1, db1), (l2, m2, dx2, dw2, db2) = out
    _close(l2, l1, "fused loss", 1e-6)
    _gather_equal(l2, "fused loss")
    assert m1.keys() == m2.keys()
    for k in m1:
        _close(m2[k], m1[k], f"metric {k}", 1e-6)
        _gather_equal(m2[k], f"metric {k}")
    _close(dx2, dx1, "fused dx", 1e-6)
    _close(dw2, dw1[start:end], "fused dW shard", 1e-6)
    _close(db2, db1[start:end], "fused db shard", 1e-6)


def _check_stale_layout(rank, group):
    """A resharding that leaves a cached layout stale is detected on every rank (no wrong numbers)."""
    fdist.clear_vocab_layout_cache()
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(2))  # hidden is replicated
    t = torch.tensor([0, 5, 6, 11])

    def call(sizes):
        s = sum(sizes[:rank])
        w = torch.randn(sum(sizes), H, generator=torch.Generator().manual_seed(3))
        return fusedrl.linear_logprob_entropy(x, w[s : s + sizes[rank]], t, backend="torch", process_group=group)

    call([6, 7])  # cached: rank0 {6: (6, 7)}, rank1 {7: (6, 7)}
    call([7, 6])  # both miss:  rank0 {7: (7, 6)}, rank1 {6: (7, 6)}
    with pytest.raises(RuntimeError, match="stale"):
        call([6, 6])  # both hit; rank1 would assume start 7: caught by the forward's own gather
    lp, _ = call([6, 6])  # the stale entries were dropped on every rank: refetched, correct
    ref, _ = fusedrl.linear_logprob_entropy(
        x, torch.randn(12, H, generator=torch.Generator().manual_seed(3)), t, backend="torch"
    )
    _close(lp, ref, "after refetch", 2e-5)
    fdist.clear_vocab_layout_cache()


def _backend_available(name):
    return name == "reference" or availability(name, torch.device("cpu"))[0]


@pytest.mark.parametrize("world", [2, 3])
def test_tp_matches_single_process(world):
    """torch and reference backends, one launch per world size (spawning dominates the time)."""
    _launch(_tp_worker, world, ("torch", "reference"))


def test_tp_matches_single_process_triton():
    if not _backend_available("triton"):
        pytest.skip(f"triton backend not available: {availability('triton', torch.device('cpu'))[1]}")
    _launch(_tp_worker, 2, ("triton",))


# --------------------------------------------------------------------------------------------------
# data parallel (DDP / FSDP2): halves of a batch with global normalisers = one big batch
# --------------------------------------------------------------------------------------------------
class _TinyPolicy(torch.nn.Module):
    def __init__(self, h, v):
        super().__init__()
        self.body = torch.nn.Linear(h, h)
        self.lm_head = torch.nn.Linear(h, v, bias=False)

    def forward(self, x, targets, old, adv, mask, cfg, **normalisers):
        hidden = torch.tanh(self.body(x))
        # the fused loss is called inside the wrapped module's forward, where FSDP2 has unsharded
        # lm_head.weight into a plain tensor
        return fusedrl.fused_policy_loss(
            hidden, self.lm_head.weight, targets, old, adv, mask, config=cfg, backend="torch", **normalisers
        )


def _dp_batch():
    g = torch.Generator().manual_seed(11)
    B, T, h, v = 6, 5, 8, 17
    x = torch.randn(B, T, h, generator=g)
    targets = torch.randint(0, v, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)  # per sequence
    lengths = torch.tensor([5, 4, 5, 1, 0, 2])  # rank 0's half has 14 tokens, rank 1's 3 (one empty seq)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    return x, targets, old, adv, mask, h, v


def _grads(model):
    out = {}
    for n, p in model.named_parameters():
        gr = p.grad
        if hasattr(gr, "full_tensor"):  # FSDP2 DTensor shard
            gr = gr.full_tensor()
        out[n.replace("module.", "")] = gr.detach().clone()
    return out


def _dp_worker(rank, world, init_method, wrappers):
    _init(rank, world, init_method)
    for wrapper in wrappers:
        _dp_check(rank, world, wrapper)
    finish()


def _dp_check(rank, world, wrapper):
    x, targets, old, adv, mask, h, v = _dp_batch()
    torch.manual_seed(0)
    ref_model = _TinyPolicy(h, v)
    model = _TinyPolicy(h, v)
    model.load_state_dict(ref_model.state_dict())
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    half = x.shape[0] // world
    mine = slice(rank * half, (rank + 1) * half)
    for mode in ("token-mean", "seq-mean-token-mean"):
        cfg = fusedrl.PolicyLossConfig(loss_agg_mode=mode, entropy_coeff=0.01, clip_ratio_high=0.28)
        # one process, the full batch, default (= full-batch) normalisers
        ref_model.zero_grad()
        ref_loss, _ = ref_model(x, targets, old, adv, mask, cfg)
        ref_loss.backward()
        ref = _grads(ref_model)
        # each rank its half; global counts all-reduced; divided by W because DDP / FSDP average grads
        m = mask[mine]
        counts = torch.stack([m.sum(), (m.sum(1) > 0).sum().float()])
        dist.all_reduce(counts)
        norm = dict(global_num_tokens=counts[0] / world, global_num_seqs=counts[1] / world)
        for use_global in (True, False):
            model.zero_grad()
            loss, _ = model(x[mine], targets[mine], old[mine], adv[mine], m, cfg, **(norm if use_global else {}))
            loss.backward()
            got = _grads(model)
            if use_global:
                total = loss.detach().clone()
                dist.all_reduce(total)
                _close(total / world, ref_loss.detach(), f"{wrapper} {mode} loss", 1e-6)
                for k in ref:
                    _close(got[k], ref[k], f"{wrapper} {mode} grad {k}", 1e-6)
            else:  # local normalisers weight the unbalanced halves differently: the test can tell
                assert not torch.allclose(got["lm_head.weight"], ref["lm_head.weight"], atol=1e-6), mode
    del model  # release the wrapper's hooks / communication state before the group goes away
    dist.barrier()


def test_data_parallel_global_normalisers():
    """DDP, then FSDP2 (fully_shard), in one launch of 2 processes."""
    if not hasattr(fusedrl, "fused_policy_loss"):
        pytest.skip("fusedrl.fused_policy_loss not available")
    wrappers = ["ddp"]
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (availability probe)

        wrappers.append("fsdp2")
    except ImportError:  # older torch: DDP only
        pass
    _launch(_dp_worker, 2, tuple(wrappers))


# --------------------------------------------------------------------------------------------------
# GPU: the TP path over NCCL at world size 1 (in-process)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_tp_nccl_world1():
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    tmp = tempfile.TemporaryDirectory(prefix="fusedrl-nccl-")
    dist.init_process_group(
        "nccl",
        init_method="file://" + os.path.join(tmp.name, "store"),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        group = dist.group.WORLD
        dev = torch.device("cuda")
        backends = fusedrl.available_backends(dev) + ["reference"]
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16):
                n, h, v = 37, 123, 1003
                g = torch.Generator().manual_seed(0)
                x = (torch.randn(n, h, generator=g) / h**0.25).to(dtype).to(dev)
                w = (torch.randn(v, h, generator=g) / h**0.25).to(dtype).to(dev)
                b = (torch.randn(v, generator=g) * 0.5).to(dtype).to(dev)
                t = torch.randint(0, v, (n,), generator=g).to(dev)
                g_lp = torch.randn(n, generator=g, dtype=torch.float64).to(dev)
                g_h = torch.randn(n, generator=g, dtype=torch.float64).to(dev)
                c = dict(temperature=0.8, softcap=30.0, ent=True)
                lp1, en1, dx1, dw1, db1 = _run(x, w, b, t, c, backend, g_lp, g_h)
                lp2, en2, dx2, dw2, db2 = _run(x, w, b, t, c, backend, g_lp, g_h, group)
                tag = f"[nccl {backend} {dtype}]"
                assert fdist.global_vocab_size(w, group) == v
                _close(lp2, lp1, f"{tag} logp", 1e-6, 1e-6)
                _close(en2, en1, f"{tag} entropy", 1e-6, 1e-6)
                atol = 1e-5 if dtype == torch.float32 else 1e-2
                _close(dx2, dx1, f"{tag} dx", atol, 1e-3)
                _close(dw2, dw1, f"{tag} dW", atol, 1e-3)
                _close(db2, db1, f"{tag} db", atol, 1e-3)
        torch.cuda.synchronize()
    finally:
        fdist.clear_vocab_layout_cache()
        dist.destroy_process_group()
        tmp.cleanup()
