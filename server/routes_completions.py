"""POST /v1/completions: prompts as a string, strings, token ids or lists of token ids; echo; logprobs."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from engines.base import MAX_TOP_LOGPROBS
from server.errors import bad_request
from server.generation import Generation
from server.logprobs import completion_logprobs
from server.offload import run_sized
from server.prompt_bound import check_prompt_chars
from server.prompts import tokenize_prompts
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from server.respond import respond
from server.sampling import build_sampling_params, check_fields
from server.structured import structured_output
from server.text_check import check_text

router = APIRouter()


def _check_request(body: CompletionRequest) -> None:
    check_fields(body)
    if body.suffix:
        raise bad_request("suffix is not supported: this server does not do fill-in-the-middle completions.",
                          param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (only best_of equal to n).", param="best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {body.logprobs}.",
                          param="logprobs")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs is not supported: the engine does not score prompt tokens.",
                          param="echo")
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
    prompts = [(token_ids, build_sampling_params(body, body.max_tokens, body.logprobs, len(token_ids), info,
                                                 structured))
               for token_ids in all_token_ids]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(engine, state.metrics, model, response_id, prompts, body.stop_strings, body.speculative)
    strings = state.engine_holder.token_strings
    top_k = body.logprobs or 0

    # What echo prepends to each choice: the prompt as given, or decoded when given as token ids.
    echoes = []
    for prompt, (token_ids, params) in zip(body.prompts, prompts):
        text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(token_ids)
        echoes.extend([text if body.echo else ""] * params.n)
    offsets = [len(text) for text in echoes]  # text_offset of each choice's next token

    def logprobs_of(index: int, entries):
        if body.logprobs is None:
            return None
        result, offsets[index] = completion_logprobs(entries, top_k, strings, offsets[index])
        return result

    def make_response(results):
        return CompletionResponse(
            id=response_id,
            model=model,
            choices=[
                CompletionChoice(index=r.index, text=echoes[r.index] + r.text,
                                 logprobs=logprobs_of(r.index, r.logprobs), finish_reason=r.finish_reason)
                for r in results
            ],
            usage=generation.usage(),
        )

    created = int(time.time())

    def chunk(choices, usage=None) -> CompletionResponse:
        return CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage)

    async def make_chunks():
        for choice in generation.choices:
            if echoes[choice.index]:
                yield chunk([CompletionChoice(index=choice.index, text=echoes[choice.index], finish_reason=None)])
        async for deltas in generation:
            for delta in deltas:
                # like vLLM, a chunk for every step that generated tokens, even while their text is held
                # back: the client sees the stream move (and its time to first token) at once
                if delta.text or delta.num_tokens and not delta.finish_reason or (body.logprobs is not None and delta.logprobs):
                    yield chunk([CompletionChoice(index=delta.index, text=delta.text,
                                                  logprobs=logprobs_of(delta.index, delta.logprobs),
                                                  finish_reason=None)])
                if delta.finish_reason:
                    yield chunk([CompletionChoice(index=delta.index, text="", finish_reason=delta.finish_reason)])
        if body.include_usage:
            yield chunk([], usage=generation.usage())

    return await respond(request, generation, body.stream, make_response, make_chunks)
