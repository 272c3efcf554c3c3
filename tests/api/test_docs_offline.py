"""/docs and /redoc work on a machine without internet: every asset they load is served by the app itself."""

from __future__ import annotations

import re

import pytest

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from tests.helpers import serving


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_api_pages_load_nothing_from_outside(tiny_backbone, store_root, page):
    app = create_app(Settings(store=store_root, warmup=False), backbone=tiny_backbone)
    async with serving(app) as client:
        html = (await client.get(page)).text
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""", html)
        urls = [a or b for a, b in urls]
        assert urls, html
        assert not [u for u in urls if u.startswith(("http://", "https://", "//"))], urls
        for url in urls:
            assert (await client.get(url)).status_code == 200, url
        assert "/openapi.json" in urls or "/openapi.json" in html
