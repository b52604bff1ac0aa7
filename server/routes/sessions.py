"""``/v1/sessions``: list, inspect and delete the caller's sessions (a sinkserve extension).

A session is the KV cache of one conversation (``engine/sessions/store.py``). Sessions are scoped to the API
key that created them, names included: a name one key chose means nothing to another key (its own request
naming it starts its own session, and a lookup answers 404, never 403), so ids and names leak nothing. A key
holds at most ``max_sessions_per_key`` sessions and a session ``max_branches_per_session`` branches; past
them the least recently used idle one is dropped (the store's module docstring).
"""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import ApiKeyDep, EngineDep
from server.protocol import SessionDeleted, SessionInfo, SessionList

router = APIRouter(tags=["sessions"])


@router.get("/v1/sessions", response_model=SessionList)
async def list_sessions(api_key: ApiKeyDep, engine: EngineDep) -> SessionList:
    sessions = await engine.list_sessions(api_key)
    return SessionList(data=[SessionInfo(**s) for s in sessions])


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo)
async def get_session(session_id: str, api_key: ApiKeyDep, engine: EngineDep) -> SessionInfo:
    return SessionInfo(**await engine.get_session(api_key, session_id))


@router.delete("/v1/sessions/{session_id}", response_model=SessionDeleted)
async def delete_session(session_id: str, api_key: ApiKeyDep, engine: EngineDep) -> SessionDeleted:
    await engine.delete_session(api_key, session_id)
    return SessionDeleted(id=session_id)
