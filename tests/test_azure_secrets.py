"""``lorastack secrets set|list|rm`` on the stack's Key Vault (azure-keyvault-secrets over the fake vault's REST,
with Key Vault's challenge authentication); a value never appears in output."""

from __future__ import annotations

import io

import pytest
from azure_fakes import FakeCredential, client_kwargs, fake, no_ambient_azure, outputs_file

from lorastack.azure.jobs import EXIT_FAILED
from lorastack.cli import build_parser
from lorastack.commands import ops

FIXTURES = (fake, no_ambient_azure, outputs_file)  # pytest fixtures from azure_fakes, used by name
TOKEN = "hf_SuperSecretValue123"


def secrets(fake, argv, stdin=None, environ=None) -> int:
    args = build_parser().parse_args(["secrets", *argv])
    return ops.secrets_command(args, credential=FakeCredential(), client_kwargs=client_kwargs(fake),
                               stdin=stdin, environ=environ or {})


def test_set_from_env_stores_a_new_version_and_says_how_the_job_and_app_pick_it_up(fake, outputs_file, capsys):
    rc = secrets(fake, ["set", "HF_TOKEN", "--from-env", "MY_HF", "--outputs", str(outputs_file)],
                 environ={"MY_HF": TOKEN})
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert fake.secrets == {"hf-token": [TOKEN]}  # HF_TOKEN is the stack's hf-token secret
    assert TOKEN not in out + err
    assert f"secret hf-token set in vault {fake.vault}.vault.azure.net" in out
    assert "the job reads it at executions started after ACA refreshes the reference" in out
    assert "within 30 minutes" in out and "lorastack restart" in out
    vault = [r for r in fake.requests if r.host.endswith("vault.azure.net")]
    # Key Vault's challenge (401 + WWW-Authenticate; the SDK caches it per vault), then the vault-audience token
    assert vault[-1].headers["authorization"] == "Bearer fake-token-vault.azure.net"
    assert all(r.headers.get("authorization", "Bearer fake-token-vault.azure.net").endswith("vault.azure.net")
               for r in vault)


def test_set_from_stdin_and_list_show_names_never_values(fake, outputs_file, capsys):
    assert secrets(fake, ["set", "inference-api-keys", "--stdin", "--outputs", str(outputs_file)],
                   stdin=io.StringIO("key-one,key-two\n")) == 0
    assert fake.secrets["inference-api-keys"] == ["key-one,key-two"]  # the trailing newline is not part of it
    capsys.readouterr()
    assert secrets(fake, ["list", "--outputs", str(outputs_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("inference-api-keys\tenabled\t") and "key-one" not in out


def test_rm_soft_deletes_and_warns_about_references(fake, outputs_file, capsys):
    fake.secrets["hf-token"] = [TOKEN]
    assert secrets(fake, ["rm", "hf-token", "--outputs", str(outputs_file)]) == 0
    out = capsys.readouterr().out
    assert "secret hf-token deleted" in out and "recoverable until" in out and "cannot start" in out
    assert "hf-token" not in fake.secrets


@pytest.mark.parametrize("code,expect", [("ForbiddenByRbac", "Key Vault Secrets Officer"),
                                         ("ForbiddenByFirewall", "refused your network")])
def test_a_403_names_the_role_or_the_firewall(fake, outputs_file, capsys, code, expect):
    fake.kv_deny = code
    rc = secrets(fake, ["set", "hf-token", "--from-env", "V", "--outputs", str(outputs_file)], environ={"V": TOKEN})
    err = capsys.readouterr().err
    assert rc == EXIT_FAILED and expect in err and TOKEN not in err and len(err.strip().splitlines()) == 1


def test_bad_names_and_missing_values_fail_before_any_request(fake, outputs_file, capsys):
    assert secrets(fake, ["set", "my_token", "--from-env", "V", "--outputs", str(outputs_file)],
                   environ={"V": "x"}) == EXIT_FAILED
    assert "'my-token'" in capsys.readouterr().err
    assert secrets(fake, ["set", "hf-token", "--from-env", "UNSET", "--outputs", str(outputs_file)]) == EXIT_FAILED
    assert "$UNSET is not set" in capsys.readouterr().err
    assert secrets(fake, ["set", "hf-token", "--stdin", "--outputs", str(outputs_file)],
                   stdin=io.StringIO("")) == EXIT_FAILED
    assert "the value is empty" in capsys.readouterr().err
    assert not [r for r in fake.requests if r.method == "PUT"]
