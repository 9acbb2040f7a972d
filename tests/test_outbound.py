"""No server-side request forgery: URLs an `/api` user names (a configuration's GetFeatureInfo
server, a harvest execution's WMS) reach only hosts the outbound policy allows, checked after DNS
and on every redirect; relayed answers keep the requested info format only, with `nosniff`; logs
never quote a remote body. The "internal" targets are real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from apputil import layer_descriptor, live_server
from test_warehouse_support import BASE, add_user, api_client, wait_for, warehouse_settings

from tileserver.outbound import (
    AllowRule,
    GuardedResolver,
    OutboundError,
    OutboundPolicy,
    OutboundRefused,
    address_problem,
    client_session,
    fetch,
)
from tileserver.publication.store import Conflict
from tileserver.settings import load_settings
from tileserver.warehouse.endpoints import WMS_R
from tileserver.warehouse.processings import WMS_TO_PYRAMID

SECRET = "INTERNAL-SECRET-7f3a"
ADMIN = {"Authorization": "Bearer secret"}
GFI = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetFeatureInfo", "STYLES": "", "CRS": "EPSG:4326",
       "BBOX": "46,1.4,46.4,2.2", "WIDTH": "100", "HEIGHT": "50", "I": "10", "J": "20"}


# --- an "internal" service on loopback ---------------------------------------------------------------


class Internal(ThreadingHTTPServer):
    """Answers by path: /secret (text/plain), /json, /html, /xml, /error (400 with a body), /to?url=…
    (302 there), /loop (302 to itself); records every path asked."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: list[str] = []
        self.redirect_to = ""

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Handler(BaseHTTPRequestHandler):
    server: Internal

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        self.server.hits.append(path)
        answers = {
            "/secret": (200, "text/plain", SECRET), "/json": (200, "application/json", json.dumps({"secret": SECRET})),
            "/html": (200, "text/html; charset=utf-8", f"<script>alert('{SECRET}')</script>"),
            "/xml": (200, "application/vnd.ogc.gml", f"<FeatureCollection>{SECRET}</FeatureCollection>"),
            "/error": (400, "text/xml", f"<ServiceException>{SECRET}</ServiceException>"),
        }
        if path in ("/to", "/loop"):
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to if path == "/to" else "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, kind, text = answers.get(path, (404, "text/plain", "no"))
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def internal() -> Iterator[Internal]:
    server = Internal()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class FixedResolver(AbstractResolver):
    """A DNS that answers every name with the given addresses (what an attacker's zone can do)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        self.asked.append(host)
        return [{"hostname": host, "host": a, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET} for a in self.addresses]

    async def close(self) -> None:
        pass


# --- the policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12:3456::1", "private"), ("100.64.0.1", "CGNAT"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"), ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "cloud metadata"),
    ("64:ff9b::a00:1", "private"), ("240.0.0.1", "reserved"), ("8.8.8.8", None), ("2001:4860:4860::8888", None),
])
def test_address_problems(address: str, problem: str | None) -> None:
    found = address_problem(ipaddress.ip_address(address))
    assert (found is None) if problem is None else (found is not None and found.startswith(problem)), found


def test_allow_rules() -> None:
    policy = OutboundPolicy((AllowRule.parse("wms.intranet"), AllowRule.parse("*.corp.example:8443"),
                             AllowRule.parse("10.20.0.0/16"), AllowRule.parse("127.0.0.1:8080"),
                             AllowRule.parse("[::1]:9090")))
    policy.check_address("wms.intranet", 80, "10.9.9.9")  # a named host is allowed whatever it resolves to
    policy.check_address("a.corp.example", 8443, "192.168.0.1")
    policy.check_address("x", 80, "10.20.3.4")
    policy.check_address("127.0.0.1", 8080, "127.0.0.1")
    policy.check_address("::1", 9090, "::1")
    for host, port, address in (("a.corp.example", 443, "192.168.0.1"), ("corp.example", 8443, "192.168.0.1"),
                                ("x", 80, "10.21.0.1"), ("127.0.0.1", 8081, "127.0.0.1"), ("::1", 80, "::1")):
        with pytest.raises(OutboundRefused):
            policy.check_address(host, port, address)
    with pytest.raises(ValueError):
        AllowRule.parse("not a host!")
    with pytest.raises(ValueError):
        AllowRule.parse("host:99999")
    strict = OutboundPolicy((AllowRule.parse("wms.example.org"),), allow_public=False)
    with pytest.raises(OutboundRefused, match="not in outbound_allow"):
        strict.check_url("https://other.example.org/wms")
    strict.check_url("https://wms.example.org/wms")
    for url in ("file:///etc/passwd", "ftp://wms.example.org/", "http:///nohost"):
        with pytest.raises(OutboundRefused):
            OutboundPolicy().check_url(url)


def test_settings_from_the_environment() -> None:
    settings = load_settings(env={"TILESERVER_OUTBOUND_ALLOW": "127.0.0.1:8080, wms.intranet",
                                  "TILESERVER_OUTBOUND_ALLOW_PUBLIC": "false"})
    assert settings.outbound_allow == ("127.0.0.1:8080", "wms.intranet") and settings.outbound_allow_public is False
    policy = OutboundPolicy.from_settings(settings)
    assert policy.host_allowed("wms.intranet", 80) and not policy.allow_public and policy.max_redirects == 3


# --- fetching: after DNS, on every redirect --------------------------------------------------------------


async def test_a_public_looking_name_resolving_to_loopback_is_refused() -> None:
    policy = OutboundPolicy()
    with internal() as target:
        for addresses in (("127.0.0.1",), ("::1",), ("127.0.0.1", "::1")):
            resolver = FixedResolver(*addresses)
            async with client_session(policy, 5, resolver=resolver) as session:
                with pytest.raises(OutboundRefused, match="loopback"):
                    await fetch(session, f"http://wms.public-looking.example:{target.port}/secret", policy)
            assert resolver.asked  # refused on the resolved address, not on the name
        # the system's resolver too: localhost
        async with client_session(policy, 5) as session:
            with pytest.raises(OutboundRefused, match="loopback"):
                await fetch(session, f"http://localhost:{target.port}/secret", policy)
        assert target.hits == []
        # allowed by name: the connection goes to the address the resolver gave, the one checked
        allowed = OutboundPolicy((AllowRule.parse("wms.public-looking.example"),))
        async with client_session(allowed, 5, resolver=FixedResolver("127.0.0.1")) as session:
            answer = await fetch(session, f"http://wms.public-looking.example:{target.port}/secret", allowed)
        assert answer.status == 200 and answer.body == SECRET.encode() and target.hits == ["/secret"]


async def test_resolver_is_asked_at_every_connection() -> None:
    """What a name resolved to when it was stored does not matter: each fetch resolves and checks."""
    resolver = FixedResolver("127.0.0.1")
    allowed = OutboundPolicy((AllowRule.parse("rebind.example"),))
    with internal() as target:
        async with client_session(allowed, 5, resolver=GuardedResolver(allowed, resolver)) as session:
            assert (await fetch(session, f"http://rebind.example:{target.port}/secret", allowed)).status == 200
        policy = OutboundPolicy()
        with pytest.raises(OutboundRefused):
            async with client_session(policy, 5, resolver=resolver) as session:
                await fetch(session, f"http://rebind.example:{target.port}/secret", policy)
    assert target.hits == ["/secret"]


async def test_redirects_are_checked_and_capped() -> None:
    with internal() as a, internal() as b:
        policy = OutboundPolicy((AllowRule.parse(f"127.0.0.1:{a.port}"),))
        for where in (f"{b.url}/secret", f"http://localhost:{b.port}/secret", f"http://[::1]:{b.port}/secret"):
            a.redirect_to = where
            async with client_session(policy, 5) as session:
                with pytest.raises(OutboundRefused):
                    await fetch(session, f"{a.url}/to", policy)
        assert b.hits == [] and a.hits == ["/to"] * 3
        a.redirect_to = f"{a.url}/secret"  # a redirect to an allowed host is followed
        async with client_session(policy, 5) as session:
            assert (await fetch(session, f"{a.url}/to", policy)).body == SECRET.encode()
            with pytest.raises(OutboundError, match="more than 3 redirects"):
                await fetch(session, f"{a.url}/loop", policy)
        assert a.hits.count("/loop") == 4
        # a body over the limit is not read
        async with client_session(policy, 5) as session:
            with pytest.raises(OutboundError, match="exceeds the limit"):
                await fetch(session, f"{a.url}/secret", policy, max_bytes=4)


async def test_the_operator_keeps_its_freedom() -> None:
    with internal() as target:
        async with client_session(None, 5) as session:
            answer = await fetch(session, f"{target.url}/secret", None)
        assert answer.status == 200 and answer.body == SECRET.encode()


# --- through the warehouse API, against a real server -----------------------------------------------------


def _stored_scan(url: str, client: httpx.Client) -> str:
    """A GENERATED stored data: the admin API's SCAN1000 pyramid shows in the default datastore."""
    answer = httpx.put(f"{url}/admin/layers/SCAN1000", json=layer_descriptor("SCAN1000"), headers=ADMIN)
    if answer.status_code == 404:
        answer = httpx.post(f"{url}/admin/layers/SCAN1000", json=layer_descriptor("SCAN1000"), headers=ADMIN)
    assert answer.status_code in (201, 204), answer.text
    return next(s["_id"] for s in client.get(f"{BASE}/stored_data").json() if s["name"] == "SCAN1000")


