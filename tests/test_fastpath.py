"""The WMTS REST fast path answers exactly what the routed path answers, and hands everything else on."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from apputil import app_client, layer_descriptor, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tileserver.publication.model import parse_layer


async def test_fast_path_matches_the_routed_answer(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        runtime.store.add_layer(parse_layer("R", layer_descriptor("SCAN1000", restricted=True)))
        await runtime.refresh()
        lim = runtime.catalog.layers["S"].limits["10"]
        rest = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
        kvp = ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=S&STYLE=normal&TILEMATRIXSET=PM"
               f"&TILEMATRIX=10&TILEROW={lim.min_row}&TILECOL={lim.min_col}&FORMAT=image/png")
        fast, routed = await client.get(rest), await client.get(kvp)
        assert fast.status_code == routed.status_code == 200
        assert fast.content == routed.content and len(fast.content) > 0
        for header in ("content-type", "cache-control", "etag", "access-control-allow-origin", "content-length"):
            assert fast.headers[header] == routed.headers[header], header
        # a nodata tile inside the limits, the same both ways
        empty = f"/wmts/1.0.0/S/normal/PM/10/{lim.max_row}/{lim.max_col}.png"
        assert (await client.get(empty)).status_code == 200
        # everything else goes to the route: errors, restricted layers, conversions
        out = await client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.max_row + 5}/{lim.min_col}.png")
        assert out.status_code == 400 and b"TileOutOfRange" in out.content
        assert (await client.get(f"/wmts/1.0.0/R/normal/PM/10/{lim.min_row}/{lim.min_col}.png")).status_code == 400
        jpeg = await client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.jpeg")
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        head = await client.head(rest)
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == fast.headers["etag"]


def _kvp(layer: str, row: int, col: int, service: str = "WMTS", fmt: str = "image%2Fpng") -> str:
    return (f"/wmts?SERVICE={service}&REQUEST=GetTile&VERSION=1.0.0&LAYER={layer}&STYLE=normal&TILEMATRIXSET=PM"
            f"&TILEMATRIX=10&TILEROW={row}&TILECOL={col}&FORMAT={fmt}")


async def test_kvp_and_conditional_requests_match_the_route(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        await runtime.refresh()
        lim = runtime.catalog.layers["S"].limits["10"]
        fast = await client.get(_kvp("S", lim.min_row, lim.min_col))
        # SERVICE=wmts (case-insensitive for the route) is not the plain form: it takes the full path
        routed = await client.get(_kvp("S", lim.min_row, lim.min_col, service="wmts"))
        rest = await client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png")
        assert fast.status_code == routed.status_code == rest.status_code == 200
        assert fast.content == routed.content == rest.content
        for header in ("content-type", "cache-control", "etag", "access-control-allow-origin", "content-length"):
            assert fast.headers[header] == routed.headers[header] == rest.headers[header], header
        assert fast.headers["x-request-id"] != routed.headers["x-request-id"]
        # If-None-Match: 304 without body or Content-Type, the same from both paths
        etag = fast.headers["etag"]
        for url in (_kvp("S", lim.min_row, lim.min_col), _kvp("S", lim.min_row, lim.min_col, service="wmts"),
                    f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"):
            answer = await client.get(url, headers={"If-None-Match": f'"x", {etag}'})
            assert answer.status_code == 304 and answer.content == b"", url
            assert "content-type" not in answer.headers and answer.headers["etag"] == etag
        # a tile elsewhere does not match that validator
        other = await client.get(_kvp("S", lim.min_row, lim.min_col + 1), headers={"If-None-Match": etag})
        assert other.status_code == 200 and other.headers["etag"] != etag
        # errors keep the route's wording: out of range, missing parameter, bad format, repeated parameter
        out = await client.get(_kvp("S", lim.max_row + 5, lim.min_col))
        assert out.status_code == 400 and b"TileOutOfRange" in out.content
        missing = await client.get(_kvp("S", lim.min_row, lim.min_col).replace("&TILECOL=", "&X="))
        assert missing.status_code == 400 and b"MissingParameterValue" in missing.content
        jpeg = await client.get(_kvp("S", lim.min_row, lim.min_col, fmt="image/jpeg"))
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        twice = await client.get(_kvp("S", lim.min_row, lim.min_col) + "&LAYER=S")
        assert twice.status_code in (200, 400)  # the route decides; never a 500


async def test_a_new_catalog_is_seen_by_the_next_tile(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        await runtime.refresh()
        lim = runtime.catalog.layers["S"].limits["10"]
        url = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
        first = await client.get(url)
        assert first.status_code == 200
        runtime.store.put_layer(parse_layer("S", layer_descriptor("SCAN1000", cache_control="max-age=7")))
        await runtime.refresh()
        assert (await client.get(url)).headers["cache-control"] == "max-age=7"
        runtime.store.set_restricted("S", True)
        await runtime.refresh()
        assert (await client.get(url)).status_code == 400  # restricted: only the route answers, with a key
        runtime.store.remove_layer("S")
        await runtime.refresh()
        gone = await client.get(url)
        assert gone.status_code == 400 and b"unknown layer" in gone.content


# --------------------------------------------------------------------------- fast path on vs off

_SEGMENT = st.sampled_from(["S", "R", "X", "normal", "PM", "10", "9", "11", "s", ""])
_EXT = st.sampled_from(["png", "jpeg", "tif", "PNG", "webp", "png.", ""])


@st.composite
def _tile_request(draw, lim) -> tuple[str, str, dict[str, str]]:
    """A WMTS tile request near the layer's limits: REST or KVP, valid or not, HEAD or GET,
    with or without a validator."""
    near = draw(st.integers(0, 4)) == 0  # mostly inside the limits, sometimes just outside
    row = draw(st.integers(lim.min_row - 2 * near, lim.max_row + 2 * near))
    col = draw(st.integers(lim.min_col - 2 * near, lim.max_col + 2 * near))
    layer = draw(st.sampled_from(["S", "S", "S", "R", "X"]))
    style = draw(st.sampled_from(["normal", "normal", "other"]))
    tms = draw(st.sampled_from(["PM", "PM", "PM", "WGS84"]))
    z = draw(st.sampled_from(["10", "10", "9", "21", "x"]))
    if draw(st.booleans()):
        ext = draw(_EXT)
        path = f"/wmts/1.0.0/{layer}/{style}/{tms}/{z}/{row}/{col}" + (f".{ext}" if ext else "")
        if draw(st.integers(0, 9)) == 0:
            path = path.replace(f"/{layer}/", f"/{draw(_SEGMENT)}/")
        if draw(st.integers(0, 9)) == 0:
            path += "?x=1"
    else:
        fmt = draw(st.sampled_from(["image%2Fpng", "image/png", "image%2Fjpeg", "image%2Fwebp"]))
        service = draw(st.sampled_from(["WMTS", "WMTS", "wmts"]))
        pairs = [f"SERVICE={service}", "REQUEST=GetTile", "VERSION=1.0.0", f"LAYER={layer}", f"STYLE={style}",
                 f"TILEMATRIXSET={tms}", f"TILEMATRIX={z}", f"TILEROW={row}", f"TILECOL={col}", f"FORMAT={fmt}"]
        drop = draw(st.integers(-1, len(pairs) - 1))
        if drop >= 2 and draw(st.integers(0, 4)) == 0:
            del pairs[drop]
        if draw(st.integers(0, 19)) == 0:
            pairs.append(f"LAYER={layer}")
        path = "/wmts?" + "&".join(draw(st.permutations(pairs)))
    method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
    headers = {}
    if draw(st.booleans()):
        headers["If-None-Match"] = draw(st.sampled_from(["ETAG", '"nope"', '"x", ETAG', "*"]))
    if draw(st.integers(0, 4)) == 0:
        headers["Accept-Encoding"] = draw(st.sampled_from(["gzip", "identity", "br, gzip"]))
    return method, path, headers


def _comparable(answer) -> tuple:
    headers = sorted((k.lower(), v) for k, v in answer.headers.multi_items() if k.lower() != "x-request-id")
    return answer.status_code, answer.content, headers


def test_fast_path_on_and_off_answer_the_same(tmp_path):
    """Status, body and every header (but the request id) with the fast path on and off, over the
    same application: the fast path is one decision with the routed path, never another answer."""
    loop = asyncio.new_event_loop()
    context = app_client(make_settings(tmp_path))
    client = loop.run_until_complete(context.__aenter__())
    try:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        runtime.store.add_layer(parse_layer("R", layer_descriptor("SCAN1000", restricted=True)))
        loop.run_until_complete(runtime.refresh())
        lim = runtime.catalog.layers["S"].limits["10"]
        on = runtime.settings
        off = replace(on, fast_tiles=False)
        etag = loop.run_until_complete(
            client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png")).headers["etag"]
        seen = {"fast": 0}

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # the same examples every run: no flaky count
        @given(request=_tile_request(lim))
        def check(request) -> None:
            method, path, headers = request
            headers = {k: v.replace("ETAG", etag) for k, v in headers.items()}
            runtime.settings = off
            routed = loop.run_until_complete(client.request(method, path, headers=headers))
            runtime.settings = on
            fast = loop.run_until_complete(client.request(method, path, headers=headers))
            assert _comparable(fast) == _comparable(routed), (method, path, headers)
            seen["fast"] += fast.status_code in (200, 304)

        check()
        assert seen["fast"] >= 5  # the generator does reach the fast path's own answers (7 of the fixed examples)
    finally:
        runtime.settings = on
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()
