"""engine.json as a typed Manifest: the manifests today's `kiln build` writes (torch and TensorRT-LLM, copied into
tests/data/manifests) load field by field and serialise back to the same JSON, and a manifest that does not fit the
schema is refused in one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engines.build import manifest as mf

MANIFESTS = Path(__file__).parent / "data" / "manifests"


@pytest.mark.parametrize("name", ["torch-schema1.json", "trtllm-schema1.json"])
def test_schema_1_manifests_load_and_serialise_unchanged(tmp_path, name):
    raw = json.loads((MANIFESTS / name).read_text())
    shutil.copy(MANIFESTS / name, tmp_path / mf.MANIFEST)
    manifest = mf.load_manifest(tmp_path, verify=False)
    assert manifest.to_json() == raw
    assert manifest.schema_version == 1 and manifest.precision == raw["precision"]
    assert manifest.target.requires.device == raw["target"]["requires"]["device"]
    assert manifest.files and all(entry.sha256 for entry in manifest.files.values())


def test_torch_manifest_fields():
    manifest = mf.Manifest.model_validate(json.loads((MANIFESTS / "torch-schema1.json").read_text()))
    assert (manifest.backend, manifest.precision, manifest.kv_cache_dtype, manifest.dtype) == (
        "torch",
        "bf16",
        "int8",
        "auto",
    )
    assert manifest.weight_formats["qkv_proj"] == "dense" and manifest.calibration.calibrator == "minmax"
    assert manifest.trtllm is None and manifest.draft_of is None and manifest.profile is None


def test_trtllm_manifest_fields():
    manifest = mf.Manifest.model_validate(json.loads((MANIFESTS / "trtllm-schema1.json").read_text()))
    assert (manifest.backend, manifest.precision, manifest.max_model_len) == ("trtllm", "fp8", 2048)
    assert manifest.trtllm.engine_dir == "trtllm" and manifest.trtllm.quant_config["quant_algo"] == "FP8"
    assert manifest.target.requires == mf.Requirements(device="cuda", min_sm=89)
    assert manifest.weight_formats == {} and manifest.calibration.tokens is None


def test_a_written_manifest_keeps_only_the_keys_it_was_built_with(tmp_path):
    manifest = mf.Manifest(schema_version=mf.SCHEMA_VERSION, backend="torch", precision="bf16", profile=None)
    mf.write_manifest(tmp_path, manifest)
    assert json.loads((tmp_path / mf.MANIFEST).read_text()) == {
        "schema_version": mf.SCHEMA_VERSION,
        "backend": "torch",
        "precision": "bf16",
        "profile": None,
    }


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda m: m.pop("precision"), "precision: Field required"),
        (lambda m: m.update(backend="onnx"), "backend: Input should be 'torch' or 'trtllm'"),
        (lambda m: m["target"].update(sm="ninety"), "target.sm: Input should be a valid integer"),
    ],
)
def test_a_manifest_outside_the_schema_is_refused_in_one_sentence(tmp_path, change, where):
    raw = json.loads((MANIFESTS / "torch-schema1.json").read_text())
    change(raw)
    (tmp_path / mf.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(
        mf.EngineDirError,
        match=rf"is not a valid kiln engine manifest \({where}.*\); rebuild the "
        r"engine with `kiln build`\.$",
    ):
        mf.load_manifest(tmp_path, verify=False)
