"""``GET /v1/models`` and ``GET /v1/models/{model}``: the one model this server serves.

Wire format: https://platform.openai.com/docs/api-reference/models
"""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import ApiKeyDep, EngineDep
from server.errors import APIError
from server.protocol import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(api_key: ApiKeyDep, engine: EngineDep) -> ModelList:
    return ModelList(data=[ModelCard(id=engine.model_name)])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, api_key: ApiKeyDep, engine: EngineDep) -> ModelCard:
    if model != engine.model_name:
        raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
    return ModelCard(id=engine.model_name)
