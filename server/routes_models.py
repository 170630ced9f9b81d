"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import model_not_found
from server.protocol import ModelCard, ModelList

router = APIRouter()


def _card(request: Request) -> ModelCard:
    holder = request.app.state.engine_holder
    info = holder.get().info
    return ModelCard(
        id=holder.served_model_name, created=holder.created, root=info.model_name, max_model_len=info.max_model_len
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    card = _card(request)
    if model_id != card.id:
        raise model_not_found(model_id)
    return card
