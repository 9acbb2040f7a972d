"""The WMTS REST fast path answers exactly what the routed path answers, and hands everything else on."""

from __future__ import annotations

from apputil import app_client, layer_descriptor, make_settings

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
