"""fusedrl installation.

Pure Python by default; the optional CUDA extension ``fusedrl._C`` is built by CMake (see
CMakeLists.txt) when nvcc is present and ``FUSEDRL_SKIP_CUDA_BUILD`` is not set.

Environment switches (read at install time):
  FUSEDRL_SKIP_CUDA_BUILD=1     never build the extension (pure-Python install)
  FUSEDRL_REQUIRE_CUDA_BUILD=1  fail the install if the extension cannot be built (CI)
  FUSEDRL_CUDA_ARCHS="80;90a"   CMAKE_CUDA_ARCHITECTURES for the kernels
  FUSEDRL_BUILD_JOBS=N          parallel compile jobs (default: CPU count)
  FUSEDRL_CMAKE_BUILD_DIR=DIR   CMake build tree (default: build/cmake-<python tag>; reused = incremental)
  CUDACXX / CUDA_HOME           which nvcc to use (default: nvcc on PATH, then /usr/local/cuda/bin/nvcc)
The outcome (built / skipped / failed, and why) is written to fusedrl/_build_info.json, which the
cuda backend reports when the extension is missing.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _load_config():
    """fusedrl/_config.py, the one module that reads environment variables (no torch import there)."""
    spec = importlib.util.spec_from_file_location("_fusedrl_config", os.path.join(ROOT, "fusedrl", "_config.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # registered before it runs: its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


_config = _load_config()


def _flag(key):
    return bool(_config.get(key))


def _find_nvcc():
    cands = [_config.get("cudacxx") or ""]
    for home in (_config.get("cuda_home") or "", _config.get("cuda_path") or ""):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds fusedrl._C with CMake (+ ninja when available); never fails the install unless
    FUSEDRL_REQUIRE_CUDA_BUILD=1."""

    def run(self):
        for ext in self.extensions:
            self._build_one(ext)

    def _info_path(self, ext):
        return os.path.join(os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name))), "_build_info.json")

    def _write_info(self, ext, info):
        paths = {self._info_path(ext)}
        if self.inplace or getattr(self, "editable_mode", False):
            paths.add(os.path.join(ROOT, "fusedrl", "_build_info.json"))
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                json.dump(info, f, indent=1)

    def _remove_stale(self, ext):
        outdir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        if os.path.isdir(outdir):
            for fn in os.listdir(outdir):
                if fn.startswith("_C.") and fn.endswith((".so", ".pyd")):
                    os.remove(os.path.join(outdir, fn))

    def _build_one(self, ext):
        info = {"built": False, "version": VERSION, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if _flag("skip_cuda_build"):
            info["reason"] = "skipped at install time (FUSEDRL_SKIP_CUDA_BUILD=1)"
            info["skipped"] = True
            self._remove_stale(ext)
            self._write_info(ext, info)
            print("fusedrl: " + info["reason"])
            return
        nvcc = _find_nvcc()
        cmake = shutil.which("cmake")
        missing = None
        if nvcc is None:
            missing = "nvcc not found at install time (set CUDACXX or CUDA_HOME, or put nvcc on PATH)"
            info["no_nvcc"] = True
        elif cmake is None:
            missing = "cmake not found at install time (pip install cmake)"
        if missing:
            info["reason"] = missing
            self._remove_stale(ext)
            self._write_info(ext, info)
            if _flag("require_cuda_build"):
                raise RuntimeError("fusedrl: " + missing)
            print("fusedrl: building pure-Python: " + missing)
            return
        t0 = time.time()
        try:
            self._cmake_build(ext, nvcc, cmake, info)
        except Exception as e:  # noqa: BLE001 - the CUDA extension is optional
            info["reason"] = f"CUDA extension build failed: {e}"
            self._remove_stale(ext)
            self._write_info(ext, info)
            if _flag("require_cuda_build"):
                raise
            print("fusedrl: WARNING: " + info["reason"] + " -- installing without the cuda backend")
            return
        info.update(built=True, reason="", build_seconds=round(time.time() - t0, 1))
        self._write_info(ext, info)
        print(f"fusedrl: built {ext.name} in {info['build_seconds']} s")

    def _cmake_build(self, ext, nvcc, cmake, info):
        outdir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(outdir, exist_ok=True)
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        build_dir = _config.get("cmake_build_dir") or os.path.join(ROOT, "build", f"cmake-{tag}")
        os.makedirs(build_dir, exist_ok=True)
        archs = _config.get("cuda_archs")
        args = [
            cmake,
            "-S",
            ROOT,
            "-B",
            build_dir,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DFUSEDRL_CUDA_ARCHS={archs}",
            f"-DFUSEDRL_OUTPUT_DIR={outdir}",
            f"-DFUSEDRL_VERSION={VERSION}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        try:
            import pybind11  # noqa: F401

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError as e:
            raise RuntimeError("pybind11 is not installed (pip install pybind11)") from e
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if not os.path.exists(cache):  # the generator cannot change on an existing build tree
            if shutil.which("ninja"):
                args += ["-G", "Ninja"]
        jobs = _config.get("build_jobs") or _config.get("max_jobs") or str(os.cpu_count() or 2)
        info.update(archs=archs, nvcc=nvcc, build_dir=build_dir)
        print("fusedrl: " + " ".join(args))
        self._run(args)
        self._run([cmake, "--build", build_dir, "--parallel", jobs])

    @staticmethod
    def _run(cmd):
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(p.stdout[-20000:])
        if p.returncode != 0:
            tail = "\n".join(p.stdout.strip().splitlines()[-25:])
            raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited {p.returncode}:\n{tail}")


setup(
    name="fusedrl",
    version=VERSION,
    description="Fused RL policy losses (PPO/GRPO/DAPO/GSPO/Clip-Cov/KL-Cov) from hidden states, "
    "without materialising [tokens, vocab] logits",
    packages=find_packages(include=["fusedrl", "fusedrl.*"]),
    package_data={"fusedrl.backends": ["auto_table.json"]},
    python_requires=">=3.9",
    # torch >= 2.4 runs everything (torch.library.custom_op). The one-pass schedule's 16-bit GEMMs with fp32
    # output on CUDA (docs/one-pass.md, "torch versions"): >= 2.10 both fast kinds; 2.8-2.9 addmm into the
    # fp32 accumulator through mm + add (pytorch#154086, fixed by #167931); < 2.8 fp32 operands (slow).
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6; platform_system == 'Linux'"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff",
            "triton>=3.6; platform_system == 'Linux'",
            # integration tests: a tiny HF Llama built from a config, TRL's GRPOTrainer, a LoRA model
            "transformers",
            "trl",
            "peft",
        ],
        "bench": ["matplotlib", "tqdm"],
        "peers": ["liger-kernel", "cut-cross-entropy"],
        "integrations": ["transformers", "trl", "peft"],
        "build": ["pybind11>=2.10", "cmake>=3.24", "ninja"],
    },
    ext_modules=[CMakeExtension("fusedrl._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
