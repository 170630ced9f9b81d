"""`kiln build` end to end on a tiny random Llama with the default model's tokenizer: every precision
builds, the engine directory round-trips (load gives the same greedy tokens as the in-process
quantized model), builds are reused by content hash, and bad engines are refused in one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engines.base import GenerationRequest
from engines.build import manifest as mf
from engines.build.builder import BuildError, build
from engines.config import EngineConfig
from engines.hardware import Hardware
from engines.model_source import ModelNotFoundError, resolve_model
from engines.schemes import torch_names
from engines.torch.loader import LoadedModel, build_core, load_engine_dir
from tests.build_fixtures import build_options as options
from tests.build_fixtures import tiny_llama_config
from tests.conftest import greedy, run_to_completion

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama (GQA, untied head) sized to the default tokenizer's vocabulary."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-chat")
    default = resolve_model(None)
    config = tiny_llama_config(num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (default / name).is_file():
            shutil.copy(default / name, folder / name)
    return folder


def greedy_tokens(loaded: LoadedModel, config: EngineConfig, prompts: list[list[int]]) -> dict:
    core = build_core(config, loaded)
    requests = [GenerationRequest(f"r{i}", p, greedy(12, ignore_eos=True)) for i, p in enumerate(prompts)]
    return run_to_completion(core, requests)


PROMPTS = [[1, 500, 600, 700, 800, 900], [1, 42, 4242, 31337, 7, 7, 7, 9000]]


# Calibrated precisions: rebuilding them in memory would need the same calibration pass, so only the others are
# compared with an in-memory quantization (the uncalibrated code paths they share are covered there).
CALIBRATED = ("int4-awq", "int4-gptq", "int8-sq")


@pytest.fixture(scope="module")
def engine_of(tiny_chat_model, tmp_path_factory):
    """precision -> (engine directory, BuildResult), built once per module."""
    built: dict[str, tuple[Path, object]] = {}

    def get(precision: str):
        if precision not in built:
            out = tmp_path_factory.mktemp(precision) / "engine"
            built[precision] = (out, build(options(tiny_chat_model, out, precision=precision)))
        return built[precision]

    return get


@pytest.mark.parametrize("precision", torch_names())
def test_every_precision_builds_and_round_trips(engine_of, precision):
    out, result = engine_of(precision)
    assert not result.reused
    m = result.manifest
    assert m.schema_version == mf.SCHEMA_VERSION and m.precision == precision and m.backend == "torch"
    assert set(m.files) >= {
        "weights.safetensors",
        "config.json",
        "tokenizer.json",
        "build-report.json",
        "build-report.md",
    }
    report = json.loads((out / "build-report.json").read_text())
    assert report["accuracy"]["positions"] > 0 and 0 <= report["accuracy"]["top1_agreement"] <= 1
    assert "| precision |" in (out / "build-report.md").read_text()

    # The engine loads from disk into its precision's runtime layers.
    loaded = load_engine_dir(EngineConfig(engine_dir=str(out), kv_cache_memory=16 << 20))
    from engines.torch.models.llama import PROJECTIONS

    expected_format = {
        "fp32": "DenseLinear",
        "bf16": "DenseLinear",
        "int8-wo": "Int8WeightOnlyLinear",
        "int8-sq": "W8A8Int8Linear",
        "fp8": "Fp8Linear",
    }.get(precision, "Int4WeightOnlyLinear")
    for kind in PROJECTIONS:
        assert type(getattr(loaded.model.layers[0], kind)).__name__ == expected_format


@pytest.mark.parametrize("precision", [p for p in torch_names() if p not in CALIBRATED])
def test_served_engine_answers_like_the_model_quantized_in_memory(tiny_chat_model, engine_of, precision):
    """The served engine (loaded from disk) answers like the model the build evaluated in memory."""
    out, _ = engine_of(precision)
    config = EngineConfig(engine_dir=str(out), kv_cache_memory=16 << 20)
    loaded = load_engine_dir(config)
    from_disk = greedy_tokens(loaded, config, PROMPTS)

    from engines.build.quantize import quantize_model
    from engines.torch.models.llama import LlamaArgs, assemble, read_hf_checkpoint

    args = loaded.model.args
    cpu = torch.device("cpu")
    float_tensors = read_hf_checkpoint(tiny_chat_model, args, torch.float32, cpu)
    q = quantize_model(float_tensors, args, precision, None, progress=False)
    in_memory = assemble(LlamaArgs.from_hf_config(loaded.hf_config), dict(q.tensors), q.formats, loaded.dtype, cpu)
    same = LoadedModel(in_memory, loaded.hf_config, loaded.tokenizer, "x", tiny_chat_model, loaded.dtype, cpu)
    assert greedy_tokens(same, EngineConfig(kv_cache_memory=16 << 20), PROMPTS) == from_disk


def test_rebuild_with_same_inputs_is_reused_and_other_inputs_rebuild(tiny_chat_model, tmp_path):
    out = tmp_path / "engine"
    first = build(options(tiny_chat_model, out, precision="int8-wo"))
    again = build(options(tiny_chat_model, out, precision="int8-wo"))
    assert again.reused and again.manifest.build_hash == first.manifest.build_hash
    other = build(options(tiny_chat_model, out, precision="int4-rtn"))
    assert not other.reused and other.manifest.precision == "int4-rtn"
    # an altered file makes the existing engine stale, not trusted
    weights = out / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not build(options(tiny_chat_model, out, precision="int4-rtn")).reused


def test_max_accuracy_loss_picks_the_most_aggressive_profile_within_budget(tiny_chat_model, tmp_path):
    loose = build(options(tiny_chat_model, tmp_path / "loose", precision="auto", max_accuracy_loss=1e6))
    assert loose.manifest.precision.startswith("int4")  # the smallest weights pass a huge budget
    exact = build(options(tiny_chat_model, tmp_path / "exact", precision="auto", max_accuracy_loss=1e-9))
    assert exact.manifest.precision == "fp32"  # only the unquantized profile loses nothing
    tried = [c["precision"] for c in exact.report["candidates"]]
    assert tried[0].startswith("int4") and tried[-1] == "fp32"
    with pytest.raises(BuildError, match="No precision stays within --max-accuracy-loss"):
        build(options(tiny_chat_model, tmp_path / "tight", precision="int4-rtn", max_accuracy_loss=1e-9))
    assert not (tmp_path / "tight").exists()  # a failed build leaves nothing behind


@pytest.fixture(scope="module")
def built_engine(tiny_chat_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "engine"
    build(options(tiny_chat_model, out, precision="int8-wo"))
    return out


def copy_engine(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checksum_mismatch_is_refused(built_engine, tmp_path):
    engine = copy_engine(built_engine, tmp_path / "e")
    (engine / "config.json").write_text((engine / "config.json").read_text() + " ")
    with pytest.raises(mf.EngineDirError, match=r"does not match its checksum.*; rebuild the engine\.$"):
        load_engine_dir(EngineConfig(engine_dir=str(engine)))


@pytest.mark.parametrize(
    "files",
    ["absent", {}, {"weights.safetensors": {"bytes": 1}}],
    ids=["no files key", "empty files", "entry without sha256"],
)
def test_manifest_without_checksums_is_refused(built_engine, tmp_path, files):
    engine = copy_engine(built_engine, tmp_path / "e")
    (engine / "config.json").write_text((engine / "config.json").read_text() + " ")  # tampered
    manifest = json.loads((engine / "engine.json").read_text())
    if files == "absent":
        del manifest["files"]
    else:
        manifest["files"] = files
    (engine / "engine.json").write_text(json.dumps(manifest))
    with pytest.raises(mf.EngineDirError, match=r"lists no sha256 checksum for its files, so they cannot be verified"):
        load_engine_dir(EngineConfig(engine_dir=str(engine)))


def test_file_the_manifest_does_not_list_is_refused(built_engine, tmp_path):
    engine = copy_engine(built_engine, tmp_path / "e")
    (engine / "extra").mkdir()
    (engine / "extra" / "weights.bin").write_bytes(b"not built by kiln")
    with pytest.raises(mf.EngineDirError, match=r"extra/weights.bin is not listed in engine.json"):
        load_engine_dir(EngineConfig(engine_dir=str(engine)))


def test_newer_schema_is_refused(built_engine, tmp_path):
    engine = copy_engine(built_engine, tmp_path / "e")
    manifest = json.loads((engine / "engine.json").read_text())
    manifest["schema_version"] = mf.SCHEMA_VERSION + 1
    (engine / "engine.json").write_text(json.dumps(manifest))
    with pytest.raises(mf.EngineDirError, match=f"uses engine schema {mf.SCHEMA_VERSION + 1}, newer than"):
        load_engine_dir(EngineConfig(engine_dir=str(engine)))


def test_engine_for_other_hardware_is_refused(built_engine, tmp_path):
    engine = copy_engine(built_engine, tmp_path / "e")
    manifest = json.loads((engine / "engine.json").read_text())
    manifest["target"]["requires"] = {"device": "cuda", "min_sm": 89}
    (engine / "engine.json").write_text(json.dumps(manifest))
    with pytest.raises(mf.EngineDirError, match="was built for cuda .* but this machine runs on cpu"):
        load_engine_dir(EngineConfig(engine_dir=str(engine)))


def test_fp8_engine_on_an_ampere_gpu_is_refused():
    a100 = Hardware(device="cuda", name="NVIDIA A100-SXM4-80GB", memory_bytes=80 << 30, sm=80)
    h100 = Hardware(device="cuda", name="NVIDIA H100", memory_bytes=80 << 30, sm=90)
    fp8 = mf.Target(requires=mf.requirements("fp8", "cuda"))
    with pytest.raises(mf.EngineDirError, match=r"needs a GPU with SM >= 89 but NVIDIA A100-SXM4-80GB is SM 80"):
        mf.check_target("fp8", fp8, a100)
    mf.check_target("fp8", fp8, h100)


def test_building_fp8_for_an_ampere_gpu_is_refused(tiny_chat_model, tmp_path):
    a100 = Hardware(device="cuda", name="NVIDIA A100", memory_bytes=80 << 30, sm=80)
    with pytest.raises(
        BuildError, match=r"--precision fp8 is not supported on this machine: it needs a GPU with SM >= 89"
    ):
        build(options(tiny_chat_model, tmp_path / "e", precision="fp8"), hardware=a100)


def test_folder_without_manifest_is_not_an_engine(tmp_path):
    with pytest.raises(mf.EngineDirError, match="is not a kiln engine directory"):
        mf.load_manifest(tmp_path)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(calib_samples=8), "--calib-samples must be between 16 and 4096, got 8."),
        (dict(calib_samples=5000), "--calib-samples must be between 16 and 4096, got 5000."),
        (dict(precision="int3"), "--precision must be auto or one of"),
        (dict(kv_cache_dtype="int4"), "--kv-cache-dtype must be one of"),
        (dict(calibrator="mse"), "--calibrator must be one of"),
        (dict(group_size=48), "--group-size must be a power of two"),
        (
            dict(precision="nvfp4"),
            "--precision nvfp4 needs --backend trtllm and an NVIDIA GPU with SM >= 100; kiln's "
            "torch engine builds fp32, bf16,",
        ),
        (dict(device="tpu"), "--device must be auto, cpu or cuda, got 'tpu'."),
    ],
)
def test_bad_options_fail_in_one_sentence(tmp_path, kw, message):
    with pytest.raises(BuildError, match=message.replace("(", r"\(")):
        build(options(tmp_path / "model", tmp_path / "out", **kw))


def test_output_that_is_not_an_engine_is_never_replaced(tiny_chat_model, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="exists and is not a kiln engine directory"):
        build(options(tiny_chat_model, precious, precision="int8-wo"))
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli_build_reports_errors_in_one_line(tmp_path, capsys):
    from server.cli import main

    assert main(["build", "--output", str(tmp_path / "e"), "--calib-samples", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kiln build: --calib-samples must be between 16 and 4096, got 3."
    assert main(["build", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "e")]) == 2
    assert "kiln build:" in capsys.readouterr().err


def test_cuda_asked_for_without_a_gpu_fails_in_one_sentence(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BuildError, match=r"^--device cuda: device 'cuda' was asked for but torch sees no CUDA GPU\.$"):
        build(options(tiny_chat_model, tmp_path / "e", device="cuda"))
    assert not (tmp_path / "e").exists()


def test_missing_model_folder_says_so(tmp_path):
    with pytest.raises(
        ModelNotFoundError, match=r"^Model folder '.*/nope' does not exist \(in a container: is it mounted\?\)\.$"
    ):
        build(options(str(tmp_path / "nope"), tmp_path / "e"))


def test_cli_build_reads_kiln_variables_and_flags_win(tiny_chat_model, tmp_path, monkeypatch, capsys):
    """`kiln build` takes KILN_<FLAG> for its value flags (one .env configures compose's build and server
    services); a bad variable gets the flag's one-line error and a flag overrides its variable."""
    from server.cli import main

    monkeypatch.setenv("KILN_PRECISION", "nvfp4")
    assert main(["build", "--model", str(tiny_chat_model), "--output", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith("kiln build: --precision nvfp4 needs --backend trtllm")
    monkeypatch.setenv("KILN_CALIB_SAMPLES", "abc")
    with pytest.raises(SystemExit) as exited:  # argparse's own error exit
        main(["build", "--output", str(tmp_path / "e")])
    assert exited.value.code == 2
    assert "argument --calib-samples: invalid int value: 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("KILN_CALIB_SAMPLES")
    monkeypatch.setenv("KILN_MODEL", str(tiny_chat_model))
    monkeypatch.setenv("KILN_EVAL_SAMPLES", "2")
    assert main(["build", "--output", str(tmp_path / "e"), "--precision", "bf16", "--no-bench"]) == 0
    manifest = mf.load_manifest(tmp_path / "e")
    assert manifest.precision == "bf16"
    assert manifest.model.source == str(tiny_chat_model)
    assert "--precision PRECISION" in build_help() and "[env KILN_PRECISION]" in build_help()


def build_help() -> str:
    from server.cli import build_parser

    parser = build_parser()
    build_action = next(a for a in parser._actions if getattr(a, "choices", None) and "build" in a.choices)
    return " ".join(build_action.choices["build"].format_help().split())


def test_draft_of_builds_the_targets_model_at_int4_and_serves_as_its_draft(tiny_chat_model, built_engine, tmp_path):
    """`--draft-of ENGINE` takes the model from the engine's manifest and builds it at int4-awq; the target
    served with that draft gives the same greedy tokens as without it."""
    target = mf.load_manifest(built_engine)
    draft_dir = tmp_path / "draft"
    result = build(options(None, draft_dir, draft_of=str(built_engine)))
    m = result.manifest
    assert m.precision == "int4-awq" and m.model.source == target.model.source
    assert m.draft_of == mf.DraftOf(
        engine=str(built_engine.resolve()), build_hash=target.build_hash, model=target.model.source
    )

    plain = EngineConfig(engine_dir=str(built_engine), kv_cache_memory=16 << 20)
    spec = EngineConfig(
        engine_dir=str(built_engine),
        kv_cache_memory=16 << 20,
        speculative_method="draft",
        speculative_draft=str(draft_dir),
    )
    want = greedy_tokens(load_engine_dir(plain), plain, PROMPTS)
    core = build_core(spec, load_engine_dir(spec))
    requests = [GenerationRequest(f"r{i}", p, greedy(12, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    assert run_to_completion(core, requests) == want
    assert core.stats().spec_draft_tokens > 0
    described = core.proposer.describe()
    assert (described["method"], described["draft_source"], described["draft_precision"]) == (
        "draft",
        str(draft_dir),
        "int4-awq",
    )
    assert described["draft_kv_blocks"] == core.bm.num_blocks


def test_draft_of_needs_an_engine_and_the_same_vocabulary(tiny_chat_model, built_engine, tmp_path):
    with pytest.raises(BuildError, match="is not a kiln engine directory"):
        build(options(tiny_chat_model, tmp_path / "d1", draft_of=str(tmp_path)))
    # the same model with two token ids swapped in its tokenizer: a different vocabulary
    other = shutil.copytree(tiny_chat_model, tmp_path / "other")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[1000:1002]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(BuildError, match="does not share the tokenizer"):
        build(options(other, tmp_path / "d2", draft_of=str(built_engine), precision="int8-wo"))
