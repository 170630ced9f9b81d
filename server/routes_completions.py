"""POST /v1/completions: prompts as a string, strings, token ids or lists of token ids; echo; logprobs.

echo with logprobs scores the prompt as well (its first token has no logprob: null), which is how
lm-evaluation-harness computes log-likelihoods; with max_tokens 0 nothing is generated (the engine samples one
token, which the response leaves out). vLLM's prompt_logprobs gives the same numbers in vLLM's shape."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from engines.base import MAX_TOP_LOGPROBS
from server.errors import bad_request
from server.generation import Generation
from server.logprobs import completion_logprobs, echoed_prompt_logprobs, vllm_prompt_logprobs
from server.offload import run_sized
from server.prompt_bound import check_prompt_chars
from server.prompts import tokenize_prompts
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from server.request_id import engine_request_id
from server.respond import respond
from server.sampling import build_sampling_params, check_fields
from server.structured import structured_output
from server.text_check import check_text

router = APIRouter()


def _check_request(body: CompletionRequest) -> None:
    check_fields(body)
    if body.suffix:
        raise bad_request(
            "suffix is not supported: this server does not do fill-in-the-middle completions.", param="suffix"
        )
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (only best_of equal to n).", param="best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {body.logprobs}.", param="logprobs")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens 0 is only allowed with echo (to score the prompt).", param="max_tokens")
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request(
            "prompt_logprobs is not supported with stream; echo with logprobs streams them.", param="prompt_logprobs"
        )
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request):
    state = request.app.state
    engine = state.engine_holder.get()
    model = state.engine_holder.check_model(body.model)
    _check_request(body)
    structured = structured_output(body)
    check_text(body)
    info = engine.info
    for prompt in body.prompts:
        if isinstance(prompt, str):
            check_prompt_chars(engine.tokenizer, len(prompt), info.max_model_len, "prompt")
    size = sum(len(prompt) if isinstance(prompt, str) else 0 for prompt in body.prompts)
    all_token_ids = await run_sized(size, tokenize_prompts, engine.tokenizer, body.prompts, info.vocab_size)
    score_only = body.echo and body.max_tokens == 0
    echo_logprobs = body.echo and body.logprobs is not None
    asked = [k for k in (body.logprobs if echo_logprobs else None, body.prompt_logprobs) if k is not None]
    prompts = [
        (
            token_ids,
            build_sampling_params(
                body,
                1 if score_only else body.max_tokens,
                body.logprobs,
                len(token_ids),
                info,
                structured,
                max(asked) if asked else None,
            ),
        )
        for token_ids in all_token_ids
    ]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(
        engine, state.metrics, model, engine_request_id(request), prompts, body.stop_strings, body.speculative
    )
    strings = state.engine_holder.token_strings
    top_k = body.logprobs or 0

    # What echo prepends to each choice: the prompt as given, or decoded when given as token ids.
    echoes, prompt_ids = [], []
    for prompt, (token_ids, params) in zip(body.prompts, prompts):
        text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(token_ids)
        echoes.extend([text if body.echo else ""] * params.n)
        prompt_ids.extend([token_ids] * params.n)
    offsets = [len(text) for text in echoes]  # text_offset of each choice's next token

    def logprobs_of(index: int, entries, with_prompt: bool = False):
        if body.logprobs is None:
            return None
        result, offsets[index] = completion_logprobs([] if score_only else entries, top_k, strings, offsets[index])
        if with_prompt and echo_logprobs:
            prompt, _ = echoed_prompt_logprobs(prompt_ids[index], generation.prompt_logprobs[index], top_k, strings)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(prompt, name).extend(getattr(result, name))
            result = prompt
        return result

    def usage():
        used = generation.usage()
        if score_only:  # the one sampled token is not part of the response
            used.completion_tokens, used.total_tokens = 0, used.prompt_tokens
        return used

    def make_response(results):
        return CompletionResponse(
            id=response_id,
            model=model,
            choices=[
                CompletionChoice(
                    index=r.index,
                    text=echoes[r.index] + ("" if score_only else r.text),
                    logprobs=logprobs_of(r.index, r.logprobs, with_prompt=True),
                    finish_reason="length" if score_only else r.finish_reason,
                    prompt_logprobs=(
                        vllm_prompt_logprobs(generation.prompt_logprobs[r.index], strings)
                        if body.prompt_logprobs is not None
                        else None
                    ),
                )
                for r in results
            ],
            usage=usage(),
        )

    created = int(time.time())

    def chunk(choices, usage=None) -> CompletionResponse:
        return CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage)

    def echo_chunk(index: int) -> CompletionResponse:
        prompt = None
        if echo_logprobs:
            prompt, _ = echoed_prompt_logprobs(prompt_ids[index], generation.prompt_logprobs[index], top_k, strings)
        return chunk([CompletionChoice(index=index, text=echoes[index], logprobs=prompt, finish_reason=None)])

    async def make_chunks():
        # the echo goes first; with logprobs it waits for the prompt's, which come with the choice's first output
        unechoed = {choice.index for choice in generation.choices if echoes[choice.index]}
        if not echo_logprobs:
            for index in sorted(unechoed):
                yield echo_chunk(index)
            unechoed.clear()
        async for deltas in generation:
            for delta in deltas:
                if delta.index in unechoed:
                    unechoed.discard(delta.index)
                    yield echo_chunk(delta.index)
                if not score_only and delta.needs_chunk(
                    has_content=bool(delta.text), wants_logprobs=body.logprobs is not None
                ):
                    yield chunk(
                        [
                            CompletionChoice(
                                index=delta.index,
                                text=delta.text,
                                logprobs=logprobs_of(delta.index, delta.logprobs),
                                finish_reason=None,
                            )
                        ]
                    )
                if delta.finish_reason:
                    reason = "length" if score_only else delta.finish_reason
                    yield chunk([CompletionChoice(index=delta.index, text="", finish_reason=reason)])
        if body.include_usage:
            yield chunk([], usage=usage())

    return await respond(request, generation, body.stream, make_response, make_chunks)
