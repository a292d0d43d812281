"""GET /: the demo inbox page (DESIGN §4); turned off with PGPUSH_SERVE_PAGE=false."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter()
INDEX = Path(__file__).resolve().parent.parent / "static" / "index.html"


@router.get("/", operation_id="demo_page", summary="The live inbox demo page", include_in_schema=False)
async def demo_page() -> FileResponse:
    return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})