def _configuration(stored: str, name: str, server_url: str) -> dict:
    return {"type": "WMS-RASTER", "name": name, "layer_name": name,
            "type_infos": {"title": name, "abstract": name,
                           "used_data": [{"stored_data": stored, "bottom_level": "10", "top_level": "9"}]},
            "getfeatureinfo": {"server_url": server_url, "layers": "remote"}}


def _publish(client: httpx.Client, stored: str, name: str, server_url: str) -> None:
    created = client.post(f"{BASE}/configurations", json=_configuration(stored, name, server_url))
    assert created.status_code == 201, created.text
    endpoint = next(e["endpoint"]["_id"] for e in client.get(BASE).json()["endpoints"]
                    if e["endpoint"]["technical_name"] == WMS_R)
    offer = client.post(f"{BASE}/configurations/{created.json()['_id']}/offerings",
                        json={"endpoint": endpoint, "open": True})
    assert offer.status_code == 201, offer.text


def _problems(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 400, answer.text
    return answer.json()["error_description"]


@contextlib.contextmanager
def _server(tmp_path: Path, **overrides: object) -> Iterator[tuple[str, httpx.Client]]:
    settings = warehouse_settings(tmp_path, **overrides)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Conflict):  # a second server on the same data
        add_user(settings)
    with live_server(settings) as url, contextlib.closing(api_client(url)) as client:
        yield url, client


