"""Placeholder: filled by its issue-4 part."""

from fastapi import APIRouter

router = APIRouter()
