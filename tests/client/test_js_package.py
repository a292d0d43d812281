"""The browser client package (clients/js, @pgpush/client): its Node unit tests, and `npm pack` proving the
package is complete: the tarball holds exactly what should ship, and the installed package imports through
its `exports`. Skipped without node and npm, unless PGPUSH_REQUIRE_NODE=1 (CI) makes that a failure.

The package's behaviour in a browser, against the real server, is tested in tests/browser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "js"
SHIPPED = {"package.json", "README.md", "src/index.js", "src/index.d.ts"}

NODE, NPM = shutil.which("node"), shutil.which("npm")
if NODE is None or NPM is None:
    absent = " and ".join(name for name, path in (("node", NODE), ("npm", NPM)) if path is None)
    reason = f"{absent} missing (apt-get install nodejs npm)"
    if os.environ.get("PGPUSH_REQUIRE_NODE") == "1":
        raise RuntimeError(f"the JS package tests are required here but {reason}")
    pytest.skip(f"the JS package tests need Node: {reason}", allow_module_level=True)

pytestmark = pytest.mark.timeout(300)


def npm_environment(tmp_path: Path) -> dict[str, str]:
    """npm with a cache of the test's own, offline, quiet: the package has no dependencies to fetch."""
    return os.environ | {
        "npm_config_cache": str(tmp_path / "npm-cache"),
        "npm_config_offline": "true",
        "npm_config_audit": "false",
        "npm_config_fund": "false",
        "npm_config_update_notifier": "false",
        "npm_config_loglevel": "warn",
    }


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False)
    command = " ".join(args)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_the_node_unit_tests_pass(tmp_path: Path) -> None:
    # TAP whatever the Node version's default reporter: its summary lines are `# pass <n>`, `# fail <n>`.
    result = run([str(NPM), "test", "--", "--test-reporter=tap"], PACKAGE, npm_environment(tmp_path))
    summary = dict(line[2:].split(maxsplit=1) for line in result.stdout.splitlines() if line.startswith("# "))
    assert int(summary["fail"]) == 0 and int(summary["pass"]) >= 20, result.stdout


def test_npm_pack_ships_exactly_the_module_and_its_types_and_the_package_imports(tmp_path: Path) -> None:
    env = npm_environment(tmp_path)
    packed = run([str(NPM), "pack", "--json", "--pack-destination", str(tmp_path)], PACKAGE, env)
    [report] = json.loads(packed.stdout)
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert (report["name"], report["version"]) == ("@pgpush/client", manifest["version"])
    tarball = tmp_path / report["filename"]
    with tarfile.open(tarball) as tar:
        names = {name.removeprefix("package/") for name in tar.getnames()}
    assert names == SHIPPED
    assert manifest.get("dependencies", {}) == {}, "no runtime dependencies"
    pyproject = (PACKAGE.parents[1] / "pyproject.toml").read_text()
    assert f'version = "{manifest["version"]}"' in pyproject, "the client's version is the service's"

    # Installed from the tarball alone (offline: nothing to fetch), it imports through `exports`.
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    run([str(NPM), "install", "--no-save", str(tarball)], app, env)
    check = """
      import("@pgpush/client").then((m) => {
        const names = ["connect", "isControl", "readEvents"];
        if (!names.every((name) => typeof m[name] === "function")) process.exit(1);
        if (!m.isControl("pause") || m.isControl("lead")) process.exit(2);
        const handle = m.connect({ url: "http://127.0.0.1:1/events", shared: false });
        if (typeof handle.close !== "function") process.exit(3);
        handle.close();
        console.log(JSON.stringify(handle.status));
      });
    """
    result = run([str(NODE), "--input-type=module", "-e", check], app, env)
    assert json.loads(result.stdout) == {"state": "closed", "leader": False, "lastEventId": None}
    installed = app / "node_modules" / "@pgpush" / "client"
    types = json.loads((installed / "package.json").read_text())["exports"]["."]["types"]
    assert (installed / types).is_file() and (installed / manifest["types"]).is_file()
