"""POST /tokenize and POST /detokenize: vLLM's endpoints, at the root as vLLM serves them.

A prompt is tokenized as /v1/completions tokenizes it and messages are rendered as /v1/chat/completions
renders them (same template, same tools), so `count` is the prompt_tokens those endpoints would report.
Like vLLM, both refuse inputs longer than the context, which also bounds the work a request can cost.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import bad_request
from server.offload import run_sized
from server.prompt_bound import check_prompt_chars
from server.prompts import render_chat
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.sampling import check_fields
from server.text_check import check_text

router = APIRouter()


def _check_chat_options(body: TokenizeRequest) -> None:
    # render_chat renders what a chat completion sees; other renderings would count a different prompt
    if not body.add_generation_prompt:
        raise bad_request(
            "add_generation_prompt false is not supported: messages are rendered as "
            "/v1/chat/completions renders them, with the generation prompt.",
            param="add_generation_prompt",
        )
    if body.add_special_tokens:
        raise bad_request(
            "add_special_tokens true is not supported with messages: the chat template adds the "
            "model's special tokens itself.",
            param="add_special_tokens",
        )


def _check_length(num_tokens: int, max_model_len: int, param: str) -> None:
    if num_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, the {param} "
            f"has {num_tokens} tokens. Please reduce the length of the {param}.",
            param=param,
            code="context_length_exceeded",
        )


def _encode(tokenizer, prompt: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    holder = request.app.state.engine_holder
    engine = holder.get()
    holder.check_model(body.model)
    check_fields(body)
    check_text(body)
    tokenizer, max_model_len = engine.tokenizer, engine.info.max_model_len
    param = "prompt" if body.messages is None else "messages"
    chars = body.num_content_chars
    check_prompt_chars(tokenizer, chars, max_model_len, param)
    if body.messages is None:
        add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
        token_ids = await run_sized(chars, _encode, tokenizer, body.prompt, add_special_tokens)
    else:
        _check_chat_options(body)
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        # templating work grows with the messages too, not only with their text
        token_ids = await run_sized(chars + len(body.messages), render_chat, tokenizer, body.messages, tools)
    _check_length(len(token_ids), max_model_len, param)
    token_strs = tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(token_ids), max_model_len=max_model_len, tokens=token_ids, token_strs=token_strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    holder = request.app.state.engine_holder
    engine = holder.get()
    holder.check_model(body.model)
    check_fields(body)
    info = engine.info
    bad = next((t for t in body.tokens if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{info.vocab_size - 1}).", param="tokens")
    _check_length(len(body.tokens), info.max_model_len, "tokens")
    # decoding work grows with the ids (each several characters), so their number sizes it
    return DetokenizeResponse(prompt=await run_sized(len(body.tokens), engine.tokenizer.decode, body.tokens))
