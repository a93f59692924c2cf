"""The playground: one page (and its script) for trying requests in a browser, on the job API."""

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)

# `api`, or `txt2img_service.api` where the wheel installed it.
_PAGES = files(__name__.rsplit(".", 2)[0]).joinpath("playground")


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/playground")


@router.get("/playground")
def page() -> Response:
    return Response(_PAGES.joinpath("index.html").read_bytes(), media_type="text/html")


@router.get("/playground/playground.js")
def script() -> Response:
    return Response(_PAGES.joinpath("playground.js").read_bytes(), media_type="text/javascript")
