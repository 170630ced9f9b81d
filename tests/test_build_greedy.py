"""The build's reference answers (engines/build/greedy.py): decoded a layer at a time with a KV cache kept across
passes, in groups of prompts bounded by their cache's size, they are the float32 model's greedy answers as
transformers computes them (its full forward over prompt + answer so far, token by token)."""

from __future__ import annotations

import pytest
import torch

from engines.build import greedy
from engines.build.greedy import greedy_answers, kv_groups, streamed_greedy_answers
from engines.build.stream import Checkpoint
from engines.torch.models.registry import architecture
from tests.test_qwen3_olmo2_build import save_tiny_chat_model

CPU = torch.device("cpu")
# lengths across block boundaries (16) and past the tiny models' sliding window (8)
PROMPTS = [[1, 500, 600, 700], [1] + list(range(3000, 3030)), [1, 42, 4242, 31337, 7, 7, 7, 9000, 12, 13, 14, 15, 16]]
NEW_TOKENS = 12


def transformers_greedy(folder, prompts: list[list[int]], new_tokens: int, eos: list[int]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            answer: list[int] = []
            while len(answer) < new_tokens and not (answer and answer[-1] in eos):
                logits = model(torch.tensor([prompt + answer])).logits[0, -1]
                answer.append(int(logits.argmax()))
            answers.append(answer)
    return answers


def checkpoint_of(folder) -> Checkpoint:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    arch = architecture(config.model_type)
    return Checkpoint(folder, arch, arch.args_from_config(config), CPU)


@pytest.mark.parametrize("model_type", ["qwen3", "mistral", "gemma2", "phi3"])
@pytest.mark.parametrize("group_bytes", [1 << 30, 1], ids=["one-group", "a-group-each"])
def test_streamed_answers_are_the_float_models_greedy_answers(tmp_path, monkeypatch, model_type, group_bytes):
    save_tiny_chat_model(model_type, tmp_path)
    monkeypatch.setattr(greedy, "GROUP_KV_BYTES", group_bytes)
    c = checkpoint_of(tmp_path)
    got = streamed_greedy_answers(c, c.shell(c.outer(), {}, torch.float32), PROMPTS, NEW_TOKENS, [], progress=False)
    assert got == transformers_greedy(tmp_path, PROMPTS, NEW_TOKENS, [])
    assert all(len(a) == NEW_TOKENS for a in got)


def test_an_answer_stops_after_its_eos_while_the_others_go_on(tmp_path):
    save_tiny_chat_model("qwen3", tmp_path)
    c = checkpoint_of(tmp_path)
    full = transformers_greedy(tmp_path, PROMPTS, NEW_TOKENS, [])
    eos = [full[1][3]]  # the second answer's fourth token ends it there
    expected = transformers_greedy(tmp_path, PROMPTS, NEW_TOKENS, eos)
    assert len(expected[1]) == 4
    shell = c.shell(c.outer(), {}, torch.float32)
    assert streamed_greedy_answers(c, shell, PROMPTS, NEW_TOKENS, eos, progress=False) == expected


def test_a_model_holding_its_layers_answers_the_same(tmp_path):
    save_tiny_chat_model("qwen3", tmp_path)
    c = checkpoint_of(tmp_path)
    whole = c.arch.assemble(
        c.args, c.arch.read_checkpoint(c.folder, c.args, torch.float32, CPU), {}, torch.float32, CPU
    )
    got = greedy_answers(whole, PROMPTS, NEW_TOKENS, [], CPU, progress=False)
    assert got == transformers_greedy(tmp_path, PROMPTS, NEW_TOKENS, [])


def test_groups_keep_their_cache_within_the_budget():
    assert kv_groups([10, 20, 30, 5], bytes_per_token=2, budget=60) == [range(0, 2), range(2, 3), range(3, 4)]
    assert kv_groups([10, 20, 30, 5], bytes_per_token=2, budget=70) == [range(0, 2), range(2, 4)]
    assert kv_groups([40, 1], bytes_per_token=2, budget=60) == [range(0, 1), range(1, 2)]  # alone over the budget
    assert kv_groups([], bytes_per_token=2, budget=60) == []
