"""`kiln serve --engine-dir`: a built engine of the default model (INT4 weights, INT8 KV cache) served
over HTTP answers exactly like the same engine directory loaded in-process; a tampered engine is
refused at start with one sentence."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engines.base import GenerationRequest, SamplingParams
from engines.build.builder import BuildOptions, build
from engines.config import EngineConfig
from engines.torch.loader import build_core, load_engine_dir
from tests.server.conftest import start_server

QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Name three primary colors."]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "smollm2-int4"
    build(
        BuildOptions(
            output=str(out),
            precision="int4-rtn",
            kv_cache_dtype="int8",
            calib_samples=16,
            eval_samples=4,
            eval_tokens=8,
            bench=False,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def engine_server(engine_dir, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("engine-server"), "--engine-dir", str(engine_dir))
    yield server
    server.stop()


def in_process_answers(engine_dir: Path) -> list[str]:
    config = EngineConfig(engine_dir=str(engine_dir))
    loaded = load_engine_dir(config)
    core = build_core(config, loaded)
    answers = []
    for i, question in enumerate(QUESTIONS):  # one at a time, as the server sees them
        ids = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        core.add_request(
            GenerationRequest(f"q{i}", ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        )
        tokens = []
        while core.has_work():
            for out in core.step():
                tokens += out.outputs[0].new_token_ids
        answers.append(loaded.tokenizer.decode(tokens, skip_special_tokens=True))
    return answers


def test_served_engine_answers_like_the_engine_in_process(engine_dir, engine_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{engine_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    served = [
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
        for q in QUESTIONS
    ]
    client.close()
    assert served == in_process_answers(engine_dir)
    assert all(served)


def test_metadata_reports_the_engine_and_its_quantized_kv_cache(engine_server):
    import httpx

    meta = httpx.get(f"{engine_server.base_url}/v1/metadata", timeout=30).json()
    assert meta["kv_cache_dtype"] == "int8" and meta["precision"] == "int4-rtn"
    assert meta["extra"]["engine"]["weight_formats"]["qkv_proj"] == "int4"
    metrics = httpx.get(f"{engine_server.base_url}/metrics", timeout=30).text
    assert 'cache_dtype="int8"' in metrics
    capacity = next(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("kiln:kv_cache_capacity_tokens{")
    )
    # the default 1 GiB pool: 46,592 tokens in bf16 for this model; int8 holds twice as many
    assert capacity >= 2 * 46592


def test_tampered_engine_is_refused_with_one_sentence(engine_dir, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(engine_dir, tampered)
    (tampered / "tokenizer.json").write_text((tampered / "tokenizer.json").read_text() + "\n")
    with pytest.raises(RuntimeError) as failure:
        start_server(tmp_path, "--engine-dir", str(tampered))
    assert f"Engine file {tampered / 'tokenizer.json'} does not match its checksum in engine.json" in str(failure.value)
