"""ROK4's own server (C++, built by ../shared/tools/rok4/build.sh into /opt/rok4) as a benchmark peer.

As `serve.sh` of that recipe deploys it (a rok4 FastCGI process behind one nginx worker), but each
layer lists the styles and CRSs the benchmark asks for (serve.sh offers `normal` and three CRSs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

PREFIX = Path(os.environ.get("ROK4_PREFIX", "/opt/rok4"))
# the recipe beside the project checkout (../shared/tools/rok4), or ROK4_RECIPE
RECIPE = Path(os.environ.get("ROK4_RECIPE", Path(__file__).resolve().parents[2] / "shared" / "tools" / "rok4"))


def available() -> bool:
    return (PREFIX / "bin" / "rok4").exists() and shutil.which("nginx") is not None and (RECIPE / "services.json.in").exists()


class Rok4:
    """One rok4 process (`threads` threads) and one nginx worker in front, on 127.0.0.1:port."""

    def __init__(self, run: Path, pyramids: Path, tms: Path, styles: Path, port: int,
                 layers: dict[str, list[str]], crs: list[str], threads: int = 4) -> None:
        self.run, self.port = run, port
        run.mkdir(parents=True, exist_ok=True)
        (run / "layers").mkdir(exist_ok=True)
        (run / "nginx").mkdir(exist_ok=True)
        names = []
        for name, layer_styles in layers.items():
            descriptor = json.loads((pyramids / f"{name}.json").read_text())
            ids = [lv["id"] for lv in descriptor["levels"]]
            layer = {"title": name, "abstract": name, "keywords": [], "styles": layer_styles,
                     "pyramids": [{"path": str(pyramids / f"{name}.json"), "bottom_level": max(ids, key=int),
                                   "top_level": min(ids, key=int)}],
                     "extra_crs": crs, "get_feature_info": {"type": "PYRAMID"}}
            path = run / "layers" / f"{name}.json"
            path.write_text(json.dumps(layer))
            names.append(str(path))
        (run / "layers.txt").write_text("\n".join(names) + "\n")
        shutil.copy(RECIPE / "equals_crs.json", run / "equals_crs.json")
        services = json.loads((RECIPE / "services.json.in").read_text().replace("@RUN@", str(run))
                              .replace("@PORT@", str(port)))
        services["global"]["map"]["crs"] = sorted(set(services["global"]["map"]["crs"]) | set(crs))
        (run / "services.json").write_text(json.dumps(services))
        fcgi = port + 1000
        (run / "server.json").write_text(json.dumps({
            "logger": {"output": "standard_output", "level": "error"}, "threads": threads,
            "port": f"127.0.0.1:{fcgi}", "backlog": 128, "cache": {"size": 1000, "validity": 60},
            "configurations": {"services": str(run / "services.json"), "layers": str(run / "layers.txt"),
                               "styles": str(styles), "tile_matrix_sets": str(tms)}}))
        (run / "nginx.conf").write_text(f"""worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx.error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off; keepalive_requests 100000;
  client_body_temp_path {run}/nginx/cb; fastcgi_temp_path {run}/nginx/fc; proxy_temp_path {run}/nginx/px;
  uwsgi_temp_path {run}/nginx/uw; scgi_temp_path {run}/nginx/sc;
  upstream rok4 {{ server 127.0.0.1:{fcgi}; }}
  server {{ listen 127.0.0.1:{port}; location / {{ fastcgi_pass rok4; include /etc/nginx/fastcgi_params; }} }}
}}
""")
        env = {**os.environ, "ROK4_TMS_DIRECTORY": str(tms), "ROK4_STYLES_DIRECTORY": str(styles)}
        self.log = open(run / "rok4.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([str(PREFIX / "bin" / "rok4"), "-f", str(run / "server.json")], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        subprocess.run(["nginx", "-c", str(run / "nginx.conf"), "-p", str(run / "nginx") + "/"], check=True)
        for _ in range(900):  # ROK4 checks every CRS of equals_crs.json with PROJ at startup: slow on a busy box
            try:
                with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ROK4 did not answer; see {run}/rok4.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        """The processes whose CPU a request costs: rok4 and the nginx worker(s) and master."""
        out = [self.process.pid]
        try:
            master = int((self.run / "nginx.pid").read_text())
            out.append(master)
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
            out += [int(c) for c in children]
        except (OSError, ValueError):
            pass
        return out

    def stop(self) -> None:
        try:
            os.kill(int((self.run / "nginx.pid").read_text()), signal.SIGQUIT)
        except (OSError, ValueError):
            pass
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
