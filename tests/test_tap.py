"""
The twistd plugin, its options, and the package that ships it.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

import aigateway
from aigateway.store.postgres import redacted
from aigateway.tap import Options

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["proxy"], "tcp:8000")
        self.assertEqual(options["admin"], "tcp:8001:interface=127.0.0.1")
        self.assertEqual(options["database"], "aigateway.db")

    def test_db_update_frequency(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["db-update-frequency"], 1.0)
        options.parseOptions(["--db-update-frequency", "0.25"])
        self.assertEqual(options["db-update-frequency"], 0.25)
        for bad in ("-1", "soon", "100000"):
            with self.assertRaises(UsageError):
                Options().parseOptions(["--db-update-frequency", bad])

    def test_drain_timeout(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["drain-timeout"], 30.0)
        options.parseOptions(["--drain-timeout", "0"])
        self.assertEqual(options["drain-timeout"], 0.0)
        with self.assertRaises(UsageError):
            Options().parseOptions(["--drain-timeout", "-5"])

    def test_bad_endpoint(self):
        with self.assertRaises(UsageError):
            Options().parseOptions(["--proxy", "carrier-pigeon:1"])

    def test_database_url(self):
        options = Options()
        options.parseOptions(["--database", "postgresql://gw:secret@db:5432/gw"])
        self.assertEqual(options["database"], "postgresql://gw:secret@db:5432/gw")
        for refused in (
            "mysql://gw:secret@db/gw",
            "host=db dbname=gw password=secret",  # libpq's other form
            "postgresql://gw:sec%zzret@db/gw",  # not a valid URL
        ):
            with self.assertRaises(UsageError) as caught:
                Options().parseOptions(["--database", refused])
            self.assertNotIn("secret", str(caught.exception))
            self.assertNotIn("sec%zzret", str(caught.exception))

    def test_database_url_redacted(self):
        self.assertEqual(
            redacted("postgresql://gw:s3cret@[::1]:5433/gw?sslmode=require"),
            "postgresql://gw:***@[::1]:5433/gw?sslmode=require",
        )
        self.assertEqual(redacted("postgresql://db/gw"), "postgresql://db/gw")
        self.assertEqual(
            redacted("postgresql://db/gw?user=gw&password=s3cret"),
            "postgresql://db/gw?user=gw&password=***",
        )

    def test_invalid_config_refused_with_every_error(self):
        path = os.path.join(tempfile.mkdtemp(), "gateway.yaml")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "w") as f:
            f.write("_format_version: '3.0'\nupstreams:\n- name: 'a b'\n  slots: 1\n")
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--config", path])
        message = str(caught.exception)
        self.assertIn("upstreams[0].name", message)
        self.assertIn("upstreams[0].slots", message)
        with self.assertRaises(UsageError):
            Options().parseOptions(["--config", path + ".missing"])


def test_public_names():
    """
    The public surface stays small.
    """
    assert sorted(aigateway.__all__) == [
        "IBalancer",
        "IBalancerFactory",
        "IHealthView",
        "ISuccessor",
        "PickContext",
        "__version__",
    ]


def test_twistd_lists_plugin_and_options():
    listed = subprocess.run(
        [str(BIN / "twistd"), "--help"], capture_output=True, text=True
    )
    assert "aigateway" in listed.stdout
    helped = subprocess.run(
        [str(BIN / "twistd"), "aigateway", "--help"], capture_output=True, text=True
    )
    for option in ("--proxy", "--admin", "--database", "tcp:8000", "aigateway.db"):
        assert option in helped.stdout


def test_dropin_does_not_import_reactor():
    """
    twistd imports drop-ins before installing the reactor named by
    --reactor, so the drop-in and the tap module must not import one.
    """
    code = (
        "import sys, twisted.plugins.aigateway_plugin as p, aigateway.tap;"
        "import twisted.plugins.aigateway_endpoints, twisted.plugins.aigateway_reactor;"
        "p.aigateway.options;"
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_wheel_ships_the_plugin(tmp_path):
    """
    A clean wheel build carries twisted/plugins (plain find: would leave it
    out silently) and the balancer drop-ins.
    """
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("aigateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/aigateway_plugin.py" in names
    assert "twisted/plugins/aigateway_endpoints.py" in names
    assert "twisted/plugins/aigateway_reactor.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "aigateway/plugins/aigateway_balancers.py" in names
    assert "aigateway/py.typed" in names


def test_listen_backlog_default():
    """
    TCP and TLS listeners get a backlog of 1024 unless the endpoint names
    one; other endpoints are left alone.
    """
    from aigateway.service import with_backlog

    assert with_backlog("tcp:8000") == "tcp:8000:backlog=1024"
    assert with_backlog("tcp:8000:interface=127.0.0.1").endswith(":backlog=1024")
    assert with_backlog("tcp:8000:backlog=5") == "tcp:8000:backlog=5"
    assert with_backlog("unix:/run/gw.sock") == "unix:/run/gw.sock"


def test_version_is_aigateways(capsys):
    from aigateway._version import __version__

    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"aigateway {__version__} ")
