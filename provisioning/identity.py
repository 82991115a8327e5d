"""Identity and secrets: the user-assigned identity, Key Vault (created or brought), secrets and role assignments.

One ComponentResource. The job and the app use this identity for Key Vault references and image pulls; they
depend on the role assignments, so they are never created before the identity may read (ACA#733 / ACA#1174:
a system-assigned identity does not exist until the app does, so it cannot be granted access in time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import authorization, keyvault, managedidentity

from provisioning import rules

KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
ACR_PULL = "7f951dda-4ed3-4680-a7ca-43fe172d538d"


def parse_vault_id(vault_id: str) -> tuple[str, str]:
    """(resource group, vault name) of a Key Vault resource ID."""
    parts = vault_id.strip("/").split("/")
    return parts[3], parts[-1]


def secret_scope(vault_id: str, secret_name: str) -> str:
    """The ARM scope of one Key Vault secret: a role there reads that secret only [rule kv-least-privilege]."""
    return f"{vault_id.rstrip('/')}/secrets/{secret_name}"


def wait_for_propagation(args: pulumi.ResourceHookArgs, sleep=time.sleep) -> None:
    """After-create hook of every role assignment: Key Vault references and image pulls are resolved when the job's
    and app's revisions are created, which a fresh grant may not have reached yet [rule rbac-propagation].
    Runs only when the assignment is created (not on updates or previews)."""
    sleep(rules.RBAC_PROPAGATION_SECONDS)


@dataclass
class WorkloadIdentityArgs:
    """Inputs of :class:`WorkloadIdentity`."""

    resource_group_name: pulumi.Input[str]
    location: str
    identity_name: str
    subscription_id: pulumi.Input[str]
    tenant_id: pulumi.Input[str]
    vault_name: str | None  # create this vault ...
    existing_vault_id: pulumi.Input[str] | None  # ... or use this one (a string, or the platform stack's output)
    purge_protection: bool
    soft_delete_days: int
    hf_token: pulumi.Input[str] | None  # secret Outputs; None: the secret already exists in the vault
    api_keys: pulumi.Input[str] | None
    hf_token_secret_name: str
    api_keys_secret_name: str
    registry_id: pulumi.Input[str] | None
    protect: bool
    tags: dict[str, str]


class WorkloadIdentity(pulumi.ComponentResource):
    """A user-assigned identity that may read the stack's secrets (and pull its images)."""

    identity_id: pulumi.Output[str]
    client_id: pulumi.Output[str]
    vault_name: pulumi.Output[str]
    vault_uri: pulumi.Output[str]
    hf_token_url: pulumi.Output[str] | None  # None: no HF token (public base models only)
    api_keys_url: pulumi.Output[str]
    grants: list[pulumi.Resource]

    def __init__(self, name: str, args: WorkloadIdentityArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:provisioning:WorkloadIdentity", name, {}, opts)
        child = pulumi.ResourceOptions(parent=self)
        uai = managedidentity.UserAssignedIdentity(
            f"{name}-uai",
            resource_group_name=args.resource_group_name,
            resource_name_=args.identity_name,
            location=args.location,
            tags=args.tags,
            opts=child,
        )
        if args.existing_vault_id:
            existing = pulumi.Output.from_input(args.existing_vault_id)
            vault_id: pulumi.Input[str] = existing
            secrets_rg: pulumi.Input[str] = existing.apply(lambda i: parse_vault_id(i)[0])
            # read with get_vault (never modified): the real vault URI, and a clear error if the vault is missing
            found = keyvault.get_vault_output(resource_group_name=secrets_rg,
                                              vault_name=existing.apply(lambda i: parse_vault_id(i)[1]))
            vault_name_out = found.name
            vault_uri = found.properties.vault_uri
        else:
            vault = keyvault.Vault(
                f"{name}-vault",
                resource_group_name=args.resource_group_name,
                vault_name=args.vault_name,
                location=args.location,
                properties=keyvault.VaultPropertiesArgs(
                    tenant_id=args.tenant_id,
                    sku=keyvault.SkuArgs(family="A", name="standard"),
                    enable_rbac_authorization=True,
                    enable_soft_delete=True,
                    soft_delete_retention_in_days=args.soft_delete_days,
                    # Purge protection cannot be switched off once on; "false" is sent as "not set".
                    enable_purge_protection=True if args.purge_protection else None,
                ),
                tags=args.tags,
                opts=pulumi.ResourceOptions(parent=self, protect=args.protect),
            )
            vault_id, vault_name_out, secrets_rg = vault.id, vault.name, args.resource_group_name
            vault_uri = vault.properties.vault_uri

        def secret_url(key: str, secret_name: str, value: pulumi.Input[str] | None) -> pulumi.Output[str]:
            if value is None:  # brought by the platform team: reference it by its versionless URL
                return vault_uri.apply(lambda u: f"{u.rstrip('/')}/secrets/{secret_name}")
            secret = keyvault.Secret(
                f"{name}-{key}",
                resource_group_name=secrets_rg,
                vault_name=vault_name_out,
                secret_name=secret_name,
                properties=keyvault.SecretPropertiesArgs(value=pulumi.Output.secret(value), content_type="text/plain"),
                opts=child,
            )
            # Versionless URI: ACA picks up new versions (within ~30 min) without a redeploy.
            return secret.properties.secret_uri

        # No token for a vault this stack creates: public base models only, and no secret to reference.
        no_hf_token = args.hf_token is None and args.existing_vault_id is None
        self.hf_token_url = None if no_hf_token else secret_url("hf-token", args.hf_token_secret_name, args.hf_token)
        self.api_keys_url = secret_url("api-keys", args.api_keys_secret_name, args.api_keys)

        def role(role_guid: str) -> pulumi.Output[str]:
            return pulumi.Output.concat(
                "/subscriptions/", args.subscription_id, "/providers/Microsoft.Authorization/roleDefinitions/", role_guid
            )

        # Created grants wait for RBAC propagation before anything that resolves them is created.
        hook = pulumi.ResourceHook(f"{name}-wait-for-rbac-propagation", wait_for_propagation)
        grant_opts = pulumi.ResourceOptions(parent=self, hooks=pulumi.ResourceHookBinding(after_create=[hook]))
        # One grant per secret, scoped to that secret: a role on the vault would read every team's secrets.
        self.grants = [
            authorization.RoleAssignment(
                f"{name}-kv-{key}",
                scope=pulumi.Output.all(vault_id, secret_name).apply(lambda v: secret_scope(v[0], v[1])),
                principal_id=uai.principal_id,
                principal_type="ServicePrincipal",
                role_definition_id=role(KEY_VAULT_SECRETS_USER),
                opts=grant_opts,
            )
            for key, secret_name in (("hf-token", args.hf_token_secret_name), ("api-keys", args.api_keys_secret_name))
            if not (key == "hf-token" and no_hf_token)
        ]
        if args.registry_id is not None:
            self.grants.append(authorization.RoleAssignment(
                f"{name}-acr-pull",
                scope=args.registry_id,
                principal_id=uai.principal_id,
                principal_type="ServicePrincipal",
                role_definition_id=role(ACR_PULL),
                opts=grant_opts,
            ))
        self.identity_id = uai.id
        self.client_id = uai.client_id
        self.vault_name = vault_name_out
        self.vault_uri = vault_uri
        self.vault_id = pulumi.Output.from_input(vault_id)
        self.register_outputs({
            "identity_id": self.identity_id,
            "client_id": self.client_id,
            "vault_name": self.vault_name,
            "vault_uri": self.vault_uri,
        })
