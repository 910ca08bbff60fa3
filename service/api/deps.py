"""Dependency aliases for routes (full-stack-fastapi-template style)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.registry import ModelRegistry


# Coroutines, not plain functions: FastAPI runs a plain-function dependency in its thread pool, and
# that hop (a queue put and a thread wake-up per request) took 19 % of the event loop's time at
# 512 connections on the translation endpoint (py-spy), for a dictionary lookup.
async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
