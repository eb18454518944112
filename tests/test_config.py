"""One settings object: TOML file, then DICOMNODE_* environment overrides (lists and tables as JSON)."""
from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import Peer, Settings, SettingsError, load_settings, settings_reference, unknown_env


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_defaults_without_file_or_env() -> None:
    s = load_settings(None, environ={})
    assert s == Settings()
    assert s.index_url.startswith("sqlite:///") and s.index_url.endswith("index.sqlite3")


def test_toml_then_env_overrides(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
ae_title = "SITEA"
port = 4242
allowed_peers = ["PACS1", "PACS2@10.0.0.5", {ae_title = "PACS3", host = "10.1.0.0/16"}]
quiet_period_s = 30
[tls]
cert_file = "/etc/node.crt"
key_file = "/etc/node.key"
""",
    )
    env = {
        "DICOMNODE_PORT": "5555",
        "DICOMNODE_ALLOWED_PEERS": '["ONLY@127.0.0.1"]',
        "DICOMNODE_FSYNC": "false",
        "DICOMNODE_RELEASE_QUIET_S": "2.5",
        "DICOMNODE_TLS": '{"cert_file": "/a.crt", "key_file": "/a.key", "ca_file": "/ca.pem", "require_client_cert": true}',
    }
    s = load_settings(cfg, environ=env)
    assert s.ae_title == "SITEA"
    assert s.port == 5555
    assert s.allowed_peers == (Peer("ONLY", "127.0.0.1"),)
    assert s.fsync is False
    assert s.release_quiet_s == 2.5
    assert s.tls.require_client_cert and s.tls.ca_file == "/ca.pem"
    assert load_settings(cfg, environ={}).allowed_peers == (
        Peer("PACS1"),
        Peer("PACS2", "10.0.0.5"),
        Peer("PACS3", "10.1.0.0/16"),
    )


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("portt = 1", {}, "unknown setting"),
        ("port = 70000", {}, "port 70000 out of range"),
        ('ae_title = "THIS_AE_TITLE_IS_TOO_LONG"', {}, "invalid AE title"),
        ("", {"DICOMNODE_FSYNC": "maybe"}, "expected a boolean"),
        ("", {"DICOMNODE_ALLOWED_PEERS": "[not json"}, "expected JSON"),
        ("quiet_period_s = 5\nrelease_quiet_s = 9", {}, "release_quiet_s"),
        ("[tls]\nca_file='x'\nrequire_client_cert=true", {}, "needs both cert_file and key_file"),
        ("not toml =", {}, "not valid TOML"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(write(tmp_path, text), environ=env)


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_reference_lists_every_setting() -> None:
    names = [n for n, _, _ in settings_reference()]
    assert {"ae_title", "allowed_peers", "min_free_disk_mb", "quiet_period_s", "tls"} <= set(names)


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, _, _ in settings_reference():
        assert f"`{name}`" in readme, f"README configuration reference misses {name}"


def test_destinations_as_tables_strings_and_env(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
                   'tls = { ca_file = "/etc/ca.pem" }\n')
    s = load_settings(cfg, environ={})
    assert [d.name for d in s.destinations] == ["PACS@10.0.0.5:104"] and s.destinations[0].tls.enabled
    s = load_settings(None, environ={"DICOMNODE_DESTINATIONS": '["ARCHIVE@pacs.example.org:11112"]'})
    assert (s.destinations[0].ae_title, s.destinations[0].host, s.destinations[0].port) == (
        "ARCHIVE", "pacs.example.org", 11112)
    for bad, message in (('["nohostport"]', "AET@host:port"), ('[{"ae_title": "A", "host": "h", "port": 0}]', "port"),
                         ('[{"ae_title": "A", "host": "h", "port": 1, "colour": "red"}]', "unknown key")):
        with pytest.raises(SettingsError, match=message):
            load_settings(None, environ={"DICOMNODE_DESTINATIONS": bad})


def test_pipeline_mode_and_limits() -> None:
    assert Settings().embedded and Settings().serve_queues == ("cpu", "gpu")
    distributed = Settings().replace(broker_url="redis://127.0.0.1:6379/3")
    assert not distributed.embedded and distributed.serve_queues == ()
    assert distributed.replace(serve_worker="gpu").serve_queues == ("gpu",)
    with pytest.raises(SettingsError, match="visibility timeout"):
        Settings().replace(task_hard_time_limit_s=4000.0)
    with pytest.raises(SettingsError, match="broker_url"):
        Settings().replace(broker_url="amqp://guest@localhost//")
    with pytest.raises(SettingsError, match="serve_worker"):
        Settings().replace(serve_worker="tpu")


def test_torch_threads_auto_by_default_a_count_from_file_or_env_and_never_negative(tmp_path: Path) -> None:
    """0 = auto (the worker's share of the cores, decided where it runs); a positive count is used as given."""
    assert Settings().torch_threads == 0
    assert load_settings(write(tmp_path, "torch_threads = 2"), environ={}).torch_threads == 2
    assert load_settings(None, environ={"DICOMNODE_TORCH_THREADS": "1"}).torch_threads == 1
    with pytest.raises(SettingsError, match="torch_threads"):
        load_settings(None, environ={"DICOMNODE_TORCH_THREADS": "-1"})
    with pytest.raises(SettingsError, match="torch_threads"):
        load_settings(write(tmp_path, 'torch_threads = "many"'), environ={})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DICOMNODE_PORT": "abc"}, "DICOMNODE_PORT: expected an integer, got 'abc'"),
        ({"DICOMNODE_PORT": "11112.5"}, "DICOMNODE_PORT: expected an integer, got '11112.5'"),
        ({"DICOMNODE_QUIET_PERIOD_S": "soon"}, "DICOMNODE_QUIET_PERIOD_S: expected a number, got 'soon'"),
        ({"DICOMNODE_FSYNC": "maybe"}, "DICOMNODE_FSYNC: expected a boolean"),
        ({"DICOMNODE_ALLOWED_PEERS": "[PACS]"}, "DICOMNODE_ALLOWED_PEERS: expected JSON, got '[PACS]'"),
        ({"DICOMNODE_ALLOWED_PEERS": '"PACS"'}, "DICOMNODE_ALLOWED_PEERS: expected a list of peers, got 'PACS'"),
        ({"DICOMNODE_CHECKPOINT_PINS": '["a"]'}, "DICOMNODE_CHECKPOINT_PINS: expected a table family -> checkpoint"),
        ({"DICOMNODE_DESTINATIONS": '[{"ae_title": "A", "host": "h"}]'}, "DICOMNODE_DESTINATIONS: missing key 'port'"),
        ({"DICOMNODE_TLS": '{"cert": "/a.crt"}'},
         "DICOMNODE_TLS: tls has unknown key(s) 'cert' (did you mean cert_file?)"),
        # validation of a value that came from the environment names the variable too
        ({"DICOMNODE_PORT": "70000"}, "DICOMNODE_PORT: port 70000 out of range"),
        ({"DICOMNODE_LOG_LEVEL": "LOUD"}, "DICOMNODE_LOG_LEVEL: log_level 'LOUD' is not"),
        ({"DICOMNODE_TASK_HARD_TIME_LIMIT_S": "5000"}, "DICOMNODE_TASK_HARD_TIME_LIMIT_S: need 0 < task_soft"),
        ({"DICOMNODE_AE_TITLE": ""}, "DICOMNODE_AE_TITLE: invalid AE title ''"),
    ],
)
def test_a_bad_environment_value_names_its_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, environ=env)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_file_value_names_the_file_and_an_unknown_key_the_nearest_setting(tmp_path: Path) -> None:
    cfg = write(tmp_path, "port = 70000")
    with pytest.raises(SettingsError, match=rf"^port 70000 out of range \(1-65535\) \(in {cfg}\)$"):
        load_settings(cfg, environ={})
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) in .*: portt \(did you mean port\?\), zzz$"):
        load_settings(write(tmp_path, "portt = 1\nzzz = 2"), environ={})
    with pytest.raises(SettingsError, match=r"^setting port: expected an integer, got 'abc'"):
        load_settings(write(tmp_path, 'port = "abc"'), environ={})
    with pytest.raises(SettingsError, match=r"^setting port: expected an integer, got 1\.5"):
        load_settings(write(tmp_path, "port = 1.5"), environ={})
    # the environment wins over the file, and a bad value there is named as the variable
    with pytest.raises(SettingsError, match=r"^DICOMNODE_PORT: port 0 out of range"):
        load_settings(write(tmp_path, "port = 4242"), environ={"DICOMNODE_PORT": "0"})