def test_configuration_server_url_is_checked_when_stored(tmp_path: Path) -> None:
    with internal() as target, _server(tmp_path) as (url, client):
        stored = _stored_scan(url, client)
        for bad in (f"{target.url}/secret", f"http://localhost:{target.port}/secret", "http://169.254.169.254/x",
                    "http://[fd00:ec2::254]/x", "http://10.0.0.1/wms", "file:///etc/passwd"):
            problems = _problems(client.post(f"{BASE}/configurations", json=_configuration(stored, "c", bad)))
            assert len(problems) == 1 and problems[0].startswith("getfeatureinfo.server_url:"), problems
        nested = _configuration(stored, "c", f"{target.url}/secret")
        nested["type_infos"]["getfeatureinfo"] = nested.pop("getfeatureinfo")
        assert _problems(client.post(f"{BASE}/configurations", json=nested))[0].startswith(
            "type_infos.getfeatureinfo.server_url:")
        # a name that does not resolve now is accepted: the relay checks again at each request
        later = client.post(f"{BASE}/configurations", json=_configuration(stored, "c", "http://wms.invalid/wms"))
        assert later.status_code == 201, later.text
        assert target.hits == []


def test_feature_info_relay_of_an_api_layer(tmp_path: Path) -> None:
    with internal() as a, internal() as b:
        with _server(tmp_path, outbound_allow=(f"127.0.0.1:{a.port}",)) as (url, client):
            stored = _stored_scan(url, client)
            # the allow-list lets a host through; another port of the same address is still refused
            assert _problems(client.post(f"{BASE}/configurations", json=_configuration(
                stored, "c", f"{b.url}/secret")))[0].startswith("getfeatureinfo.server_url:")
            for name in ("json", "html", "xml", "secret", "to", "error"):
                _publish(client, stored, f"gfi_{name}", f"{a.url}/{name}")

            def info(layer: str, info_format: str) -> httpx.Response:
                return httpx.get(f"{url}/wms", params={**GFI, "LAYERS": layer, "QUERY_LAYERS": layer,
                                                        "INFO_FORMAT": info_format})

            answer = info("gfi_json", "application/json")
            assert answer.status_code == 200 and SECRET in answer.text
            assert answer.headers["content-type"] == "application/json"
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["content-security-policy"] == "sandbox"
            gml = info("gfi_xml", "application/vnd.ogc.gml")
            assert gml.status_code == 200 and gml.headers["content-type"] == "application/vnd.ogc.gml"
            # HTML asked and answered: relayed, but sandboxed (no script of another host runs on our origin)
            html = info("gfi_html", "text/html")
            assert html.status_code == 200 and html.headers["content-type"] == "text/html; charset=utf-8"
            assert html.headers["content-security-policy"] == "sandbox"
            assert html.headers["x-content-type-options"] == "nosniff"
            # anything but the requested format is not relayed: an OWS exception, no remote text
            for layer, info_format in (("gfi_html", "application/json"), ("gfi_html", "text/plain"),
                                       ("gfi_secret", "text/html"), ("gfi_json", "text/xml"),
                                       ("gfi_error", "text/xml")):
                refused = info(layer, info_format)
                assert refused.status_code == 502 and "ServiceException" in refused.text, (layer, refused.text)
                assert SECRET not in refused.text and "script" not in refused.text
            # a redirect from the allowed host to one that is not: refused, the other host never asked
            for where in (f"{b.url}/secret", f"http://localhost:{b.port}/secret"):
                a.redirect_to = where
                redirected = info("gfi_to", "text/plain")
                assert redirected.status_code == 502 and "not an allowed host" in redirected.text
            assert b.hits == []
            a.redirect_to = f"{a.url}/secret"
            assert info("gfi_to", "text/plain").text == SECRET
        # the same layers under a server without the allow-list: refused at fetch time, nothing asked
        a.hits.clear()
        with _server(tmp_path) as (url, client):
            refused = httpx.get(f"{url}/wms", params={**GFI, "LAYERS": "gfi_json", "QUERY_LAYERS": "gfi_json",
                                                      "INFO_FORMAT": "application/json"})
            assert refused.status_code == 502 and "not an allowed host" in refused.text
            assert a.hits == []


