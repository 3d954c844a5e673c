"""The TOML config file and its layering under the environment and the flags (pure parsing, no IO but
files in ``tmp_path``), plus one server started from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastport_anyio import Server
from fastport_core.config import Limits, ServerConfig, SessionSettings, SlowConsumerPolicy
from fastport_core.config_file import ConfigError, Overrides, ServerSettings, SessionSpec, load_settings

from .conftest import RawClient

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastport.toml"

FULL = """
[server]
host = "0.0.0.0"
port = 4000
certfile = "tls/cert.pem"
keyfile = "tls/key.pem"
log_level = "debug"
shutdown_timeout = 2.5
ping_interval = 15
ping_timeout = 7.5
handshake_timeout = 3
slow_consumer_policy = "drop_oldest"
auth_max_failures = 5
auth_throttle_base = 0.25
auth_throttle_max = 10
dedupe_ttl = 60
password_hash_cost = 1024

[limits]
max_message_size = 2048
max_topic_length = 64
max_output_buffer = 65536
max_connections = 50

[defaults]
retryInterval = 2000
maxRetryLimit = 4
messageExpiryTime = 60000
sessionExpiry = 3600000

[admin]
user = "ops"
password = "file-password"

[[sessions]]
name = "demo"
password = "demo-password"

[[sessions]]
name = "ops-managed"
password = "pw"
secretKey = "operator-chosen-secret"
retryInterval = 500
"""


def write(tmp_path: Path, text: str, name: str = "fastport.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings(environ={})
    assert settings == ServerSettings()
    assert (settings.host, settings.port, settings.admin, settings.sessions) == ("127.0.0.1", 3000, None, ())


def test_a_full_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL), environ={})
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 4000, "DEBUG")
    assert settings.shutdown_timeout == 2.5
    assert settings.certfile == tmp_path / "tls" / "cert.pem"  # relative to the file, not the cwd
    assert settings.keyfile == tmp_path / "tls" / "key.pem"
    assert settings.admin is not None
    assert (settings.admin.user, settings.admin.password) == ("ops", "file-password")
    defaults = SessionSettings(
        retry_interval=2.0, max_retry_limit=4, message_expiry_time=60.0, session_expiry=3600.0
    )
    assert settings.config == ServerConfig(
        limits=Limits(
            max_message_size=2048, max_topic_length=64, max_output_buffer=65536, max_connections=50
        ),
        default_session_settings=defaults,
        slow_consumer_policy=SlowConsumerPolicy.DROP_OLDEST,
        ping_interval=15.0,
        ping_timeout=7.5,
        handshake_timeout=3.0,
        auth_max_failures=5,
        auth_throttle_base=0.25,
        auth_throttle_max=10.0,
        dedupe_ttl=60.0,
        password_hash_cost=1024,
    )
    demo, managed = settings.sessions
    assert demo == SessionSpec("demo", "demo-password")  # no settings of its own: the server's defaults
    assert managed.secret_key == "operator-chosen-secret"
    # A session's own keys override [defaults], which fill in the rest.
    assert managed.settings == SessionSettings(
        retry_interval=0.5, max_retry_limit=4, message_expiry_time=60.0, session_expiry=3600.0
    )


def test_trusted_proxies_are_a_list_of_addresses_or_networks(tmp_path: Path) -> None:
    text = "[server]\ntrusted_proxies = ['10.0.0.0/8', '::1']\nauth_failure_budget = 0\n"
    text += "send_ack_received = false\n"
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.config.trusted_proxies == ("10.0.0.0/8", "::1")
    assert settings.config.auth_failure_budget == 0
    assert settings.config.send_ack_received is False


def test_ping_interval_false_disables_keepalive(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[server]\nping_interval = false\n"), environ={})
    assert settings.config.ping_interval is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[limits]\nmax_topic_lenght = 3\n",
            "[limits]: unknown key 'max_topic_lenght' (did you mean 'max_topic_length'?)",
        ),
        ("[server]\nprot = 1\n", "[server]: unknown key 'prot' (did you mean 'port'?)"),
        (
            "[defaults]\nretry_interval = 1\n",
            "[defaults]: unknown key 'retry_interval' (did you mean 'retryInterval'?)",
        ),
        ("[admin]\nusername = 'x'\n", "[admin]: unknown key 'username'"),
        ("[[sessions]]\nname = 'a'\npassword = 'b'\nsecret = 'c'\n", "[sessions #1]: unknown key 'secret'"),
        ("[sever]\nport = 1\n", "[top level]: unknown key 'sever' (did you mean 'server'?)"),
    ],
)
def test_unknown_keys_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = '3000'\n", "[server] port: must be an integer, got a string"),
        ("[server]\nport = 70000\n", "port must be 0-65535"),
        ("[limits]\nmax_topic_length = 1.5\n", "[limits] max_topic_length: must be an integer, got a number"),
        ("[limits]\nmax_topic_length = true\n", "must be an integer, got a boolean"),
        ("[limits]\nmax_topic_length = 0\n", "max_topic_length must be positive"),
        ("[server]\nslow_consumer_policy = 'ignore'\n", "must be one of 'disconnect', 'drop_oldest'"),
        ("[server]\nping_timeout = 'soon'\n", "[server] ping_timeout: must be a number"),
        ("[server]\nlog_level = 'loud'\n", "log level must be one of"),
        ("[server]\npassword_hash_cost = 1000\n", "power of two"),
        ("[server]\ntrusted_proxies = '10.0.0.1'\n", "must be an array of non-empty strings"),
        ("[server]\nsend_ack_received = 1\n", "must be true or false"),
        ("[server]\ntrusted_proxies = ['proxy.local']\n", "'proxy.local' is not an IP address or network"),
        ("[defaults]\nretryInterval = 'fast'\n", "retryInterval must be a number"),
        ("[[sessions]]\nname = 'a'\n", "[sessions #1]: missing key 'password'"),
        ("[[sessions]]\nname = 'a'\npassword = ''\n", "password: must be a non-empty string"),
        ("[[sessions]]\nname='a'\npassword='b'\n[[sessions]]\nname='a'\npassword='c'\n", "declared twice"),
        ("sessions = 3\n", "must be an array of tables"),
        ("server = 3\n", "[server]: must be a table"),
        ("[admin]\nuser = 'ops'\n", "admin password missing"),
        ("[admin]\nuser = 'o:ps'\npassword = 'x'\n", "contain no ':'"),
        ("[server]\nkeyfile = 'key.pem'\n", "a keyfile needs a certfile"),
        ("[server\n", "invalid TOML"),
        (
            "[[sessions]]\nname='a'\npassword='b'\ntokenKey='short'\n",
            "[sessions #1] tokenKey: invalid token key",
        ),
        ("[[sessions]]\nname='a'\npassword='b'\ntokenKey=3\n", "tokenKey: must be a non-empty string"),
        ("[server]\nstore = 's.db'\ncluster = 'nats://n:4222'\n", "give --cluster or --store, not both"),
        ("[server]\ncluster = 'n:4222'\n", "'n:4222' is not a nats:// or tls:// URL"),
        ("[server]\ncluster = 'nats://n:4222'\ncluster_replicas = 7\n", "replicas must be 1 to 5"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text), environ={})
    assert message in str(raised.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_layering_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    environ = {
        "FASTPORT_HOST": "10.0.0.1",
        "FASTPORT_PORT": "5000",
        "FASTPORT_ADMIN_USER": "env-user",
        "FASTPORT_ADMIN_PASSWORD": "env-password",
        "FASTPORT_LOG_LEVEL": "warning",
    }
    from_env = load_settings(path, environ=environ)
    assert (from_env.host, from_env.port, from_env.log_level) == ("10.0.0.1", 5000, "WARNING")
    assert from_env.admin is not None and from_env.admin.user == "env-user"
    assert from_env.admin.password == "env-password"

    flags = Overrides(port=6000, admin_password="flag-password", certfile="/etc/cert.pem")
    from_flags = load_settings(path, environ=environ, overrides=flags)
    assert (from_flags.host, from_flags.port) == ("10.0.0.1", 6000)  # host still from the environment
    assert from_flags.admin is not None
    assert (from_flags.admin.user, from_flags.admin.password) == ("env-user", "flag-password")
    assert from_flags.certfile == Path("/etc/cert.pem")  # a flag's path is taken as given


def test_the_per_address_bound_from_the_file_or_its_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_uninitialised_per_address = 8\nmax_connections = 100\n")
    assert load_settings(path, environ={}).config.limits.max_uninitialised_per_address == 8
    flagged = load_settings(path, environ={}, overrides=Overrides(max_uninitialised_per_address=3))
    assert flagged.config.limits.max_uninitialised_per_address == 3
    assert flagged.config.limits.max_connections == 100  # the file's other limits stay
    assert load_settings(environ={}).config.limits.max_uninitialised_per_address == 64
    with pytest.raises(ConfigError, match=r"--max-uninitialised-per-address: .*positive"):
        load_settings(environ={}, overrides=Overrides(max_uninitialised_per_address=0))


def test_admin_credentials_may_be_split_across_layers(tmp_path: Path) -> None:
    path = write(tmp_path, "[admin]\nuser = 'ops'\n")
    settings = load_settings(path, environ={"FASTPORT_ADMIN_PASSWORD": "from-env"})
    assert settings.admin is not None and (settings.admin.user, settings.admin.password) == (
        "ops",
        "from-env",
    )


def test_empty_environment_variables_count_as_unset() -> None:
    settings = load_settings(environ={"FASTPORT_PORT": "", "FASTPORT_ADMIN_USER": ""})
    assert settings.port == 3000 and settings.admin is None


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FASTPORT_PORT: port must be an integer"):
        load_settings(environ={"FASTPORT_PORT": "http"})


def test_the_cluster_settings_from_the_file_the_environment_and_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\ncluster = 'nats://a:4222, nats://b:4222'\ncluster_ca = 'ca.pem'\n")
    settings = load_settings(path, environ={"FASTPORT_CLUSTER_PASSWORD": "nats-secret"})
    assert settings.cluster == ("nats://a:4222", "nats://b:4222")
    assert settings.cluster_ca == tmp_path / "ca.pem"  # relative to the file
    assert (settings.cluster_password, settings.cluster_replicas) == ("nats-secret", 1)
    assert "nats-secret" not in repr(settings)
    flags = Overrides(cluster="tls://c:4222", cluster_user="fp", cluster_replicas=3)
    settings = load_settings(path, environ={}, overrides=flags)
    assert (settings.cluster, settings.cluster_user, settings.cluster_replicas) == (
        ("tls://c:4222",),
        "fp",
        3,
    )


def test_passwords_stay_out_of_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL), environ={})
    text = repr(settings)
    assert "file-password" not in text and "demo-password" not in text
    assert "operator-chosen-secret" not in text


def test_the_example_config_declares_the_demo_session() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert [(s.name, s.password) for s in settings.sessions] == [("demo", "demo-password")]
    assert (settings.host, settings.port, settings.admin) == ("127.0.0.1", 3000, None)
    assert settings.store is not None
    assert settings.store.resolve() == (EXAMPLE.parent.parent / "data" / "fastport.db").resolve()


@pytest.mark.anyio
async def test_sessions_from_a_file_exist_when_the_server_starts(tmp_path: Path) -> None:
    text = FULL.replace("password_hash_cost = 1024", "password_hash_cost = 16")
    settings = load_settings(write(tmp_path, text), environ={})
    async with Server(
        "127.0.0.1", 0, config=settings.config, sessions=settings.sessions, admin=settings.admin
    ) as server:
        for name, password in (("demo", "demo-password"), ("ops-managed", "pw")):
            async with await RawClient.connect(server.port) as client:
                assert (await client.init(name, password))["success"] is True
        # The file's secret key is the one that authorises dropping the session.
        server.core.drop_session("ops-managed", "pw", "operator-chosen-secret", 0.0)
        assert server.core.session_names() == ["demo"]


@pytest.mark.anyio
async def test_a_session_token_key_from_the_file_signs_its_tokens(tmp_path: Path) -> None:
    import time

    from fastport_core.crypto import generate_key
    from fastport_core.tokens import mint_token

    token_key = generate_key()
    text = f"[server]\npassword_hash_cost = 16\n[[sessions]]\nname = 'a'\npassword = 'pw'\ntokenKey = '{token_key}'\n"
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.sessions[0].token_key == token_key
    assert token_key not in repr(settings)
    async with Server("127.0.0.1", 0, config=settings.config, sessions=settings.sessions) as server:
        assert server.core.broker.token_key("a") == token_key
        token = mint_token(token_key, expires_at=time.time() + 60, session="a")
        async with await RawClient.connect(server.port) as client:
            answer = await client.request({"type": "init", "sessionName": "a", "token": token})
            assert answer["success"] is True