def test_unknown_variables_are_warnings_with_the_nearest_setting() -> None:
    env = {"DICOMNODE_PROT": "11113", "DICOMNODE_PORT": "11112", "DICOMNODE_ZZZ": "1", "HOME": "/root",
           "DICOMNODE_TEST_ARTIFACTS": "/tmp/a"}
    assert unknown_env(env) == ["DICOMNODE_PROT is not a setting (did you mean DICOMNODE_PORT?)",
                                "DICOMNODE_ZZZ is not a setting"]
    assert load_settings(None, environ=env).port == 11112  # a warning: the settings still load
    assert unknown_env({"DICOMNODE_PORT": "1"}) == []
    assert unknown_env({"DICOMNODE_port": "1"}) == ["DICOMNODE_port is not a setting (did you mean DICOMNODE_PORT?)"]


def test_the_http_port_may_not_be_the_dicom_port() -> None:
    """Both would bind one port: the HTTP side first, then the listener would fail with a less clear message."""
    with pytest.raises(SettingsError, match="http_port 11112 is also the DICOM port"):
        load_settings(environ={"DICOMNODE_HTTP_PORT": "11112"})
    assert load_settings(environ={"DICOMNODE_HTTP_PORT": "0", "DICOMNODE_PORT": "11112"}).http_port == 0