def test_admin_layers_may_name_internal_hosts(tmp_path: Path) -> None:
    with internal() as target, _server(tmp_path) as (url, _client):
        gfi = {"type": "EXTERNALWMS", "url": f"{target.url}/json", "layers": "x"}
        answer = httpx.put(f"{url}/admin/layers/OPS", json=layer_descriptor("SCAN1000", get_feature_info=gfi),
                           headers=ADMIN)
        if answer.status_code == 404:
            answer = httpx.post(f"{url}/admin/layers/OPS", json=layer_descriptor("SCAN1000", get_feature_info=gfi),
                                headers=ADMIN)
        assert answer.status_code in (201, 204), answer.text
        info = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(httpx.get(
            f"{url}/wms", params={**GFI, "LAYERS": "OPS", "QUERY_LAYERS": "OPS", "INFO_FORMAT": "application/json"})))
        assert SECRET in info.text and info.headers["x-content-type-options"] == "nosniff"
        # the operator's layer still relays only the requested format
        wrong = httpx.get(f"{url}/wms", params={**GFI, "LAYERS": "OPS", "QUERY_LAYERS": "OPS",
                                                "INFO_FORMAT": "text/html"})
        assert wrong.status_code == 502 and SECRET not in wrong.text


def _harvest(client: httpx.Client, url: str) -> httpx.Response:
    processing = client.get(f"{BASE}/processings", params={"name": WMS_TO_PYRAMID}).json()[0]["_id"]
    return client.post(f"{BASE}/processings/executions", json={
        "processing": processing, "inputs": {}, "output": {"stored_data": {"name": "moisson"}},
        "parameters": {"tms": "PM", "compression": "png", "harvest_layers": "L", "harvest_url": url,
                       "samplesperpixel": 3, "sampleformat": "UINT8", "bottom": "10", "top": "10",
                       "harvest_levels": ["10"], "width": 2, "height": 2, "harvest_format": "image/png",
                       "harvest_area": "POLYGON((1.5 46.2,2.3 46.2,2.3 46.5,1.5 46.5,1.5 46.2))"}})


def _run_to_the_end(client: httpx.Client, execution: dict) -> tuple[dict, str]:
    path = f"{BASE}/processings/executions/{execution['_id']}"
    client.post(f"{path}/launch").raise_for_status()
    done = wait_for(lambda: (lambda e: e if e["status"] in ("SUCCESS", "FAILURE") else None)(client.get(path).json()),
                    timeout=60)
    return done, "\n".join(client.get(f"{path}/logs").json())


def test_harvest_url_is_checked_and_never_echoed(tmp_path: Path) -> None:
    with internal() as a, internal() as b:
        with _server(tmp_path, outbound_allow=(f"127.0.0.1:{a.port}",)) as (_url, client):
            for bad in (f"{b.url}/secret", f"http://localhost:{b.port}/secret", "http://169.254.169.254/wms",
                        "http://[::1]/wms"):
                problems = _problems(_harvest(client, bad))
                assert len(problems) == 1 and problems[0].startswith("parameters.harvest_url:"), problems
            # an allowed host answering an error: the logs say status, type and length, not the body
            created = _harvest(client, f"{a.url}/error")
            assert created.status_code == 201, created.text
            done, logs = _run_to_the_end(client, created.json())
            assert done["status"] == "FAILURE" and "HTTP 400, text/xml," in logs and "bytes" in logs, logs
            assert SECRET not in logs and "ServiceException" not in logs
            # an allowed host redirecting inside: the execution fails, the other host is never asked
            a.redirect_to = f"{b.url}/secret"
            created = _harvest(client, f"{a.url}/to")
            assert created.status_code == 201, created.text
            done, logs = _run_to_the_end(client, created.json())
            assert done["status"] == "FAILURE" and "loopback" in logs and SECRET not in logs, logs
            assert b.hits == [] and "/to" in a.hits
