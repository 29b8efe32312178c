"""verl workers register fusedrl's losses themselves: ``VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl``.

verl 0.9.1 imports the modules that variable names at ``import verl``, in every process (driver and Ray workers).
Each test runs a fresh interpreter, as a worker would be. The tests that need verl skip cleanly without it.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# what importing verl.trainer.ppo.core_algos needs besides torch and transformers
_VERL_NEEDS = ("verl", "ray", "tensordict", "omegaconf", "codetiming", "orjson", "transformers")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    environ.pop("VERL_USE_EXTERNAL_MODULES", None)  # only the variable a test sets
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
        cwd=ROOT,
    )


def _needs_verl():
    missing = [m for m in _VERL_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"verl's loss registry needs {missing}")


_CHECK_REGISTRY = """
    import fusedrl.integrations.verl as fr
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    def check():
        for mode in fr.VERL_LOSS_MODES + fr.VERL_ENTROPY_MODES:
            fn = get_policy_loss_fn("fusedrl_" + mode)
            assert getattr(fn, "_fusedrl", False), mode
            assert fn.__module__.startswith("fusedrl.integrations.verl"), fn.__module__
            assert fn.__name__ == f"fusedrl_policy_loss_{mode}", fn.__name__
        for mode in fr.VERL_LOSS_MODES:
            assert not getattr(get_policy_loss_fn(mode), "_fusedrl", False), f"verl's own {mode} was replaced"
        registry = sorted(core_algos.POLICY_LOSS_REGISTRY)
        assert len(registry) == 2 * len(fr.VERL_LOSS_MODES) + len(fr.VERL_ENTROPY_MODES), registry

    check()
    # registering pulls in nothing that needs `datasets` (absent from a minimal verl environment)
    for heavy in ("verl.workers.utils.losses", "verl.utils.dataset", "datasets"):
        assert heavy not in sys.modules, heavy
    # importing again, registering again and patch_verl are harmless
    import fusedrl.integrations.verl  # noqa: F401
    fr.register_verl_policy_losses()
    fr.patch_verl(backend="torch")
    check()
"""


def test_verl_imports_fusedrl_and_finds_its_losses():
    """verl's own route: `import verl` imports the external module, then the actor looks the loss up."""
    _needs_verl()
    code = """
    import sys
    import verl  # reads VERL_USE_EXTERNAL_MODULES and imports fusedrl.integrations.verl
    assert "fusedrl.integrations.verl" in sys.modules
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    import torch
    from omegaconf import OmegaConf

    fn = get_policy_loss_fn("fusedrl_vanilla")
    # as verl's ppo_loss calls it: keywords only; the same number as verl's own vanilla loss
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g)
    kw = dict(
        old_log_prob=lp + 0.1 * torch.randn(3, 5, generator=g),
        log_prob=lp,
        advantages=torch.randn(3, 5, generator=g),
        response_mask=torch.ones(3, 5),
        loss_agg_mode="token-mean",
        config=OmegaConf.create(
            dict(
                clip_ratio=0.2,
                clip_ratio_low=0.2,
                clip_ratio_high=0.28,
                clip_ratio_c=3.0,
                policy_loss=dict(loss_mode="vanilla"),
                global_batch_info={},
            )
        ),
    )
    loss, metrics = fn(**kw)
    ref, _ = get_policy_loss_fn("vanilla")(**kw)
    torch.testing.assert_close(loss, ref)
    assert "actor/pg_clipfrac" in metrics
    """
    out = _run(code + _CHECK_REGISTRY, VERL_USE_EXTERNAL_MODULES="fusedrl.integrations.verl")
    assert out.returncode == 0, out.stdout + out.stderr


def test_fusedrl_imported_before_verl_registers_too():
    """A driver that imports fusedrl first: verl imports the partly built module back (a no-op), and fusedrl's
    own import finishes the registration."""
    _needs_verl()
    code = """
    import sys
    import fusedrl.integrations.verl
    assert "verl" in sys.modules
    """
    out = _run(code + _CHECK_REGISTRY, VERL_USE_EXTERNAL_MODULES="fusedrl.integrations.verl")
    assert out.returncode == 0, out.stdout + out.stderr


def test_import_without_verl_registers_nothing_and_says_nothing():
    code = """
    import sys, warnings
    sys.modules["verl"] = None  # as if verl were not installed
    warnings.simplefilter("error")
    import fusedrl.integrations.verl as fr
    assert fr.VERL_LOSS_MODES and hasattr(fr, "FusedLinearForPPO")
    try:
        fr.register_verl_policy_losses()
    except ImportError as e:
        assert "needs verl" in str(e)
    else:
        raise AssertionError("registered without verl")
    """
    out = _run(code)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.strip() == "", out.stderr
