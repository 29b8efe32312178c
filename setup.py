"""fusedrl installation.

Pure Python by default; the optional CUDA extension ``fusedrl._C`` is built by CMake (see
CMakeLists.txt) when nvcc is present and ``FUSEDRL_SKIP_CUDA_BUILD`` is not set.
"""
from setuptools import find_packages, setup

setup(
    name="fusedrl",
    version="0.1.0",
    description="Fused RL policy losses (PPO/GRPO/DAPO/GSPO/Clip-Cov/KL-Cov) from hidden states, "
    "without materialising [tokens, vocab] logits",
    packages=find_packages(include=["fusedrl", "fusedrl.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6; platform_system == 'Linux'"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.6; platform_system == 'Linux'"],
        "bench": ["matplotlib", "tqdm"],
        "peers": ["liger-kernel", "cut-cross-entropy"],
        "integrations": ["transformers"],
    },
)
